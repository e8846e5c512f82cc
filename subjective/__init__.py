"""subjective: an OpenAI-compatible inference server that computes only where it must."""

__version__ = "0.1.0"
