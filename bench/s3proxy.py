"""A delaying, counting HTTP proxy in front of an S3 endpoint (moto's server), and moto started for a benchmark.

    python -m bench.s3proxy --target http://127.0.0.1:5000 --delay-ms 30      # prints its port, serves until killed

Every request waits `delay` before it is forwarded, as a real store's first-byte latency (20-50 ms per S3 GET)
would make it; requests are counted per method and per path. Control paths (not forwarded):
    GET  /__proxy/counts        {"GET": n, ..., "paths": {"/bucket/key": n}}
    POST /__proxy/reset         zero the counts
    POST /__proxy/delay?ms=30   change the delay
Python code uses `proxy(target, delay_ms)`, which runs it as a child process (so the loader under test does not
share its GIL) bound to 127.0.0.1 on a free port, and stops it by PID.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import tempfile
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
       "content-length"}


def serve(target: str, delay_ms: float, port: int = 0) -> None:
    up = urlsplit(target)
    state = {"delay": delay_ms / 1000, "methods": Counter(), "paths": Counter()}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as boto3's pooled connections expect

        def log_message(self, *args):  # quiet: one line per request would dominate a benchmark's output
            pass

        def setup(self):
            super().setup()
            self.upstream = http.client.HTTPConnection(up.hostname, up.port, timeout=120)

        def _reply(self, status: int, body: bytes, headers=(), head: bool = False):
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)) if not head else dict(
                (k.lower(), v) for k, v in headers).get("content-length", "0"))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _control(self):
            url = urlsplit(self.path)
            with lock:
                if url.path == "/__proxy/counts":
                    body = {**state["methods"], "paths": dict(state["paths"]), "delay_ms": state["delay"] * 1000}
                elif url.path == "/__proxy/reset":
                    state["methods"].clear()
                    state["paths"].clear()
                    body = {}
                elif url.path == "/__proxy/delay":
                    state["delay"] = float(parse_qs(url.query)["ms"][0]) / 1000
                    body = {"delay_ms": state["delay"] * 1000}
                else:
                    return self._reply(404, b"unknown control path")
            self._reply(200, json.dumps(body).encode(), [("Content-Type", "application/json")])

        def _forward(self):
            if self.path.startswith("/__proxy/"):
                return self._control()
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            with lock:
                delay = state["delay"]
                state["methods"][self.command] += 1
                state["paths"][urlsplit(self.path).path] += 1
            if delay:
                time.sleep(delay)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP - {"content-length"}}
            for attempt in (0, 1):  # moto may have closed an idle keep-alive connection
                try:
                    self.upstream.request(self.command, self.path, body=body, headers=headers)
                    resp = self.upstream.getresponse()
                    data = resp.read()
                    break
                except (http.client.HTTPException, ConnectionError):
                    self.upstream.close()
                    if attempt:
                        raise
            self._reply(resp.status, data, resp.getheaders(), head=self.command == "HEAD")

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    server = Server(("127.0.0.1", port), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


class Proxy:
    """Handle on a running proxy: its URL, counts, reset and delay."""

    def __init__(self, url: str):
        self.url = url

    def _call(self, path: str, method: str = "GET") -> dict:
        req = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def counts(self) -> dict:
        return self._call("/__proxy/counts")

    def reset(self) -> None:
        self._call("/__proxy/reset", "POST")

    def set_delay(self, ms: float) -> None:
        self._call(f"/__proxy/delay?ms={ms}", "POST")

    def gets(self, contains: str = "") -> int:
        """GET requests so far whose path contains `contains` (e.g. "/clips/": clip objects, not the manifest)."""
        return sum(n for path, n in self.counts()["paths"].items() if contains in path) if contains else \
            self.counts().get("GET", 0)


@contextlib.contextmanager
def _child(args: list[str], what: str):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"{what} did not start (exit {proc.poll()})")
        yield int(line)
    finally:
        proc.send_signal(signal.SIGTERM)  # by PID: this child only
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def proxy(target: str, delay_ms: float = 0.0):
    """A running proxy in front of `target`; yields a Proxy."""
    with _child([sys.executable, "-m", "bench.s3proxy", "--target", target, "--delay-ms", str(delay_ms)],
                "bench.s3proxy") as port:
        yield Proxy(f"http://127.0.0.1:{port}")


@contextlib.contextmanager
def local_s3():
    """moto's S3 server on 127.0.0.1 at a free port (cluster.local's launcher, the project's one), with moto's dummy
    credentials in the environment; yields its URL and restores the environment after."""
    from cluster import local
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_PROFILE",
            "AWS_SESSION_TOKEN")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    with tempfile.TemporaryDirectory(prefix="flipray-bench-s3-") as state:
        service = local.start_s3(state)
        try:
            os.environ["AWS_ENDPOINT_URL"] = service.url
            yield service.url
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            local.stop(service)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.s3proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="the S3 endpoint to forward to, e.g. http://127.0.0.1:5000")
    p.add_argument("--delay-ms", type=float, default=0.0, help="added to every request before it is forwarded")
    p.add_argument("--port", type=int, default=0, help="0 = a free port (printed on stdout)")
    args = p.parse_args(argv)
    serve(args.target, args.delay_ms, args.port)


if __name__ == "__main__":
    main()
