"""``python -m rbee_jupyter.worker``: one model, one process (see :mod:`rbee_jupyter.worker`)."""

from .server import main

raise SystemExit(main())
