"""``python -m fineserve``: the ``fineserve`` command (the console script's entry point,
``fineserve.cli:main``), for when the script's directory is not on ``PATH``."""

from __future__ import annotations

if __name__ == "__main__":
    # Imported here, not at module level: importing ``fineserve.__main__`` (as tools that
    # scan a package do) should not load the whole command line.
    from fineserve.cli import main

    main()
