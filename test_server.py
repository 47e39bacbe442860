"""Tests for server.py against a scripted fake OpenAI-compatible API on a loopback port.

The fake speaks the real wire format (SSE chunks, tool-call deltas, usage only when asked
for, [DONE]), so the real openai client and AutoGen run end to end. Plain JSON routes run
in-process; streams run under a real uvicorn so SSE framing and disconnects are real.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its test client; httpx is this project's test dependency.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

import server

SERVICE_KEY = "sk-upstream-secret-123"
SERVER_KEY = "server-secret-456"
HERE = Path(__file__).parent


# ---------------------------------------------------------------------------
# The fake model API
# ---------------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted answer of the fake API to one chat completion request."""

    content: str | None = None  # None: echo the last user message
    reasoning: str = ""
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    error_body: dict[str, Any] | None = None
    fault: str | None = None  # drop, truncate, bad_json, hang, stall
    usage: tuple[int, int] = (11, 7)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll a condition until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while time.monotonic() < deadline:
        if condition():
            return True
        tick.wait(0.005)
    return condition()


class FakeModelAPI:
    """A scripted OpenAI-compatible /v1/chat/completions."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.hanging = 0
        self.disconnected = threading.Event()
        self.release: asyncio.Event | None = None
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])])

    def reset(self, *replies: Reply) -> None:
        self.script, self.requests, self.headers = list(replies), [], []
        self.disconnected.clear()

    async def completions(self, request: Request) -> Response:
        if self.release is None:
            self.release = asyncio.Event()
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        reply = self.script.pop(0) if self.script else Reply()
        if reply.status != 200:
            error = reply.error_body or {"error": {"message": "scripted failure", "type": "x"}}
            return JSONResponse(error, status_code=reply.status, headers=reply.headers)
        if reply.fault == "stall":
            await self._hang()
        return StreamingResponse(self._stream(body, reply), media_type="text/event-stream")

    async def _hang(self) -> None:
        self.hanging += 1
        try:
            assert self.release is not None
            await self.release.wait()
        finally:
            self.hanging -= 1
            self.disconnected.set()

    async def _stream(self, body: dict[str, Any], reply: Reply) -> Any:
        model = body["model"]
        if reply.content is None:
            reply.content = "echo: " + last_user_text(body)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            data = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model}
            return f"data: {json.dumps({**data, 'choices': [choice]})}\n\n".encode()

        yield chunk({"role": "assistant", "content": ""})
        for piece in _pieces(reply.reasoning):
            yield chunk({"reasoning_content": piece, "content": None})
        for index, piece in enumerate(_pieces(reply.content if not reply.tool_calls else "")):
            if index == 2 and reply.fault in {"drop", "truncate", "bad_json", "hang"}:
                async for part in self._fault(reply.fault):
                    yield part
                return
            yield chunk({"content": piece})
        for index, (name, arguments) in enumerate(reply.tool_calls):
            call = {"index": index, "id": f"call_{index}", "type": "function"}
            yield chunk({"tool_calls": [{**call, "function": {"name": name, "arguments": ""}}]})
            text = json.dumps(arguments)
            for part in (text[: len(text) // 2], text[len(text) // 2 :]):
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
        yield chunk({}, "tool_calls" if reply.tool_calls else "stop")
        if body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": reply.usage[0], "completion_tokens": reply.usage[1]}
            usage["total_tokens"] = sum(reply.usage)
            data = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model}
            yield f"data: {json.dumps({**data, 'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def _fault(self, fault: str) -> Any:
        if fault == "drop":
            raise ConnectionResetError("scripted drop mid-stream")
        if fault == "bad_json":
            yield b"data: {this is not json\n\n"
        if fault == "hang":
            await self._hang()


def last_user_text(body: dict[str, Any]) -> str:
    return next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")


def _pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)] if text else []


class ServerThread:
    """A real uvicorn serving an app on a free loopback port, in a background thread."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        config.timeout_graceful_shutdown = 3
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert wait_until(lambda: self.server.started), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def call(self, coroutine: Any) -> Any:
        """Run a coroutine on the server's event loop and return its result."""
        loop = self.server.servers[0].get_loop()  # type: ignore[attr-defined]
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(10)


@pytest.fixture(scope="session")
def _upstream_server() -> Iterator[tuple[FakeModelAPI, ServerThread]]:
    fake = FakeModelAPI()
    with ServerThread(fake.app) as thread:
        yield fake, thread


@pytest.fixture
def upstream(_upstream_server: tuple[FakeModelAPI, ServerThread]) -> Iterator[FakeModelAPI]:
    fake, thread = _upstream_server
    fake.reset()
    yield fake
    if fake.release is not None:
        release = fake.release
        thread.server.servers[0].get_loop().call_soon_threadsafe(release.set)  # type: ignore[attr-defined]
        assert wait_until(lambda: fake.hanging == 0)
        fake.release = None


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name in ENV_NAMES:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


ENV_NAMES = {
    line.split("=")[0].strip("# ").strip()
    for line in (HERE / ".env.example").read_text(encoding="utf-8").splitlines()
    if "=" in line
}


@pytest.fixture
def settings_for(
    upstream: FakeModelAPI, _upstream_server: Any, tmp_path: Path
) -> Callable[..., server.Settings]:
    """Settings of a service pointed at the fake API, with env-style overrides."""
    url = _upstream_server[1].url + "/v1"

    def make(**overrides: str) -> server.Settings:
        env = {
            "API_KEY": SERVICE_KEY,
            "BASE_URL": url,
            "DATABASE_PATH": str(tmp_path / "chat.db"),
            "MAX_RETRIES": "0",
            "REQUEST_TIMEOUT": "10",
            "HOST": "127.0.0.1",
        }
        env.update(overrides)
        return server.Settings.from_env(env)

    return make


@pytest.fixture
def client(settings_for: Callable[..., server.Settings]) -> Iterator[TestClient]:
    with TestClient(server.create_app(settings_for())) as test_client:
        yield test_client


@pytest.fixture
def service(settings_for: Callable[..., server.Settings]) -> Iterator[ServerThread]:
    with ServerThread(server.create_app(settings_for())) as thread:
        yield thread


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2
        events.append((lines[0][7:], json.loads(lines[1][6:])))
    return events


def stream(url: str, body: dict[str, Any], **kwargs: Any) -> tuple[httpx.Response, list]:
    with httpx.Client(timeout=30) as http:
        response = http.post(url + "/api/chat/stream", json=body, **kwargs)
    return response, parse_sse(response.text) if response.status_code == 200 else []


def names(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [name for name, _ in events]


# ---------------------------------------------------------------------------
# Smoke
# ---------------------------------------------------------------------------


def test_stream_sends_chunks_message_and_done_in_order(service: ServerThread, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(content="你好 世界 from the model"))
    response, events = stream(service.url, {"message": "hi"})
    assert response.status_code == 200
    assert names(events) == ["status"] + ["chunk"] * 5 + ["message", "done"]
    assert "".join(d["content"] for n, d in events if n == "chunk") == "你好 世界 from the model"
