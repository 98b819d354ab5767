"""Fetching: proxies from the environment, retries of transient errors, clear errors (servers on 127.0.0.1)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from vzpkg.errors import MirrorError
from vzpkg.repo.http import fetch


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []
    statuses: list[int] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        type(self).requests.append(self.path)
        status = type(self).statuses.pop(0) if type(self).statuses else 200
        body = b"proxied" if status == 200 else b"busy"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, type[_Recorder]]]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)  # the tests below talk to the server directly
    handler = type("Handler", (_Recorder,), {"requests": [], "statuses": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", handler
    finally:
        srv.shutdown()


def test_proxy_from_environment(server, monkeypatch: pytest.MonkeyPatch) -> None:
    url, handler = server
    for var in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", url)
    resp = fetch("http://mirror.invalid/debian/dists/bookworm/InRelease", retries=0)
    assert resp.content == b"proxied"
    # A proxy receives the absolute URL: the request went through it, not to the (unresolvable) mirror.
    assert handler.requests == ["http://mirror.invalid/debian/dists/bookworm/InRelease"]


def test_transient_errors_are_retried(server) -> None:
    url, handler = server
    handler.statuses = [503, 502]
    resp = fetch(f"{url}/InRelease", retries=2, backoff=0.01)
    assert resp.content == b"proxied" and len(handler.requests) == 3


def test_not_found_is_not_retried(server) -> None:
    url, handler = server
    handler.statuses = [404]
    with pytest.raises(MirrorError, match="HTTP 404"):
        fetch(f"{url}/missing", retries=3, backoff=0.01)
    assert len(handler.requests) == 1
