"""``python -m dfquant ...``: the command line (also ``torchrun --nproc-per-node N -m dfquant ...``)."""
import sys

from .cli import main

sys.exit(main())
