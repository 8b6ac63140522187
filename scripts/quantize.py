#!/usr/bin/env python3
"""Offline quantize-and-save: `python scripts/quantize.py [MODEL] OUT --format int4 ...`.

A thin wrapper over `lowbit quantize` (same arguments) for use from a source checkout.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowbit.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["quantize", *sys.argv[1:]]))
