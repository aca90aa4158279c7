#!/usr/bin/env python
"""Thin wrapper around `vim2.weights.convert_main` (installed as a console script too); see its --help.

Needs the package installed (`bash tools/setup_env.sh` installs it editable into .venv).
"""
import sys

from vim2.weights import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
