"""rbee-jupyter: download, load (quantized, layer by layer) and stream local LLMs from Jupyter."""

__version__ = "0.1.0"
