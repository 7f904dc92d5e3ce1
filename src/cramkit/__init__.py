"""cramkit: train transformer language models efficiently under a fixed budget."""

__version__ = "0.1.0"
