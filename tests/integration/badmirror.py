"""A misbehaving mirror for tests: serves a directory on 127.0.0.0/8, with chosen paths broken on purpose.

    mirror = BadMirror(root)                        # files below ROOT, like a plain mirror
    mirror.set("/dists/s/InRelease", "hang")        # accepts, then never answers
    mirror.set(path, "trickle", delay=0.5)          # the file's headers, then one byte every DELAY seconds
                                                    # (size=N: N bytes each time)
    mirror.set(path, "truncate")                    # promises the file's length, sends half, closes
    mirror.set(path, "huge")                        # a body without end (no Content-Length)
    mirror.set(path, "bytes", body=b"...")          # this body instead of the file (a bomb, garbage, ...)
    mirror.set(path, "redirect", location=url)      # 302 to URL (a loop: a location redirecting to itself)
    url = mirror.start()                            # http://127.0.0.1:PORT (host="127.0.0.2" for another host,
                                                    # port=N to take over the port of a server just stopped)
    BadMirror(root, tls=(cert, key)).start()        # https, for the https -> http redirect

Everything listens on 127.0.0.0/8 only. `requests` records the paths asked for.
"""

from __future__ import annotations

import http.server
import os
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


class _Handler(http.server.BaseHTTPRequestHandler):
    mirror: BadMirror
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        m = self.mirror
        path = self.path.split("?", 1)[0]
        m.requests.append(path)
        mode, opts = m.modes.get(path, ("file", {}))
        try:
            getattr(self, f"_{mode}")(path, **opts)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            pass  # the client gave up: that is what the tests expect of it

    def _file_body(self, path: str) -> bytes | None:
        target = (self.mirror.root / path.lstrip("/")).resolve()
        if not target.is_relative_to(self.mirror.root.resolve()) or not target.is_file():
            return None
        return target.read_bytes()

    def _send(self, status: int, body: bytes, length: int | None = None, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _file(self, path: str) -> None:
        body = self._file_body(path)
        if body is None:
            self._send(404, b"not found")
        else:
            self._send(200, body)

    def _bytes(self, path: str, body: bytes) -> None:
        self._send(200, body)

    def _hang(self, path: str) -> None:
        self.mirror.stopped.wait()

    def _trickle(self, path: str, delay: float = 0.5, size: int = 1) -> None:
        body = self._file_body(path) or b"x" * 4096
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(0, len(body), size):
            if self.mirror.stopped.wait(delay):
                return
            self.wfile.write(body[i:i + size])
            self.wfile.flush()

    def _truncate(self, path: str) -> None:
        body = self._file_body(path) or b"x" * 4096
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True

    def _huge(self, path: str) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"\0" * (1 << 20)
        while not self.mirror.stopped.is_set():
            self.wfile.write(chunk)
        self.close_connection = True

    def _redirect(self, path: str, location: str) -> None:
        self._send(302, b"", Location=location)


class BadMirror:
    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int = 0,
                 tls: tuple[Path, Path] | None = None) -> None:
        assert host.startswith("127."), "test servers stay on 127.0.0.0/8"
        self.root = root
        self.host = host
        self.port = port
        self.tls = tls
        self.modes: dict[str, tuple[str, dict[str, Any]]] = {}
        self.requests: list[str] = []
        self.stopped = threading.Event()
        self.server: http.server.ThreadingHTTPServer | None = None

    def set(self, path: str, mode: str, **opts: Any) -> None:
        self.modes[path] = (mode, opts)

    def reset(self) -> None:
        self.modes.clear()
        self.requests.clear()

    def start(self) -> str:
        handler = type("Handler", (_Handler,), {"mirror": self})
        self.server = http.server.ThreadingHTTPServer((self.host, self.port), handler)
        self.server.daemon_threads = True
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.url

    @property
    def url(self) -> str:
        assert self.server is not None
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.stopped.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A throw-away certificate for HOST (an IP address) and its key, made with openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={host}",
                    "-addext", f"subjectAltName=IP:{host}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def loopback_alias_works(host: str = "127.0.0.2") -> bool:
    """Linux routes all of 127.0.0.0/8 to lo; check anyway before a test relies on a second host."""
    try:
        with socket.socket() as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def wait_rss(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str, int, float]:
    """Run ARGV; return (exit status, stdout, stderr, peak RSS in KiB of it and its children, seconds taken).
    os.wait4 gives the rusage of exactly this child, whatever else the test process ran before."""
    start = time.monotonic()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    proc = subprocess.Popen(argv, env=env, stdout=out_w, stderr=err_w, stdin=subprocess.DEVNULL)
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd: int) -> None:
        while data := os.read(fd, 65536):
            chunks[fd].append(data)
        os.close(fd)

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
    for t in readers:
        t.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        _pid, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in readers:
        t.join(5)
    return (proc.returncode, b"".join(chunks[out_r]).decode(errors="replace"),
            b"".join(chunks[err_r]).decode(errors="replace"), usage.ru_maxrss, time.monotonic() - start)
