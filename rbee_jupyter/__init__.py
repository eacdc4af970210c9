"""rbee-jupyter: download, load (quantized, layer by layer) and stream local LLMs from Jupyter."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time ``__getattr__`` imports on first use
    from .kernel.client import Client
    from .kernel.inkernel import load_model


def _jupyter_server_extension_points() -> list[dict]:
    """Tell jupyter_server where the extension app lives (imported lazily: torch is heavy)."""
    from .server.app import RbeeApp

    return [{"module": "rbee_jupyter", "app": RbeeApp}]


def load_ipython_extension(ipython) -> None:
    """``%load_ext rbee_jupyter``: registers the ``%rbee`` magics."""
    from .kernel.magics import load_ipython_extension as load

    load(ipython)


def __getattr__(name: str):
    """Lazy exports, so ``import rbee_jupyter`` stays cheap (no httpx, no torch)."""
    if name == "Client":
        from .kernel.client import Client

        return Client
    if name == "load_model":
        from .kernel.inkernel import load_model

        return load_model
    raise AttributeError(f"module 'rbee_jupyter' has no attribute {name!r}")


__all__ = ["Client", "load_model", "load_ipython_extension", "__version__"]
