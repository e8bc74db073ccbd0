"""rmskit: build real-world multimodal safety datasets image-first, and score safety datasets."""

__version__ = "0.1.0"
