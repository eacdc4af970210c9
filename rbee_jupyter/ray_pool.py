"""The old home of the Ray pool, kept so that ``pool_class = "rbee_jupyter.ray_pool.RayPool"`` in
existing configs still works. New configs name ``rbee_jupyter.pools.ray.RayPool``."""
from .pools.ray import RayPool

__all__ = ["RayPool"]
