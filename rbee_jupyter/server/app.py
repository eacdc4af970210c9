"""``RbeeApp``: the server extension, its configuration, and the hive's lifetime."""

from __future__ import annotations

import os
from pathlib import Path

from jupyter_server.extension.application import ExtensionApp
from traitlets import Float, Int, Type, Unicode, default

from .. import __version__
from ..hive import Hive, HiveConfig
from ..paths import default_cache_dir, default_catalog_path
from ..pool import LocalProcessPool, Pool
from .handlers import handlers
from .openai import openai_handlers


class RbeeApp(ExtensionApp):
    """Download, load and serve local LLMs from the Jupyter server (``c.RbeeApp.*``)."""

    name = "rbee"
    version = __version__
    load_other_extensions = True

    cache_dir = Unicode(
        config=True,
        help="Folder models are downloaded into, in huggingface_hub's cache layout so transformers "
             "finds them. Default: huggingface_hub's cache (HF_HUB_CACHE, else HF_HOME/hub, else "
             "~/.cache/huggingface/hub). On JupyterHub, point every server at one shared folder.",
    )

    @default("cache_dir")
    def _default_cache_dir(self) -> str:
        return default_cache_dir()

    catalog_path = Unicode(
        config=True,
        help="SQLite file that lists the downloaded models. Default: <jupyter data dir>/rbee/catalog.sqlite.",
    )

    @default("catalog_path")
    def _default_catalog_path(self) -> str:
        return default_catalog_path()

    hub_endpoint = Unicode(
        config=True,
        help="Base URL of the Hugging Face hub (or a mirror). Default: the HF_ENDPOINT environment "
             "variable, else https://huggingface.co.",
    )

    @default("hub_endpoint")
    def _default_endpoint(self) -> str:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")

    hf_token = Unicode(
        None, allow_none=True, config=True,
        help="Hub access token for gated or private models. Default None: huggingface_hub's own "
             "lookup (the HF_TOKEN environment variable, then the token saved by `hf auth login`).",
    )

    sse_keepalive_s = Float(
        10.0, config=True,
        help="Seconds of silence after which an event stream sends a ': keep-alive' comment, so "
             "proxies and browsers keep the connection open. Default 10.",
    )

    download_stall_s = Float(
        60.0, config=True,
        help="Seconds without a single byte after which a transfer counts as stalled and is retried "
             "(after the last retry: DOWNLOAD_STALLED). Default 60.",
    )

    download_retries = Int(
        6, config=True,
        help="Tries per file for connection resets, stalls and hash mismatches, with exponential "
             "backoff; each try resumes from the partial file. Default 6.",
    )

    download_backoff_s = Float(
        0.5, config=True,
        help="First wait between tries of a download, doubled each time (at most 8 s). Default 0.5.",
    )

    max_concurrent_downloads = Int(
        2, config=True,
        help="Downloads running at once; more wait in line (their streams say so). Default 2.",
    )

    disk_reserve_mb = Int(
        0, config=True,
        help="Megabytes that must stay free on the cache's disk after a download; a download that "
             "would eat into them is refused with INSUFFICIENT_DISK before its first byte. Default 0.",
    )

    job_retention_s = Float(
        600.0, config=True,
        help="Seconds a finished job (and its event log) stays reachable, for late subscribers and "
             "Last-Event-ID resumes. Default 600.",
    )

    max_body_bytes = Int(
        1 << 20, config=True,
        help="Largest JSON request body accepted, in bytes; larger ones get 413. Default 1 MiB.",
    )

    pool_class = Type(
        default_value=LocalProcessPool, klass=Pool, config=True,
        help="Where workers run: the default starts one local process per loaded model. Any "
             "rbee_jupyter.pool.Pool subclass can be named (e.g. a Ray or external-engine pool).",
    )

    keep_alive_s = Float(
        None, allow_none=True, config=True,
        help="Seconds an idle worker stays loaded before it is unloaded to free its memory (like "
             "Ollama's keep_alive). Default None: until unloaded by hand.",
    )

    loading_timeout_s = Float(
        1800.0, allow_none=True, config=True,
        help="Seconds a load may take before it fails with LOADING_TIMEOUT (naming the layer it was "
             "at) and its worker is stopped. None: no limit. Default 1800.",
    )

    inference_stall_s = Float(
        120.0, allow_none=True, config=True,
        help="Seconds a started generation may go without producing a token before it is stopped "
             "with INFERENCE_STALLED. None: no limit. Default 120.",
    )

    queue_depth = Int(
        8, config=True,
        help="Generations that may wait for a worker; more are refused with 503 WORKER_BUSY. Default 8.",
    )

    max_tokens_limit = Int(
        4096, config=True,
        help="Largest max_tokens a request may ask for. Default 4096.",
    )

    def initialize_settings(self) -> None:
        config = HiveConfig(
            cache_dir=Path(self.cache_dir).expanduser(), catalog_path=Path(self.catalog_path).expanduser(),
            hub_endpoint=self.hub_endpoint or None, hf_token=self.hf_token,
            download_stall_s=self.download_stall_s, download_retries=self.download_retries,
            download_backoff_s=self.download_backoff_s, max_concurrent_downloads=self.max_concurrent_downloads,
            disk_reserve_mb=self.disk_reserve_mb, job_retention_s=self.job_retention_s,
            pool_class=self.pool_class, keep_alive_s=self.keep_alive_s, loading_timeout_s=self.loading_timeout_s,
            inference_stall_s=self.inference_stall_s,
            queue_depth=self.queue_depth, max_tokens_limit=self.max_tokens_limit,
        )
        self.hive = Hive(config)
        self.log.info("rbee: cache %s, hub %s", config.cache_dir, config.hub_endpoint)
        if incomplete := self.hive.incomplete_downloads():  # e.g. the last server was killed mid-transfer
            self.log.warning("rbee: %d unfinished download(s) in %s (%s); downloading the model again resumes "
                             "them, GET rbee/v1/models lists them", len(incomplete), config.cache_dir,
                             ", ".join(sorted({i["repo_id"] for i in incomplete})))

    def initialize_handlers(self) -> None:
        from .handlers import NotFoundHandler

        self.handlers.extend(handlers(self) + openai_handlers({"app": self})
                             + [(r"/rbee/.*", NotFoundHandler, {"app": self})])  # last: what nothing else matched

    async def _start_jupyter_server_extension(self, serverapp) -> None:
        """Kernels started from now on find this server (``RBEE_SERVER_URL`` / ``RBEE_TOKEN``).

        Runs once the server listens, so the published port is the real one.
        """
        from ..feed import ensure_feed
        from ..kernel_env import publish

        publish(serverapp)
        ensure_feed(self.hive)  # from now on, so resuming clients find what happened

    async def stop_extension(self) -> None:
        from ..kernel_env import unpublish

        unpublish()
        from ..feed import FeedJob

        if isinstance(self.hive.feed, FeedJob):  # its streams end with [DONE] before the server goes
            await self.hive.feed.close()
        await self.hive.stop()
