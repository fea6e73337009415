"""Stage embeddings ``v_k`` (ESTIMATORS.md §3): ``cache`` reads and validates the cached file beside the ledger,
``write`` computes one stage at a time per tensor and writes it atomically."""
