#!/usr/bin/env python
"""KerasTuner search over loss weights: ``python scripts/tune.py --variant S --max-trials 10``.

Same options as ``hnseg tune``; rerun the same command to resume a killed search.
"""

import sys
from pathlib import Path

# Runnable from a clone without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hnseg_keras.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
