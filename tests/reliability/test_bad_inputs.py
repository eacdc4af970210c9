"""Malformed HTTP input against a real ``jupyter server`` process: each is a 4xx JSON error.

Every case names the status and the error code the client gets; after all of them the
same server still answers a normal request and its process is alive. The server and
the worker are the session's (tests/conftest.py), so a case that broke them would break
every later test too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from rbee_jupyter.testing.pytest_plugin import TINY_REPO

TINY = f"hf:{TINY_REPO}"
WORKER = "<worker>"  # replaced by the session worker's id
PROMPT = "Once upon a time"


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    status: int
    code: str
    body: Any = None  # JSON-encoded unless ``raw`` is given
    raw: bytes | None = None

    def request(self, server, worker_id: str) -> httpx.Response:
        path = self.path.replace(WORKER, worker_id)
        if self.raw is not None:
            content = self.raw
        elif self.body is None:
            content = b""
        else:  # keep lone surrogates and NaN as escapes, exactly as a hostile client would send them
            content = json.dumps(_with_worker(self.body, worker_id)).encode()
        return server.client.request(self.method, path, content=content, headers={"Content-Type": "application/json"},
                                     timeout=30)


def _with_worker(body: Any, worker_id: str) -> Any:
    if isinstance(body, dict):
        return {k: worker_id if v == WORKER else v for k, v in body.items()}
    return body


def infer(**fields) -> dict[str, Any]:
    return {"worker_id": WORKER, "prompt": PROMPT, "max_tokens": 4, **fields}


def chat(**fields) -> dict[str, Any]:
    return {"model": TINY_REPO, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


BIG = 2 << 20  # over the default max_body_bytes (1 MiB)

CASES = [
    # --- not JSON, not an object, too big ---------------------------------------------
    Case("download: body is not JSON", "POST", "v1/models/download", 400, "INVALID_REQUEST", raw=b"{model_ref:"),
    Case("download: empty body", "POST", "v1/models/download", 400, "INVALID_REQUEST", raw=b""),
    Case("download: body is an array", "POST", "v1/models/download", 400, "INVALID_REQUEST", body=[TINY]),
    Case("download: body is a string", "POST", "v1/models/download", 400, "INVALID_REQUEST", body=TINY),
    Case("download: body is null", "POST", "v1/models/download", 400, "INVALID_REQUEST", raw=b"null"),
    Case("download: body is not UTF-8", "POST", "v1/models/download", 400, "INVALID_REQUEST", raw=b'{"a": "\xff\xfe"}'),
    Case("download: body is nested 100000 deep", "POST", "v1/models/download", 400, "INVALID_REQUEST",
         raw=b"[" * 100_000 + b"]" * 100_000),
    Case("download: body over max_body_bytes", "POST", "v1/models/download", 413, "BODY_TOO_LARGE",
         raw=b'{"model_ref": "' + b"a" * BIG + b'"}'),
    Case("workers: body over max_body_bytes", "POST", "v1/workers", 413, "BODY_TOO_LARGE", raw=b" " * BIG),
    Case("workers: body is an array", "POST", "v1/workers", 400, "INVALID_REQUEST", body=[{"model_ref": TINY}]),
    Case("inference: empty body", "POST", "v1/inference", 400, "INVALID_REQUEST", raw=b""),
    Case("inference: body is a number", "POST", "v1/inference", 400, "INVALID_REQUEST", raw=b"42"),
    Case("openai chat: body is not JSON", "POST", "openai/v1/chat/completions", 400, "invalid_request", raw=b"{"),
    Case("openai completions: empty body", "POST", "openai/v1/completions", 400, "invalid_request", raw=b""),
    # --- wrong types and values --------------------------------------------------------
    Case("download: model_ref missing", "POST", "v1/models/download", 400, "INVALID_MODEL_REF", body={}),
    Case("download: model_ref is a number", "POST", "v1/models/download", 400, "INVALID_MODEL_REF",
         body={"model_ref": 7}),
    Case("download: model_ref is an object", "POST", "v1/models/download", 400, "INVALID_MODEL_REF",
         body={"model_ref": {"repo": TINY_REPO}}),
    Case("download: model_ref 100k chars", "POST", "v1/models/download", 400, "INVALID_MODEL_REF",
         body={"model_ref": "hf:" + "a" * 100_000}),
    Case("workers: device is a number", "POST", "v1/workers", 400, "INVALID_REQUEST",
         body={"model_ref": TINY, "device": 0}),
    Case("workers: device list of numbers", "POST", "v1/workers", 400, "INVALID_REQUEST",
         body={"model_ref": TINY, "device": [0, 1]}),
    Case("workers: quantization is a list", "POST", "v1/workers", 400, "INVALID_REQUEST",
         body={"model_ref": TINY, "quantization": ["nf4"]}),
    Case("workers: double_quant is a string", "POST", "v1/workers", 400, "INVALID_REQUEST",
         body={"model_ref": TINY, "double_quant": "yes"}),
    Case("workers: max_memory is a list", "POST", "v1/workers", 400, "INVALID_REQUEST",
         body={"model_ref": TINY, "max_memory": ["1GB"]}),
    Case("workers: max_memory negative", "POST", "v1/workers", 400, "INVALID_REQUEST",
         body={"model_ref": TINY, "max_memory": {"cpu": -1}}),
    Case("workers: max_memory '1.2.3GB'", "POST", "v1/workers", 400, "INVALID_REQUEST",
         body={"model_ref": TINY, "max_memory": {"cpu": "1.2.3GB"}}),
    Case("workers: max_memory '..'", "POST", "v1/workers", 400, "INVALID_REQUEST",
         body={"model_ref": TINY, "max_memory": {"cpu": ".."}}),
    Case("workers: max_memory 1e400", "POST", "v1/workers", 400, "INVALID_REQUEST",
         raw=b'{"model_ref": "%s", "max_memory": {"cpu": 1e400}}' % TINY.encode()),
    Case("inference: no worker_id nor model_ref", "POST", "v1/inference", 400, "INVALID_REQUEST",
         body={"prompt": PROMPT}),
    Case("inference: worker_id is a number", "POST", "v1/inference", 400, "INVALID_REQUEST",
         body={"worker_id": 3, "prompt": PROMPT}),
    Case("inference: prompt is a list", "POST", "v1/inference", 400, "INVALID_REQUEST", body=infer(prompt=["a"])),
    Case("inference: prompt and messages", "POST", "v1/inference", 400, "INVALID_REQUEST",
         body=infer(messages=[{"role": "user", "content": "hi"}])),
    Case("inference: max_tokens negative", "POST", "v1/inference", 400, "INVALID_REQUEST", body=infer(max_tokens=-5)),
    Case("inference: max_tokens 10**30", "POST", "v1/inference", 400, "INVALID_REQUEST",
         body=infer(max_tokens=10**30)),
    Case("inference: max_tokens a string", "POST", "v1/inference", 400, "INVALID_REQUEST",
         body=infer(max_tokens="10")),
    Case("inference: max_tokens true", "POST", "v1/inference", 400, "INVALID_REQUEST", body=infer(max_tokens=True)),
    Case("inference: temperature NaN", "POST", "v1/inference", 400, "INVALID_REQUEST",
         raw=b'{"worker_id": "%s", "prompt": "x", "temperature": NaN}'),
    Case("inference: temperature Infinity", "POST", "v1/inference", 400, "INVALID_REQUEST",
         raw=b'{"worker_id": "%s", "prompt": "x", "temperature": Infinity}'),
    Case("inference: top_p 0", "POST", "v1/inference", 400, "INVALID_REQUEST", body=infer(top_p=0)),
    Case("inference: seed negative", "POST", "v1/inference", 400, "INVALID_REQUEST", body=infer(seed=-1)),
    Case("inference: seed 2**64", "POST", "v1/inference", 400, "INVALID_REQUEST", body=infer(seed=2**64)),
    Case("inference: stop list of numbers", "POST", "v1/inference", 400, "INVALID_REQUEST", body=infer(stop=[1, 2])),
    Case("inference: stop empty string", "POST", "v1/inference", 400, "INVALID_REQUEST", body=infer(stop="")),
    Case("inference: messages a string", "POST", "v1/inference", 400, "INVALID_REQUEST",
         body={"worker_id": WORKER, "messages": "hi"}),
    Case("inference: messages with unknown role", "POST", "v1/inference", 400, "INVALID_REQUEST",
         body={"worker_id": WORKER, "messages": [{"role": "wizard", "content": "hi"}]}),
    Case("openai chat: n=9 (over the cap of 8)", "POST", "openai/v1/chat/completions", 400, "invalid_request",
         body=chat(n=9)),
    Case("openai chat: n=0", "POST", "openai/v1/chat/completions", 400, "invalid_request", body=chat(n=0)),
    Case("openai chat: stream a string", "POST", "openai/v1/chat/completions", 400, "invalid_request",
         body=chat(stream="yes")),
    Case("openai chat: stream_options a list", "POST", "openai/v1/chat/completions", 400, "invalid_request",
         body=chat(stream=True, stream_options=[1])),
    Case("openai chat: messages empty", "POST", "openai/v1/chat/completions", 400, "invalid_request",
         body=chat(messages=[])),
    Case("openai chat: messages of numbers", "POST", "openai/v1/chat/completions", 400, "invalid_request",
         body=chat(messages=[1, 2])),
    Case("openai chat: model a number", "POST", "openai/v1/chat/completions", 400, "invalid_request",
         body=chat(model=5)),
    Case("openai chat: model not loaded", "POST", "openai/v1/chat/completions", 404, "model_not_found",
         body=chat(model="org/never-loaded")),
    Case("openai chat: max_tokens negative", "POST", "openai/v1/chat/completions", 400, "invalid_request",
         body=chat(max_tokens=-1)),
    Case("openai completions: prompt a dict", "POST", "openai/v1/completions", 400, "invalid_request",
         body={"model": TINY_REPO, "prompt": {"text": "hi"}}),
    # --- traversal in refs and ids -------------------------------------------------------
    Case("download: hf:../../x", "POST", "v1/models/download", 400, "INVALID_MODEL_REF", body={"model_ref": "hf:../../x"}),
    Case("download: hf:%2e%2e/x", "POST", "v1/models/download", 400, "INVALID_MODEL_REF",
         body={"model_ref": "hf:%2e%2e/%2e%2e"}),
    Case("download: hf:org/repo/../../x.gguf", "POST", "v1/models/download", 400, "INVALID_MODEL_REF",
         body={"model_ref": "hf:org/repo/../../x.gguf"}),
    Case("download: revision ../../etc", "POST", "v1/models/download", 400, "INVALID_MODEL_REF",
         body={"model_ref": f"{TINY}@../../etc"}),
    Case("download: file:///tmp/%2e%2e/etc", "POST", "v1/models/download", 400, "INVALID_MODEL_REF",
         body={"model_ref": "file:///tmp/%2e%2e/etc"}),
    Case("download: file://../etc", "POST", "v1/models/download", 400, "INVALID_MODEL_REF",
         body={"model_ref": "file://../etc"}),
    Case("workers: hf:org/..", "POST", "v1/workers", 400, "INVALID_MODEL_REF", body={"model_ref": "hf:org/.."}),
    Case("progress: id=../../etc/passwd", "GET", "v1/models/download/progress?id=..%2F..%2Fetc%2Fpasswd", 404,
         "JOB_NOT_FOUND"),
    Case("cancel download: id %2e%2e", "DELETE", "v1/models/download/%2e%2e", 404, "JOB_NOT_FOUND"),
    Case("cancel download: id with /", "DELETE", "v1/models/download/a/b", 404, "NOT_FOUND"),
    Case("worker: id ..%2F..%2Fetc", "GET", "v1/workers/..%2F..%2Fetc", 404, "WORKER_NOT_FOUND"),
    Case("worker: id with /", "GET", "v1/workers/w-1/../../x", 404, "NOT_FOUND"),
    Case("unload: id with /", "DELETE", "v1/workers/a/b/c", 404, "NOT_FOUND"),
    Case("loading progress: id %2e%2e", "GET", "v1/loading/progress?id=%2e%2e", 404, "WORKER_NOT_FOUND"),
    Case("cancel inference: id with /", "DELETE", "v1/inference/a/b", 404, "NOT_FOUND"),
    Case("delete model: ref hf:../x", "DELETE", "v1/models?ref=hf:..%2Fx", 400, "INVALID_MODEL_REF"),
    Case("unknown route under rbee/", "GET", "v1/nothing-here", 404, "NOT_FOUND"),
    # --- odd unicode -----------------------------------------------------------------------
    Case("download: NUL in ref", "POST", "v1/models/download", 400, "INVALID_MODEL_REF",
         body={"model_ref": "hf:org/re\u0000po"}),
    Case("download: RTL override in ref", "POST", "v1/models/download", 400, "INVALID_MODEL_REF",
         body={"model_ref": "hf:org/\u202eoper"}),
    Case("download: zero-width joiner in ref", "POST", "v1/models/download", 400, "INVALID_MODEL_REF",
         body={"model_ref": "hf:org/re\u200dpo"}),
    Case("download: lone surrogate in ref", "POST", "v1/models/download", 400, "INVALID_REQUEST",
         body={"model_ref": "hf:org/\ud800"}),
    Case("download: fullwidth dots in ref", "POST", "v1/models/download", 400, "INVALID_MODEL_REF",
         body={"model_ref": "hf:\uff0e\uff0e/x"}),
    Case("inference: lone surrogate in prompt", "POST", "v1/inference", 400, "INVALID_REQUEST",
         body=infer(prompt="tell me \udc00")),
    Case("inference: lone surrogate in stop", "POST", "v1/inference", 400, "INVALID_REQUEST",
         body=infer(stop=["\ud83d"])),
    Case("openai chat: lone surrogate in content", "POST", "openai/v1/chat/completions", 400, "invalid_request",
         body=chat(messages=[{"role": "user", "content": "\udfff"}])),
    Case("worker: id with NUL", "GET", "v1/workers/w-%00", 404, "WORKER_NOT_FOUND"),
    Case("progress: id with RTL mark", "GET", "v1/models/download/progress?id=%E2%80%8F", 404, "JOB_NOT_FOUND"),
    # --- wrong methods -----------------------------------------------------------------------
    Case("PUT v1/workers", "PUT", "v1/workers", 405, "METHOD_NOT_ALLOWED", body={"model_ref": TINY}),
    Case("PATCH v1/models/download", "PATCH", "v1/models/download", 405, "METHOD_NOT_ALLOWED",
         body={"model_ref": TINY}),
    Case("GET v1/models/download", "GET", "v1/models/download", 405, "METHOD_NOT_ALLOWED"),
    Case("POST v1/models", "POST", "v1/models", 405, "METHOD_NOT_ALLOWED", body={}),
    Case("PUT v1/inference", "PUT", "v1/inference", 405, "METHOD_NOT_ALLOWED", body=infer()),
    Case("GET v1/inference", "GET", "v1/inference", 405, "METHOD_NOT_ALLOWED"),
    Case("DELETE v1/devices", "DELETE", "v1/devices", 405, "METHOD_NOT_ALLOWED"),
    Case("PUT v1/workers/<id>", "PUT", f"v1/workers/{WORKER}", 405, "METHOD_NOT_ALLOWED", body={}),
    Case("PATCH v1/workers/<id> without shared", "PATCH", f"v1/workers/{WORKER}", 400, "INVALID_REQUEST", body={}),
    Case("POST v1/events", "POST", "v1/events", 405, "METHOD_NOT_ALLOWED", body={}),
    Case("GET openai chat/completions", "GET", "openai/v1/chat/completions", 405, "method_not_allowed"),
    Case("DELETE openai models", "DELETE", "openai/v1/models", 405, "method_not_allowed"),
    # --- queries ---------------------------------------------------------------------------------
    Case("progress: no id", "GET", "v1/models/download/progress", 400, "INVALID_REQUEST"),
    Case("progress: empty id", "GET", "v1/models/download/progress?id=", 400, "INVALID_REQUEST"),
    Case("delete model: no ref", "DELETE", "v1/models", 400, "INVALID_REQUEST"),
    Case("delete model: ref not downloaded", "DELETE", "v1/models?ref=hf:org/never", 404, "MODEL_NOT_FOUND"),
]


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_is_a_4xx_json_error(rbee_server, rbee_worker, case: Case) -> None:
    if case.raw is not None and b"%s" in case.raw:
        case = Case(case.id, case.method, case.path, case.status, case.code, raw=case.raw % rbee_worker.encode())

    r = case.request(rbee_server, rbee_worker)

    assert r.status_code == case.status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    error = r.json()["error"]
    assert error["code"] == case.code, error
    assert isinstance(error["message"], str) and error["message"]


def test_the_server_keeps_serving_after_all_of_them(rbee_server, rbee_worker) -> None:
    for case in CASES:  # once more, back to back, on one connection
        case.request(rbee_server, rbee_worker)

    assert rbee_server.proc.poll() is None, rbee_server.log()[-3000:]
    assert rbee_server.get("v1/models").status_code == 200
    assert rbee_server.get(f"v1/workers/{rbee_worker}").json()["state"] == "idle"
    events = rbee_server.events("v1/inference", method="POST",
                                body={"worker_id": rbee_worker, "prompt": PROMPT, "max_tokens": 3})
    assert [e["type"] for e in events] == ["started", "token", "token", "token", "end"]
    assert "Traceback" not in rbee_server.log()


def test_unknown_routes_need_the_token_too(rbee_server) -> None:
    anonymous = httpx.Client(base_url=rbee_server.url + "rbee/", timeout=10)
    for method in ("GET", "POST", "DELETE"):
        r = anonymous.request(method, "v1/workers/a/b")
        assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN"
