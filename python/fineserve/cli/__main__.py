"""``python -m fineserve.cli``: the command line (tests run it in a process of its own)."""

from . import main

main()
