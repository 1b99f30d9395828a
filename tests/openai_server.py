"""A real local HTTP server speaking the OpenAI chat-completions wire format, for tests.

    with FakeOpenAI() as fake:
        fake.reply(text("Hello world", usage=(12, 2)))
        client = AsyncOpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)
        ...
        assert fake.requests[0]["model"] == "gpt-test"

Each request to POST /v1/chat/completions is recorded (`requests`, `headers`) and
answered with the next queued `Response` (FIFO). A request that finds the queue empty
gets a 500 with an error body saying so, and any other path gets a 404, so that a test
bug is loud. Standard library only: a ThreadingHTTPServer on 127.0.0.1 in a background
thread, HTTP/1.1 with keep-alive; streams use chunked transfer-encoding, so a dropped
stream is a protocol error on the client side, not a silent end of body.

A streamed text reply may be paced (`text(..., chunk_delay_s=0.02)`: 50 pieces a
second, as a model streams), and `FakeOpenAI(record_chunk_times=True)` keeps, in
`chunk_times`, when each streamed content piece went out (`time.monotonic()` just
before its write): the bench measures what a relay adds to each delta from it.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "FakeOpenAI",
    "Response",
    "text",
    "tool_calls",
    "error",
    "drop_mid_stream",
    "hang",
    "raw",
]

DEFAULT_USAGE = (10, 5)
# How many characters of a tool call's `arguments` go into one streamed chunk.
ARGUMENT_PIECE = 8


@dataclass(frozen=True)
class Response:
    """One queued answer. Build it with text(), tool_calls(), error(), drop_mid_stream()
    or hang() rather than by hand."""

    kind: str  # "text" | "tool_calls" | "error" | "drop" | "hang" | "raw"
    content: str = ""
    chunks: tuple[str, ...] = ()
    calls: tuple[tuple[str, str], ...] = ()
    finish_reason: str | None = None
    usage: tuple[int, int] = DEFAULT_USAGE
    status: int = 200
    error_body: dict[str, Any] | None = None
    extra_headers: tuple[tuple[str, str], ...] = ()
    payload: Any = None  # raw(): the body as given (a list of events when streamed)
    chunk_delay_s: float = 0.0  # streamed text: the pause before each content piece after the first


def _words(content: str) -> tuple[str, ...]:
    """Split into per-word pieces that concatenate back to `content` exactly."""
    if not content:
        return ()
    return tuple(piece for piece in re.split(r"(?<=\s)(?=\S)", content) if piece)


def text(
    content: str,
    *,
    finish_reason: str = "stop",
    usage: tuple[int, int] = DEFAULT_USAGE,
    chunks: Sequence[str] | None = None,
    chunk_delay_s: float = 0.0,
) -> Response:
    """A plain assistant reply. Streamed one word per chunk unless `chunks` gives the
    exact delta pieces (they must concatenate to `content`); `chunk_delay_s` paces a
    stream: the first piece goes out with the role chunk, each later one that long
    after the one before (0: all at once)."""
    if chunks is None:
        pieces = _words(content)
    else:
        pieces = tuple(chunks)
        if "".join(pieces) != content:
            raise ValueError(f"chunks {pieces!r} do not concatenate to content {content!r}")
    if chunk_delay_s < 0:
        raise ValueError(f"chunk_delay_s must be >= 0, got {chunk_delay_s!r}")
    return Response("text", content=content, chunks=pieces, finish_reason=finish_reason, usage=tuple(usage),
                    chunk_delay_s=float(chunk_delay_s))


def tool_calls(
    calls: Sequence[tuple[str, str]],
    *,
    content: str = "",
    finish_reason: str = "tool_calls",
    usage: tuple[int, int] = DEFAULT_USAGE,
) -> Response:
    """An assistant message calling tools: `calls` is [(name, arguments_json_str), ...];
    their ids are "call_0", "call_1", ... When streamed, each call's arguments string is
    split across several chunks."""
    normalized = tuple((str(name), str(arguments)) for name, arguments in calls)
    return Response(
        "tool_calls",
        content=content,
        chunks=_words(content),
        calls=normalized,
        finish_reason=finish_reason,
        usage=tuple(usage),
    )


def error(
    status: int,
    *,
    code: str | None = None,
    message: str = "fake error",
    type_: str = "invalid_request_error",
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An HTTP error with the OpenAI error body {"error": {message, type, param, code}}.
    `headers` adds response headers (e.g. {"retry-after": "0"})."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Response(
        "error",
        status=status,
        error_body=body,
        extra_headers=tuple((headers or {}).items()),
    )


def drop_mid_stream(chunks_before_drop: Sequence[str] | int = ("Hello ", "wor")) -> Response:
    """Start a 200 answer, send some content, then close the TCP connection without
    finishing it. Streamed: the role chunk and one content delta per piece of
    `chunks_before_drop` (a list of strings, or a count of made-up pieces), then the
    connection closes with no final chunk, no [DONE] and no terminating HTTP chunk.
    Not streamed: a Content-Length larger than the partial JSON body that is sent."""
    if isinstance(chunks_before_drop, int):
        pieces = tuple(f"w{i} " for i in range(chunks_before_drop))
    else:
        pieces = tuple(chunks_before_drop)
    return Response("drop", content="".join(pieces), chunks=pieces)


def raw(payload: Any) -> Response:
    """A 200 answer with exactly `payload` as its JSON body — when the request streams,
    `payload` is the list of event bodies (then `data: [DONE]`). For a server that
    speaks the format wrongly: wrong types, missing fields, odd shapes."""
    return Response(kind="raw", payload=payload)


def hang(chunks_before_hang: Sequence[str] | None = None) -> Response:
    """Accept the request and never answer, until the server is closed (then the
    connection is closed). With `chunks_before_hang` on a streamed request, first send
    the 200 headers, the role chunk and those content deltas, then hang mid-stream.
    FakeOpenAI.hanging is set once a hang has started (after those chunks)."""
    pieces = tuple(chunks_before_hang or ())
    return Response("hang", content="".join(pieces), chunks=pieces)


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every handler thread
    block_on_close = True
    allow_reuse_address = True

    fake: FakeOpenAI

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)) or (isinstance(exc, OSError) and self.fake._closing):
            return
        self.fake.server_errors.append("".join(traceback.format_exc()))
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence access logs
        pass

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._untrack(self.connection)

    # --- request ---------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            body = bytearray()
            while True:
                size_line = self.rfile.readline()
                if not size_line:
                    raise ConnectionError("client closed mid-body")
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:
        self._read_body()
        self._send_json(404, _error_body(f"FakeOpenAI: no route for GET {self.path}", "not_found"))

    def do_POST(self) -> None:
        raw = self._read_body()
        if self.path.split("?", 1)[0].rstrip("/") != "/v1/chat/completions":
            self._send_json(404, _error_body(f"FakeOpenAI: no route for POST {self.path}", "not_found"))
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            self._send_json(400, _error_body(f"FakeOpenAI: request body is not JSON: {exc}", "invalid_json"))
            return
        fake = self.server.fake
        response = fake._record(body, {k.lower(): v for k, v in self.headers.items()})
        if response is None:
            self._send_json(
                500,
                _error_body(
                    "FakeOpenAI: no response was queued for this request (call fake.reply(...) first)",
                    "no_response_queued",
                    type_="server_error",
                ),
            )
            return
        _Exchange(self, body, response, fake._next_id()).serve()

    # --- response helpers ------------------------------------------------------------

    def _send_json(
        self, status: int, payload: Any, headers: Sequence[tuple[str, str]] = (), request_id: str | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", request_id or f"req_fake{self.server.fake._next_id()}")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _error_body(message: str, code: str | None, type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


class _Exchange:
    """Serves one queued Response to one recorded request."""

    def __init__(self, handler: _Handler, body: dict[str, Any], response: Response, number: int) -> None:
        self.handler = handler
        self.fake = handler.server.fake
        self.response = response
        self.model = body.get("model", "")
        self.stream = body.get("stream") is True
        options = body.get("stream_options") or {}
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.id = f"chatcmpl-fake{number}"
        self.request_id = f"req_fake{number}"
        self.created = int(time.time())

    def serve(self) -> None:
        kind = self.response.kind
        if kind == "error":
            assert self.response.error_body is not None
            self.handler._send_json(
                self.response.status, self.response.error_body, self.response.extra_headers, self.request_id
            )
        elif kind == "hang":
            if self.stream and self.response.chunks:
                self._start_stream()
                self._send_event(self._chunk({"role": "assistant", "content": ""}))
                for piece in self.response.chunks:
                    self._send_event(self._chunk({"content": piece}))
            self.fake.hanging.set()
            self.fake._released.wait()
            self._abort()
        elif kind == "drop":
            if self.stream:
                self._start_stream()
                self._send_event(self._chunk({"role": "assistant", "content": ""}))
                for piece in self.response.chunks:
                    self._send_event(self._chunk({"content": piece}))
            else:
                whole = json.dumps(self._completion()).encode()
                h = self.handler
                h.send_response(200)
                h.send_header("Content-Type", "application/json")
                h.send_header("Content-Length", str(len(whole)))
                h.send_header("x-request-id", self.request_id)
                h.end_headers()
                h.wfile.write(whole[: len(whole) // 2])
            self._abort()
        elif kind == "raw":
            if self.stream:
                self._start_stream()
                for event in self.response.payload:
                    self._send_event(event)
                self._send_raw(b"data: [DONE]\n\n")
                self._write(b"0\r\n\r\n")
            else:
                self.handler._send_json(200, self.response.payload, request_id=self.request_id)
        elif self.stream:
            self._serve_stream()
        else:
            self.handler._send_json(200, self._completion(), request_id=self.request_id)

    # --- non-streamed ----------------------------------------------------------------

    def _completion(self) -> dict[str, Any]:
        r = self.response
        message: dict[str, Any] = {"role": "assistant", "content": r.content, "refusal": None}
        if r.kind == "tool_calls":
            message["content"] = r.content or None
            message["tool_calls"] = [
                {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
                for i, (name, arguments) in enumerate(r.calls)
            ]
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": r.finish_reason}],
            "usage": self._usage(),
        }

    def _usage(self) -> dict[str, int]:
        prompt, completion = self.response.usage
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # --- streamed --------------------------------------------------------------------

    def _serve_stream(self) -> None:
        r = self.response
        self._start_stream()
        deltas: list[dict[str, Any]] = []
        if r.kind == "text" or r.chunks:
            deltas.append({"role": "assistant", "content": ""})
            deltas.extend({"content": piece} for piece in r.chunks)
        for i, (name, arguments) in enumerate(r.calls):
            head = {"index": i, "id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": ""}}
            if not deltas:  # the first chunk of a content-less tool call carries the role too
                deltas.append({"role": "assistant", "content": None, "tool_calls": [head]})
            else:
                deltas.append({"tool_calls": [head]})
            for start in range(0, len(arguments), ARGUMENT_PIECE):
                piece = arguments[start : start + ARGUMENT_PIECE]
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        if not deltas:
            deltas.append({"role": "assistant", "content": ""})
        paced = False
        for delta in deltas:
            piece = delta.get("content")
            if piece:
                # The stream's rate: between pieces, the server's closing (which ends the
                # pause at once), or the delay, whichever comes first.
                if paced and r.chunk_delay_s and self.fake._released.wait(r.chunk_delay_s):
                    return
                paced = True
                self._send_piece(self._chunk(delta), piece)
            else:
                self._send_event(self._chunk(delta))
        self._send_event(self._chunk({}, finish_reason=r.finish_reason))
        if self.include_usage:
            self._send_event(self._envelope([], usage=self._usage()))
        self._send_raw(b"data: [DONE]\n\n")
        self._write(b"0\r\n\r\n")  # the terminating HTTP chunk

    def _start_stream(self) -> None:
        h = self.handler
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream; charset=utf-8")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("x-request-id", self.request_id)
        h.end_headers()

    def _envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "fp_fake",
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return chunk

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return self._envelope([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])

    def _send_event(self, payload: dict[str, Any]) -> None:
        self._send_raw(b"data: " + json.dumps(payload).encode() + b"\n\n")

    def _send_piece(self, payload: dict[str, Any], piece: str) -> None:
        """A content delta; its send time noted when the fake records them."""
        data = b"data: " + json.dumps(payload).encode() + b"\n\n"
        frame = b"%x\r\n" % len(data) + data + b"\r\n"
        if self.fake.chunk_times is not None:
            self.fake.chunk_times.append((piece, time.monotonic()))  # list.append: atomic, no lock on the hot path
        self._write(frame)

    def _send_raw(self, data: bytes) -> None:
        self._write(b"%x\r\n" % len(data) + data + b"\r\n")

    def _write(self, data: bytes) -> None:
        self.handler.wfile.write(data)
        self.handler.wfile.flush()

    def _abort(self) -> None:
        """Close the connection abruptly: no further bytes, no terminating chunk."""
        self.handler.close_connection = True
        try:
            self.handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FakeOpenAI:
    """A chat-completions server on 127.0.0.1 (a random free port) while in its `with`."""

    requests: list[dict]
    headers: list[dict[str, str]]

    def __init__(self, *, record_chunk_times: bool = False) -> None:
        self.requests = []
        self.headers = []
        # (content piece, time.monotonic() just before it was written), when recorded
        self.chunk_times: list[tuple[str, float]] | None = [] if record_chunk_times else None
        self.hanging = threading.Event()  # set once a hang() handler has started
        self.server_errors: list[str] = []  # tracebacks of unexpected handler failures
        self._queue: deque[Response] = deque()
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._connections: set[socket.socket] = set()
        self._ids = 0
        self._closing = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FakeOpenAI:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="FakeOpenAI", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        with self._lock:
            self._closing = True
        self._released.set()
        server.shutdown()  # stop accepting
        assert self._thread is not None
        self._thread.join()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # wake handlers blocked reading an idle keep-alive connection
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        server.server_close()  # joins every handler thread

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeOpenAI is not running (use it in a `with` block)")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def reply(self, response: Response) -> None:
        """Queue `response` for the next request (FIFO)."""
        if not isinstance(response, Response):
            raise TypeError(f"expected a Response, got {response!r}")
        with self._lock:
            self._queue.append(response)

    @property
    def pending(self) -> int:
        """How many queued responses no request has taken yet."""
        with self._lock:
            return len(self._queue)

    # --- used by the handlers --------------------------------------------------------

    def _record(self, body: dict, headers: dict[str, str]) -> Response | None:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            return self._queue.popleft() if self._queue else None

    def _next_id(self) -> int:
        with self._lock:
            self._ids += 1
            return self._ids

    def _track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)
            closing = self._closing
        if closing:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)
