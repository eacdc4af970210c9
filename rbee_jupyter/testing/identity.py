"""An identity provider with several users, for testing a shared (service mode) server.

A plain ``jupyter server`` knows one token and turns it into an anonymous user, so
ownership rules cannot be tried on it. This provider maps tokens to named users (and
marks admins the way JupyterHub's user model does, with an ``admin`` attribute), while
the server's own token still works as before::

    c.ServerApp.identity_provider_class = "rbee_jupyter.testing.identity.TokenUsersIdentityProvider"
    c.TokenUsersIdentityProvider.users = {"alice-token": {"name": "alice"},
                                          "carol-token": {"name": "carol", "admin": True}}
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from jupyter_server.auth.identity import IdentityProvider, User
from traitlets import Dict, TraitError, validate


@dataclass
class TeamUser(User):
    """A named user of a shared server; ``admin`` as JupyterHub's user model has it."""

    admin: bool = False


class TokenUsersIdentityProvider(IdentityProvider):
    """Each configured token is one named user; any other token is checked as usual."""

    users = Dict(
        config=True,
        help="Token → {'name': user name, 'admin': bool}. Requests with one of these tokens "
             "(Authorization: token ..., or ?token=) are that user. Default: none.",
    )

    @validate("users")
    def _check_users(self, proposal: dict[str, Any]) -> dict[str, Any]:
        for token, user in proposal["value"].items():
            if not token or not isinstance(user, dict) or not user.get("name"):
                raise TraitError(f"users[{token!r}] must be {{'name': ..., 'admin': bool}}, got {user!r}.")
        return proposal["value"]

    async def get_user_token(self, handler: Any) -> User | None:
        sent = self.get_token(handler)
        if sent:
            for token, user in self.users.items():
                if hmac.compare_digest(sent.encode(), token.encode()):
                    return TeamUser(username=user["name"], admin=bool(user.get("admin", False)))
        return await super().get_user_token(handler)

    def get_user_cookie(self, handler: Any) -> User | None:
        """No cookie logins: every request names its user by its token (a test client keeps
        cookies, and a cookie from one user must not leak into another's requests)."""
        return None

    def set_login_cookie(self, handler: Any, user: User) -> None:
        return None
