"""core/egress.py: which URLs the server may open for users who are not admins (finding 3).

The transport tests use a real HTTP server on loopback and a resolver the test controls
(the part a DNS rebinding attacker controls): the connection must go to the very address
that was checked, with the name the user registered as ``Host``.
"""

from __future__ import annotations

import http.server
import threading
from typing import ClassVar

import httpx
import pytest

from rbee_jupyter.core.egress import EgressPolicy
from rbee_jupyter.errors import UrlNotAllowed


@pytest.mark.parametrize("url, kind", [
    ("http://127.0.0.1:8000/v1", "loopback"),
    ("http://127.9.9.9/v1", "loopback"),
    ("http://[::1]:8000/v1", "loopback"),
    ("http://[::ffff:127.0.0.1]/v1", "loopback"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://[fe80::1]/v1", "link-local"),
    ("http://10.0.0.7:8000/v1", "private"),
    ("http://172.16.3.4/v1", "private"),
    ("http://192.168.1.10/v1", "private"),
    ("http://[fd00::1]/v1", "private"),
    ("http://0.0.0.0:8000/v1", "private"),
    ("http://100.64.0.1/v1", "non-public"),
])
def test_addresses_that_are_not_public_are_refused(url, kind):
    with pytest.raises(UrlNotAllowed) as refused:
        EgressPolicy().check_url(url)
    assert refused.value.code == "URL_NOT_ALLOWED" and refused.value.status == 403
    assert refused.value.details["kind"] == kind, refused.value.details
    assert "engine_allowed_networks" in refused.value.message


@pytest.mark.parametrize("host", ["metadata.google.internal", "METADATA.google.internal.", "metadata",
                                  "instance-data"])
def test_metadata_services_are_refused_by_name(host):
    with pytest.raises(UrlNotAllowed, match="metadata service"):
        EgressPolicy().check_url(f"http://{host}/computeMetadata/v1")


def test_public_addresses_and_names_pass_registration():
    policy = EgressPolicy()
    policy.check_url("https://8.8.8.8/v1")
    policy.check_url("https://api.example.org/v1")  # a name: checked at each connection instead


def test_an_administrator_opens_a_network_and_sets_url_patterns():
    policy = EgressPolicy.from_config(["http://10.1.2.*:8000/v1", "https://*.gpu.example.org/v1"], ["10.1.2.0/24"])
    policy.check_url("http://10.1.2.9:8000/v1")
    policy.check_url("https://a.gpu.example.org/v1")
    with pytest.raises(UrlNotAllowed, match="matches none of the URL patterns"):
        policy.check_url("https://8.8.8.8/v1")
    with pytest.raises(UrlNotAllowed) as refused:  # inside a pattern, outside the opened network
        EgressPolicy.from_config(["http://10.*"], ["10.1.2.0/24"]).check_url("http://10.9.9.9/v1")
    assert refused.value.details["kind"] == "private"
    with pytest.raises(ValueError):
        EgressPolicy.from_config([], ["not-a-network"])


class _Recorder(http.server.BaseHTTPRequestHandler):
    hosts: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hosts.append(self.headers["Host"])
        body = b'{"data": []}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def loopback_server():
    _Recorder.hosts = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


async def test_each_connection_is_checked_on_what_the_name_resolves_to_then(loopback_server):
    # An administrator opened 127.0.0.1 only; the attacker's name first answers it, then 127.0.0.2
    answers = [["127.0.0.1"], ["127.0.0.2"], ["127.0.0.1", "169.254.169.254"]]
    asked = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return answers.pop(0)

    policy = EgressPolicy.from_config([], ["127.0.0.1/32"])
    url = f"http://engine.attacker.test:{loopback_server}/v1/models"
    async with httpx.AsyncClient(transport=policy.transport(resolver=resolver)) as client:
        # When the name resolves to the opened address, the request reaches it, under the registered name
        r = await client.get(url)
        assert r.status_code == 200 and _Recorder.hosts == [f"engine.attacker.test:{loopback_server}"]
        # When it is rebound to another loopback address, the next request is refused before any connection
        with pytest.raises(UrlNotAllowed) as refused:
            await client.get(url)
        assert refused.value.details == {"field": "url", "host": "engine.attacker.test", "address": "127.0.0.2",
                                         "kind": "loopback"}
        # One record of several that is not allowed refuses the name (no luck in the order)
        with pytest.raises(UrlNotAllowed, match="169.254.169.254, which is a link-local address"):
            await client.get(url)
    assert asked == [("engine.attacker.test", loopback_server)] * 3
    assert len(_Recorder.hosts) == 1  # nothing reached the server after the first request


async def test_the_system_resolver_is_used_by_default(loopback_server):
    policy = EgressPolicy()
    async with httpx.AsyncClient(transport=policy.transport()) as client:
        with pytest.raises(UrlNotAllowed, match="localhost resolves to 127.0.0.1, which is a loopback address"):
            await client.get(f"http://localhost:{loopback_server}/v1/models")
    assert _Recorder.hosts == []


# --- a host name is resolved at registration too ------------------------------------------------------

def test_a_name_that_resolves_to_a_refused_address_is_refused_at_registration():
    table = {"engine.attacker.test": ["127.0.0.1"], "meta.attacker.test": ["93.184.216.34", "169.254.169.254"],
             "lan.attacker.test": ["10.0.0.7"], "ok.example.org": ["93.184.216.34"]}
    asked = []

    def lookup(host: str, port: int) -> list[str]:
        asked.append((host, port))
        if host not in table:
            raise OSError("no such name")
        return table[host]

    policy = EgressPolicy()
    for host, kind, address in (("engine.attacker.test", "loopback", "127.0.0.1"),
                                ("meta.attacker.test", "link-local", "169.254.169.254"),
                                ("lan.attacker.test", "private", "10.0.0.7")):
        with pytest.raises(UrlNotAllowed) as refused:
            policy.check_registration(f"http://{host}:8000/v1", lookup=lookup)
        assert refused.value.status == 403 and refused.value.code == "URL_NOT_ALLOWED"
        assert refused.value.details == {"field": "url", "host": host, "address": address, "kind": kind}
        assert f"{host} resolves to {address}, which is a {kind} address" in refused.value.message
    policy.check_registration("https://ok.example.org/v1", lookup=lookup)
    policy.check_registration("https://unknown.example.org/v1", lookup=lookup)  # the connection will say
    assert ("ok.example.org", 443) in asked and ("engine.attacker.test", 8000) in asked
    # a literal address is judged without a lookup; an opened network opens names that resolve into it
    with pytest.raises(UrlNotAllowed):
        policy.check_registration("http://127.0.0.1/v1", lookup=lookup)
    assert ("127.0.0.1", 80) not in asked
    EgressPolicy.from_config([], ["10.0.0.0/8"]).check_registration("http://lan.attacker.test/v1", lookup=lookup)

