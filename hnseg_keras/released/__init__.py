"""Package data: one folder per released model (``inference/released.py`` reads them)."""
