"""``python -m tests.fakeollama ARGS``, or ``python tests/fakeollama ARGS`` (the directory).

Run as a directory, this file is a top-level script with the package's own directory
first on sys.path; put its parent there instead and import the package by its name, so
the relative imports inside it work and its module names shadow nothing.
"""

import sys

if __package__:
    from .process import main
else:
    import importlib
    from pathlib import Path

    here = Path(__file__).resolve().parent
    sys.path[0] = str(here.parent)
    main = importlib.import_module(f"{here.name}.process").main

sys.exit(main())
