"""A real HTTP server on 127.0.0.1 that serves Product1M-style images, and fails on purpose.

`ImageServer(images, plans)` serves `GET /<host>/<id>.jpg` (host `a` or `b`, the two URLs of a
row) from `images` ({id: JPEG bytes}). `plans[(host, id)]` picks what that URL does instead of a
plain 200 (see `BEHAVIOURS`). Every request is counted by path, so a test can check that a rerun
sends none for the images already saved.
"""

from __future__ import annotations

import collections
import http.server
import io
import threading
import time

from PIL import Image

ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n  <Code>AccessDenied</Code>\n'
                 b"  <Message>You have no right to access this object because of bucket acl."
                 b"</Message>\n  <RequestId>5F2A0C1D9E8B7A6C5D4E3F21</RequestId>\n"
                 b"  <HostId>product1m.oss-cn-hangzhou.aliyuncs.com</HostId>\n</Error>\n")

BEHAVIOURS = (
    "ok",             # 200 with the JPEG.
    "access_denied",  # 403 with the OSS AccessDenied XML body.
    "not_found",      # 404.
    "slow",           # The JPEG, after `slow_s` seconds (longer than the client's timeout).
    "truncated",      # 200 whose Content-Length promises more than the body sends.
    "html",           # 200 with an HTML page.
    "png",            # 200 with the image as an RGBA PNG.
    "cmyk",           # 200 with the image as a CMYK JPEG.
    "redirect",       # 302 to another path that serves the JPEG.
    "flaky",          # 503 on the first request, the JPEG afterwards.
    "tiny",           # 200 with a 4x4 JPEG.
)


def _encode(data: bytes, fmt: str, mode: str, size: tuple[int, int] | None = None) -> bytes:
    im = Image.open(io.BytesIO(data)).convert(mode)
    if size:
        im = im.resize(size)
    out = io.BytesIO()
    im.save(out, format=fmt)
    return out.getvalue()


class ImageServer:
    """Starts on a free port of 127.0.0.1; `url(host, id)`; `stop()` (or use as a context)."""

    def __init__(self, images: dict[str, bytes], plans: dict[tuple[str, str], str] | None = None,
                 slow_s: float = 3.0, delay_s: float = 0.0):
        self.images, self.plans, self.slow_s = images, dict(plans or {}), slow_s
        self.delay_s = delay_s  # Before every answer: a slow host, for a run to be killed in.
        for plan in self.plans.values():
            assert plan in BEHAVIOURS, plan
        self.requests: collections.Counter[str] = collections.Counter()
        self.user_agents: set[str] = set()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # Quiet.
                pass

            def do_GET(self):  # noqa: N802 (http.server's name)
                server._serve(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # Clients that hang up: expected.
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, host: str, item_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/{host}/{item_id}.jpg"

    def requests_for(self, item_id: str) -> int:
        """Requests for either URL of `item_id` (redirect targets included)."""
        return sum(n for path, n in self.requests.items()
                   if path.rsplit("/", 1)[-1] == f"{item_id}.jpg")

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests[h.path] += 1
            count = self.requests[h.path]
            self.user_agents.add(h.headers.get("User-Agent", ""))
        time.sleep(self.delay_s)
        parts = h.path.strip("/").split("/")
        if len(parts) == 3 and parts[1] == "moved":  # A redirect's target.
            host, item_id, plan = parts[0], parts[2][:-4], "ok"
        elif len(parts) == 2 and parts[1].endswith(".jpg"):
            host, item_id = parts[0], parts[1][:-4]
            plan = self.plans.get((host, item_id), "ok")
        else:
            return self._send(h, 404, b"no such path", "text/plain")
        data = self.images.get(item_id)
        if data is None or plan == "not_found":
            return self._send(h, 404, b"<html><body>404 Not Found</body></html>", "text/html")
        if plan == "access_denied":
            return self._send(h, 403, ACCESS_DENIED, "application/xml")
        if plan == "slow":
            time.sleep(self.slow_s)
        if plan == "truncated":
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.send_header("Content-Length", str(len(data)))
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(data[: len(data) // 3])
            h.wfile.flush()
            h.close_connection = True
            return None
        if plan == "html":
            return self._send(h, 200, b"<!DOCTYPE html><html><body>Item removed</body></html>",
                              "text/html; charset=utf-8")
        if plan == "redirect":
            h.send_response(302)
            h.send_header("Location", f"/{host}/moved/{item_id}.jpg")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        if plan == "flaky" and count == 1:
            return self._send(h, 503, b"busy, try again", "text/plain")
        if plan == "png":
            return self._send(h, 200, _encode(data, "PNG", "RGBA"), "image/png")
        if plan == "cmyk":
            return self._send(h, 200, _encode(data, "JPEG", "CMYK"), "image/jpeg")
        if plan == "tiny":
            return self._send(h, 200, _encode(data, "JPEG", "RGB", (4, 4)), "image/jpeg")
        return self._send(h, 200, data, "image/jpeg")

    @staticmethod
    def _send(h, status: int, body: bytes, content_type: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
