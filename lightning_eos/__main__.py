"""``python -m lightning_eos report LOGDIR ...``: the same command line as ``lightning-eos``."""

import sys

from lightning_eos.cli import main

sys.exit(main())
