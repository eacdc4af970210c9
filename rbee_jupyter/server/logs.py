"""Our modules' log records go where the Jupyter server's own lines go.

The core logs through ``logging.getLogger(__name__)`` (it knows nothing of Jupyter), while
a Jupyter server writes its log through its application logger's handlers, with no handler
on the root logger. Without this, our records (an internal error's traceback among them)
would reach the server log only at WARNING and above, through Python's last-resort handler,
unformatted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

PACKAGE = "rbee_jupyter"


def route_package_logs(server_log: logging.Logger) -> Callable[[], None]:
    """Add the server log's handlers to the package logger; returns how to take them off again.

    The package logger's level follows the server's (``--log-level``), and records still
    propagate, so a root handler that someone did install (pytest's, a notebook's) sees them too.
    """
    package = logging.getLogger(PACKAGE)
    source: logging.Logger | None = server_log  # an extension's logger may be a child of the server's
    while source is not None and not source.handlers and source.propagate:
        source = source.parent
    handlers = [] if source is None or source is logging.root else source.handlers  # root: reached anyway
    added = [h for h in handlers if h not in package.handlers]
    for handler in added:
        package.addHandler(handler)
    previous = package.level
    package.setLevel(server_log.getEffectiveLevel())

    def detach() -> None:
        for handler in added:
            package.removeHandler(handler)
        package.setLevel(previous)
    return detach
