"""steerserve: an inference server for steered generation."""

__version__ = "0.1.0"
