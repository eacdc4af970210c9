"""Service mode: the hub says who is calling (its API tokens and its OAuth), and what they may do.

When one hive serves a whole JupyterHub node, it runs as a hub service (``jupyter rbee``
started by the hub, reached at ``/services/rbee/``). Users arrive with their own hub
tokens (``Authorization: token ...``, e.g. ``%rbee connect URL --token T``) or a browser
session (the hub's OAuth, started at ``/services/rbee/login``, with its callback at
``/services/rbee/oauth_callback``); the
hub decides whether they hold the service's access scope (``JUPYTERHUB_OAUTH_ACCESS_SCOPES``,
granted to users by a role with ``access:services!service=rbee``).

This reuses JupyterHub's own single-user identity provider (token, cookie, OAuth state and
its ``_xsrf`` rules for cookie sessions) and adds what the hive needs on top:

* every user carries ``admin`` (a hub admin, or listed in ``c.RbeeApp.admin_users``), which
  ownership checks read;
* the authorizer grants the ``rbee`` resource only: a process every hub user can reach must
  not hand them kernels, files or terminals of the account it runs as.

jupyterhub is an optional dependency (``pip install rbee-jupyter[hub]``); only this module
imports it. The hub's side, in ``jupyterhub_config.py`` (what tests/test_jupyterhub.py runs)::

    c.JupyterHub.services = [{"name": "rbee", "url": "http://127.0.0.1:10101",
                              "command": ["jupyter-rbee"], "oauth_no_confirm": True}]
    c.JupyterHub.load_roles = [{"name": "user", "scopes": ["self", "access:services!service=rbee"]}]
    # optional: kernels reach the service with their server's own token (`%rbee connect URL`, or
    # RBEE_SERVER_URL set for single-user servers that do not run the extension themselves)
    c.Spawner.server_token_scopes = ["users:activity!user", "access:servers!server",
                                     "access:services!service=rbee"]

The hub must see the service answer within about 10 s of starting it, or it exits.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlparse

from jupyter_server.auth import Authorizer
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from jupyterhub.singleuser.extension import JupyterHubIdentityProvider, JupyterHubUser
from tornado import web

from .handlers import AUTH_RESOURCE

__all__ = ["HubUser", "HubServiceIdentityProvider", "HubServiceAuthorizer", "HubLoginHandler",
           "service_server_config"]


class HubUser(JupyterHubUser):
    """A hub user or service as the handlers see it; ``hub_user`` is the hub's model of it."""

    admin: bool
    """May act on everyone's jobs and workers: a hub admin, or named in ``c.RbeeApp.admin_users``."""

    def __init__(self, hub_user: dict[str, Any], *, admin: bool) -> None:
        super().__init__(hub_user)
        self.admin = admin


class HubServiceIdentityProvider(JupyterHubIdentityProvider):
    """Hub tokens and OAuth cookies, with users that know whether they are admins.

    The hub's admin flag comes with the caller's own model when its token may read it
    (a user's API token can); tokens that may not (e.g. OAuth tokens limited to the name)
    count as non-admin unless the name is in ``c.RbeeApp.admin_users``.
    """

    async def get_user(self, handler: Any) -> HubUser | None:
        user = await super().get_user(handler)
        if user is None or isinstance(user, HubUser):
            return user
        hub_user = user.hub_user
        app = handler.settings.get("rbee")  # the RbeeApp (ExtensionApp puts itself under its name)
        admins = set(getattr(app, "admin_users", None) or ())
        hub_user_admin = hub_user.get("kind", "user") == "user" and bool(hub_user.get("admin"))
        found = HubUser(hub_user, admin=hub_user_admin or hub_user["name"] in admins)
        handler._jupyterhub_user = found  # what the base class caches for this request
        return found

    def get_handlers(self) -> list[tuple[str, Any]]:
        return [*super().get_handlers(), ("/login", HubLoginHandler)]

    def identity_model(self, user: Any) -> dict[str, Any]:
        """``GET api/me`` says whether the caller is an admin (the sidebar offers more to admins)."""
        model = super().identity_model(user)
        model["admin"] = bool(getattr(user, "admin", False))
        return model


class HubLoginHandler(JupyterHandler):
    """``GET login?next=PATH``: a browser's way in, since the service has no page of its own.

    API routes answer 403 rather than start the hub's OAuth; this page starts it (when
    there is no session yet), then sends the browser on to ``next``, a path of this service
    (default: the model list), with the session cookie and ``_xsrf`` set.
    """

    @web.authenticated
    def get(self) -> None:
        home = url_path_join(self.base_url, "rbee/v1/models")
        next_url = self.get_argument("next", "") or home
        if not next_url.startswith(self.base_url) or next_url.startswith("//") or "\\" in next_url:
            next_url = home  # never an open redirect
        self.redirect(next_url)


class HubServiceAuthorizer(Authorizer):
    """Users holding the service's access scope may use the hive's API, and nothing else here."""

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        if resource != AUTH_RESOURCE or not isinstance(user, HubUser):
            return False
        hub_auth = self.identity_provider.hub_auth
        return bool(hub_auth.check_scopes(hub_auth.access_scopes, user.hub_user))


def service_server_config(environ: dict[str, str] | None = None, *,
                          tornado_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``c.ServerApp`` settings for running as a hub service, from the environment the hub sets.

    The hub tells a managed service where to listen (``JUPYTERHUB_SERVICE_URL``) and under
    which prefix the proxy forwards to it (``JUPYTERHUB_SERVICE_PREFIX``); those win over
    config files, since the proxy's route is fixed by the hub. Tornado's own ``_xsrf`` check
    is off as in the hub's single-user servers: it runs before authentication, so it would
    refuse token-authenticated POSTs; the server checks ``_xsrf`` after authentication, for
    cookie sessions only.

    Args:
        environ: the environment to read (default ``os.environ``).
        tornado_settings: the server's configured ``tornado_settings``, kept apart from ``xsrf_cookies``.

    Raises:
        RuntimeError: the variables are missing (not started by a hub, or no ``url`` set for
            the service in ``c.JupyterHub.services``).
    """
    env = os.environ if environ is None else environ
    url = env.get("JUPYTERHUB_SERVICE_URL")
    if not url or not env.get("JUPYTERHUB_API_TOKEN"):
        raise RuntimeError(
            "rbee service mode needs the environment JupyterHub gives a managed service "
            "(JUPYTERHUB_SERVICE_URL, JUPYTERHUB_API_TOKEN, ...): start `jupyter rbee` from "
            "c.JupyterHub.services with a 'url', or set c.RbeeApp.service_mode = False.")
    where = urlparse(url)
    port = where.port or (443 if where.scheme == "https" else 80)
    return {
        "identity_provider_class": f"{__name__}.HubServiceIdentityProvider",
        "authorizer_class": f"{__name__}.HubServiceAuthorizer",
        "ip": where.hostname or "127.0.0.1", "port": port, "port_retries": 0,
        "base_url": env.get("JUPYTERHUB_SERVICE_PREFIX") or "/",
        "open_browser": False, "trust_xheaders": True, "terminals_enabled": False,
        "tornado_settings": {**(tornado_settings or {}), "xsrf_cookies": False},
    }
