"""``python -m hf_stage_attribution``: the ``hf-stage-attribution`` command, also under ``torchrun -m`` or
``accelerate launch -m`` where a module is easier to name than the console script."""

from __future__ import annotations

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
