"""loom: long-context transformer training with 4D parallelism."""

__version__ = "0.1.0"
