"""An OpenAI-compatible engine a user controls: what an attacker registers to collect other users' prompts.

It serves one model name, streams a fixed text for every completion, and records every
request it gets (path, ``Authorization`` header, body), so a test sees from the engine's side
whose prompts and keys reached it. ``refuse_with`` makes it answer generations with HTTP 422
and that body instead: what a test uses to check the body is not echoed to users.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
from dataclasses import dataclass, field

TEXT = ["EVIL", " TEXT"]


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    body: dict | None


@dataclass
class Listener:
    """The engine on ``host`` (``::1`` by default); ``url`` is its OpenAI base."""

    model: str
    host: str = "::1"
    refuse_with: str | None = None
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _record(self, body: dict | None) -> None:
                listener.seen.append(Seen(self.command, self.path, self.headers.get("Authorization"), body))

            def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._record(None)
                self._send(200, json.dumps({"object": "list", "data": [{"id": listener.model}]}).encode())

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                self._record(body)
                if listener.refuse_with is not None:
                    self._send(422, json.dumps({"error": {"message": listener.refuse_with}}).encode())
                    return
                chat = self.path.endswith("chat/completions")
                chunks = [{"choices": [{"index": 0, **({"delta": {"content": t}} if chat else {"text": t}),
                                        "finish_reason": None}]} for t in TEXT]
                chunks.append({"choices": [{"index": 0, **({"delta": {}} if chat else {"text": ""}),
                                            "finish_reason": "stop"}]})
                payload = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
                self._send(200, payload, "text/event-stream")

            def log_message(self, *args) -> None:
                pass

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server_class = type("Server", (http.server.ThreadingHTTPServer,), {"address_family": family,
                                                                            "daemon_threads": True})
        self._server = server_class((self.host, 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def prompts(self) -> list[dict]:
        """The bodies of the generations it was sent."""
        return [s.body for s in self.seen if s.method == "POST" and s.body is not None]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
