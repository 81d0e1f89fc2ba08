"""`python -m fedblock.client ARGS` is `fedblock worker ARGS`: the entry point torchrun starts on each rank."""

import sys

from ..common.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
