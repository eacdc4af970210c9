"""Who may do what when one hive serves a whole team (``c.RbeeApp.service_mode``).

A single-user server needs none of this: its user owns everything. A hive shared by
a team must keep three promises: only the owner of a job or worker (or an admin) may
cancel or unload it; ``file://`` refs reach only the folders the administrator lists;
and a hub token one user sends is used for that user's transfers alone. The hive asks
the functions here; the HTTP layer only turns the authenticated Jupyter user into a
:class:`Principal`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import AccessDenied, NotOwner

TOKEN_HEADER = "X-HF-Token"
TOKEN_FIELD = "hf_token"


@dataclass(frozen=True)
class Principal:
    """The caller of a hive method: a user name and whether that user is an admin."""

    name: str
    admin: bool = False


ANYONE = Principal("")
"""Whoever may be listening: what the server-wide feed shows (no one's gated models)."""


def principal_of(user: Any, admin_users: Iterable[str] = ()) -> Principal | None:
    """The principal of a Jupyter ``User`` (None when unauthenticated).

    An identity provider may mark admins itself (an ``admin`` attribute, or the ``admin``
    field of JupyterHub's user model in ``hub_user``); ``admin_users`` names more of them
    in the server's config.
    """
    name = getattr(user, "username", None) if user is not None else None
    if not name:
        return None
    hub_user = getattr(user, "hub_user", None)
    marked = getattr(user, "admin", False) or (isinstance(hub_user, dict) and hub_user.get("admin"))
    return Principal(name, admin=bool(marked) or name in set(admin_users))


def may_control(principal: Principal | None, owner: str | None) -> bool:
    """Whether ``principal`` may cancel or unload what ``owner`` started.

    ``None`` as principal is the hive's own code (shutdown, keep-alive, the CLI): it may.
    Something without an owner (made before service mode, or by the server itself) is
    an admin's to stop.
    """
    if principal is None or principal.admin:
        return True
    return owner is not None and owner == principal.name


def check_control(principal: Principal | None, owner: str | None, *, what: str) -> None:
    """Raise ``NotOwner`` (403) unless ``principal`` may cancel or unload ``what``.

    Args:
        what: the thing named in the message, e.g. ``"download 3f2a…"``.
    """
    if may_control(principal, owner):
        return
    by = f"belongs to {owner}" if owner else "was started by the server itself"
    raise NotOwner(f"The {what} {by}; only its owner or an admin (c.RbeeApp.admin_users) may cancel or unload it.",
                   details={"owner": owner, "user": principal.name if principal else None})


def may_see(principal: Principal | None, owner: str | None, *, shared: bool = False) -> bool:
    """Whether ``principal`` may see (and use) something of ``owner``'s: theirs, an admin, or shared.

    What a user may not see is answered 404, as if it did not exist: an id found in a log
    or guessed confirms nothing.
    """
    return shared or may_control(principal, owner)


#: What users other than its owner see of a shared worker: no URL, owner, process or failure text.
#: Its load counters are public: they are counts and a rate, summed over every user's requests, so
#: they reveal no prompt, text or user, and they are what another user needs to choose between
#: replicas (``load`` was public already and says as much).
PUBLIC_WORKER_FIELDS = ("id", "model_ref", "state", "devices", "memory_mb", "quantization", "dtype", "created_at",
                        "last_used", "layers_loaded", "layers_total", "backend", "model", "name", "shared", "load",
                        "kind", "active_sequences", "queue_length", "batch_size", "max_batch_size",
                        "tokens_per_second")


def public_worker(info: dict[str, Any]) -> dict[str, Any]:
    """A shared worker as other users see it; an engine's ref loses its host (``openai:model``)."""
    out = {k: info[k] for k in PUBLIC_WORKER_FIELDS if k in info}
    if info.get("backend") == "openai":
        out["model_ref"] = f"openai:{info.get('model') or ''}"
    return out


def check_local_path(path: str, allowed_dirs: Iterable[str], *, cache_dir: str | None = None) -> str:
    """``path`` resolved (symlinks followed); ``AccessDenied`` unless that is inside an allowed folder.

    The real path is compared, not the text, so a symlink inside an allowed folder that
    points elsewhere does not open the rest of the machine. The model cache is never a
    local folder, even when listed: a gated model's files there are only handed out
    after the hub said yes.
    """
    real = os.path.realpath(path)
    roots = [os.path.realpath(d) for d in allowed_dirs]
    if cache_dir is not None and _inside(real, os.path.realpath(cache_dir)):
        raise AccessDenied(f"{path} is inside the model cache; ask for the model by its hub ref (hf:org/repo).",
                           details={"path": path})
    if any(_inside(real, root) for root in roots):
        return real
    listed = ", ".join(roots) if roots else "none are listed"
    raise AccessDenied(f"{path} is outside the folders this shared server may read models from ({listed}). "
                       "Ask the administrator to add its folder to c.RbeeApp.allowed_local_dirs, or download "
                       "the model from the hub.", details={"path": path, "allowed_local_dirs": roots})


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def token_fingerprint(token: str) -> str:
    """A short, one-way name for a token: keys downloads apart without keeping the token."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def parse_user_token(header: str | None, body: dict[str, Any] | None) -> str | None:
    """The hub token a request carries (header ``X-HF-Token`` or body field ``hf_token``), removed from the body.

    Raises:
        InvalidRequest: the field is not a non-empty string, or header and body disagree.
    """
    from ..errors import InvalidRequest

    value = body.pop(TOKEN_FIELD, None) if body is not None else None
    if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > 1024):
        raise InvalidRequest(f"{TOKEN_FIELD} must be a hub access token (a non-empty string).",
                             details={"field": TOKEN_FIELD})
    if header is not None and value is not None and header.strip() != value.strip():
        raise InvalidRequest(f"The {TOKEN_HEADER} header and the {TOKEN_FIELD} field carry different tokens; "
                             "send one.", details={"field": TOKEN_FIELD})
    token = (header if header is not None else value or "").strip()
    return token or None
