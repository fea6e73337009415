"""Benchmarks of hf-stage-attribution: fidelity against replay, cost, recording overhead, memory, distributed.

One command regenerates ``BENCHMARKS.md`` and ``BENCHMARKS.json`` from a fresh run (see ``benchmarks/run.py``)::

    python benchmarks/run.py [--quick] [--output BENCHMARKS.md]

Modules, one per figure: :mod:`.fidelity` (and the costs measured in the same run, :mod:`.cost`),
:mod:`.overhead`, :mod:`.memory`, :mod:`.distributed`; :mod:`.pipelines` builds the pipelines measured,
:mod:`.render` writes the markdown. ``import_memory.py`` (peak memory of ``import-checkpoints``) is a separate script.
"""
