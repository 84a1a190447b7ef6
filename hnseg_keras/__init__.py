"""hnseg-keras: organ-at-risk segmentation of head-and-neck CT with a residual 2D U-Net."""

__version__ = "0.1.0"
