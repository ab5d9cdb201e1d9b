"""explore.py's web server: one page and small JSON or PNG exchanges, on the loopback
address unless told otherwise. A bad request gets a 4xx status and a JSON error, and the
server goes on serving; no request names a file or a path on the machine."""

from __future__ import annotations

import io
import json
import math
import socket
import sys
import threading
import urllib.parse
import webbrowser
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from machinery import cli

import numpy as np
from PIL import Image

MAX_BODY = 4 * 2**20  # bytes a request may send: a photo, not a folder of them
MAX_PIXELS = 40_000_000  # an image's width x height that the encoder is given at most
LOOPBACK = "127.0.0.1"


class BadRequest(Exception):
    """A request the server refuses, with its 4xx status and a message for the page."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


# An answer: (content type, body). A route takes the request's body (b"" for GET) and its
# query's fields (?label=3: {"label": "3"}).
Route = Callable[[bytes, dict[str, str]], tuple[str, bytes]]


def json_answer(value: object) -> tuple[str, bytes]:
    return "application/json", json.dumps(value).encode()


def png_answer(pixels: np.ndarray) -> tuple[str, bytes]:
    """uint8 (height, width, channels) pixels as a PNG."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "image/png", buffer.getvalue()


def read_json(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("the body is not a JSON object")
    return value


def latent_point(value: object, latent_dim: int, name: str = "z") -> np.ndarray:
    """A JSON list of `latent_dim` finite numbers, as float32."""
    if not (isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                            for v in value)):
        raise BadRequest(f"{name} must be a list of {latent_dim} numbers")
    if len(value) != latent_dim:
        raise BadRequest(f"{name} has {len(value)} numbers; the model's latent space has {latent_dim}")
    if not all(math.isfinite(v) for v in value):
        raise BadRequest(f"{name} holds a number that is not finite")
    return np.asarray(value, np.float32)


def whole_number(value: object, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}")
    return value


def check_image(body: bytes) -> None:
    """Refuse a body that is not an image Pillow reads, or one too large to decode."""
    try:
        with Image.open(io.BytesIO(body)) as image:
            width, height = image.size
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        raise BadRequest("the body is not an image (PNG, JPEG, BMP or GIF)",
                         HTTPStatus.UNSUPPORTED_MEDIA_TYPE) from None
    if width * height > MAX_PIXELS:
        raise BadRequest(f"an image of {width}x{height} pixels is more than this server decodes "
                         f"({MAX_PIXELS:,} pixels)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)


def make_handler(page: bytes, gets: dict[str, Route], posts: dict[str, Route]) -> type:
    lock = threading.Lock()  # one model call at a time: the page asks often, and briefly

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] == "/":
                self.answer(HTTPStatus.OK, ("text/html; charset=utf-8", page))
            else:
                self.route(gets, b"")

        def do_POST(self) -> None:  # noqa: N802
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                return self.refuse(BadRequest("a POST needs a Content-Length", HTTPStatus.LENGTH_REQUIRED))
            if int(length) > MAX_BODY:  # read to its end (or to 16 times the limit), unkept
                self.close_connection = True
                left = min(int(length), 16 * MAX_BODY)
                while left > 0 and (chunk := self.rfile.read(min(left, 2**16))):
                    left -= len(chunk)
                return self.refuse(BadRequest(f"the body is {int(length):,} bytes; at most {MAX_BODY:,}",
                                              HTTPStatus.REQUEST_ENTITY_TOO_LARGE))
            self.route(posts, self.rfile.read(int(length)))

        def route(self, routes: dict[str, Route], body: bytes) -> None:
            url = urllib.parse.urlsplit(self.path)
            path, query = url.path, dict(urllib.parse.parse_qsl(url.query))
            if path not in routes:
                other = posts if routes is gets else gets
                status = HTTPStatus.METHOD_NOT_ALLOWED if path in other else HTTPStatus.NOT_FOUND
                return self.refuse(BadRequest(f"no {self.command} {path} here", status))
            try:
                with lock:
                    answer = routes[path](body, query)
            except BadRequest as error:
                return self.refuse(error)
            except Exception as error:  # noqa: BLE001 - a bug: say so in one line, and go on serving
                print(f"explore.py: {self.command} {path} failed: {cli.first_line(error)}", file=sys.stderr)
                return self.answer(HTTPStatus.INTERNAL_SERVER_ERROR,
                                   json_answer({"error": "the server failed; its terminal says why"}))
            self.answer(HTTPStatus.OK, answer)

        def refuse(self, error: BadRequest) -> None:
            self.answer(error.status, json_answer({"error": str(error)}))

        def answer(self, status: HTTPStatus, answer: tuple[str, bytes]) -> None:
            kind, body = answer
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # a quiet terminal: errors alone
            pass

    return Handler


def make_server(page: bytes, gets: dict[str, Route], posts: dict[str, Route], host: str = LOOPBACK,
                port: int = 0) -> ThreadingHTTPServer:
    """The server, bound and ready for serve_forever(); port 0 takes a free one."""
    try:
        server = ThreadingHTTPServer((host, port), make_handler(page, gets, posts))
    except OSError as error:
        raise cli.UserError(f"cannot serve on {host}:{port} ({cli.first_line(error)}); "
                            f"try another --port") from None
    server.daemon_threads = True
    return server


def address(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    shown = LOOPBACK if host in ("0.0.0.0", "::") else host  # noqa: S104 (what --host 0.0.0.0 binds)
    return f"http://{shown}:{port}/"


def open_browser(url: str) -> None:
    """Open `url` in the default browser, where there is one (quietly not, where there is none)."""
    threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()


def is_loopback(host: str) -> bool:
    try:
        return all(info[4][0].startswith("127.") or info[4][0] == "::1"
                   for info in socket.getaddrinfo(host, None))
    except OSError:
        return False
