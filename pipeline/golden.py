"""``python -m pipeline.golden FILE...`` (or ``nanodet-golden FILE...``): parity with the official NanoDet-Plus
on golden files (:mod:`pipeline.tools.golden`). Exit 0 all within tolerance, 1 a check failed, 2 a file
cannot be used."""
from __future__ import annotations

import sys

from pipeline.tools.golden import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
