"""End-to-end example pipelines used by the demo, the recipes and the benchmarks (tiny, offline, recorded)."""
