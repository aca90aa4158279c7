#!/usr/bin/env python
"""Thin wrapper around `vim2.weights.export_main` (installed as a console script too); see its --help."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vim2.weights import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
