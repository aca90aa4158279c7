#!/usr/bin/env python
"""Thin wrapper around `vim2.weights.export_main` (installed as a console script too); see its --help.

Needs the package installed (`bash tools/setup_env.sh` installs it editable into .venv).
"""
import sys

from vim2.weights import export_main

if __name__ == "__main__":
    sys.exit(export_main())
