"""``python -m cellgap.study ...`` — the study from one process, one job per run (``--only``), or one rank per GPU:
``torchrun --nproc-per-node N -m cellgap.study ...`` (docs/study.md)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
