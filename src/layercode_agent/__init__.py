"""layercode-agent: the Python backend for Layercode voice agents."""

__version__ = "0.1.0"

__all__ = ["__version__"]
