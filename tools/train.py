#!/usr/bin/env python
"""Thin wrapper around `vim2.train.main` (installed as a console script too); see its --help.

Needs the package installed (`bash tools/setup_env.sh` installs it editable into .venv).
"""
import sys

from vim2.train import main

if __name__ == "__main__":
    sys.exit(main())
