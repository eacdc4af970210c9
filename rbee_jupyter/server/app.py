"""``RbeeApp``: the server extension, its configuration, and the hive's lifetime."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Dict, Enum, Float, Int, List, Set, TraitError, Type, Unicode, default, validate
from traitlets.config import Config

from .. import __version__
from ..core.hive import Hive, HiveConfig
from ..core.limits import UserLimits
from ..core.paths import default_cache_dir, default_catalog_path
from ..pools.base import Pool, under_jupyterhub
from ..pools.engines import OpenAIEnginePool
from ..pools.local import LocalProcessPool
from ..protocol import (DOWNLOAD_BACKOFF_S, DOWNLOAD_CONNECTIONS, DOWNLOAD_RETRIES, DOWNLOAD_SEGMENT_MB,
                        DOWNLOAD_SPREAD_BELOW_MBPS, DOWNLOAD_STALL_S, MAX_TOKENS_LIMIT, QUEUE_DEPTH)
from .handlers import handlers
from .openai import openai_handlers

__all__ = ["RbeeApp", "main", "under_jupyterhub"]

#: Settings every pool takes, declared on RbeeApp (hive-wide, documented there) and passed on as c.Pool.*.
_POOL_WIDE = ("keep_alive_s", "loading_timeout_s", "inference_stall_s")
#: Settings that moved to the pool that uses them: old c.RbeeApp name -> (class, trait). The old names
#: still work, with a deprecation warning.
_MOVED = {
    "spare_worker": ("LocalProcessPool", "spare_worker"),
    "ray_address": ("RayPool", "address"),
    "ray_resources": ("RayPool", "resources"),
    "engine_timeout_s": ("OpenAIEnginePool", "timeout_s"),
    "engine_health_interval_s": ("OpenAIEnginePool", "health_interval_s"),
}


def _device_name(value: object, trait: str) -> str:
    from ..engine.devices import is_device_name, normalise_device_name

    name = normalise_device_name(value) if isinstance(value, str) else ""
    if not is_device_name(name):
        raise TraitError(f"c.RbeeApp.{trait}: {value!r} is not a device name; use \"cpu\" or \"cuda:N\".")
    return name


def _pool_wide(trait: Float) -> Float:
    """A pool setting offered on RbeeApp too: the same default and help, declared once on :class:`Pool`."""
    return Float(trait.default_value, allow_none=trait.allow_none, config=True,
                 help=f"{trait.help} Set here, it applies to every pool (c.Pool.* and a pool's own section win).")


class RbeeApp(ExtensionApp):
    """Download, load and serve local LLMs from the Jupyter server (``c.RbeeApp.*``)."""

    name = "rbee"
    version = __version__
    # Only read when launched as an app (`jupyter rbee`, :func:`main`): the hive alone. As a hub
    # service every hub user can reach it, and must not also get its kernels, files or terminals.
    load_other_extensions = False

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
             "lookup (the HF_TOKEN environment variable, then the token saved by `hf auth login`). "
             "In service_mode it serves users' requests only if share_server_token is True.",
    )

    sse_keepalive_s = Float(
        10.0, config=True,
        help="Seconds of silence after which an event stream sends a ': keep-alive' comment, so "
             "proxies and browsers keep the connection open. Default 10.",
    )

    download_stall_s = Float(
        DOWNLOAD_STALL_S, config=True,
        help="Seconds without a single byte after which a transfer counts as stalled and is retried "
             "(after the last retry: DOWNLOAD_STALLED). Default 60.",
    )

    download_retries = Int(
        DOWNLOAD_RETRIES, config=True,
        help="Tries per file for connection resets, stalls and hash mismatches, with exponential "
             "backoff; each try resumes from the partial file. Default 6.",
    )

    download_backoff_s = Float(
        DOWNLOAD_BACKOFF_S, config=True,
        help="First wait between tries of a download, doubled each time (at most 8 s). Default 0.5.",
    )

    download_connections = Int(
        DOWNLOAD_CONNECTIONS, min=1, config=True,
        help="HTTP connections one download uses at once, across the files of a repository and the "
             "ranged segments of its big files (CDNs cap each connection, not the link). 1: one file "
             "after another over one connection. At least 1. Default 8.",
    )

    download_segment_mb = Float(
        DOWNLOAD_SEGMENT_MB, min=0.0625, config=True,
        help="Files of at least twice this many megabytes (2^20 bytes) are fetched as ranged segments "
             "of about this size, several at once, each resumable on its own; smaller files come in one "
             "stream. Servers that ignore ranges always get one stream. At least 0.0625 (64 KiB). Default 8.",
    )

    download_spread_below_mbps = Float(
        DOWNLOAD_SPREAD_BELOW_MBPS, min=0.0, config=True,
        help="A big file's first ranged connection is timed over its first 4 MiB: at this many megabytes "
             "(10^6 bytes) per second or more the server is taken as uncapped (loopback, a LAN mirror) and "
             "the segments go one after another over that one connection, since more would only cost CPU. "
             "Slower, they spread over download_connections (a CDN caps each connection). 0: always spread. "
             "Default 150.",
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
             "rbee_jupyter.pools.base.Pool subclass can be named (e.g. 'rbee_jupyter.pools.ray.RayPool'). "
             "Each pool has settings of its own: c.LocalProcessPool.*, c.RayPool.*, c.OpenAIEnginePool.*, and "
             "c.Pool.* for all of them.",
    )

    ray_address = Unicode(
        None, allow_none=True, config=True,
        help="Deprecated: use c.RayPool.address (this name still works and is passed on).",
    )

    ray_resources = Dict(
        config=True, help="Deprecated: use c.RayPool.resources (this name still works and is passed on).",
    )

    keep_alive_s = Float(
        None, allow_none=True, config=True,
        help="Seconds an idle worker stays loaded before it is unloaded to free its memory (like "
             "Ollama's keep_alive). None: until unloaded by hand. Default: 1800 (30 min) when the "
             "server runs under JupyterHub (JUPYTERHUB_API_TOKEN or JUPYTERHUB_SERVICE_PREFIX is set), "
             "because there a forgotten model holds memory other users need; None otherwise.",
    )

    @default("keep_alive_s")
    def _default_keep_alive(self) -> float | None:
        return 1800.0 if under_jupyterhub() else None

    spare_worker = Bool(
        config=True,
        help="Deprecated: use c.LocalProcessPool.spare_worker (this name still works and is passed on). "
             "Default: True, but False under JupyterHub.",
    )

    @default("spare_worker")
    def _default_spare_worker(self) -> bool:
        return not under_jupyterhub()

    allowed_devices = List(
        Unicode(), default_value=None, allow_none=True, config=True,
        help="Devices this server's workers may use, e.g. [\"cuda:0\", \"cpu\"], so that the users of one "
             "node can be given separate GPUs. A load asking for another device is refused with 400 "
             "DEVICE_NOT_AVAILABLE; device \"auto\" means every allowed GPU, in this order; GET v1/devices "
             "lists only these. Default None: every device of the machine.",
    )

    @validate("allowed_devices")
    def _check_allowed_devices(self, proposal):
        names = proposal["value"]
        return None if names is None else [_device_name(n, "allowed_devices") for n in names]

    device_quota_mb = Dict(
        config=True,
        help="Memory, in MB, this server's workers together may hold per device, e.g. "
             "{\"cuda:0\": 20000, \"cpu\": 8000}, so that one user cannot take a shared GPU. A load whose plan "
             "would go over it spills to the next device it may use, else is refused with 507 QUOTA_EXCEEDED "
             "naming the workers that hold the memory. Loading workers count with their planned size. A "
             "device not listed is limited only by its free memory. Default {}: no quota.",
    )

    @validate("device_quota_mb")
    def _check_quota(self, proposal):
        quota = {}
        for name, mb in proposal["value"].items():
            if isinstance(mb, bool) or not isinstance(mb, (int, float)) or mb < 0:
                raise TraitError(f"c.RbeeApp.device_quota_mb[{name!r}] must be a number of MB >= 0, got {mb!r}.")
            quota[_device_name(name, "device_quota_mb")] = mb
        return quota

    loading_timeout_s = _pool_wide(Pool.loading_timeout_s)
    inference_stall_s = _pool_wide(Pool.inference_stall_s)

    queue_depth = Int(
        QUEUE_DEPTH, config=True,
        help="Generations that may wait for a worker; more are refused with 503 WORKER_BUSY. Default 8.",
    )

    max_tokens_limit = Int(
        MAX_TOKENS_LIMIT, config=True,
        help="Largest max_tokens a request may ask for. Default 4096.",
    )

    max_batch_size = Int(
        None, allow_none=True, config=True,
        help="Generations a worker decodes together in one forward step; more wait in its queue "
             "(queue_depth). 1 turns batching off. None: 8 on a CPU, 32 on a GPU. Default None.",
    )

    kv_budget_mb = Float(
        None, allow_none=True, config=True,
        help="MB of KV cache a worker's running batch may reserve (each request reserves its prompt plus "
             "max_tokens); a request that would exceed it waits in the queue. 0: no limit. None: half the "
             "memory free after loading, at most 4096 MB on a CPU. Default None.",
    )

    @validate("max_batch_size", "kv_budget_mb")
    def _check_batching(self, proposal):
        value, name = proposal["value"], proposal["trait"].name
        low = 1 if name == "max_batch_size" else 0
        if value is not None and value < low:
            raise TraitError(f"c.RbeeApp.{name} must be >= {low} or None, got {value!r}.")
        return value

    service_mode = Bool(
        config=True,
        help="Run as one hive shared by a team (e.g. a JupyterHub service): jobs and workers have an owner "
             "and only the owner or an admin (admin_users) may cancel or unload them; file:// refs are "
             "limited to allowed_local_dirs; each user's hub token (X-HF-Token) serves only that user, and "
             "gated models one user downloaded stay hidden from users without access. Outside it: a "
             "single-user server, whose user owns everything. Default: True when JupyterHub started this "
             "process as a service (JUPYTERHUB_SERVICE_NAME is set), else False.",
    )

    @default("service_mode")
    def _default_service_mode(self) -> bool:
        return bool(os.environ.get("JUPYTERHUB_SERVICE_NAME"))

    admin_users = Set(
        Unicode(), config=True,
        help="User names that may cancel or unload anyone's jobs and workers in service_mode (an identity "
             "provider may also mark admins itself, as JupyterHub's does). Default: none.",
    )

    allowed_local_dirs = List(
        Unicode(), config=True,
        help="Absolute folders whose models users may load with file:// refs in service_mode; a ref must "
             "resolve (symlinks followed) inside one of them, else 403 ACCESS_DENIED. Default: none, so "
             "only hub models. Ignored outside service_mode, where file:// reads any folder.",
    )

    @validate("allowed_local_dirs")
    def _absolute_dirs(self, proposal: dict) -> list[str]:
        relative = [d for d in proposal["value"] if not os.path.isabs(os.path.expanduser(d))]
        if relative:
            raise TraitError(f"c.RbeeApp.allowed_local_dirs must list absolute folders, got {relative}.")
        return [os.path.expanduser(d) for d in proposal["value"]]

    share_server_token = Bool(
        False, config=True,
        help="In service_mode, use hf_token (or HF_TOKEN) for requests of users who send no token of their "
             "own, so everyone can reach what the server's account can. Default False: the server's token "
             "is never used for users' requests. Ignored outside service_mode.",
    )

    max_user_workers = Int(
        4, config=True,
        help="In service_mode, most workers one user (not an admin) may have loading or loaded at once, "
             "external engines included; one more is refused with 429 USER_LIMIT. 0: no cap. Default 4.",
    )

    max_user_downloads = Int(
        2, config=True,
        help="In service_mode, most downloads one user (not an admin) may have running at once (joining a "
             "download already running is free); one more is refused with 429 USER_LIMIT. 0: no cap. Default 2.",
    )

    max_user_streams = Int(
        8, config=True,
        help="In service_mode, most generations one user (not an admin) may have streaming at once, OpenAI "
             "routes included; one more is refused with 429 USER_LIMIT. 0: no cap. Default 8.",
    )

    max_user_jobs = Int(
        100, config=True,
        help="In service_mode, most finished jobs (with their events, for late readers) kept per user; beyond "
             "it that user's oldest are forgotten before job_retention_s. 0: no cap. Default 100.",
    )

    import_memory_mb = Int(
        None, allow_none=True, config=True,
        help="Megabytes of memory a GGUF import may use; it runs in a helper process with this address-space "
             "limit (RLIMIT_AS, on top of its libraries), so a hostile or oversized file fails with OUT_OF_MEMORY "
             "instead of exhausting the server. Default None: the host's available memory when the import starts.",
    )

    def _jupyter_server_config(self) -> dict:
        """Server settings when launched as `jupyter rbee`: in service mode, the hub's auth and address."""
        config = super()._jupyter_server_config()
        if self.service_mode:
            from .hub_auth import service_server_config

            config["ServerApp"].update(service_server_config(tornado_settings=self.serverapp.tornado_settings))
        return config

    engines = List(
        Dict(), config=True,
        help="External OpenAI-compatible engines (vLLM, TGI, llama.cpp server, Ollama /v1, transformers serve) "
             "registered as workers at start, e.g. [{\"name\": \"vllm-70b\", \"url\": \"http://gpu-node:8000/v1\", "
             "\"model\": \"meta-llama/Llama-3.1-70B-Instruct\", \"api_key_env\": \"VLLM_API_KEY\"}]. Each needs url "
             "and model; api_key (or api_key_env, the name of an environment variable of the server holding it), "
             "name (the model name clients use) and shared (in service_mode, whether every user may use it; "
             "default true) are optional. Keys are never shown. Default: none.",
    )

    @validate("engines")
    def _check_engines(self, proposal):
        from ..protocol import EngineSpec

        for entry in proposal["value"]:
            try:
                EngineSpec.from_json(_engine_body(entry))
            except Exception as e:
                raise TraitError(f"c.RbeeApp.engines: {getattr(e, 'message', e)}") from e
        return proposal["value"]

    engine_registration = Enum(
        ["admins", "users"], "admins", config=True,
        help="In service_mode, who may register external engines over HTTP (POST v1/workers with backend "
             "openai): 'admins' (the default), or 'users' (everyone; their URLs are then held to "
             "engine_url_patterns and engine_allowed_networks). An engine belongs to whoever registered it; "
             "only an admin may share it with other users. Ignored outside service_mode.",
    )

    engine_url_patterns = List(
        Unicode(), config=True,
        help="In service_mode, shell-style patterns (e.g. 'https://*.gpu.example.org/v1') one of which the URL "
             "of an engine registered by a user who is not an admin must match, else 403 URL_NOT_ALLOWED. "
             "Default: none, so any http(s) URL whose addresses are public.",
    )

    engine_allowed_networks = List(
        Unicode(), config=True,
        help="In service_mode, networks (CIDR, e.g. '10.1.2.0/24') that engines registered by users who are "
             "not admins may reach although they are not public. Every other loopback, link-local "
             "(169.254.0.0/16, cloud metadata), private or reserved address is refused, checked on the "
             "address a name resolves to at each connection. Default: none.",
    )

    @validate("engine_allowed_networks")
    def _check_networks(self, proposal):
        import ipaddress

        for network in proposal["value"]:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as e:
                raise TraitError(f"c.RbeeApp.engine_allowed_networks: {e}") from e
        return proposal["value"]

    engine_timeout_s = Float(
        OpenAIEnginePool.timeout_s.default_value, config=True,
        help="Deprecated: use c.OpenAIEnginePool.timeout_s (this name still works and is passed on).",
    )

    engine_health_interval_s = Float(
        OpenAIEnginePool.health_interval_s.default_value, allow_none=True, config=True,
        help="Deprecated: use c.OpenAIEnginePool.health_interval_s (this name still works and is passed on).",
    )

    def _pool_config(self) -> Config:
        """The configuration the pools read: this server's, plus what RbeeApp passes on.

        The hive-wide ``c.RbeeApp.keep_alive_s``, ``loading_timeout_s`` and ``inference_stall_s``
        become ``c.Pool.*`` unless that is set (a class's own section, e.g.
        ``c.LocalProcessPool.keep_alive_s``, wins over both, as traitlets does). A moved name
        set on RbeeApp is passed to its new home with a warning, unless the new name is set too.
        """
        config = copy.deepcopy(self.config)
        for name in _POOL_WIDE:
            if name not in config.Pool:
                config.Pool[name] = getattr(self, name)
        for old, (section, new) in _MOVED.items():
            if old in self.config.RbeeApp:
                self.log.warning("rbee: c.RbeeApp.%s is deprecated; use c.%s.%s", old, section, new)
                if new not in config[section]:
                    config[section][new] = self.config.RbeeApp[old]
        return config

    def initialize_settings(self) -> None:
        from .logs import route_package_logs

        self._detach_logs = route_package_logs(self.log)  # e.g. an internal error's traceback
        config = HiveConfig(
            cache_dir=Path(self.cache_dir).expanduser(), catalog_path=Path(self.catalog_path).expanduser(),
            hub_endpoint=self.hub_endpoint or None, hf_token=self.hf_token,
            download_stall_s=self.download_stall_s, download_retries=self.download_retries,
            download_backoff_s=self.download_backoff_s, download_connections=self.download_connections,
            download_segment_mb=self.download_segment_mb, download_spread_below_mbps=self.download_spread_below_mbps,
            max_concurrent_downloads=self.max_concurrent_downloads,
            disk_reserve_mb=self.disk_reserve_mb, job_retention_s=self.job_retention_s,
            pool_class=self.pool_class, queue_depth=self.queue_depth, max_tokens_limit=self.max_tokens_limit,
            max_batch_size=self.max_batch_size, kv_budget_mb=self.kv_budget_mb,
            allowed_devices=self.allowed_devices, device_quota_mb=dict(self.device_quota_mb),
            service_mode=self.service_mode, admin_users=frozenset(self.admin_users),
            allowed_local_dirs=tuple(self.allowed_local_dirs), share_server_token=self.share_server_token,
            parent=self, pool_config=self._pool_config(),
            engine_registration=self.engine_registration, engine_url_patterns=tuple(self.engine_url_patterns),
            engine_allowed_networks=tuple(self.engine_allowed_networks),
            user_limits=UserLimits(workers=self.max_user_workers, downloads=self.max_user_downloads,
                                   streams=self.max_user_streams, kept_jobs=self.max_user_jobs),
            import_memory_mb=self.import_memory_mb,
        )
        self.hive = Hive(config)
        pool = self.hive.pool.primary
        self.log.info("rbee: cache %s, hub %s", config.cache_dir, config.hub_endpoint)
        self.log.info("rbee: keep_alive_s=%s%s, allowed_devices=%s, device_quota_mb=%s, pool %s",
                      pool.keep_alive_s, " (under JupyterHub)" if under_jupyterhub() else "",
                      config.allowed_devices, config.device_quota_mb, type(pool).__name__)
        if config.service_mode:
            self.log.info("rbee: service mode; admins: %s; file:// folders: %s; server token shared: %s",
                          ", ".join(sorted(config.admin_users)) or "none",
                          ", ".join(config.allowed_local_dirs) or "none", config.share_server_token)
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
        from ..core.feed import ensure_feed
        from ..kernel.kernel_env import publish

        publish(serverapp, with_token=not self.service_mode)  # a shared hive's token stays in the server
        ensure_feed(self.hive)  # from now on, so resuming clients find what happened
        self.hive.pool.warm_up()  # e.g. the spare worker's imports, while the user opens a notebook
        for entry in self.engines:  # registered in the background: an engine that is down shows as failed
            job = self.hive.load({"shared": True, **_engine_body(entry)})  # the administrator's: the team's
            self.log.info("rbee: engine %s at %s registering as worker %s", entry.get("name") or entry.get("model"),
                          entry.get("url"), job.id)

    async def stop_extension(self) -> None:
        from ..kernel.kernel_env import unpublish

        unpublish()
        from ..core.feed import FeedJob

        if isinstance(self.hive.feed, FeedJob):  # its streams end with [DONE] before the server goes
            await self.hive.feed.close()
        await self.hive.stop()
        self._detach_logs()


def main(argv: list[str] | None = None) -> None:
    """``jupyter rbee``: the hive as a server of its own, e.g. once per node as a JupyterHub service.

    A hub starts it as a managed service (``c.JupyterHub.services``, ``command: ["jupyter-rbee"]``);
    the hub's environment switches on :attr:`RbeeApp.service_mode`.
    """
    RbeeApp.launch_instance(argv)
def _engine_body(entry: dict) -> dict:
    """A configured engine as a ``POST v1/workers`` body; ``api_key_env`` names the variable holding the key.

    Only the administrator's configuration may read the server's environment: the HTTP API
    never does, or a user could send any variable's value to a URL of their choosing.
    """
    body = {"backend": "openai", **{k: v for k, v in entry.items() if k != "api_key_env"}}
    if entry.get("api_key_env"):
        body["api_key"] = os.environ.get(str(entry["api_key_env"])) or None
    return body
