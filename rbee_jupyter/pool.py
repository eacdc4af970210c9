"""The old home of the local pool, kept so that ``pool_class = "rbee_jupyter.pool.LocalProcessPool"`` in
existing configs still works. New configs name ``rbee_jupyter.pools.local.LocalProcessPool``."""
from .pools.base import Pool
from .pools.local import LocalProcessPool

__all__ = ["LocalProcessPool", "Pool"]
