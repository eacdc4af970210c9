"""Per-user caps of a shared hive: one user cannot take every worker, download slot or stream.

The hive counts what a user holds from its own registries (jobs and workers carry their
owner) at the moment of a new request, so nothing is reserved or released by hand and a
crash cannot leak a slot. Caps apply in service mode to users who are not admins; on a
single-user server the user is the admin and nothing is capped.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserLimit

__all__ = ["UserLimits", "check_cap"]

_TRAITS = {"workers": "max_user_workers", "downloads": "max_user_downloads", "streams": "max_user_streams"}
_WHAT = {"workers": ("worker", "workers", " (loading or loaded, engines included)"),
         "downloads": ("download", "downloads", " running"), "streams": ("generation", "generations", " streaming")}


def _held(cap: str, n: int) -> str:
    one, many, how = _WHAT[cap]
    return f"{n} {one if n == 1 else many}{how}"


@dataclass(frozen=True)
class UserLimits:
    """The caps; 0 means no cap. ``kept_jobs`` bounds finished jobs kept per user for late readers."""

    workers: int = 0
    downloads: int = 0
    streams: int = 0
    kept_jobs: int = 0


def check_cap(cap: str, limit: int, held: int, user: str) -> None:
    """Raise :class:`UserLimit` when ``user`` already holds ``limit`` of ``cap`` (``limit`` 0: no cap).

    Raises:
        UserLimit: 429, naming the cap and the trait that sets it.
    """
    if limit <= 0 or held < limit:
        return
    trait = f"c.RbeeApp.{_TRAITS[cap]}"
    raise UserLimit(f"{user} already has {_held(cap, held)}, the most one user may have on this shared hive "
                    f"({trait} = {limit}). Stop one first, or ask an administrator to raise {trait}.",
                    details={"cap": cap, "limit": limit, "held": held, "trait": trait, "user": user})
