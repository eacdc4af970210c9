"""Test helpers anyone can use: tiny models made on the spot and a local hub server."""

from .tiny_model import make_tiny_model, make_tokenizer

__all__ = ["make_tiny_model", "make_tokenizer"]
