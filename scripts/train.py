#!/usr/bin/env python
"""Train a residual U-Net: ``python scripts/train.py --variant S`` (same options as ``hnseg train``).

Without ``--data`` the built-in phantom data set is prepared on first use (into ``tfrecords/``).
"""

import sys
from pathlib import Path

# Runnable from a clone without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hnseg_keras.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
