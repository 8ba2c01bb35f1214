"""CPU inference service for bidirectional GRU models trained on GPU with cuDNN."""

__version__ = "0.1.0"
