"""``python -m pipeline.tune sweep=NAME [options] [config overrides]``: a Ray Tune sweep
(:func:`pipeline.tune.driver.main`; options in its docstring)."""
from __future__ import annotations

import sys

from pipeline.tune.driver import main

if __name__ == "__main__":
    sys.exit(main())
