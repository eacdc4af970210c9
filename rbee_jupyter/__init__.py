"""rbee-jupyter: download, load (quantized, layer by layer) and stream local LLMs from Jupyter."""

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict]:
    """Tell jupyter_server where the extension app lives (imported lazily: torch is heavy)."""
    from .server.app import RbeeApp

    return [{"module": "rbee_jupyter", "app": RbeeApp}]
