"""The ``hf-stage-attribution`` command line (one module per sub-command)."""
