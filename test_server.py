"""Tests for server.py against a scripted fake OpenAI-compatible API on a loopback port.

The fake speaks the real wire format (SSE chunks, tool-call deltas, usage only when asked
for, [DONE]), so the real openai client and AutoGen run end to end. Plain JSON routes run
in-process; streams run under a real uvicorn so SSE framing and disconnects are real.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import functools
import gc
import importlib.metadata
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import httpx
import openai
import psycopg
import pydantic
import pytest
import uvicorn
from ag_ui import core as agui
from jsonschema import Draft202012Validator  # openapi-spec-validator's own dependency
from openapi_spec_validator import OpenAPIV31SpecValidator
from opentelemetry import trace as trace_api
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from playwright.sync_api import Page, Playwright, expect, sync_playwright
from playwright.sync_api import Route as BrowserRoute
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
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
    fault: str | None = None  # drop, truncate, bad_json, error_event, hang, stall, hold
    finish_reason: str | None = None  # None: "tool_calls" or "stop"
    usage: tuple[int, int] = (11, 7)
    cached_tokens: int | None = None  # reported as OpenAI and DeepSeek do, when given
    reasoning_tokens: int | None = None
    usage_on_finish: bool = False  # usage on the finish chunk, not on a chunk of its own
    call_ids: tuple[str, ...] = ()  # default: call_0, call_1, ...


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
        self.strict: str | None = None  # None: lenient; "deepseek" or "openai": that API's rules
        self.produced: dict[str, str] = {}  # in deepseek mode: the reasoning of each answer it gave
        self.app = Starlette(
            routes=[Route("/v1/chat/completions", self.completions, methods=["POST"]), Route("/v1/models", self.models)]
        )
        self.model_lists = 0

    def reset(self, *replies: Reply, strict: str | None = None) -> None:
        self.script, self.requests, self.headers = list(replies), [], []
        self.strict, self.produced = strict, {}
        self.disconnected.clear()

    async def completions(self, request: Request) -> Response:
        if self.release is None:
            self.release, self.loop = asyncio.Event(), asyncio.get_running_loop()
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        refusal = deepseek_refusal(body, self.produced) if self.strict == "deepseek" else None
        refusal = openai_refusal(body) if self.strict == "openai" else refusal
        if refusal is not None:
            # Both APIs' error shape; DeepSeek repeats the type as the code, OpenAI leaves it null.
            code = "invalid_request_error" if self.strict == "deepseek" else None
            error = {"message": refusal, "type": "invalid_request_error", "param": None, "code": code}
            return JSONResponse({"error": error}, status_code=400)
        reply = self.script.pop(0) if self.script else Reply()
        if self.strict == "deepseek":
            reply = self._deepseek_reply(body, reply)
        if reply.status != 200:
            error = reply.error_body or {"error": {"message": "scripted failure", "type": "x"}}
            return JSONResponse(error, status_code=reply.status, headers=reply.headers)
        if reply.fault == "stall":
            await self._hang()
        return StreamingResponse(self._stream(body, reply), media_type="text/event-stream")

    async def models(self, request: Request) -> Response:
        self.model_lists += 1
        return JSONResponse({"object": "list", "data": [{"id": "deepseek-flash", "object": "model", "created": 1,
                                                         "owned_by": "fake"}]})  # fmt: skip

    def end_hang(self) -> None:
        """Let hanging requests go on (from the test's thread)."""
        assert self.release is not None
        self.loop.call_soon_threadsafe(self.release.set)

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
        if reply.content is None and not reply.tool_calls:
            reply.content = "echo: " + last_user_text(body)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            data = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model}
            return f"data: {json.dumps({**data, 'choices': [choice]})}\n\n".encode()

        yield chunk({"role": "assistant", "content": ""})
        for piece in _pieces(reply.reasoning):
            yield chunk({"reasoning_content": piece, "content": None})
        for index, piece in enumerate(_pieces(reply.content or "")):  # with tool calls: the text beside them
            if index == 2 and reply.fault in {"drop", "truncate", "bad_json", "error_event", "hang"}:
                async for part in self._fault(reply.fault):
                    yield part
                return
            if index == 2 and reply.fault == "hold":  # hold the stream open, then finish it
                await self._hang()
            # DeepSeek marks the end of the reasoning with a null reasoning_content.
            yield chunk({"content": piece, **({"reasoning_content": None} if self.strict == "deepseek" else {})})
        for index, (name, arguments) in enumerate(reply.tool_calls):
            call_id = reply.call_ids[index] if reply.call_ids else f"call_{index}"
            call = {"index": index, "id": call_id, "type": "function"}
            yield chunk({"tool_calls": [{**call, "function": {"name": name, "arguments": ""}}]})
            text = json.dumps(arguments)
            for part in (text[: len(text) // 2], text[len(text) // 2 :]):
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
        finish = reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")
        usage = self._usage(reply) if body.get("stream_options", {}).get("include_usage") else None
        if usage is not None and reply.usage_on_finish:
            yield chunk({}, finish)[:-3] + b',"usage":' + json.dumps(usage).encode() + b"}\n\n"
        else:
            yield chunk({}, finish)
        if usage is not None and not reply.usage_on_finish:
            data = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model}
            yield f"data: {json.dumps({**data, 'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def _usage(self, reply: Reply) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": reply.usage[0], "completion_tokens": reply.usage[1]}
        usage["total_tokens"] = sum(reply.usage)
        if reply.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": reply.cached_tokens}
            if self.strict == "deepseek":  # DeepSeek also reports the hits and misses on their own
                usage["prompt_cache_hit_tokens"] = reply.cached_tokens
                usage["prompt_cache_miss_tokens"] = reply.usage[0] - reply.cached_tokens
        if reply.reasoning_tokens is not None:
            usage["completion_tokens_details"] = {"reasoning_tokens": reply.reasoning_tokens}
        return usage

    def _deepseek_reply(self, body: dict[str, Any], reply: Reply) -> Reply:
        """As DeepSeek V4 answers: thinking unless told not to, remembering what it thought."""
        if body.get("thinking", {}).get("type") == "disabled":
            return dataclasses.replace(reply, reasoning="")
        if reply.status != 200:
            return reply
        reasoning = reply.reasoning or DEFAULT_REASONING
        # Call ids unique per request, so the reasoning of each call can be looked up later.
        ids = tuple(f"call_{len(self.requests)}_{index}" for index in range(len(reply.tool_calls)))
        key = " ".join(ids) or (reply.content if reply.content is not None else "echo: " + last_user_text(body))
        self.produced[key] = reasoning
        return dataclasses.replace(reply, reasoning=reasoning, content=None if ids else key, call_ids=ids)

    async def _fault(self, fault: str) -> Any:
        if fault == "drop":
            raise ConnectionResetError("scripted drop mid-stream")
        if fault == "bad_json":
            yield b"data: {this is not json\n\n"
        if fault == "error_event":  # as OpenRouter reports a failure mid-stream: a chunk with an error
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]}  # fmt: skip
            yield f"data: {json.dumps({**chunk, 'error': {'message': 'overloaded', 'code': 502}})}\n\n".encode()
        if fault == "hang":
            await self._hang()


# Starts with "the" and ends with "k": AutoGen 0.7.5's lstrip("<think>")/rstrip("</think>") would eat letters.
DEFAULT_REASONING = "the user asks; a tool may help.\n  I should think"
DEEPSEEK_MODELS = {"deepseek-flash", "deepseek-v4-flash", "deepseek-v4-pro"}
PASS_BACK = "The `reasoning_content` in the thinking mode must be passed back to the API."
OPENAI_BODY_FIELDS = {
    "model", "messages", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls", "temperature",
    "top_p", "max_tokens", "max_completion_tokens", "n", "stop", "presence_penalty", "frequency_penalty", "seed",
    "user", "response_format", "logprobs", "top_logprobs", "logit_bias", "metadata", "store", "service_tier",
}  # fmt: skip
OPENAI_MESSAGE_FIELDS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls", "refusal", "audio"},
    "tool": {"role", "content", "tool_call_id"},
}


# OpenAI's answer for a model it does not know.
OPENAI_UNKNOWN_MODEL = {
    "error": {
        "message": "The model `x` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
}


def deepseek_refusal(body: dict[str, Any], produced: dict[str, str]) -> str | None:
    """What DeepSeek V4's API would refuse this request for, if anything."""
    if body.get("model") not in DEEPSEEK_MODELS:
        return "Model Not Exist"
    if body.get("thinking", {"type": "enabled"}).get("type") not in ("enabled", "disabled"):
        return "thinking.type must be enabled or disabled"
    if body.get("reasoning_effort", "high") not in ("low", "high", "max"):
        return "reasoning_effort must be low, high or max"
    calls: set[str] = set()
    for message in body["messages"]:
        if message["role"] == "assistant":
            calls = {call["id"] for call in message.get("tool_calls") or []}
        elif message["role"] == "tool" and message["tool_call_id"] not in calls:
            return "Messages with role 'tool' must be a response to a preceding message with 'tool_calls'"
    if body.get("thinking", {}).get("type") == "disabled":
        return None
    for turn in split_turns(body["messages"]):
        if not any(m.get("tool_calls") for m in turn):
            continue
        for message in turn:
            key = " ".join(c["id"] for c in message.get("tool_calls") or []) or message.get("content")
            sent = message.get("reasoning_content")
            if not isinstance(sent, str) or produced.get(key, sent) != sent:
                return PASS_BACK
    return None


def split_turns(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The assistant messages of each turn: the messages between two user messages."""
    turns: list[list[dict[str, Any]]] = [[]]
    for message in messages:
        if message["role"] == "user":
            turns.append([])
        elif message["role"] == "assistant":
            turns[-1].append(message)
    return turns


def openai_refusal(body: dict[str, Any]) -> str | None:
    """What OpenAI's API would refuse for an unknown field in the body or a message."""
    unknown = set(body) - OPENAI_BODY_FIELDS
    if unknown:
        return f"Unrecognized request argument supplied: {', '.join(sorted(unknown))}"
    for index, message in enumerate(body["messages"]):
        extra = set(message) - OPENAI_MESSAGE_FIELDS[message["role"]]
        if extra:
            return f"Additional properties are not allowed ({sorted(extra)} were unexpected) - 'messages.{index}'"
    return None


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

    def __enter__(self) -> Self:
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

    @property
    def app_ctx(self) -> server.AppContext:
        return self.server.config.app.state.ctx

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


# ---------------------------------------------------------------------------
# PostgreSQL for the tests
# ---------------------------------------------------------------------------


class PostgresCluster:
    """A throwaway PostgreSQL cluster from the installed binaries on a free loopback port,
    run as the postgres user (initdb refuses root), with fsync off."""

    def __init__(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not found:
            pytest.fail(
                "The PostgreSQL tests need PostgreSQL: apt-get install -y postgresql (or set TEST_DATABASE_URL)"
            )
        self.bin, self.port = found[-1].parent, free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="chat-pg-"))
        password = self.dir / "password"
        password.write_text(POSTGRES_PASSWORD, encoding="utf-8")
        for path in (self.dir, password):
            shutil.chown(path, "postgres", "postgres")
        self._run("initdb", "-D", "data", "-U", "postgres", "--auth-host=scram-sha-256", "--auth-local=trust",
                  f"--pwfile={password}", "--no-sync", "-E", "UTF8")  # fmt: skip
        self.start()
        admin = f"postgresql://postgres:{POSTGRES_PASSWORD}@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f"CREATE ROLE chat LOGIN PASSWORD '{POSTGRES_PASSWORD}'")
            connection.execute("CREATE DATABASE chat OWNER chat")
        self.url = f"postgresql://chat:{POSTGRES_PASSWORD}@127.0.0.1:{self.port}/chat"

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, cwd=self.dir, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c fsync=off -c unix_socket_directories={self.dir}"
        self._run("pg_ctl", "-D", "data", "-l", "log", "-w", "-o", options, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", "data", "-w", "-m", "fast", "stop")

    def processes(self) -> list[int]:
        """The postmaster and its children."""
        postmaster = int((self.dir / "data" / "postmaster.pid").read_text().split()[0])
        return [postmaster, *child_processes(postmaster, b"postgres")]

    def freeze(self) -> None:
        """Stop every process of the cluster, as a frozen host: its kernel still acknowledges."""
        self.frozen = self.processes()
        for pid in self.frozen:
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in getattr(self, "frozen", []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = []

    def sql(self, statement: str, database: str = "postgres") -> None:
        admin = f"postgresql://postgres:{POSTGRES_PASSWORD}@127.0.0.1:{self.port}/{database}"
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(statement)  # type: ignore[arg-type]

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


POSTGRES_PASSWORD = "pg-secret-789"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """TEST_DATABASE_URL, else a cluster of our own for the session."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
        return
    cluster = PostgresCluster()
    try:
        yield cluster.url
    finally:
        cluster.remove()


def empty_postgres(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            "DROP TABLE IF EXISTS messages, conversations, leases, approvals, call_reasoning, artifacts, schema_version"
        )


@pytest.fixture
def database(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The database settings of a test: SQLite, or an empty PostgreSQL under BOTH_DATABASES."""
    if getattr(request, "param", "sqlite") == "sqlite":
        return {"DATABASE_PATH": str(tmp_path / "chat.db")}
    url = request.getfixturevalue("postgres_url")
    empty_postgres(url)
    return {"DATABASE_URL": url}


BOTH_DATABASES = pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def settings_for(
    upstream: FakeModelAPI, _upstream_server: Any, tmp_path: Path, database: dict[str, str]
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
            **database,
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


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, int]:
    """A turn's usage as the /api faces give it."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "cached_tokens": cached,
            "reasoning_tokens": reasoning}  # fmt: skip


# ---------------------------------------------------------------------------
# openapi.json as a test oracle
# ---------------------------------------------------------------------------

OPENAPI = json.loads((HERE / "openapi.json").read_text(encoding="utf-8"))


def schema_validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for a schema of openapi.json, its $refs resolved within the document."""
    root = {**schema, "components": OPENAPI["components"]}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


def resolve(item: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in item:
        item = functools.reduce(lambda node, key: node[key], item["$ref"][2:].split("/"), OPENAPI)
    return item


def template_of(method: str, path: str) -> str | None:
    """The documented path a request path falls under, if the method is documented there."""
    for template, item in OPENAPI["paths"].items():
        pattern = re.sub(r"\{\w+\}", "[^/]+", template.replace("{path}", ".+"))  # Starlette's {path:path}
        if method.lower() in item and re.fullmatch(pattern, path):
            return template
    return None


def sse_events(text: str) -> list[dict[str, str]]:
    """Events as an SSE client parses them (comments skipped, one event per blank line)."""
    events, event = [], {}
    for line in text.split("\n"):
        if not line:
            if "data" in event:
                events.append({"event": "message", **event})
            event = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            event[field] = value.removeprefix(" ")
    return events


def assert_event_documented(event: dict[str, str], schema: dict[str, Any] | None = None) -> None:
    """One parsed event against a stream's event schema (by default /api's), and its data against
    the contentSchema of the branch it falls under (validators take contentSchema as a note)."""
    schema = schema or OPENAPI["components"]["schemas"]["ChatEvent"]
    schema_validator(schema).validate(event)
    [branch] = [branch for branch in schema["oneOf"] if schema_validator(branch).is_valid(event)]
    if "contentSchema" in branch["properties"]["data"]:
        schema_validator(branch["properties"]["data"]["contentSchema"]).validate(json.loads(event["data"]))


def assert_documented(response: httpx.Response) -> None:
    """The status is listed for the operation and the body validates against what it lists; an
    unknown path or method gets the shared error shape."""
    template = template_of(response.request.method, response.request.url.path)
    if template is None:
        schema_validator(OPENAPI["components"]["schemas"]["Error"]).validate(response.json())
        return
    responses = responses_of(response.request.method.lower(), template)
    assert str(response.status_code) in responses, f"{response.request.url} gave {response.status_code}"
    documented = resolve(responses[str(response.status_code)])
    for name, header in documented.get("headers", {}).items():
        if name in response.headers:
            schema_validator(header["schema"]).validate(response.headers[name])
    media_type = response.headers.get("content-type", "").split(";")[0]
    content = set(documented.get("content", {}))
    assert bool(content & {media_type, "*/*"}) if response.content else not content, (content, media_type)
    if media_type == "text/event-stream":
        for event in sse_events(response.text):
            assert_event_documented(event, resolve(documented["content"][media_type]["schema"]))
    elif media_type == "application/json":
        schema_validator(documented["content"][media_type]["schema"]).validate(response.json())


@contextlib.contextmanager
def held_stream(url: str, body: dict[str, Any], upstream: FakeModelAPI) -> Iterator[tuple[str, Iterator[str]]]:
    """A stream kept open while its model call hangs at the fake API: its first text and the rest."""
    with httpx.Client(timeout=10) as http, http.stream("POST", url + "/api/chat/stream", json=body) as response:
        received = response.iter_text()  # one iterator: dropping it would close the stream
        first = next(received)
        assert wait_until(lambda: upstream.hanging == 1)
        yield first, received


# ---------------------------------------------------------------------------
# A real browser
# ---------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
# A name that is not loopback: Swagger UI, for one, behaves differently on localhost.
PAGE_HOST = "autogen-chat.test"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--host-resolver-rules=MAP {PAGE_HOST} 127.0.0.1"]  # fmt: skip
expect.set_options(timeout=10_000)  # the machine may be busy with other tests


@dataclass
class Tab:
    page: Page
    url: str  # the service, as the browser reaches it
    elsewhere: list[str] = field(default_factory=list)  # requests for other hosts, all blocked
    errors: list[str] = field(default_factory=list)  # uncaught script errors
    warnings: list[str] = field(default_factory=list)  # the console's warnings and errors
    missing: list[str] = field(default_factory=list)  # requests the service answered 404


class Chromium:
    """Debian's chromium: each tab a browser of its own with a new empty profile, so tabs share
    no storage and each has its own language and window size."""

    def __init__(self, playwright: Playwright, profiles: Path) -> None:
        self.playwright, self.profiles = playwright, profiles
        self.tabs: list[Tab] = []

    def open(self, service_url: str, **options: Any) -> Tab:
        """A tab on the service that can reach no other host."""
        options = {"locale": "en-US", "viewport": {"width": 1100, "height": 760}, **options}
        context = self.playwright.chromium.launch_persistent_context(
            self.profiles / f"profile-{len(self.tabs)}", executable_path=CHROMIUM, args=CHROMIUM_ARGS, **options
        )
        tab = Tab(context.pages[0], service_url.replace("127.0.0.1", PAGE_HOST))

        def only_the_service(route: BrowserRoute) -> None:
            if route.request.url.startswith(tab.url + "/"):
                route.continue_()
            else:
                tab.elsewhere.append(route.request.url)
                route.abort()

        tab.page.route("**/*", only_the_service)
        tab.page.on("pageerror", lambda error: tab.errors.append(str(error)))
        tab.page.on("console", lambda m: tab.warnings.append(m.text) if m.type in {"warning", "error"} else None)
        tab.page.on("response", lambda r: tab.missing.append(r.url) if r.status == 404 else None)
        self.tabs.append(tab)
        return tab


@pytest.fixture
def chromium(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Chromium]:
    """Tabs for one test; a failed test leaves a screenshot of each in its tmp_path, and an
    uncaught script error fails the test."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium", pytrace=False)
    failures = request.session.testsfailed
    # Per test, not per session: sync_playwright() marks an event loop running on this thread
    # for as long as it is open, which breaks asyncio.run() in the tests after it.
    with sync_playwright() as playwright:
        chromium = Chromium(playwright, tmp_path)
        try:
            yield chromium
            if request.session.testsfailed > failures:  # the failed call has been reported by now
                for index, tab in enumerate(chromium.tabs):
                    tab.page.screenshot(path=tmp_path / f"failure-{index}.png", full_page=True)
                    print(f"screenshot of the failed test's page: {tmp_path / f'failure-{index}.png'}")
        finally:
            for tab in chromium.tabs:
                tab.page.context.close()
    assert [error for tab in chromium.tabs for error in tab.errors] == []


@pytest.fixture
def tab(chromium: Chromium, service: ServerThread) -> Tab:
    return chromium.open(service.url)


# ---------------------------------------------------------------------------
# Streaming and JSON chat
# ---------------------------------------------------------------------------


def test_stream_sends_status_chunks_message_and_done_in_order(service: ServerThread, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(content="你好 世界 from the model"))
    response, events = stream(service.url, {"message": "hi"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-accel-buffering"] == "no"
    assert names(events) == ["status"] + ["chunk"] * 5 + ["message", "done"]
    started, done = events[0][1], events[-1][1]
    assert started["status"] == "started" and started["conversation_id"] == done["conversation_id"]
    assert "".join(d["content"] for n, d in events if n == "chunk") == "你好 世界 from the model"
    assert events[-2][1] == {"content": "你好 世界 from the model", "source": "assistant"}
    assert done["usage"] == usage(11, 7) and done["finish_reason"] == "stop"


def test_stream_events_are_one_line_json_with_readable_chinese(service: ServerThread, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(content="第一行\n第二行"))
    response, events = stream(service.url, {"message": "hi"})
    assert "第一行\\n第二行" in response.text
    for block in response.text.strip().split("\n\n"):
        assert len(block.split("\n")) == 2
    assert events[-2][1]["content"] == "第一行\n第二行"


def test_model_api_is_asked_for_usage_in_streams(client: TestClient, upstream: FakeModelAPI) -> None:
    client.post("/api/chat", json={"message": "hi"})
    assert upstream.requests[0]["stream"] is True
    assert upstream.requests[0]["stream_options"] == {"include_usage": True}
    assert upstream.headers[0]["authorization"] == f"Bearer {SERVICE_KEY}"


def test_chat_answers_json_with_message_usage_and_conversation_id(client: TestClient, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(content="Paris is the capital."))
    response = client.post("/api/chat", json={"message": "Capital of France?"})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "success"
    assert body["message"] == "Paris is the capital."
    assert body["usage"] == usage(11, 7)
    assert body["tool_calls"] == [] and body["finish_reason"] == "stop"
    assert len(body["conversation_id"]) == 36


def test_an_answer_cut_at_the_token_limit_is_kept_and_reported_as_length(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="the start of", finish_reason="length"), Reply(content="cut", finish_reason="length"))
    _, events = stream(service.url, {"message": "long", "conversation_id": "cut"})
    with httpx.Client(timeout=10) as http:
        answered = http.post(service.url + "/api/chat", json={"message": "more", "conversation_id": "cut"}).json()
        stored = http.get(service.url + "/api/conversations/cut").json()["messages"]
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "length"
    assert answered["status"] == "success" and answered["finish_reason"] == "length"
    assert [m["content"] for m in stored] == ["long", "the start of", "more", "cut"]


def test_calculate_tool_runs_end_to_end_and_its_result_reaches_the_model(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(tool_calls=[("calculate", {"expression": "(2 + 3) * 4 ** 2"})]), Reply(content="It is 80."))
    _response, events = stream(service.url, {"message": "What is (2+3)*4^2?"})
    assert names(events) == [
        "status", "status", "tool_call", "tool_result", "status", "chunk", "chunk", "chunk", "message", "done",
    ]  # fmt: skip
    assert [d["status"] for n, d in events if n == "status"] == ["started", "calling_tool", "responding"]
    call, result = events[2][1], events[3][1]
    assert call == {"id": "call_0", "name": "calculate", "arguments": '{"expression": "(2 + 3) * 4 ** 2"}'}
    assert result == {"call_id": "call_0", "name": "calculate", "content": "80", "is_error": False}
    tool_message = upstream.requests[1]["messages"][-1]
    assert tool_message == {"role": "tool", "tool_call_id": "call_0", "content": "80"}
    assert events[-1][1]["usage"] == usage(22, 14)


def test_chat_json_lists_tool_calls_with_their_results(client: TestClient, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(tool_calls=[("get_current_time", {"timezone": "Asia/Tokyo"})]), Reply(content="Now."))
    body = client.post("/api/chat", json={"message": "time in Tokyo?"}).json()
    [call] = body["tool_calls"]
    assert call["name"] == "get_current_time" and call["is_error"] is False
    assert call["result"].endswith("Asia/Tokyo)") and "+09:00" in call["result"]
    assert body["message"] == "Now."


def test_bad_time_zone_is_a_tool_error_and_the_turn_still_completes(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(tool_calls=[("get_current_time", {"timezone": "Mars/Base"})]), Reply(content="Sorry."))
    _, events = stream(service.url, {"message": "time on Mars?"})
    result = next(d for n, d in events if n == "tool_result")
    assert result["is_error"] is True and "Mars/Base" in result["content"]
    assert names(events)[-1] == "done"


def test_reasoning_goes_to_thought_events_and_chunks_carry_only_the_answer(
    service: ServerThread, upstream: FakeModelAPI, settings_for: Callable[..., server.Settings]
) -> None:
    upstream.reset(Reply(reasoning="Let me think about it", content="The answer is 4."))
    _, events = stream(service.url, {"message": "2+2?"})
    thought = "".join(d["content"] for n, d in events if n == "thought")
    answer = "".join(d["content"] for n, d in events if n == "chunk")
    assert thought == "Let me think about it"
    assert answer == "The answer is 4."
    assert names(events).index("thought") < names(events).index("chunk")
    assert events[-2] == ("message", {"content": "The answer is 4.", "source": "assistant"})


def test_think_tags_in_the_content_of_local_r1_models_become_thought_events(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="<think>Two and two make four.</think> It is 4."))
    _, events = stream(service.url, {"message": "2+2?"})
    assert "".join(d["content"] for n, d in events if n == "thought") == "Two and two make four."
    assert "".join(d["content"] for n, d in events if n == "chunk") == "It is 4."
    assert events[-2] == ("message", {"content": "It is 4.", "source": "assistant"})


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 1000], ids=lambda size: f"pieces-of-{size}")
def test_think_tags_give_the_same_parts_however_the_text_is_cut(size: int) -> None:
    text = "  <think>plan: 1 < 2 </thin k></think>\n\nThe answer <think> stays text."
    tags, parts = server.ThinkTags(), []
    for start in range(0, len(text), size):
        parts += tags.feed(text[start : start + size])
    parts += tags.flush()
    assert "".join(t for kind, t in parts if kind == "reasoning") == "plan: 1 < 2 </thin k>"
    assert "".join(t for kind, t in parts if kind == "text") == "The answer <think> stays text."


def test_reasoning_with_a_closing_think_tag_in_it_stays_reasoning_and_the_answer_stays_clean(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(reasoning="is </think> a tag? no", content="Plain answer."))
    _, events = stream(service.url, {"message": "hi"})
    assert "".join(d["content"] for n, d in events if n == "thought") == "is </think> a tag? no"
    assert "".join(d["content"] for n, d in events if n == "chunk") == "Plain answer."


def test_an_answer_that_starts_with_a_think_tag_is_kept_whole_where_the_api_streams_reasoning_apart(
    sdk: openai.OpenAI, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(reasoning="the user wants a tag", content="<think> is an HTML-like tag."))
    answer = sdk.chat.completions.create(model="m", messages=ASK).choices[0].message
    assert answer.content == "<think> is an HTML-like tag."
    assert answer.reasoning_content == "the user wants a tag"  # type: ignore[attr-defined]


def answers_on_every_face(url: str, upstream: FakeModelAPI, reply: Reply, turns: int = 1) -> dict[str, str]:
    """The answer text as each face gives it: the joined chunks, the message event, the JSON
    reply, /v1 streamed and not, and the stored messages (their content joined as the turn's answer)."""
    upstream.reset(*[dataclasses.replace(reply) for _ in range(6 * turns)])
    _, events = stream(url, {"message": "hi", "conversation_id": "same"})
    found = {"chunks": "".join(d["content"] for n, d in events if n == "chunk")}
    found["message"] = next(d["content"] for n, d in events if n == "message")
    found["json"] = httpx.post(url + "/api/chat", json={"message": "hi"}, timeout=10).json()["message"]
    with openai.OpenAI(base_url=url + "/v1", api_key="any", max_retries=0) as sdk:
        found["v1"] = sdk.chat.completions.create(model="m", messages=ASK).choices[0].message.content or ""
        found["v1_stream"] = joined(list(sdk.chat.completions.create(model="m", messages=ASK, stream=True)), "content")
    stored = httpx.get(url + "/api/conversations/same", timeout=10).json()["messages"]
    found["stored"] = "\n\n".join(m["content"] for m in stored if m["role"] == "assistant" and m["content"])
    return found


@pytest.mark.parametrize("text", ["  two spaces first", "\nA line first", "plain"], ids=["spaces", "newline", "plain"])
def test_every_face_gives_the_same_answer_leading_white_space_included(
    service: ServerThread, upstream: FakeModelAPI, text: str
) -> None:
    found = answers_on_every_face(service.url, upstream, Reply(content=text))
    assert found == dict.fromkeys(found, text)


def test_text_beside_a_tool_call_is_kept_in_order_on_every_face_and_in_the_models_context(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    script = [Reply(content="Let me check.", tool_calls=[("calculate", {"expression": "6*7"})]), Reply(content="42.")]
    upstream.reset(*script * 5)
    _, events = stream(service.url, {"message": "6*7?", "conversation_id": "beside"})
    chunks = "".join(d["content"] for n, d in events if n == "chunk")
    message = next(d["content"] for n, d in events if n == "message")
    reply = httpx.post(service.url + "/api/chat", json={"message": "6*7?"}, timeout=10).json()
    with openai.OpenAI(base_url=service.url + "/v1", api_key="any", max_retries=0) as sdk:
        v1 = sdk.chat.completions.create(model="m", messages=ASK).choices[0].message.content
        v1_stream = joined(list(sdk.chat.completions.create(model="m", messages=ASK, stream=True)), "content")
    stored = httpx.get(service.url + "/api/conversations/beside", timeout=10).json()["messages"]
    assert {chunks, message, reply["message"], v1, v1_stream} == {"Let me check.\n\n42."}
    assert [(m["role"], m.get("content")) for m in stored] == [
        ("user", "6*7?"), ("assistant", "Let me check."), ("tool", "42"), ("assistant", "42.")
    ]  # fmt: skip
    sent = [m for m in upstream.requests[1]["messages"] if m["role"] == "assistant"]
    assert sent[0]["content"] == "Let me check." and sent[0]["tool_calls"][0]["function"]["name"] == "calculate"
    upstream.reset(Reply(content="Yes."))
    stream(service.url, {"message": "Sure?", "conversation_id": "beside"})
    later = [m for m in upstream.requests[0]["messages"] if m["role"] == "assistant"]
    assert [m["content"] for m in later] == ["Let me check.", "42."]


def test_a_lone_surrogate_in_the_models_output_still_ends_the_stream_with_done(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="half \ud800 a pair"))
    response, events = stream(service.url, {"message": "hi", "conversation_id": "half"})
    assert names(events)[-1] == "done"
    assert "".join(d["content"] for n, d in events if n == "chunk") == "half \ufffd a pair"
    stored = httpx.get(service.url + "/api/conversations/half", timeout=10).json()["messages"]
    assert stored[-1]["content"] == "half \ufffd a pair"


@pytest.mark.parametrize("placement", ["own-chunk", "finish-chunk"])
@pytest.mark.parametrize("strict", [None, "deepseek"], ids=["openai-shaped", "deepseek"])
def test_cached_and_reasoning_tokens_reach_every_face_and_the_stored_turn(
    service: ServerThread, upstream: FakeModelAPI, placement: str, strict: str | None
) -> None:
    reply = Reply(content="Cached.", usage=(1000, 300), cached_tokens=900, reasoning_tokens=200,
                  usage_on_finish=placement == "finish-chunk")  # fmt: skip
    expected = usage(1000, 300, cached=900, reasoning=200)
    upstream.reset(*[dataclasses.replace(reply) for _ in range(4)], strict=strict)
    model = "deepseek-flash"
    _, events = stream(service.url, {"message": "hi", "conversation_id": "tokens"})
    assert events[-1][1]["usage"] == expected
    assert httpx.post(service.url + "/api/chat", json={"message": "hi"}, timeout=10).json()["usage"] == expected
    stored = httpx.get(service.url + "/api/conversations/tokens", timeout=10).json()["messages"]
    assert stored[-1]["usage"] == expected
    with openai.OpenAI(base_url=service.url + "/v1", api_key="any", max_retries=0) as sdk:
        answered = sdk.chat.completions.create(model=model, messages=ASK).usage
        chunks = list(sdk.chat.completions.create(model=model, messages=ASK, stream=True,
                                                  stream_options={"include_usage": True}))  # fmt: skip
    for got in (answered, chunks[-1].usage):
        assert (got.prompt_tokens, got.completion_tokens, got.total_tokens) == (1000, 300, 1300)
        assert got.prompt_tokens_details.cached_tokens == 900
        assert got.completion_tokens_details.reasoning_tokens == 200


@BOTH_DATABASES
def test_stored_assistant_message_keeps_the_thought_apart(client: TestClient, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(reasoning="hmm", content="Four."))
    conversation_id = client.post("/api/chat", json={"message": "2+2?"}).json()["conversation_id"]
    messages = client.get(f"/api/conversations/{conversation_id}").json()["messages"]
    assert messages[1]["content"] == "Four." and messages[1]["thought"] == "hmm"


def test_a_ping_comment_is_sent_while_the_model_is_quiet(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="a b c d", fault="hang"))
    with ServerThread(server.create_app(settings_for(PING_INTERVAL="0.05"))) as service:
        with httpx.Client(timeout=10) as http:
            with http.stream("POST", service.url + "/api/chat/stream", json={"message": "hi"}) as response:
                seen = ""
                for text in response.iter_text():
                    seen += text
                    # A slow start may ping before the first chunk too; the quiet comes after it.
                    if ": ping\n\n" in seen.partition("event: chunk")[2]:
                        break
    assert ": ping\n\n" in seen.partition("event: chunk")[2]


def raw_stream_request(url: str, body: dict[str, Any], receive_buffer: int) -> socket.socket:
    """A stream request on a raw socket with a small receive buffer, not read yet: a slow reader."""
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    host, port = url.removeprefix("http://").split(":")
    reader.connect((host, int(port)))
    data = json.dumps(body).encode()
    reader.sendall(
        b"POST /api/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return reader


def read_to_the_end(reader: socket.socket, within: float = 10.0) -> bytes:
    """What the socket receives until the chunked terminator, or until `within` seconds pass."""
    received, deadline = b"", time.monotonic() + within
    reader.settimeout(0.5)
    while not received.endswith(b"0\r\n\r\n") and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            received += reader.recv(1 << 20) or b""
    return received


async def queue_behind_the_end(turn: server.Turn, event: server.Event) -> None:
    turn.events.put_nowait(event)


def test_a_stream_ends_after_done_even_when_the_reader_lags_behind_the_turn(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    long_answer = " ".join(f"{i:05d}" + "x" * 500 for i in range(6000))  # about 3 MB of events
    upstream.reset(Reply(content=long_answer))
    with ServerThread(server.create_app(settings_for(PING_INTERVAL="0.05"))) as service:
        # Accepted sockets inherit the listener's send buffer: keep the kernel from taking it all.
        service.server.servers[0].sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        reader = raw_stream_request(service.url, {"message": "long", "conversation_id": "lag"}, 65536)
        try:
            assert wait_until(lambda: len(service.app_ctx.turns) == 1)
            [turn] = service.app_ctx.turns
            assert wait_until(turn.task.done, timeout=30)
            assert service.call(service.app_ctx.store.get_conversation("lag")) is not None
            assert not turn.events.empty(), "the reader was not actually behind when the turn ended"
            assert turn.timer.cancelled(), "the turn's timer still runs after its task ended"
            service.call(queue_behind_the_end(turn, server.PING))  # as a tick after the end once did
            received = read_to_the_end(reader)
        finally:
            reader.close()
    assert received.endswith(b"0\r\n\r\n"), "the stream never ended"
    assert b"event: done" in received and b": ping" not in received[received.rindex(b"event: done") :]


# ---------------------------------------------------------------------------
# Conversations and memory
# ---------------------------------------------------------------------------


@BOTH_DATABASES
def test_second_turn_sends_the_first_turn_to_the_model(client: TestClient, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(content="Nice to meet you, Ada."), Reply(content="You are Ada."))
    first = client.post("/api/chat", json={"message": "I am Ada."}).json()
    client.post("/api/chat", json={"message": "Who am I?", "conversation_id": first["conversation_id"]})
    sent = [(m["role"], m["content"]) for m in upstream.requests[1]["messages"]]
    assert sent[0][0] == "system"
    assert sent[1:] == [("user", "I am Ada."), ("assistant", "Nice to meet you, Ada."), ("user", "Who am I?")]


@BOTH_DATABASES
def test_unknown_conversation_id_starts_a_new_conversation_under_that_id(
    client: TestClient, upstream: FakeModelAPI
) -> None:
    body = client.post("/api/chat", json={"message": "hi", "conversation_id": "my-chat:1"}).json()
    assert body["conversation_id"] == "my-chat:1"
    assert len(upstream.requests[0]["messages"]) == 2
    assert client.get("/api/conversations/my-chat:1").status_code == 200


@BOTH_DATABASES
def test_conversation_survives_a_restart_on_the_same_database(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    settings = settings_for()
    with TestClient(server.create_app(settings)) as first:
        first.post("/api/chat", json={"message": "Remember 42.", "conversation_id": "keep"})
    with TestClient(server.create_app(settings)) as second:
        second.post("/api/chat", json={"message": "What number?", "conversation_id": "keep"})
        stored = second.get("/api/conversations/keep").json()
    sent = [m["content"] for m in upstream.requests[1]["messages"][1:]]
    assert sent == ["Remember 42.", "echo: Remember 42.", "What number?"]
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "user", "assistant"]


@BOTH_DATABASES
def test_history_sent_to_the_model_is_bounded_and_starts_at_a_user_message(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    with TestClient(server.create_app(settings_for(MAX_HISTORY_MESSAGES="3"))) as client:
        upstream.reset(Reply(tool_calls=[("calculate", {"expression": "1+1"})]), Reply(content="2"))
        client.post("/api/chat", json={"message": "one", "conversation_id": "c"})
        for text in ("two", "three"):
            client.post("/api/chat", json={"message": text, "conversation_id": "c"})
        stored = client.get("/api/conversations/c").json()["messages"]
    sent = [(m["role"], m["content"]) for m in upstream.requests[-1]["messages"]]
    assert sent == [("system", sent[0][1]), ("user", "two"), ("assistant", "echo: two"), ("user", "three")]
    assert len(stored) == 8  # all are stored: user, call, result, answer, then two short turns


@pytest.mark.parametrize("size", [2, 3, 4, 5], ids=lambda size: f"window-{size}")
def test_tool_result_is_never_sent_without_its_call(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, size: int
) -> None:
    with TestClient(server.create_app(settings_for(MAX_HISTORY_MESSAGES=str(size)))) as client:
        upstream.reset(Reply(tool_calls=[("calculate", {"expression": "1+1"})]), Reply(content="2"))
        client.post("/api/chat", json={"message": "one", "conversation_id": "c"})
        client.post("/api/chat", json={"message": "two", "conversation_id": "c"})
    for request in upstream.requests:
        roles = [m["role"] for m in request["messages"]]
        assert roles[1] == "user"
        for index, role in enumerate(roles):
            if role == "tool":
                assert roles[index - 1] in {"assistant", "tool"}


@BOTH_DATABASES
def test_conversations_are_listed_newest_first_with_paging(client: TestClient, upstream: FakeModelAPI) -> None:
    for name in ("a", "b", "c"):
        client.post("/api/chat", json={"message": f"hello {name}", "conversation_id": name})
    page = client.get("/api/conversations?limit=2").json()
    assert [c["conversation_id"] for c in page["conversations"]] == ["c", "b"]
    assert page["total"] == 3 and page["limit"] == 2 and page["offset"] == 0
    rest = client.get("/api/conversations?limit=2&offset=2").json()
    assert [c["conversation_id"] for c in rest["conversations"]] == ["a"]
    assert rest["conversations"][0]["title"] == "hello a"
    assert rest["conversations"][0]["message_count"] == 2


@BOTH_DATABASES
def test_conversation_holds_messages_with_tool_calls_results_and_timestamps(
    client: TestClient, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(tool_calls=[("calculate", {"expression": "6*7"})]), Reply(content="42"))
    client.post("/api/chat", json={"message": "6 times 7?", "conversation_id": "t"})
    body = client.get("/api/conversations/t").json()
    user, call, result, answer = body["messages"]
    assert user["role"] == "user" and user["content"] == "6 times 7?"
    assert call["role"] == "assistant" and call["tool_calls"][0]["name"] == "calculate"
    assert result == {**result, "role": "tool", "call_id": "call_0", "content": "42", "is_error": False}
    assert answer["role"] == "assistant" and answer["content"] == "42"
    assert all(m["created_at"].endswith("Z") for m in body["messages"])
    assert body["created_at"] <= body["updated_at"]


@BOTH_DATABASES
def test_delete_removes_a_conversation_and_a_second_delete_is_404(client: TestClient, upstream: FakeModelAPI) -> None:
    client.post("/api/chat", json={"message": "hi", "conversation_id": "gone"})
    assert client.delete("/api/conversations/gone").status_code == 204
    assert client.get("/api/conversations/gone").status_code == 404
    second = client.delete("/api/conversations/gone")
    assert second.status_code == 404 and second.json()["error"]["code"] == "not_found"


@BOTH_DATABASES
def test_a_running_conversation_is_busy_while_others_run_in_parallel(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="a b c d e", fault="hang"), Reply(content="other"))
    with held_stream(service.url, {"message": "x", "conversation_id": "busy"}, upstream) as (first, _):
        assert first.startswith("event: status")
        with httpx.Client(timeout=10) as http:
            again = http.post(service.url + "/api/chat", json={"message": "y", "conversation_id": "busy"})
            delete = http.delete(service.url + "/api/conversations/busy")
            other = http.post(service.url + "/api/chat", json={"message": "z", "conversation_id": "free"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "conversation_busy"
    assert again.headers["retry-after"] == "1" and again.json()["error"]["retry_after"] == 1
    assert delete.status_code == 409 and delete.headers["retry-after"] == "1"
    assert other.status_code == 200 and other.json()["message"] == "other"


@BOTH_DATABASES
@pytest.mark.parametrize(
    "first, last_event", [(Reply(content="first answer"), "done"), (Reply(status=500), "error")], ids=["done", "error"]
)
def test_the_next_message_can_follow_as_soon_as_the_last_event_is_read(
    service: ServerThread, upstream: FakeModelAPI, monkeypatch: pytest.MonkeyPatch, first: Reply, last_event: str
) -> None:
    # The race, widened: the first response does not close its turn until the next message is
    # answered, so only a lease let go as the turn's task ends lets that message in.
    answered, close = threading.Event(), server.Turn.close

    async def close_after_the_next_message(turn: server.Turn) -> None:
        if turn.job.message == "one":
            await asyncio.get_running_loop().run_in_executor(None, answered.wait, 10)
        await close(turn)

    monkeypatch.setattr(server.Turn, "close", close_after_the_next_message)
    upstream.reset(first, Reply(content="second answer"))
    with httpx.Client(timeout=10) as http:
        body, seen = {"message": "one", "conversation_id": "quick"}, ""
        with http.stream("POST", service.url + "/api/chat/stream", json=body) as response:
            try:
                for text in response.iter_text():  # the response is still open when the next message goes
                    seen += text
                    if f"event: {last_event}" in seen:
                        follow = http.post(service.url + "/api/chat", json={**body, "message": "two"})
                        break
            finally:
                answered.set()
    assert follow.status_code == 200 and follow.json()["message"] == "second answer"


def test_a_client_can_stop_a_stream_and_resend_at_once(service: ServerThread, upstream: FakeModelAPI) -> None:
    statuses = []
    for attempt in range(5):
        upstream.reset(Reply(content="a b c d e", fault="hang"), Reply(content="resent"))
        body = {"message": "x", "conversation_id": f"stop-{attempt}"}
        with httpx.Client(timeout=10) as resender, httpx.Client(timeout=10) as http:
            resender.get(service.url + "/health")  # kept alive: the resend can overtake the closing connection
            with http.stream("POST", service.url + "/api/chat/stream", json=body) as response:
                for text in response.iter_text():
                    if "event: chunk" in text:
                        break
            statuses.append(resender.post(service.url + "/api/chat", json=body).status_code)
    assert statuses == [200] * 5


@BOTH_DATABASES
def test_client_disconnect_cancels_the_turn_closes_the_model_request_and_saves_nothing(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="saved"), Reply(content="a b c d e", fault="hang"))
    with httpx.Client(timeout=10) as http:
        http.post(service.url + "/api/chat", json={"message": "first", "conversation_id": "d"})
        before = http.get(service.url + "/api/conversations/d").json()
        with http.stream(
            "POST", service.url + "/api/chat/stream", json={"message": "second", "conversation_id": "d"}
        ) as response:
            for text in response.iter_text():
                if "event: chunk" in text:
                    break
        assert upstream.disconnected.wait(1.0), "the model request was not closed within 1 s"
        assert wait_until(lambda: not service.app_ctx.turns)
        after = http.get(service.url + "/api/conversations/d").json()
        retry = http.post(service.url + "/api/chat", json={"message": "second", "conversation_id": "d"})
    assert after == before
    assert retry.status_code == 200
    assert [m["content"] for m in upstream.requests[-1]["messages"][1:]] == ["first", "saved", "second"]


def test_a_failure_while_reading_the_model_stream_closes_the_model_request(
    service: ServerThread, upstream: FakeModelAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_feed(reply: server.ModelReply, chunk: Any) -> None:
        raise RuntimeError("scripted failure while reading a chunk")

    monkeypatch.setattr(server.ModelReply, "feed", broken_feed)
    upstream.reset(Reply(content="a b c d e", fault="hang"))
    _, events = stream(service.url, {"message": "hi", "conversation_id": "broken"})
    assert events[-1][1]["code"] == "internal_error"
    assert upstream.disconnected.wait(5), "the model request stayed open"


def test_a_json_chat_whose_client_disconnects_is_cancelled_and_saves_nothing(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="a b c d e", fault="hang"), Reply(content="answered"))
    host, port = service.url.removeprefix("http://").split(":")
    body = json.dumps({"message": "hello", "conversation_id": "gave-up"}).encode()
    with socket.create_connection((host, int(port))) as client:
        client.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_until(lambda: upstream.hanging == 1)
    assert upstream.disconnected.wait(5), "the model request was not closed"
    assert wait_until(lambda: not service.app_ctx.turns)
    assert service.call(service.app_ctx.store.acquire_lease("gave-up", "probe", 0.001)), "the lease outlived the turn"
    with httpx.Client(timeout=10) as http:
        assert http.get(service.url + "/api/conversations/gave-up").status_code == 404
        retry = http.post(service.url + "/api/chat", json={"message": "hello", "conversation_id": "gave-up"})
        stored = http.get(service.url + "/api/conversations/gave-up").json()["messages"]
    assert retry.status_code == 200 and retry.json()["message"] == "answered"
    assert [m["content"] for m in stored] == ["hello", "answered"]


# ---------------------------------------------------------------------------
# DeepSeek's thinking mode, and nothing of it sent to other APIs
# ---------------------------------------------------------------------------


def tool_turn(expression: str, answer: str) -> list[Reply]:
    return [Reply(tool_calls=[("calculate", {"expression": expression})]), Reply(content=answer)]


def chat_turns(settings: server.Settings, texts: list[str], restart: bool = False) -> list[list[Any]]:
    """Stream each message into conversation "c", on one server or a new one for each."""
    results = []
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(TestClient(server.create_app(settings)))
        for text in texts:
            if restart and results:
                stack.close()
                client = stack.enter_context(TestClient(server.create_app(settings)))
            response = client.post("/api/chat/stream", json={"message": text, "conversation_id": "c"})
            results.append(parse_sse(response.text))
        results.append(client.get("/api/conversations/c").json()["messages"])
    return results


@pytest.mark.parametrize("restart", [False, True], ids=["one-server", "restart-before-each-turn"])
@pytest.mark.parametrize(
    "env", [{"REASONING_EFFORT": "high"}, {}], ids=["deepseek-fields-set", "behind-a-gateway-nothing-set"]
)
def test_with_deepseek_thinking_a_tool_turn_and_the_turns_after_it_complete(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, restart: bool, env: dict[str, str]
) -> None:
    # The fake is at a loopback URL, as a gateway (One API, LiteLLM) would be: the reasoning goes
    # back because the API streamed it, whatever the host and whether or not THINKING is set.
    upstream.reset(*tool_turn("6*7", "42."), Reply(content="Yes."), *tool_turn("7*8", "56."), strict="deepseek")
    *turns, stored = chat_turns(settings_for(**env), ["What is 6*7?", "Sure?", "And 7*8?"], restart)
    assert [names(events)[-1] for events in turns] == ["done", "done", "done"]
    assert "".join(d["content"] for n, d in turns[0] if n == "thought") == DEFAULT_REASONING * 2
    assert [m.get("thought") for m in stored if m["role"] == "assistant"] == [DEFAULT_REASONING] * 5
    sent = [m for m in upstream.requests[-1]["messages"] if m["role"] == "assistant"]
    assert [m.get("reasoning_content") for m in sent] == [DEFAULT_REASONING, DEFAULT_REASONING, None, DEFAULT_REASONING]
    assert sent[0]["content"] is None  # the reasoning is not sent as the tool call's content
    assert {r.get("reasoning_effort") for r in upstream.requests} == {env.get("REASONING_EFFORT")}
    assert len(upstream.requests) == 5


def test_thinking_disabled_is_sent_and_yields_no_thought_events(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    upstream.reset(*tool_turn("6*7", "42."), Reply(content="Yes."), strict="deepseek")
    *turns, stored = chat_turns(settings_for(THINKING="disabled"), ["What is 6*7?", "Sure?"])
    assert [names(events)[-1] for events in turns] == ["done", "done"]
    assert "thought" not in names(turns[0] + turns[1]) and all("thought" not in m for m in stored)
    assert [r["thinking"] for r in upstream.requests] == [{"type": "disabled"}] * 3
    assert not any("reasoning_content" in m for r in upstream.requests for m in r["messages"])


def test_a_tool_turn_saved_without_reasoning_does_not_block_thinking_later(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    upstream.reset(*tool_turn("6*7", "42."), Reply(content="Yes."), strict="deepseek")
    chat_turns(settings_for(THINKING="disabled"), ["What is 6*7?"])
    *turns, _ = chat_turns(settings_for(THINKING="enabled"), ["Sure?"])
    assert names(turns[0])[-1] == "done"
    sent = [m for m in upstream.requests[-1]["messages"] if m["role"] == "assistant"]
    assert [m.get("reasoning_content") for m in sent] == ["", ""]  # none was kept: empty, not invented


@pytest.mark.parametrize("size", [1, 3, 5, 8], ids=lambda size: f"window-{size}")
def test_the_history_window_never_cuts_an_assistant_message_from_its_reasoning_or_tool_results(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, size: int
) -> None:
    upstream.reset(*tool_turn("1+1", "2."), *tool_turn("2+2", "4."), *tool_turn("3+3", "6."), strict="deepseek")
    settings = settings_for(THINKING="enabled", MAX_HISTORY_MESSAGES=str(size))
    *turns, _ = chat_turns(settings, ["one", "two", "three"])
    assert [names(events)[-1] for events in turns] == ["done", "done", "done"]  # the fake refuses a cut turn


def test_nothing_of_deepseek_reaches_an_api_that_refuses_unknown_fields(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    # OpenAI's API streams no reasoning_content and refuses fields it does not know.
    upstream.reset(*tool_turn("6*7", "42."), Reply(content="Yes."), strict="openai")
    *turns, _ = chat_turns(settings_for(MODEL_NAME="gpt-4o-mini"), ["What is 6*7?", "Sure?"])
    assert [names(events)[-1] for events in turns] == ["done", "done"] and len(upstream.requests) == 3
    assert not any("reasoning_content" in m for r in upstream.requests for m in r["messages"])


@pytest.mark.parametrize(
    "env, thinking_api",
    [
        ({}, True),
        ({"BASE_URL": "http://localhost:11434/v1"}, False),
        ({"BASE_URL": "http://localhost:4000/v1", "THINKING": "enabled"}, True),
        ({"BASE_URL": "http://localhost:4000/v1", "REASONING_EFFORT": "max"}, True),
    ],
    ids=["deepseek-by-default", "other-api", "other-api-thinking-set", "other-api-effort-set"],
)
def test_thinking_fields_go_to_deepseek_and_where_the_user_sets_them(env: dict[str, str], thinking_api: bool) -> None:
    assert server.Settings.from_env(env).thinking_api is thinking_api


@pytest.mark.parametrize("name, value", [("THINKING", "enabled"), ("REASONING_EFFORT", "low")])
def test_thinking_settings_are_refused_for_openai(name: str, value: str) -> None:
    with pytest.raises(server.SettingsError) as error:
        server.Settings.from_env({"BASE_URL": "https://api.openai.com/v1", name: value})
    assert f"{name}={value!r}" in str(error.value)


@pytest.mark.parametrize("model", ["deepseek-chat", "deepseek-reasoner"])
def test_a_retired_model_name_starts_with_one_warning_and_its_error_names_the_replacement(
    settings_for: Callable[..., server.Settings],
    upstream: FakeModelAPI,
    caplog: pytest.LogCaptureFixture,
    model: str,
) -> None:
    upstream.reset(strict="deepseek")
    caplog.set_level(logging.WARNING, logger="autogen_chat")
    with TestClient(server.create_app(settings_for(MODEL_NAME=model))) as client:
        warned = [r.getMessage() for r in caplog.records if r.name == "autogen_chat"]
        response = client.post("/api/chat", json={"message": "hi"})
    assert warned == [f"DeepSeek retired MODEL_NAME={model} on 2026-07-24: set MODEL_NAME=deepseek-flash in .env."]
    assert response.status_code == 502 and response.json()["error"]["code"] == "model_not_found"
    assert "set MODEL_NAME=deepseek-flash" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------
# Configuration, index, health and docs
# ---------------------------------------------------------------------------


def test_without_an_api_key_the_demo_model_answers_through_the_real_agent_and_says_so_everywhere(
    settings_for: Callable[..., server.Settings],
) -> None:
    with ServerThread(server.create_app(settings_for(API_KEY=""))) as service:
        _, timed = stream(service.url, {"message": "现在东京几点？"})
        _, summed = stream(service.url, {"message": "What is (2+3)*4?"})
        other = httpx.post(service.url + "/api/chat", json={"message": "hello"}, timeout=10).json()
        health = httpx.get(service.url + "/health", timeout=10).json()
        index = httpx.get(service.url + "/", timeout=10).json()
        with openai.OpenAI(base_url=service.url + "/v1", api_key="any") as sdk:
            listed = sdk.models.list().data[0]
            v1 = sdk.chat.completions.create(model="autogen-agent", messages=[{"role": "user", "content": "6*7?"}])
    assert names(timed) == ["status"] + ["thought"] * names(timed).count("thought") + [
        "status",
        "tool_call",
        "tool_result",
        "status",
    ] + ["chunk"] * names(timed).count("chunk") + ["message", "done"]
    assert timed[names(timed).index("tool_call")][1]["arguments"] == '{"timezone":"Asia/Tokyo"}'
    assert next(d for n, d in timed if n == "message")["content"].startswith("东京现在是 ")
    assert next(d for n, d in summed if n == "message")["content"] == "The result is 20."
    assert "API_KEY" in other["message"] and other["tool_calls"] == []
    assert v1.choices[0].message.content == "The result is 42."
    assert health["status"] == "degraded" and health["model"] == "demo" and "API_KEY" in health["reasons"][0]
    assert index["model"] == "demo" and listed.owned_by == "autogen-chat-demo"


def test_the_demo_model_is_never_used_when_a_key_is_set(client: TestClient, upstream: FakeModelAPI) -> None:
    assert client.post("/api/chat", json={"message": "现在东京几点？"}).json()["message"] == "echo: 现在东京几点？"
    assert client.get("/health").json()["model"] == "deepseek-flash"


def test_health_asks_the_model_api_only_when_told_to_and_not_again_for_a_while(
    client: TestClient, upstream: FakeModelAPI, settings_for: Callable[..., server.Settings]
) -> None:
    upstream.model_lists = 0
    assert "model_api" not in client.get("/health").json() and upstream.model_lists == 0
    checked = [client.get("/health?check=model").json() for _ in range(2)]
    assert [body["model_api"] for body in checked] == ["ok", "ok"] and upstream.model_lists == 1
    assert client.get("/health?check=everything").status_code == 422
    with TestClient(server.create_app(settings_for(BASE_URL=f"http://127.0.0.1:{free_port()}/v1"))) as down:
        failed = down.get("/health?check=model").json()
    assert failed["status"] == "degraded" and failed["model_api"].startswith("failed: upstream_unreachable")


def test_health_says_a_gateway_that_answers_its_model_list_with_a_page_failed(
    settings_for: Callable[..., server.Settings],
) -> None:
    page = Starlette(routes=[Route("/v1/models", lambda _: HTMLResponse("<html>sign in</html>"))])
    with ServerThread(page) as gateway, TestClient(server.create_app(settings_for(BASE_URL=gateway.url + "/v1"))) as c:
        response = c.get("/health?check=model")
    body = response.json()
    assert body["status"] == "degraded" and body["model_api"].startswith("failed: upstream_error: GET /models")


def test_under_uvicorn_the_apps_lines_carry_their_level_and_time(
    settings_for: Callable[..., server.Settings], tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with log.open("w") as output, service_processes(1, process_env(settings_for), tmp_path, output=output):
        pass
    lines = log.read_text().splitlines()
    assert any(
        re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO autogen_chat: model deepseek-flash at", line)
        for line in lines
    )


def test_python_server_py_names_port_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "DATABASE_PATH": str(tmp_path / "ok.db")}
        result = subprocess.run([sys.executable, str(HERE / "server.py")], check=False, cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"Configuration error: PORT={port} on HOST=127.0.0.1 cannot be listened on")


@BOTH_DATABASES
def test_health_is_ok_with_model_agent_and_database(client: TestClient) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["reasons"] == []
    assert body["model"] == "deepseek-flash" and body["agent_ready"] is True and body["database"] is True


def test_index_names_model_and_host_but_never_the_key(client: TestClient) -> None:
    response = client.get("/")
    body = response.json()
    assert body["model"] == "deepseek-flash" and body["base_url_host"] == "127.0.0.1"
    assert body["docs"] == {"openapi": "/openapi.json", "swagger_ui": "/docs", "redoc": "/redoc"}
    assert SERVICE_KEY not in response.text


@pytest.mark.parametrize("path, marker", [("/docs", "swagger-ui"), ("/redoc", "redoc")], ids=["swagger", "redoc"])
def test_docs_pages_load_the_openapi_document(client: TestClient, path: str, marker: str) -> None:
    response = client.get(path)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert marker in response.text and "/openapi.json" in response.text


def test_openapi_document_describes_exactly_the_routes_of_the_app(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    documented = {(path, method.upper()) for path, item in document["paths"].items() for method in item}
    served = {
        (re.sub(r":\w+}", "}", route.path), method)  # /static/{path:path} is /static/{path} in OpenAPI
        for route in client.app.routes  # type: ignore[attr-defined]
        for method in route.methods - {"HEAD"}
    }
    assert documented == served
    for path, item in document["paths"].items():
        for operation in item.values():
            assert "200" in operation["responses"] or "204" in operation["responses"], path
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(document)))
    assert refs <= set(document["components"]["schemas"])
    stream_doc = document["paths"]["/api/chat/stream"]["post"]["responses"]["200"]["description"]
    for event in ("status", "chunk", "thought", "tool_call", "tool_result", "message", "done", "error"):
        assert f"| {event} |" in stream_doc


def test_openapi_json_is_a_valid_openapi_3_1_document_formatted_with_two_spaces() -> None:
    text = (HERE / "openapi.json").read_text(encoding="utf-8")
    OpenAPIV31SpecValidator(OPENAPI).validate()
    assert text == json.dumps(OPENAPI, indent=2, ensure_ascii=False) + "\n", "format: json.dumps(indent=2)"
    assert OPENAPI["info"]["version"] == server.__version__


def test_the_documents_error_codes_are_the_servers_each_under_its_status() -> None:
    schemas = OPENAPI["components"]["schemas"]
    assert schemas["ErrorDetail"]["properties"]["code"]["enum"] == list(server.ERRORS)
    listed = set(schemas["ErrorEventData"]["allOf"][1]["properties"]["code"]["enum"])
    for path, item in OPENAPI["paths"].items():
        face_status = server.OPENAI_ERRORS.statuses if path.startswith("/v1/") else {}
        for operation in item.values():
            for status, response in operation["responses"].items():
                codes = error_codes(response)
                assert all(
                    face_status.get(server.ERRORS[code][0], server.ERRORS[code][0]) == int(status) for code in codes
                )
                listed.update(codes)
    # Any unknown path is 404 not_found and any other method 405 method_not_allowed, as the info says.
    assert listed | {"not_found", "method_not_allowed"} == set(server.ERRORS)


def error_codes(response: dict[str, Any]) -> list[str]:
    """The codes an error response narrows the shared Error schema to; [] for any other response."""
    schema = resolve(response).get("content", {}).get("application/json", {}).get("schema", {})
    if "allOf" not in schema:
        return []
    assert schema["allOf"][0]["$ref"] in {"#/components/schemas/Error", "#/components/schemas/V1Error"}
    return schema["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"]


def test_the_documented_message_pattern_refuses_exactly_the_characters_the_server_calls_blank() -> None:
    pattern = re.compile(OPENAPI["components"]["schemas"]["ChatRequest"]["properties"]["message"]["pattern"])
    for code in range(sys.maxunicode + 1):
        character = chr(code)
        assert bool(pattern.search(character)) == bool(character.strip()), hex(code)


@pytest.mark.parametrize("vision", ["true", "false"])
def test_the_served_document_states_the_message_limit_and_image_parts_of_the_settings(
    settings_for: Callable[..., server.Settings], vision: str
) -> None:
    with TestClient(server.create_app(settings_for(MAX_MESSAGE_CHARS="100", MODEL_VISION=vision))) as client:
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
        refused = client.post("/api/chat", json={"message": "x" * 101})
    assert schemas["ChatRequest"]["properties"]["message"]["maxLength"] == 100
    assert refused.status_code == 422 and "MAX_MESSAGE_CHARS (100)" in refused.json()["error"]["message"]
    assert ("V1ImagePart" in json.dumps(schemas["V1UserPart"])) == (vision == "true")


@pytest.mark.parametrize(
    "env, formats",
    [({}, ["null", "text", "json_object"]), ({"MODEL_NAME": "qwen2.5", "MODEL_STRUCTURED_OUTPUT": "true"},
      ["null", "text", "json_schema"])],
    ids=["deepseek", "local-with-structured-output"],
)  # fmt: skip
def test_the_served_document_lists_the_response_formats_the_model_takes(
    settings_for: Callable[..., server.Settings], env: dict[str, str], formats: list[str]
) -> None:
    with TestClient(server.create_app(settings_for(**env))) as client:
        listed = client.get("/openapi.json").json()["components"]["schemas"]["V1ResponseFormat"]["oneOf"]
    assert [f.get("title", f.get("type")) for f in listed] == formats


def test_a_null_conversation_id_starts_a_new_conversation(client: TestClient, upstream: FakeModelAPI) -> None:
    response = client.post("/api/chat", json={"message": "hi", "conversation_id": None})
    assert response.status_code == 200
    assert client.get(f"/api/conversations/{response.json()['conversation_id']}").status_code == 200


def test_every_streamed_event_and_ping_validates_against_the_documented_event_schema(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, mcp_file: Path, tmp_path: Path
) -> None:
    upstream.reset(
        Reply(reasoning="let me see", tool_calls=[("calculate", {"expression": "6*7"})]),
        Reply(content="it is 42"),
        Reply(tool_calls=[("files__echo", {"text": "asked"})]),
        Reply(content="denied"),
        Reply(content="a b c d", fault="hang"),
    )
    config = mcp_config(tmp_path, {"files": stdio_server(mcp_file)})
    app = server.create_app(settings_for(PING_INTERVAL="0.05", REQUEST_TIMEOUT="0.5", MCP_CONFIG=config))
    with ServerThread(app) as service, httpx.Client(base_url=service.url, timeout=10) as http:
        answered = http.post("/api/chat/stream", json={"message": "6*7?"})
        with approval_stream(service.url, {"message": "echo?", "conversation_id": "asked"}) as (asked, rest):
            approve(service.url, "asked", "call_0", "deny")
            asked += list(rest)
        failed = http.post("/api/chat/stream", json={"message": "and now?"})
    assert ": ping\n\n" in failed.text
    events = sse_events(answered.text) + sse_events("".join(asked)) + sse_events(failed.text)
    for event in events:
        assert_event_documented(event)
    documented = OPENAPI["components"]["schemas"]["ChatEvent"]["properties"]["event"]["enum"]
    assert {event["event"] for event in events} == set(documented)


def test_every_response_the_document_lists_is_given_and_validates(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = server.create_app(settings_for(CORS_ORIGINS="https://app.example"))
    with ServerThread(app) as service, httpx.Client(base_url=service.url) as http:
        paths = ("/", "/health", "/metrics", "/openapi.json", "/docs", "/redoc", "/static/none")
        given = [http.get(path) for path in paths]
        given += [http.get("/health?check=model"), http.get("/health?check=all")]
        given.append(http.get("/chat"))
        given.append(http.get("/chat", headers={"If-None-Match": given[-1].headers["ETag"]}))
        example = OPENAPI["paths"]["/static/{path}"]["get"]["parameters"][0]["example"]
        given.append(http.get("/static/" + example))
        given.append(http.get(given[-1].url, headers={"If-None-Match": given[-1].headers["ETag"]}))
        upstream.reset(Reply(tool_calls=[("get_current_time", {"timezone": "UTC"})]), Reply(content="noon"))
        given += turn_requests(http, "c")
        given.append(http.post("/v1/chat/completions", json={"messages": ASK, "stream": True}))
        upstream.reset(Reply(reasoning="hm", tool_calls=[("calculate", {"expression": "1+1"}), ("mine", {})]))
        tools = [{"type": "function", "name": "mine"}]
        given.append(http.post("/v1/responses", json={"input": "hi", "stream": True, "tools": tools}))
        upstream.reset(Reply(content="a b c", fault="drop"))
        given.append(http.post("/v1/responses", json={"input": "hi", "stream": True}))
        given += [http.get("/api/conversations"), http.get("/api/conversations/c"), http.get("/api/conversations/x")]
        given += [http.delete("/api/conversations/x"), http.get("/v1/models")]
        first = http.post("/v1/responses", json={"input": "one"})
        later = {"input": "two", "previous_response_id": first.json()["id"]}
        given += [first, http.post("/v1/responses", json=later), http.post("/v1/responses", json=later)]  # then 409
        given += [http.get(f"/v1/responses/{first.json()['id']}"), http.get("/v1/responses/resp_nope")]
        given.append(http.post("/v1/responses", content=b"x" * (server.Settings.from_env({}).v1_max_body_bytes + 1)))
        service.call(service.app_ctx.store.ask_approval("c", "call_x", 300))  # as a turn waiting for a decision does
        decision = "/api/conversations/c/approvals/call_x"
        given += [http.post(decision, json={"decision": "approve"}), http.post(decision, json={"decision": "deny"})]
        given += [http.post("/api/conversations/c/approvals/none", json={"decision": "deny"})]
        given += [http.post(decision, json={"decision": "maybe"}), http.post(decision, content=b"{nope")]
        given += [http.post(decision, content=b"x" * 300_000), http.post(decision, content=b"<a/>", headers=XML)]
        given += [http.post(decision, json={"decision": "deny"}, headers={"Origin": "https://elsewhere.example"})]
        given += turn_requests(http, headers={"Content-Type": "text/plain", "Origin": "https://elsewhere.example"})
        elsewhere = {"Origin": "https://elsewhere.example"}
        given += [http.request(method, path, headers=elsewhere) for method, path in (
            ("GET", "/api/conversations"), ("GET", "/api/conversations/c"), ("DELETE", "/api/conversations/c"),
            ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/v1/responses/resp_nope"))]  # fmt: skip
        upstream.reset(Reply(content="a b c d", fault="hang"))
        with held_stream(service.url, {"message": "wait", "conversation_id": "c"}, upstream):
            given += turn_requests(http, "c") + [http.delete("/api/conversations/c")]
        assert wait_until(lambda: not service.app_ctx.turns)
        given.append(http.delete("/api/conversations/c"))
        monkeypatch.setattr(server, "run_agent", a_bug)
        given += turn_requests(http)
        service.app_ctx.shutting_down = True
        given += turn_requests(http)
        # Every SQLite statement is interrupted from now on, as on a failing disk.
        for connection in (service.app_ctx.store.blocking, service.app_ctx.store.quick):
            connection.set_progress_handler(lambda: 1, 1)
        given += [http.get("/health"), http.get("/api/conversations"), http.get("/api/conversations/c")]
        given.append(http.get(f"/v1/responses/{first.json()['id']}"))
        given.append(http.delete("/api/conversations/c"))
        given.append(http.post(decision, json={"decision": "deny"}))
    monkeypatch.undo()
    upstream.reset(*[Reply(status=429), Reply(status=500), Reply(fault="stall")] * 2)
    with ServerThread(server.create_app(settings_for(REQUEST_TIMEOUT="0.5"))) as service:
        with httpx.Client(base_url=service.url) as http:
            given += [http.post("/v1/chat/completions", json={"messages": ASK}) for _ in range(3)]
            given += [http.post("/v1/responses", json={"input": "hi"}) for _ in range(3)]
    with TestClient(server.create_app(settings_for(SERVER_API_KEY=SERVER_KEY))) as client:
        given += [client.request(method.upper(), path.replace("{conversation_id}", "c")) for method, path in OPERATIONS]
    for response in given:
        assert_documented(response)
    seen = {(r.request.method, r.request.url.path, r.status_code) for r in given}
    seen |= {(method, path.split("?")[0], status) for _, method, path, _, status, _ in BAD_REQUESTS}
    seen |= {("POST", "/api/chat", status) for *_, status in FAULTS}
    seen |= {("POST", "/v1/chat/completions", status) for _, _, status, _, _ in V1_BAD_REQUESTS}
    seen |= {("POST", "/v1/responses", 400) for _ in RESPONSES_BAD_INPUT}
    given_by_operation = {(method, template_of(method, path), status) for method, path, status in seen}
    listed = {
        (method.upper(), path, int(status)) for method, path in OPERATIONS for status in responses_of(method, path)
    }
    assert {given for given in given_by_operation if given[1] is not None} == listed


def turn_requests(http: httpx.Client, conversation_id: str | None = None, **kwargs: Any) -> list[httpx.Response]:
    """One request to each operation that runs a turn: JSON unless other headers are given."""
    named = {} if conversation_id is None else {"conversation_id": conversation_id}
    bodies = {
        "/api/chat": {"message": "hi", **named},
        "/api/chat/stream": {"message": "hi", **named},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], **named},
        "/api/ag-ui": {"threadId": conversation_id or "t", "messages": [{"id": "m", "role": "user", "content": "hi"}]},
        "/v1/responses": {"input": "hi"},
    }
    kwargs.setdefault("headers", {"Content-Type": "application/json"})
    return [http.post(path, content=json.dumps(body), **kwargs) for path, body in bodies.items()]


OPERATIONS = [(method, path) for path, item in OPENAPI["paths"].items() for method in item]


def responses_of(method: str, path: str) -> dict[str, Any]:
    return OPENAPI["paths"][path][method]["responses"]


async def a_bug(*args: Any) -> None:
    raise RuntimeError("an unexpected failure")


# ---------------------------------------------------------------------------
# Static files, and the documentation pages in a real browser
# ---------------------------------------------------------------------------


def docs_assets(client: TestClient) -> list[str]:
    return [url for path in ("/docs", "/redoc") for url in re.findall(r'(?:src|href)="([^"]+)"', client.get(path).text)]


def test_docs_pages_load_every_asset_from_the_app_and_forbid_other_hosts(client: TestClient) -> None:
    urls = docs_assets(client)
    assert len(set(urls)) == 4 and all(url.startswith("/static/vendor/") for url in urls), urls
    for path in ("/docs", "/redoc"):
        assert "//" not in client.get(path).text
        assert "default-src 'self'" in client.get(path).headers["content-security-policy"]


def test_vendored_assets_are_served_with_type_long_caching_and_gzip(client: TestClient) -> None:
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".png": "image/png"}
    for url in docs_assets(client):
        plain = client.get(url, headers={"Accept-Encoding": "identity"})
        assert plain.status_code == 200 and plain.headers["content-type"] == types[Path(url).suffix], url
        assert plain.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert "content-encoding" not in plain.headers
        again = client.get(url, headers={"Accept-Encoding": "identity", "If-None-Match": plain.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        if url.endswith(".png"):
            continue
        zipped = client.get(url, headers={"Accept-Encoding": "br;q=1, gzip;q=0.5"})
        assert zipped.headers["content-encoding"] == "gzip" and zipped.headers["vary"].startswith("Accept-Encoding")
        assert int(zipped.headers["content-length"]) < len(plain.content) / 3
        assert zipped.content == plain.content and zipped.headers["etag"] != plain.headers["etag"]
        refused = client.get(url, headers={"Accept-Encoding": "gzip;q=0, *"})
        assert "content-encoding" not in refused.headers


@pytest.mark.parametrize(
    "path",
    ["%2e%2e/server.py", "%2E%2E%2Fserver.py", "%2Fetc%2Fpasswd", "vendor", "", "vendor/none.js", "a%00b"],
    ids=["dot-dot", "encoded-slash", "absolute", "directory", "root", "missing", "nul"],
)
def test_only_files_inside_static_are_served(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, path: str
) -> None:
    (tmp_path / "static" / "vendor").mkdir(parents=True)
    (tmp_path / "server.py").write_text("a secret beside static/", encoding="utf-8")
    monkeypatch.setattr(server, "STATIC_DIR", tmp_path / "static")
    response = client.get(f"/static/{path}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert b"secret" not in response.content


def test_an_unversioned_static_file_is_revalidated_and_served_anew_when_it_changes(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(server, "STATIC_DIR", tmp_path)
    (tmp_path / "notes.txt").write_text("one", encoding="utf-8")
    first = client.get("/static/notes.txt")
    (tmp_path / "notes.txt").write_text("two, longer", encoding="utf-8")
    second = client.get("/static/notes.txt", headers={"If-None-Match": first.headers["etag"]})
    assert first.headers["cache-control"] == "no-cache" and first.text == "one"
    assert first.headers["content-type"] == "text/plain; charset=utf-8"
    assert second.status_code == 200 and second.text == "two, longer"


def test_if_none_match_star_revalidates_any_static_file(client: TestClient) -> None:
    response = client.get("/static/screenshot.png", headers={"If-None-Match": "*"})
    assert response.status_code == 304 and response.content == b""


def documented_operations(service: ServerThread) -> set[tuple[str, str]]:
    document = httpx.get(service.url + "/openapi.json").json()
    return {(method, path) for path, item in document["paths"].items() for method in item}


def test_swagger_ui_shows_every_operation_and_runs_one_with_no_other_host(tab: Tab, service: ServerThread) -> None:
    tab.page.goto(tab.url + "/docs")
    stream = tab.page.locator('.opblock-post .opblock-summary-path[data-path="/api/chat/stream"]')
    stream.wait_for()
    assert stream.is_visible()
    shown = tab.page.eval_on_selector_all(
        ".opblock", "els => els.map(e => [e.querySelector('.opblock-summary-method').textContent.toLowerCase(),"
        " e.querySelector('.opblock-summary-path').dataset.path])"
    )  # fmt: skip
    assert {tuple(operation) for operation in shown} == documented_operations(service)
    health = tab.page.locator("#operations-default-health")  # Swagger UI ids the block by operationId
    health.locator(".opblock-summary-control").click()
    health.get_by_role("button", name="Try it out").click()
    health.get_by_role("button", name="Execute").click()
    health.locator(".live-responses-table .response-col_status", has_text="200").wait_for()
    assert tab.elsewhere == [] and tab.errors == []


def test_redoc_shows_every_operation_and_finds_them_with_no_other_host(tab: Tab, service: ServerThread) -> None:
    tab.page.goto(tab.url + "/redoc")
    stream = tab.page.locator('[data-section-id="operation/chatStream"]')  # ReDoc ids sections by operationId
    stream.get_by_text("/api/chat/stream").first.wait_for()
    stream.get_by_role("button", name="200").first.click()
    for branch in OPENAPI["components"]["schemas"]["ChatEvent"]["oneOf"]:  # each event, with its data
        stream.get_by_role("button", name=branch["title"], exact=True).click()
        stream.get_by_text(branch["description"].split("`")[1]).first.wait_for()
    shown = tab.page.eval_on_selector_all(
        "[data-section-id^='operation/']", "els => els.map(e => e.dataset.sectionId.split('/')[1])"
    )
    operations = {
        op["operationId"]: (method, path) for path, item in OPENAPI["paths"].items() for method, op in item.items()
    }
    assert {operations[operation_id] for operation_id in shown} == documented_operations(service)
    tab.page.get_by_placeholder("Search...").fill("stream")
    tab.page.get_by_role("menuitem", name="Run one turn, stream it as Server-Sent Events").wait_for()
    assert tab.elsewhere == [] and tab.errors == []
    # No schema warnings and no favicon 404; the policy blocks the logo ReDoc's bundle fetches from its CDN.
    assert [w for w in tab.warnings if "cdn.redoc.ly" not in w] == [] and tab.missing == []


@pytest.mark.parametrize(
    "name, value",
    [
        ("PORT", "eighty"),
        ("PORT", "0"),
        ("WORKERS", "0"),
        ("REQUEST_TIMEOUT", "-1"),
        ("MAX_HISTORY_MESSAGES", "0"),
        ("BASE_URL", "api.deepseek.com"),
        ("MODEL_FUNCTION_CALLING", "maybe"),
        ("TOOLS", "calculate,shell"),
        ("LOG_LEVEL", "LOUD"),
        ("THINKING", "on"),
        ("REASONING_EFFORT", "medium"),
        ("DATABASE_URL", "mysql://db.example/chat"),
        ("DATABASE_POOL_SIZE", "0"),
        ("LOG_FORMAT", "xml"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
    ],
    ids=[
        "port-text",
        "port-zero",
        "workers-zero",
        "timeout-negative",
        "history-zero",
        "url-no-scheme",
        "bool",
        "tool",
        "log",
        "thinking",
        "effort",
        "database-url",
        "pool-size",
        "log-format",
        "otlp-endpoint",
    ],
)
def test_a_malformed_setting_stops_start_up_naming_the_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(server.SettingsError) as error:
        server.load_settings()
    assert name in str(error.value) and value in str(error.value)


def test_dotenv_is_read_and_the_real_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MODEL_NAME=from-dotenv\nPORT=9001\n", encoding="utf-8")
    monkeypatch.setenv("PORT", "9002")
    settings = server.load_settings(tmp_path / ".env")
    assert settings.model_name == "from-dotenv" and settings.port == 9002
    assert settings.env_file == str(tmp_path / ".env")


def test_the_dotenv_beside_server_py_is_found_from_any_working_directory(tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "app", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    shutil.copy(HERE / "server.py", home)
    (home / ".env").write_text("MODEL_NAME=from-dotenv\nDATABASE_PATH=data/chat.db\n", encoding="utf-8")
    code = "import server; s = server.load_settings(); print(s.model_name, s.database_path, s.env_file)"
    env = {name: value for name, value in os.environ.items() if name not in ENV_NAMES}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env={**env, "PYTHONPATH": str(home)},
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert out == ["from-dotenv", str(home / "data" / "chat.db"), str(home / ".env")]


def test_a_misspelt_setting_in_dotenv_is_warned_about_naming_the_right_one(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "APIKEY=sk-1\nMODEL=gpt-4o\nGITHUB_TOKEN=x\nOTEL_SERVICE_NAME=chat\n", encoding="utf-8"
    )
    *misspelt, sdk_only = server.load_settings(tmp_path / ".env").notes
    assert [note.split(" in ")[0] + " -> " + note.rsplit(" ", 1)[1] for note in misspelt] == [
        "APIKEY -> API_KEY?",
        "MODEL -> MODEL_NAME?",
    ]
    assert sdk_only.startswith("OTEL_SERVICE_NAME in ") and sdk_only.endswith("from the real environment only")


class ReadNames(dict):
    """An environment that remembers which names were read."""

    read: set[str] = set()

    def get(self, name: str, default: Any = None) -> Any:
        ReadNames.read.add(name)
        return super().get(name, default)


def test_env_example_lists_exactly_the_settings_the_server_reads() -> None:
    listed = re.findall(r"^([A-Z][A-Z0-9_]*)=", (HERE / ".env.example").read_text(encoding="utf-8"), re.MULTILINE)
    ReadNames.read = set()
    server.Settings.from_env(ReadNames())
    assert len(listed) == len(set(listed)) and set(listed) == set(server.ENV_NAMES) == ReadNames.read


def test_importing_server_reads_no_file_and_starts_nothing(tmp_path: Path) -> None:
    # A .env that would stop start-up, and a database path that would be created.
    home = tmp_path / "app"
    home.mkdir()
    shutil.copy(HERE / "server.py", home)
    (home / ".env").write_text("PORT=eighty\n", encoding="utf-8")
    code = "import gc, sys, threading, server; print(gc.get_freeze_count(), threading.active_count(), server.app.app)"
    code += "; print('prometheus_client' in sys.modules)"  # it reads /proc as it loads
    env = {name: value for name, value in os.environ.items() if name not in ENV_NAMES}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(home)},
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.split() == ["0", "1", "None", "False"] and out.stderr == ""
    assert not [path for path in home.rglob("*.db")]


def test_another_autogen_version_stops_start_up_naming_it(
    settings_for: Callable[..., server.Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.8.0" if name == "autogen-ext" else real(name))
    with pytest.raises(server.SettingsError, match=r"autogen-ext 0\.8\.0 is installed; this server needs 0\.7\.5"):
        with TestClient(server.create_app(settings_for())):
            pass


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, {"function_calling": True, "json_output": True, "family": "unknown", "vision": True}),
        ({"MODEL_NAME": "deepseek-v4-flash"}, {"function_calling": True, "json_output": True, "vision": False}),
        ({"MODEL_NAME": "deepseek-v4-pro"}, {"function_calling": True, "json_output": True, "vision": False}),
        ({"MODEL_NAME": "deepseek-reasoner"}, {"function_calling": True, "family": "unknown", "vision": False}),
        ({"MODEL_NAME": "qwen2.5:7b"}, {"function_calling": True, "json_output": False, "family": "unknown"}),
        ({"MODEL_NAME": "gpt-4o"}, {"vision": True, "function_calling": True}),
        (
            {"MODEL_NAME": "llava", "MODEL_VISION": "true", "MODEL_FUNCTION_CALLING": "false", "MODEL_FAMILY": "x"},
            {"vision": True, "function_calling": False, "family": "x"},
        ),
    ],
    ids=[
        "deepseek-flash-default",
        "deepseek-v4-flash",
        "deepseek-v4-pro",
        "retired",
        "ollama-default",
        "autogen-known",
        "overrides",
    ],
)
def test_model_info_works_for_models_autogen_does_not_know(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: dict[str, Any]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    info = server.load_settings().model_info
    assert {key: info[key] for key in expected} == expected
    assert set(info) >= {"vision", "function_calling", "json_output", "family", "structured_output"}


def test_tools_setting_empty_turns_tools_off(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    with TestClient(server.create_app(settings_for(TOOLS=""))) as client:
        client.post("/api/chat", json={"message": "hi"})
    assert "tools" not in upstream.requests[0]
    with TestClient(server.create_app(settings_for(TOOLS="calculate"))) as client:
        client.post("/api/chat", json={"message": "hi"})
    assert [t["function"]["name"] for t in upstream.requests[1]["tools"]] == ["calculate"]


# ---------------------------------------------------------------------------
# The README's examples
# ---------------------------------------------------------------------------

README_SECTIONS = (
    "快速开始", "API", "OpenAI 兼容接口（`/v1`）", "AG-UI（CopilotKit、`@ag-ui/client`）",
    "Responses API（`/v1/responses`）",
)  # fmt: skip
# What changes from one run to the next: ids, times, and the numbers that follow from them.
README_CLOCK = "@2026-12-01 13:51:00"  # UTC
VOLATILE = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"call_[0-9a-f]{12}"), "<call>"),
    (re.compile(r"chatcmpl-[0-9a-f]{32}"), "<chatcmpl>"),
    (re.compile(r"\b(resp|rs|msg|fc|conv)_[0-9a-f]{32}"), r"\1_<id>"),
    (re.compile(r'"(created|completed)_at":\d+'), r'"\1_at":<t>'),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<id>"),
    (re.compile(r'"created":\d+'), '"created":<t>'),
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:Z|[+-]\d\d:\d\d)?"), "<time>"),
    (re.compile(r"\d{4}-\d\d-\d\d"), "<date>"),
    (re.compile(r"\b\d\d:\d\d\b"), "<hh:mm>"),
    (re.compile(r"星期[一二三四五六日]|(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day"), "<day>"),
]


@dataclass
class ReadmeBlock:
    section: str
    language: str
    text: str
    skipped: bool  # marked <!-- readme-test: skip (why) -->


def readme_blocks() -> list[ReadmeBlock]:
    """The fenced code blocks of the README's quick start and API sections, in order."""
    return readme_blocks_of(*README_SECTIONS)


def readme_blocks_of(*sections: str) -> list[ReadmeBlock]:
    blocks, section, skip = [], "", False
    lines = iter((HERE / "README.md").read_text(encoding="utf-8").splitlines())
    for line in lines:
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("<!-- readme-test: skip"):
            skip = True
        elif line.startswith("```") and section in sections:
            body = list(itertools.takewhile(lambda text: not text.startswith("```"), lines))
            blocks.append(ReadmeBlock(section, line[3:].strip(), "\n".join(body), skip))
            skip = False
        elif line.startswith("```"):
            list(itertools.takewhile(lambda text: not text.startswith("```"), lines))
    return blocks


def stable(text: str) -> str:
    for pattern, replacement in VOLATILE:
        text = pattern.sub(replacement, text)
    return text.strip()


def run_readme_block(block: ReadmeBlock, home: Path, port: int, env: dict[str, str]) -> str | None:
    """Run a block as written, but on this test's port, from a copy of the project; its output.
    Blocks that start the server are run as the server of the test instead (None)."""
    text = block.text.replace("localhost:8000", f"localhost:{port}")
    if block.language == "python":
        command = [sys.executable, "-c", text]
    elif block.language != "bash" or "server.py" in text or "uvicorn server:app" in text:
        return None  # another language's (a browser's); or the server the test started, as this block starts it
    else:
        command = ["bash", "-euo", "pipefail", "-c", text]
    done = subprocess.run(command, cwd=home, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"README block failed:\n{text}\n{done.stderr}"
    return done.stdout


TEST_TOOLS = {"pytest", "playwright", "openapi-spec-validator", "openai-agents"}


def test_the_runtime_install_pulls_no_test_tools_and_the_readmes_test_command_pins_them() -> None:
    lines = (HERE / "requirements.txt").read_text(encoding="utf-8").splitlines()
    runtime = {re.split(r"[\[=<>~ ]", line)[0].lower() for line in lines if line.strip() and not line.startswith("#")}
    assert not runtime & (TEST_TOOLS | {"ruff", "schemathesis"})
    [command, *_] = [b.text for b in readme_blocks_of("测试") if b.language == "bash"]
    pins = dict(re.findall(r"([a-z-]+)==([\d.]+)", command))
    assert set(pins) == TEST_TOOLS and "-r requirements.txt" in command
    assert pins["pytest"] == importlib.metadata.version("pytest")


def test_every_example_of_the_readmes_quick_start_and_api_runs_as_written_against_the_demo_model(
    tmp_path: Path,
) -> None:
    home = tmp_path / "project"
    home.mkdir()
    for name in ("server.py", "openapi.json", ".env.example", "requirements.txt"):
        shutil.copy(HERE / name, home)
    shutil.copytree(HERE / "static", home / "static")
    env = {name: value for name, value in os.environ.items() if name not in ENV_NAMES} | {"NO_PROXY": "*"}
    blocks = [block for block in readme_blocks() if not block.skipped]
    assert any("cp .env.example .env" in block.text for block in blocks), "the quick start makes .env"
    subprocess.run(["cp", ".env.example", ".env"], cwd=home, check=True)  # as the quick start's block does
    port = free_port()
    server_env = {**env, "HOST": "127.0.0.1", "PORT": str(port)}  # the environment wins over .env: loopback only
    # The demo model's answers name the day and its token counts follow the tool's text: the server
    # runs from the moment the README's outputs were taken (2026-12-01 22:51 in Tokyo, a Tuesday).
    server_env |= faked_clock(README_CLOCK) | {"TZ": "UTC"}
    with subprocess.Popen([sys.executable, "server.py"], cwd=home, env=server_env, start_new_session=True) as process:
        try:
            assert wait_until(lambda: health_status(f"http://127.0.0.1:{port}") == 200, 30), "server.py did not start"
            shown = [(block, run_readme_block(block, home, port, env)) for block in blocks if block.language != "text"
                     and block.language != "json" and "cp .env.example" not in block.text]  # fmt: skip
        finally:
            os.killpg(process.pid, signal.SIGTERM)
    outputs = {id(block): block for block in blocks if block.language in {"text", "json"}}
    for index, block in enumerate(blocks[:-1]):
        after = blocks[index + 1]
        if id(after) in outputs and block.language in {"bash", "python"}:
            got = next(out for b, out in shown if b is block)
            assert stable(got) == stable(after.text), f"the README shows another output for:\n{block.text}"


# ---------------------------------------------------------------------------
# The calculator
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, result",
    [("1 + 2 * 3", "7"), ("(1 + 2) * 3", "9"), ("7 / 2", "3.5"), ("7 // 2", "3"), ("7 % 4", "3"),
     ("2 ** 10", "1024"), ("-3 + +4", "1"), ("0.1 + 0.2", "0.30000000000000004"), ("2 ** -1", "0.5"),
     ("1.001 ** 5000", str(1.001**5000)), ("2 ** 3000", str(2**3000)), ("3 ** -2000", str(3**-2000)),
     ("2 ** -4000", "0.0"), ("(-2) ** 4095", str((-2) ** 4095)), ("1 ** 10 ** 100", "1")],
)  # fmt: skip
def test_calculate_does_arithmetic(expression: str, result: str) -> None:
    assert server.calculate(expression) == result


@pytest.mark.parametrize(
    "expression",
    ["__import__('os')", "x + 1", "abs(-1)", "1 / 0", "10 ** 100000", "(10 ** 300) ** 20", "1e308 * 10",
     "(-8) ** 0.5", "1 +", "'a' * 3", "[1] * 2", "True + 1", "9" * 201, "9 ** 9 ** 9", "2 ** 4096", "1e999",
     "-1e999", "0 ** -1"],
)  # fmt: skip
def test_calculate_refuses_what_is_not_bounded_arithmetic(monkeypatch: pytest.MonkeyPatch, expression: str) -> None:
    def bounded_power(base: Any, exponent: Any) -> Any:
        # An exact int power runs as long as its result is big (9 ** 9 ** 9: minutes): never start one.
        if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1:
            assert abs(base).bit_length() * exponent <= 2 * server.MAX_RESULT_BITS, "an unbounded power was computed"
        return base**exponent

    monkeypatch.setitem(server.BINARY_OPERATORS, ast.Pow, bounded_power)
    with pytest.raises(ValueError):
        server.calculate(expression)


# ---------------------------------------------------------------------------
# Faults of the model API
# ---------------------------------------------------------------------------

FAULTS = [
    ("401", Reply(status=401), "upstream_auth", 502),
    ("403", Reply(status=403), "upstream_auth", 502),
    ("429-retry-after", Reply(status=429, headers={"Retry-After": "7"}), "upstream_rate_limited", 429),
    ("429", Reply(status=429), "upstream_rate_limited", 429),
    ("500", Reply(status=500), "upstream_error", 502),
    ("503", Reply(status=503), "upstream_error", 502),
    ("dropped-mid-stream", Reply(content="a b c d", fault="drop"), "upstream_error", 502),
    ("truncated", Reply(content="a b c d", fault="truncate"), "upstream_incomplete", 502),
    (
        "cut-by-the-api",
        Reply(content="a b c d", finish_reason="insufficient_system_resource"),
        "upstream_incomplete",
        502,
    ),
    ("content-filter", Reply(content="a b c d", finish_reason="content_filter"), "upstream_incomplete", 502),
    ("unknown-reason", Reply(content="a b c d", finish_reason="gave_up"), "upstream_incomplete", 502),
    ("bad-json-chunk", Reply(content="a b c d", fault="bad_json"), "upstream_error", 502),
    ("error-event", Reply(content="a b c d", fault="error_event"), "upstream_error", 502),
    ("no-first-byte", Reply(fault="stall"), "upstream_timeout", 504),
    ("no-next-chunk", Reply(content="a b c d", fault="hang"), "upstream_timeout", 504),
    ("model-404", Reply(status=404, error_body=OPENAI_UNKNOWN_MODEL), "model_not_found", 502),
    ("path-404", Reply(status=404), "upstream_error", 502),
]


SSE_EVENTS = b'data: {"a": 1}\n\n: a comment\n\nevent: x\ndata: [\ndata: 2]\nid: 7\n\ndata:{"\xe4\xb8\xad"}\n\n'


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
def test_the_model_stream_is_read_the_same_whatever_its_line_ends_and_wherever_a_read_ends(line_end: bytes) -> None:
    raw = SSE_EVENTS.replace(b"\n", line_end)

    async def read(parts: list[bytes]) -> list[bytes]:
        async def stream() -> AsyncIterator[bytes]:
            for part in parts:
                yield part

        return [data async for data in server.sse_data(stream())]

    for cut in range(len(raw) + 1):
        assert asyncio.run(read([raw[:cut], raw[cut:]])) == [b'{"a": 1}', b"[\n2]", '{"中"}'.encode()], cut


def fault_scenario(url: str, upstream: FakeModelAPI, fault: Reply) -> dict[str, Any]:
    """Seed a conversation, fail a streamed and a JSON turn with `fault`, then chat again."""
    with httpx.Client(base_url=url, timeout=30) as http:
        upstream.reset(Reply(content="kept"))
        http.post("/api/chat", json={"message": "first", "conversation_id": "f"})
        before = http.get("/api/conversations/f").json()
        upstream.reset(fault, Reply(**fault.__dict__))
        streamed = http.post("/api/chat/stream", json={"message": "boom", "conversation_id": "f"})
        answered = http.post("/api/chat", json={"message": "boom", "conversation_id": "f"})
        after = http.get("/api/conversations/f").json()
        upstream.reset(Reply(content="fine"))
        next_turn = http.post("/api/chat", json={"message": "again", "conversation_id": "f"})
    for event in sse_events(streamed.text):
        assert_event_documented(event)
    return {"events": parse_sse(streamed.text), "answered": answered, "unchanged": before == after, "next": next_turn}


@pytest.mark.parametrize("fault, code, status", [f[1:] for f in FAULTS], ids=[f[0] for f in FAULTS])
def test_a_model_api_fault_ends_the_turn_with_one_error_and_changes_nothing(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, fault: Reply, code: str, status: int
) -> None:
    timeout = "0.5" if code == "upstream_timeout" else "10"
    with ServerThread(server.create_app(settings_for(REQUEST_TIMEOUT=timeout))) as service:
        outcome = fault_scenario(service.url, upstream, fault)
    assert_documented(outcome["answered"])
    events = outcome["events"]
    assert names(events).count("error") == 1 and events[-1][0] == "error"
    assert events[-1][1]["code"] == code
    assert outcome["answered"].status_code == status
    assert outcome["answered"].json()["error"]["code"] == code
    assert outcome["unchanged"], "the failed turn changed the stored conversation"
    assert outcome["next"].status_code == 200 and outcome["next"].json()["message"] == "fine"


def test_rate_limit_passes_the_wait_on(client: TestClient, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(status=429, headers={"Retry-After": "7"}))
    response = client.post("/api/chat", json={"message": "hi"})
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"]["retry_after"] == 7


def test_model_not_found_names_the_model_setting(client: TestClient, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(status=404, error_body=OPENAI_UNKNOWN_MODEL))
    error = client.post("/api/chat", json={"message": "hi"}).json()["error"]
    assert error["code"] == "model_not_found" and "MODEL_NAME='deepseek-flash'" in error["message"]


@pytest.mark.parametrize("path, hint", [("", True), ("/other/v1", False)], ids=["without-v1", "with-v1"])
def test_a_base_url_with_no_chat_completions_is_named_with_a_hint_about_v1(
    settings_for: Callable[..., server.Settings], _upstream_server: Any, path: str, hint: bool
) -> None:
    base_url = _upstream_server[1].url + path
    with TestClient(server.create_app(settings_for(BASE_URL=base_url))) as client:
        error = client.post("/api/chat", json={"message": "hi"}).json()["error"]
    assert error["code"] == "upstream_error" and f"BASE_URL={base_url}" in error["message"]
    assert ("does it end in /v1?" in error["message"]) is hint


@pytest.mark.parametrize(
    "base_url", ["http://127.0.0.1:9/v1", "http://nothing.invalid/v1"], ids=["connection-refused", "name-not-resolved"]
)
def test_an_unreachable_model_api_is_reported_as_such(
    settings_for: Callable[..., server.Settings], base_url: str
) -> None:
    with ServerThread(server.create_app(settings_for(BASE_URL=base_url))) as service:
        _, events = stream(service.url, {"message": "hi", "conversation_id": "u"})
        with httpx.Client(timeout=30) as http:
            answered = http.post(service.url + "/api/chat", json={"message": "hi"})
            stored = http.get(service.url + "/api/conversations/u")
    assert events[-1] == (
        "error",
        {"code": "upstream_unreachable", "message": server.ERRORS["upstream_unreachable"][1]},
    )
    assert answered.status_code == 502 and stored.status_code == 404


def test_errors_before_any_token_are_retried(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(status=500), Reply(content="second try"))
    with TestClient(server.create_app(settings_for(MAX_RETRIES="1"))) as client:
        response = client.post("/api/chat", json={"message": "hi"})
    assert response.json()["message"] == "second try" and len(upstream.requests) == 2


def test_a_stream_that_already_sent_tokens_is_never_retried(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="a b c d", fault="drop"), Reply(content="retried"))
    with ServerThread(server.create_app(settings_for(MAX_RETRIES="2"))) as service:
        _, events = stream(service.url, {"message": "hi"})
    assert [d["content"] for n, d in events if n == "chunk"] == ["a", " b"]
    assert events[-1][1]["code"] == "upstream_error" and len(upstream.requests) == 1


# ---------------------------------------------------------------------------
# Faults of the client
# ---------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@BOTH_DATABASES
def test_fifty_disconnects_leak_no_task_connection_or_lease(service: ServerThread, upstream: FakeModelAPI) -> None:
    async def task_count() -> int:
        return len(asyncio.all_tasks())

    upstream.reset(Reply(content="warm"))
    with httpx.Client(timeout=10) as http:
        http.post(service.url + "/api/chat", json={"message": "warm up"})
    tasks, fds = service.call(task_count()), open_fds()
    for index in range(50):
        upstream.reset(Reply(content="a b c d e", fault="hang"))
        with httpx.Client(timeout=10) as http:
            body = {"message": "hi", "conversation_id": f"d{index}"}
            with http.stream("POST", service.url + "/api/chat/stream", json=body) as response:
                for text in response.iter_text():
                    if "event: chunk" in text:
                        break
        assert upstream.disconnected.wait(5)
    assert wait_until(lambda: not service.app_ctx.turns and upstream.hanging == 0)
    assert wait_until(lambda: service.call(task_count()) == tasks), "tasks leaked"
    # At most the baseline: the warm-up left a keep-alive connection the pool may since have dropped.
    assert wait_until(lambda: open_fds() <= fds), "connections or files leaked"
    store = service.app_ctx.store
    assert all(service.call(store.acquire_lease(f"d{index}", "probe", 1)) for index in range(50)), "a lease leaked"
    assert service.call(store.list_conversations(100, 0))[1] == 1


def test_a_slow_reader_does_not_hold_up_other_streams(service: ServerThread, upstream: FakeModelAPI) -> None:
    long_answer = " ".join(f"{i:05d}" + "x" * 500 for i in range(4000))  # about 2 MB of events
    upstream.reset(Reply(content=long_answer), Reply(content="quick"))
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    host, port = service.url.removeprefix("http://").split(":")
    slow.connect((host, int(port)))
    body = json.dumps({"message": "long please", "conversation_id": "slow"}).encode()
    slow.sendall(
        b"POST /api/chat/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    try:
        assert wait_until(lambda: len(upstream.requests) == 1)
        _, events = stream(service.url, {"message": "quick one", "conversation_id": "fast"})
        assert names(events)[-1] == "done"
        assert any(turn.job.conversation_id == "slow" for turn in service.app_ctx.turns), (
            "the slow reader was not actually held back"
        )
    finally:
        slow.close()
    assert wait_until(lambda: not service.app_ctx.turns)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

INVALID, XML = "validation_error", {"Content-Type": "application/xml"}
BAD_REQUESTS = [
    ("body-not-json", "POST", "/api/chat", {"content": b"{nope"}, 400, "invalid_json"),
    ("body-not-utf8", "POST", "/api/chat", {"content": b"\xff\xfe"}, 400, "invalid_json"),
    ("json-not-object", "POST", "/api/chat", {"json": ["hi"]}, 422, "validation_error"),
    ("message-missing", "POST", "/api/chat", {"json": {}}, 422, "validation_error"),
    ("message-not-string", "POST", "/api/chat", {"json": {"message": 5}}, 422, "validation_error"),
    ("message-empty", "POST", "/api/chat", {"json": {"message": ""}}, 422, "validation_error"),
    ("message-whitespace", "POST", "/api/chat/stream", {"json": {"message": " \n\t"}}, 422, "validation_error"),
    ("message-too-long", "POST", "/api/chat", {"json": {"message": "x" * 32001}}, 422, "validation_error"),
    ("body-too-large", "POST", "/api/chat/stream", {"content": b"x" * 300_000}, 413, "payload_too_large"),
    ("chat-body-too-large", "POST", "/api/chat", {"content": b"x" * 300_000}, 413, "payload_too_large"),
    ("id-not-string", "POST", "/api/chat", {"json": {"message": "hi", "conversation_id": 7}}, 422, "validation_error"),
    ("id-bad-pattern", "POST", "/api/chat", {"json": {"message": "hi", "conversation_id": "../x"}}, 422, INVALID),
    ("id-too-long", "POST", "/api/chat", {"json": {"message": "hi", "conversation_id": "a" * 129}}, 422, INVALID),
    ("wrong-method", "GET", "/api/chat", {}, 405, "method_not_allowed"),
    ("unknown-path", "GET", "/api/nothing", {}, 404, "not_found"),
    ("xml-content-type", "POST", "/api/chat", {"content": b"<m/>", "headers": XML}, 415, "unsupported_media_type"),
    ("bad-limit", "GET", "/api/conversations?limit=0", {}, 422, "validation_error"),
    ("bad-path-id", "GET", "/api/conversations/a%20b", {}, 422, "validation_error"),
    ("delete-bad-path-id", "DELETE", "/api/conversations/a%20b", {}, 422, "validation_error"),
    ("stream-body-not-json", "POST", "/api/chat/stream", {"content": b"{nope"}, 400, "invalid_json"),
    ("stream-xml", "POST", "/api/chat/stream", {"content": b"<m/>", "headers": XML}, 415, "unsupported_media_type"),
    ("unknown-field", "POST", "/api/chat", {"json": {"message": "hi", "conversationId": "c"}}, 422, INVALID),
    ("offset-too-large", "GET", "/api/conversations?offset=1000000001", {}, 422, "validation_error"),
    ("limit-superscript", "GET", "/api/conversations?limit=%C2%B2", {}, 422, INVALID),
    ("offset-superscript", "GET", "/api/conversations?offset=%C2%B9", {}, 422, INVALID),
    ("offset-5000-digits", "GET", "/api/conversations?offset=" + "9" * 5000, {}, 422, INVALID),
    ("deep-nesting", "POST", "/api/chat", {"content": b"[" * 100_000}, 400, "invalid_json"),
    ("deep-nesting-closed", "POST", "/api/chat", {"content": b"[" * 100_000 + b"]" * 100_000}, 400, "invalid_json"),
    ("lone-surrogate", "POST", "/api/chat", {"content": b'{"message": "hi \\ud800"}'}, 422, INVALID),
    ("ag-ui-not-json", "POST", "/api/ag-ui", {"content": b"{nope"}, 400, "invalid_json"),
    ("ag-ui-too-large", "POST", "/api/ag-ui", {"content": b"x" * (8 * 2**20 + 1)}, 413, "payload_too_large"),
    ("ag-ui-xml", "POST", "/api/ag-ui", {"content": b"<m/>", "headers": XML}, 415, "unsupported_media_type"),
    ("ag-ui-not-run-input", "POST", "/api/ag-ui", {"json": {"threadId": 5}}, 422, INVALID),
    ("id-dot", "POST", "/api/chat", {"json": {"message": "hi", "conversation_id": "."}}, 422, INVALID),
    ("id-dot-dot", "POST", "/api/chat", {"json": {"message": "hi", "conversation_id": ".."}}, 422, INVALID),
    ("path-id-dot-dot", "GET", "/api/conversations/%2E%2E", {}, 422, INVALID),
]  # fmt: skip


@pytest.mark.parametrize(
    "method, path, kwargs, status, code", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_input_gets_a_json_error_one_log_line_and_changes_nothing(
    client: TestClient,
    upstream: FakeModelAPI,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    caplog.set_level(logging.INFO, logger="autogen_chat")
    response = client.request(method, path, **kwargs)
    assert response.status_code == status
    assert response.json() == {
        "status": "error",
        "error": {"code": code, "message": response.json()["error"]["message"]},
    }
    assert_documented(response)
    assert len([r for r in caplog.records if r.name == "autogen_chat"]) == 1
    assert upstream.requests == []
    assert client.get("/api/conversations").json()["total"] == 0


def test_json_body_is_accepted_without_a_json_content_type(client: TestClient) -> None:
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}):
        response = client.post("/api/chat", content=b'{"message": "curl -d"}', headers=headers)
        assert response.status_code == 200


def test_a_large_body_is_refused_while_it_is_read(client: TestClient) -> None:
    chunk = b" " * 65536
    consumed: list[int] = []

    async def receive() -> dict[str, Any]:
        consumed.append(1)
        return {"type": "http.request", "body": chunk, "more_body": len(consumed) < 100}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/api/chat", "raw_path": b"/api/chat",
        "query_string": b"", "headers": [], "http_version": "1.1", "scheme": "http",
        "server": ("test", 80), "client": ("test", 1), "root_path": "", "app": client.app,
    }  # fmt: skip
    client.portal.call(client.app, scope, receive, send)  # type: ignore[union-attr]
    assert sent[0]["status"] == 413
    assert len(consumed) <= server.Settings.max_body_bytes // len(chunk) + 1


def test_a_body_that_finishes_arriving_after_shutdown_began_starts_no_turn(
    client: TestClient, upstream: FakeModelAPI
) -> None:
    parts = [b'{"message": ', b'"late"}']

    async def receive() -> dict[str, Any]:
        if len(parts) == 1:
            server.begin_shutdown(client.app.state.ctx)  # type: ignore[attr-defined]
        return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/api/chat", "raw_path": b"/api/chat",
        "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
        "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": "", "app": client.app,
    }  # fmt: skip
    client.portal.call(client.app, scope, receive, send)  # type: ignore[union-attr]
    assert sent[0]["status"] == 503 and b"server_shutting_down" in sent[1]["body"]
    assert upstream.requests == [] and not client.app.state.ctx.turns  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# Access
# ---------------------------------------------------------------------------


def test_server_key_guards_every_api_route_and_leaves_the_rest_open(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    with TestClient(server.create_app(settings_for(SERVER_API_KEY=SERVER_KEY))) as client:
        guarded = [(method, re.sub(r"\{\w+\}", "x", route.path))
                   for route in client.app.routes  # type: ignore[attr-defined]
                   if route.path.startswith(("/api/", "/v1/")) for method in route.methods - {"HEAD"}]  # fmt: skip
        assert len(guarded) >= 5
        for method, path in guarded:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SERVER_KEY}):
                response = client.request(method, path, json={"message": "hi"}, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.json()["error"]["code"] == "unauthorized"
        for path in ("/", "/health", "/openapi.json", "/docs", "/redoc", "/chat"):
            assert client.get(path).status_code == 200
        authorized = client.post("/api/chat", json={"message": "hi"}, headers={"Authorization": f"Bearer {SERVER_KEY}"})
        document = client.get("/openapi.json").json()
    assert authorized.status_code == 200
    assert document["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert document["paths"]["/api/chat"]["post"]["security"] == [{"bearer": []}]
    assert upstream.requests and len(upstream.requests) == 1


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, scheme: str
) -> None:
    with TestClient(server.create_app(settings_for(SERVER_API_KEY=SERVER_KEY))) as client:
        response = client.get("/api/conversations", headers={"Authorization": f"{scheme} {SERVER_KEY}"})
    assert response.status_code == 200


def test_server_key_guards_the_api_of_a_service_behind_a_root_path(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, tmp_path: Path
) -> None:
    env = process_env(settings_for, SERVER_API_KEY=SERVER_KEY)
    # As behind nginx on a sub-path: the proxy strips /chat, uvicorn puts it back into scope["path"].
    with service_process(env, tmp_path, "--root-path", "/chat") as (_, url):
        with httpx.Client(base_url=url, timeout=10) as http:
            refused = [http.get("/api/conversations"), http.post("/api/chat", json={"message": "hi"})]
            allowed = http.get("/api/conversations", headers={"Authorization": f"Bearer {SERVER_KEY}"})
    assert [r.status_code for r in refused] == [401, 401]
    assert all(r.json()["error"]["code"] == "unauthorized" for r in refused)
    assert allowed.status_code == 200 and "conversations" in allowed.json()
    assert upstream.requests == []


@pytest.mark.parametrize(
    "host, server_key, warned",
    [("0.0.0.0", "", True), ("0.0.0.0", SERVER_KEY, False), ("127.0.0.1", "", False), ("::1", "", False)],
    ids=["exposed", "exposed-with-key", "loopback", "loopback-v6"],
)
def test_python_server_py_warns_when_it_listens_beyond_this_machine_without_a_server_key(
    settings_for: Callable[..., server.Settings],
    caplog: pytest.LogCaptureFixture,
    host: str,
    server_key: str,
    warned: bool,
) -> None:
    settings = settings_for(HOST=host, SERVER_API_KEY=server_key)
    assert (server.exposure_warning(settings) is not None) is warned
    caplog.set_level(logging.WARNING, logger="autogen_chat")
    with TestClient(server.create_app(settings)):  # as under `uvicorn server:app`, which chooses its own host
        pass
    assert not any("HOST" in r.getMessage() for r in caplog.records)


def test_cors_preflight_works_from_an_allowed_origin_and_fails_from_another(
    settings_for: Callable[..., server.Settings],
) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    with TestClient(server.create_app(settings_for(CORS_ORIGINS="https://app.example"))) as client:
        allowed = client.options("/api/chat/stream", headers={"Origin": "https://app.example", **preflight})
        denied = client.options("/api/chat/stream", headers={"Origin": "https://evil.example", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers


EVIL, APP, FORM = "https://evil.example", "https://app.example", "application/x-www-form-urlencoded"
JSON = "application/json"
ORIGIN_CASES = [
    ("form-from-another-site", "/api/chat", APP, "", {"Origin": EVIL, "Content-Type": FORM}, 403),
    ("text-from-another-site", "/api/chat/stream", APP, "", {"Origin": EVIL, "Content-Type": "text/plain"}, 403),
    ("no-type-from-another-site", "/api/chat", APP, "", {"Origin": EVIL}, 403),
    ("sandboxed-page", "/api/chat", APP, "", {"Origin": "null", "Content-Type": "text/plain"}, 403),
    ("text-from-an-allowed-origin", "/api/chat", APP, "", {"Origin": APP, "Content-Type": "text/plain"}, 200),
    ("text-from-this-server", "/api/chat", APP, "", {"Origin": "http://testserver", "Content-Type": "text/plain"}, 200),
    ("json-from-another-site", "/api/chat", APP, "", {"Origin": EVIL, "Content-Type": JSON}, 403),
    ("json-from-another-site-by-default", "/api/chat", "", "", {"Origin": EVIL, "Content-Type": JSON}, 403),
    ("read-from-another-site-by-default", "/api/conversations", "", "", {"Origin": EVIL}, 403),
    ("curl-sends-no-origin", "/api/chat", APP, "", {"Content-Type": FORM}, 200),
    ("wildcard-opens-json-not-forms", "/api/chat", "*", "", {"Origin": EVIL, "Content-Type": FORM}, 403),
    ("wildcard-opens-json", "/api/chat", "*", "", {"Origin": EVIL, "Content-Type": JSON}, 200),
    ("with-a-key-any-page-may-call-with-it", "/api/chat", "", SERVER_KEY, {"Origin": EVIL, "Content-Type": JSON}, 200),
    ("with-a-key-not-without-it", "/api/chat", "", SERVER_KEY, {"Origin": EVIL, "Content-Type": JSON}, 401),
]  # fmt: skip


@pytest.mark.parametrize(
    "path, allowed, key, headers, status", [c[1:] for c in ORIGIN_CASES], ids=[c[0] for c in ORIGIN_CASES]
)
def test_a_page_of_another_origin_gets_nothing_it_could_not_get_without_a_key(
    settings_for: Callable[..., server.Settings],
    upstream: FakeModelAPI,
    path: str,
    allowed: str,
    key: str,
    headers: dict[str, str],
    status: int,
) -> None:
    auth = {"Authorization": f"Bearer {key}"} if key and status != 401 else {}
    with TestClient(server.create_app(settings_for(CORS_ORIGINS=allowed, SERVER_API_KEY=key))) as client:
        body = b'{"message": "spend the credit", "conversation_id": "victim"}'
        response = client.request("GET" if path == "/api/conversations" else "POST", path, content=body,
                                  headers={**headers, **auth})  # fmt: skip
        stored = client.get("/api/conversations/victim", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == status
    if status >= 400:
        assert response.json()["error"]["code"] == ("unauthorized" if status == 401 else "origin_not_allowed")
        assert upstream.requests == [] and stored.status_code == 404


def test_cors_wildcard_never_allows_credentials(settings_for: Callable[..., server.Settings]) -> None:
    with TestClient(server.create_app(settings_for(CORS_ORIGINS="*"))) as client:
        response = client.get("/health", headers={"Origin": "https://any.example"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers


def test_keys_never_reach_a_response_an_event_or_the_logs(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    leak = {"error": {"message": f"Incorrect API key provided: {SERVICE_KEY}", "type": "auth"}}
    auth = {"Authorization": f"Bearer {SERVER_KEY}"}
    texts = []
    with ServerThread(server.create_app(settings_for(SERVER_API_KEY=SERVER_KEY, HOST="0.0.0.0"))) as service:
        upstream.reset(
            Reply(status=401, error_body=leak), Reply(status=401, error_body=leak), Reply(status=500, error_body=leak)
        )
        with httpx.Client(base_url=service.url, headers=auth, timeout=10) as http:
            texts.append(http.post("/api/chat/stream", json={"message": "hi"}).text)
            for _ in range(2):
                texts.append(http.post("/api/chat", json={"message": "hi"}).text)
            for path in ("/", "/health", "/openapi.json", "/api/conversations"):
                texts.append(http.get(path).text)
            texts.append(http.get("/api/conversations", headers={"Authorization": "Bearer nope"}).text)
    logged = "\n".join(r.getMessage() + str(r.exc_info or "") for r in caplog.records)
    assert "upstream_auth" in texts[0] and "upstream_error" in texts[2]
    assert "Incorrect API key provided: ***" in texts[2]  # the provider's words, less the key
    for secret in (SERVICE_KEY, SERVER_KEY):
        assert all(secret not in text for text in texts), secret
        assert secret not in logged, secret
    assert "Incorrect API key" not in logged


@pytest.mark.parametrize(
    "said, shown",
    [
        ("max_tokens must be at most 8192", "max_tokens must be at most 8192"),
        ("bad key sk-proj-AbCdEf0123456789 given", "bad key *** given"),
        ("header Bearer abc.def-ghi refused", "header *** refused"),
        (f"token {'x' * 40} expired", "token *** expired"),
    ],
    ids=["plain", "openai-key", "bearer", "long-secret"],
)
def test_an_upstream_error_with_no_code_of_its_own_passes_on_the_providers_words_redacted(
    client: TestClient, upstream: FakeModelAPI, said: str, shown: str
) -> None:
    upstream.reset(Reply(status=400, error_body={"error": {"message": said, "type": "invalid_request_error"}}))
    error = client.post("/api/chat", json={"message": "hi"}).json()["error"]
    assert error == {"code": "upstream_error", "message": f"The model API answered 400: {shown}"}


def test_settings_never_show_the_keys_in_their_repr() -> None:
    settings = server.Settings(api_key=SERVICE_KEY, server_api_key=SERVER_KEY, database_url="postgresql://u:pw@h/d")
    assert all(secret not in repr(settings) for secret in (SERVICE_KEY, SERVER_KEY, "pw@"))


@pytest.mark.parametrize(
    "path, body",
    [("/api/chat", {"message": "hi"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})],
    ids=["api", "v1-stateful"],
)
def test_a_turn_stopped_as_it_lets_go_of_its_lease_still_delivers_its_last_event(
    client: TestClient, upstream: FakeModelAPI, monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any]
) -> None:
    # The window, widened: shutdown's grace runs out just as the failed turn lets go of its
    # lease, before its error event is queued.
    release = server.Lease.release

    def stop_the_turns_then_release(lease: server.Lease) -> asyncio.Future[None]:
        server.stop_turns(lease.ctx)
        return release(lease)

    monkeypatch.setattr(server.Lease, "release", stop_the_turns_then_release)
    upstream.reset(Reply(status=500))
    response = client.post(path, json={**body, "conversation_id": "c"})
    assert response.status_code == 502 and "upstream_error" in response.text


# ---------------------------------------------------------------------------
# Load and processes
# ---------------------------------------------------------------------------


@BOTH_DATABASES
def test_two_hundred_concurrent_streams_complete_without_cross_talk(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    async def one(http: httpx.AsyncClient, index: int) -> list[tuple[str, dict[str, Any]]]:
        body = {"message": f"message {index}", "conversation_id": f"load-{index}"}
        response = await http.post("/api/chat/stream", json=body)
        return parse_sse(response.text)

    async def run_all() -> list[list[tuple[str, dict[str, Any]]]]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=service.url, timeout=60, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(200)))

    results = asyncio.run(run_all())
    assert [names(events)[-1] for events in results] == ["done"] * 200
    store = service.app_ctx.store
    for index in range(200):
        stored = service.call(store.get_conversation(f"load-{index}"))
        assert stored is not None
        assert [m["content"] for m in stored["messages"]] == [f"message {index}", f"echo: message {index}"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def service_process(env: dict[str, str], cwd: Path, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`uvicorn server:app` in its own process(es) on a free loopback port; `python server.py`
    when `args` is just that."""
    with service_processes(1, env, cwd, *args) as [started]:
        yield started


@contextlib.contextmanager
def service_processes(
    count: int, env: dict[str, str], cwd: Path, *args: str, output: Any = None
) -> Iterator[list[tuple[subprocess.Popen, str]]]:
    """`count` instances of `uvicorn server:app` (or `python server.py`), all started at once,
    each on its own port."""
    started = []
    try:
        for _ in range(count):
            port = free_port()
            command = [sys.executable, "-m", "uvicorn", "server:app", "--app-dir", str(HERE),
                       "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args]  # fmt: skip
            own_env = {**os.environ, **env}
            if args == ("server.py",):
                command, own_env = (
                    [sys.executable, str(HERE / "server.py")],
                    {**own_env, "HOST": "127.0.0.1", "PORT": str(port)},
                )
            # Its own session, so the workers of --workers go down with it.
            process = subprocess.Popen(
                command, cwd=cwd, env=own_env, start_new_session=True, stdout=output, stderr=output
            )
            started.append((process, f"http://127.0.0.1:{port}"))
        for _, url in started:
            assert wait_until(lambda url=url: health_status(url) == 200, timeout=30), "service process did not start"
        yield started
    finally:
        for process, _ in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process, _ in started:
            try:
                process.wait(10)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)


def health_status(url: str) -> int:
    try:
        return httpx.get(url + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def process_env(settings_for: Callable[..., server.Settings], **overrides: str) -> dict[str, str]:
    settings = settings_for()
    return {"API_KEY": SERVICE_KEY, "BASE_URL": settings.base_url, "DATABASE_PATH": settings.database_path,
            "DATABASE_URL": settings.database_url or "", "MAX_RETRIES": "0", **overrides}  # fmt: skip


def child_processes(pid: int, marker: bytes = b"spawn_main") -> list[int]:
    """The children of a process whose command line holds `marker`."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if (
                int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid
                and marker in (stat.parent / "cmdline").read_bytes()
            ):
                children.append(int(stat.parent.name))
    return children


def test_python_server_py_runs_workers_processes_and_the_busy_rule_holds_across_them(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, tmp_path: Path
) -> None:
    upstream.reset(Reply(content="a b c d", fault="hang"))
    with service_process(process_env(settings_for, WORKERS="2"), tmp_path, "server.py") as (process, url):
        assert len(child_processes(process.pid)) == 2
        assert "pydantic_core" not in Path(f"/proc/{process.pid}/maps").read_text()  # nor the app: 85 MiB less
        body = {"message": "x", "conversation_id": "shared"}
        with held_stream(url, body, upstream):
            statuses = {httpx.post(url + "/api/chat", json=body, timeout=10).status_code for _ in range(10)}
    assert statuses == {409}


def test_a_lease_left_by_a_killed_process_expires(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, tmp_path: Path
) -> None:
    upstream.reset(Reply(content="a b c d", fault="hang"))
    env = process_env(settings_for, LEASE_SECONDS="1")
    with service_process(env, tmp_path) as (process, url):
        with held_stream(url, {"message": "x", "conversation_id": "orphan"}, upstream):
            process.send_signal(signal.SIGKILL)
            process.wait(10)
    database = sqlite3.connect(env["DATABASE_PATH"])
    assert database.execute("SELECT count(*) FROM leases WHERE conversation_id = 'orphan'").fetchone() == (1,)
    database.close()
    upstream.reset()
    with TestClient(server.create_app(settings_for())) as client:
        body = {"message": "retry", "conversation_id": "orphan"}
        assert wait_until(lambda: client.post("/api/chat", json=body).status_code == 200)
        stored = client.get("/api/conversations/orphan").json()["messages"]
    assert [m["content"] for m in stored] == ["retry", "echo: retry"]


def test_sigterm_ends_open_streams_with_an_error_and_keeps_the_database_consistent(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, tmp_path: Path
) -> None:
    env = process_env(settings_for, SHUTDOWN_GRACE_SECONDS="0.5")
    with service_process(env, tmp_path) as (process, url):
        upstream.reset(Reply(content="kept"), Reply(content="a b c d", fault="hang"))
        httpx.post(url + "/api/chat", json={"message": "first", "conversation_id": "term"}, timeout=10)
        with held_stream(url, {"message": "second", "conversation_id": "term"}, upstream) as (text, rest):
            process.send_signal(signal.SIGTERM)
            text += "".join(rest)
        # After a graceful shutdown uvicorn re-raises the signal it caught, so -SIGTERM is normal.
        assert process.wait(15) in (0, -signal.SIGTERM)
    events = parse_sse(text)
    assert events[-1] == (
        "error",
        {"code": "server_shutting_down", "message": server.ERRORS["server_shutting_down"][1], "retry_after": 5},
    )
    database = sqlite3.connect(env["DATABASE_PATH"])
    assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert database.execute("SELECT count(*) FROM leases").fetchone() == (0,)
    database.close()
    with TestClient(server.create_app(settings_for())) as client:
        stored = client.get("/api/conversations/term").json()["messages"]
    assert [m["content"] for m in stored] == ["first", "kept"]


def test_a_database_path_that_cannot_be_opened_stops_start_up(
    settings_for: Callable[..., server.Settings], tmp_path: Path
) -> None:
    for path in (tmp_path, tmp_path / "missing" / "chat.db"):
        with pytest.raises(server.SettingsError, match="DATABASE_PATH"):
            with TestClient(server.create_app(settings_for(DATABASE_PATH=str(path)))):
                pass


@pytest.mark.parametrize(
    "name, value",
    [("DATABASE_PATH", "missing/dir/chat.db"), ("PORT", "eighty")],
    ids=["database-path", "port"],
)
def test_python_server_py_refuses_a_bad_setting_with_one_clear_line(tmp_path: Path, name: str, value: str) -> None:
    env = {**os.environ, name: value, "HOST": "127.0.0.1", "PORT": "1", "DATABASE_PATH": str(tmp_path / "ok.db")}
    env[name] = value
    result = subprocess.run([sys.executable, str(HERE / "server.py")], check=False, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    shown = str(HERE / value) if name == "DATABASE_PATH" else value  # a relative path is taken from server.py's folder
    assert result.stderr.startswith(f"Configuration error: {name}={shown!r}")
    assert "Traceback" not in result.stderr


def test_a_database_url_that_is_not_postgresql_is_refused_without_its_password() -> None:
    with pytest.raises(server.SettingsError) as error:
        server.Settings.from_env({"DATABASE_URL": "mysql://chat:hunter2@db.example/chat?password=hunter2"})
    assert str(error.value).startswith("DATABASE_URL='mysql://chat:***@db.example/chat?password=***'")
    assert "hunter2" not in str(error.value)


@pytest.mark.parametrize(
    "command",
    [["server.py"], ["-m", "uvicorn", "server:app", "--port", "0"]],
    ids=["python-server-py", "uvicorn"],
)
def test_an_unreachable_postgresql_stops_start_up_with_one_line_and_no_password(
    tmp_path: Path, command: list[str]
) -> None:
    url = f"postgresql://chat:{POSTGRES_PASSWORD}@127.0.0.1:{free_port()}/chat"
    env = {**os.environ, "DATABASE_URL": url, "HOST": "127.0.0.1", "PORT": "1"}
    result = subprocess.run(
        [sys.executable, *command], check=False, cwd=HERE, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    [line] = [line for line in result.stderr.splitlines() if "DATABASE_URL" in line]
    assert line.split("Configuration error: ")[1].startswith("DATABASE_URL='postgresql://chat:***@127.0.0.1:")
    assert "Traceback" not in result.stderr
    assert POSTGRES_PASSWORD not in result.stderr + result.stdout


def test_health_is_degraded_when_the_database_stops_answering(client: TestClient) -> None:
    store = client.app.state.ctx.store  # type: ignore[attr-defined]
    store.blocking.close()
    store.quick.close()
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["status"] == "degraded" and response.json()["database"] is False


# ---------------------------------------------------------------------------
# Storage faults and leases
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def sqlite_write_lock(path: str) -> Iterator[None]:
    """Hold the write lock of a SQLite file, as a backup or a second tool would."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("COMMIT")
        other.close()


def test_a_locked_sqlite_file_never_stalls_the_event_loop(
    monkeypatch: pytest.MonkeyPatch, upstream: FakeModelAPI, settings_for: Callable[..., server.Settings]
) -> None:
    # The save waits for the lock for up to busy_timeout inside sqlite3. On the event loop
    # GET / could not answer (within its 10 s) until the save gave up; off the loop it
    # answers at once, the lock goes, and the waiting save goes through.
    monkeypatch.setattr(server, "SQLITE_BUSY_TIMEOUT_MS", 60_000)
    upstream.reset(Reply(content="a b c d", fault="stall"))
    with ServerThread(server.create_app(settings_for())) as service:
        with held_stream(service.url, {"message": "x", "conversation_id": "locked"}, upstream) as (seen, rest):
            with sqlite_write_lock(settings_for().database_path):
                upstream.end_hang()
                for text in rest:
                    seen += text
                    if "event: message" in seen:  # the save comes next
                        break
                index = httpx.get(service.url + "/", timeout=10)
            seen += "".join(rest)
    assert index.status_code == 200
    assert names(parse_sse(seen))[-1] == "done"


async def stop_turns(ctx: server.AppContext) -> None:
    server.stop_turns(ctx)


def test_shutdown_during_a_save_that_waits_for_the_sqlite_lock_tells_the_client_what_was_stored(
    upstream: FakeModelAPI, settings_for: Callable[..., server.Settings]
) -> None:
    upstream.reset(Reply(content="a b c d", fault="stall"))
    settings = settings_for()
    with ServerThread(server.create_app(settings)) as service:
        with held_stream(service.url, {"message": "x", "conversation_id": "saving"}, upstream) as (seen, rest):
            with sqlite_write_lock(settings.database_path):
                upstream.end_hang()
                saving = lambda: any(t.state is server.TurnState.SAVING for t in service.app_ctx.turns)  # noqa: E731
                assert wait_until(saving), "the turn never waited to save"
                service.call(stop_turns(service.app_ctx))  # shutdown's grace runs out
            seen += "".join(rest)
        stored = httpx.get(service.url + "/api/conversations/saving", timeout=10)
    assert names(parse_sse(seen))[-1] == "done"  # the save went through once the lock went: so the client is told
    assert stored.status_code == 200 and stored.json()["messages"][-1]["content"] == "a b c d"


def test_a_database_that_cannot_be_written_answers_503_saves_nothing_and_keeps_no_lease(
    monkeypatch: pytest.MonkeyPatch, settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    monkeypatch.setattr(server, "SQLITE_BUSY_TIMEOUT_MS", 100)
    settings = settings_for()
    with ServerThread(server.create_app(settings)) as service, httpx.Client(base_url=service.url, timeout=10) as http:
        upstream.reset(Reply(content="kept"), Reply(content="a b c d", fault="stall"))
        http.post("/api/chat", json={"message": "first", "conversation_id": "w"})
        before = http.get("/api/conversations/w").json()
        with held_stream(service.url, {"message": "second", "conversation_id": "w"}, upstream) as (seen, rest):
            with sqlite_write_lock(settings.database_path):
                refused = http.post("/api/chat", json={"message": "hi", "conversation_id": "other"})
                deleted = http.delete("/api/conversations/w")
                upstream.end_hang()
                seen += "".join(rest)  # the answer streams, then its save fails
                listed = http.get("/api/conversations")
        after = http.get("/api/conversations/w").json()
        upstream.reset()
        assert wait_until(
            lambda: http.post("/api/chat", json={"message": "3", "conversation_id": "w"}).status_code == 200
        )
    for response in (refused, deleted):
        assert response.status_code == 503 and response.json()["error"]["code"] == "database_unavailable"
    events = parse_sse(seen)
    assert "message" in names(events) and names(events).count("error") == 1
    assert events[-1][0] == "error" and events[-1][1]["code"] == "database_unavailable"
    assert listed.status_code == 200 and after == before


@BOTH_DATABASES
def test_a_turn_whose_lease_was_taken_over_saves_nothing(service: ServerThread, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(content="kept"), Reply(content="a b c d", fault="stall"))
    httpx.post(service.url + "/api/chat", json={"message": "first", "conversation_id": "taken"}, timeout=10)
    with held_stream(service.url, {"message": "lost", "conversation_id": "taken"}, upstream) as (seen, rest):
        [turn], store = service.app_ctx.turns, service.app_ctx.store
        service.call(store.release_lease("taken", turn.lease.owner))  # as if it expired while the process was paused
        assert service.call(store.acquire_lease("taken", "another-process", 90))
        upstream.end_hang()
        seen += "".join(rest)
    events = parse_sse(seen)
    assert events[-1][0] == "error" and events[-1][1]["code"] == "turn_superseded"
    stored = service.call(store.get_conversation("taken"))
    assert [m["content"] for m in stored["messages"]] == ["first", "kept"]


@BOTH_DATABASES
def test_a_renewal_that_finds_the_lease_taken_stops_the_turn(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="a b c d", fault="hang"))
    with ServerThread(server.create_app(settings_for(LEASE_SECONDS="0.3"))) as service:
        with held_stream(service.url, {"message": "x", "conversation_id": "renew"}, upstream) as (seen, rest):
            [turn], store = service.app_ctx.turns, service.app_ctx.store
            service.call(store.release_lease("renew", turn.lease.owner))
            assert service.call(store.acquire_lease("renew", "another-process", 90))
            seen += "".join(rest)  # ends while the model is still answering
        assert upstream.disconnected.wait(5), "the model request was not closed"
        assert service.call(store.get_conversation("renew")) is None
    events = parse_sse(seen)
    assert events[-1][0] == "error" and events[-1][1]["code"] == "turn_superseded"


# ---------------------------------------------------------------------------
# Several instances on one database
# ---------------------------------------------------------------------------

ON_POSTGRESQL = pytest.mark.parametrize("database", ["postgresql"], indirect=True)


@ON_POSTGRESQL
def test_two_instances_share_conversations_and_run_one_turn_at_a_time(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, tmp_path: Path
) -> None:
    with service_processes(2, process_env(settings_for), tmp_path) as [(_, a), (_, b)]:
        upstream.reset(Reply(content="Hi Ada."), Reply(content="You are Ada."))
        httpx.post(a + "/api/chat", json={"message": "I am Ada.", "conversation_id": "ab"}, timeout=10)
        on_b = httpx.post(b + "/api/chat", json={"message": "Who am I?", "conversation_id": "ab"}, timeout=10)
        sent = [(m["role"], m["content"]) for m in upstream.requests[1]["messages"][1:]]
        upstream.reset(Reply(content="a b c d", fault="hang"))
        with held_stream(a, {"message": "long", "conversation_id": "ab"}, upstream):
            busy = httpx.post(b + "/api/chat", json={"message": "now?", "conversation_id": "ab"}, timeout=10)
            deleted = httpx.delete(b + "/api/conversations/ab", timeout=10)
    assert on_b.json()["message"] == "You are Ada."
    assert sent == [("user", "I am Ada."), ("assistant", "Hi Ada."), ("user", "Who am I?")]
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "conversation_busy"
    assert deleted.status_code == 409


@ON_POSTGRESQL
def test_a_turn_killed_with_its_instance_saves_nothing_and_another_instance_continues(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, tmp_path: Path
) -> None:
    env = process_env(settings_for, LEASE_SECONDS="1")
    with service_processes(2, env, tmp_path) as [(killed, a), (_, b)]:
        upstream.reset(Reply(content="kept"), Reply(content="a b c d", fault="hang"))
        httpx.post(a + "/api/chat", json={"message": "first", "conversation_id": "kill"}, timeout=10)
        with held_stream(a, {"message": "killed", "conversation_id": "kill"}, upstream):
            os.killpg(killed.pid, signal.SIGKILL)
            killed.wait(10)
        upstream.reset()
        body = {"message": "retry", "conversation_id": "kill"}
        assert wait_until(lambda: httpx.post(b + "/api/chat", json=body, timeout=10).status_code == 200)
        stored = httpx.get(b + "/api/conversations/kill", timeout=10).json()["messages"]
    assert [m["content"] for m in stored] == ["first", "kept", "retry", "echo: retry"]


@ON_POSTGRESQL
def test_four_instances_started_at_once_on_an_empty_database_all_come_up(
    settings_for: Callable[..., server.Settings], tmp_path: Path, database: dict[str, str]
) -> None:
    with service_processes(4, process_env(settings_for), tmp_path) as started:
        statuses = [health_status(url) for _, url in started]
    with psycopg.connect(database["DATABASE_URL"]) as connection:
        versions = connection.execute("SELECT version FROM schema_version").fetchall()
    assert statuses == [200] * 4
    assert versions == [(server.SCHEMA_VERSION,)]


@BOTH_DATABASES
def test_a_paused_instance_whose_turn_was_taken_over_saves_nothing(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, tmp_path: Path
) -> None:
    env = process_env(settings_for, LEASE_SECONDS="1")
    with service_processes(2, env, tmp_path) as [(paused, a), (_, b)]:
        upstream.reset(Reply(content="a b c d", fault="stall"))
        with held_stream(a, {"message": "paused", "conversation_id": "p"}, upstream) as (seen, rest):
            os.killpg(paused.pid, signal.SIGSTOP)
            try:
                body = {"message": "meanwhile", "conversation_id": "p"}
                assert wait_until(lambda: httpx.post(b + "/api/chat", json=body, timeout=10).status_code == 200)
            finally:
                os.killpg(paused.pid, signal.SIGCONT)
            upstream.end_hang()
            seen += "".join(rest)
        stored = httpx.get(b + "/api/conversations/p", timeout=10).json()["messages"]
    events = parse_sse(seen)
    assert events[-1][0] == "error" and events[-1][1]["code"] == "turn_superseded"
    assert [m["content"] for m in stored] == ["meanwhile", "echo: meanwhile"]


def test_postgresql_stopped_and_started_under_a_running_server(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, tmp_path: Path
) -> None:
    cluster, log = PostgresCluster(), tmp_path / "server.log"  # a cluster of its own, to stop and start
    try:
        env = process_env(settings_for, DATABASE_URL=cluster.url)
        with log.open("w") as output, service_processes(1, env, tmp_path, output=output) as [(_, url)]:
            http = httpx.Client(base_url=url, timeout=30)
            upstream.reset(Reply(content="kept"), Reply(content="a b c d", fault="stall"))
            http.post("/api/chat", json={"message": "first", "conversation_id": "pg"})
            with held_stream(url, {"message": "lost", "conversation_id": "pg"}, upstream) as (seen, rest):
                cluster.stop()
                health = http.get("/health")
                refused = http.post("/api/chat", json={"message": "hi"})
                upstream.end_hang()
                seen += "".join(rest)  # the answer streams, then its save fails
                # The error comes first: the lease's release, which waits out the database's time limit, follows.
                release_first = "could not release the lease" in log.read_text()
            index = http.get("/")
            cluster.start()
            upstream.reset()
            # The first call (on another conversation: the failed turn's lease goes once its release is retried).
            again = http.post("/api/chat", json={"message": "again", "conversation_id": "pg2"})
            upstream.reset(Reply(content="a b c d", fault="stall"))
            upstream.release = None  # a new hang: the first one was ended
            with held_stream(url, {"message": "across", "conversation_id": "pg2"}, upstream) as (across, rest):
                cluster.stop()
                cluster.start()
                upstream.end_hang()  # the save of an answer that streamed in full is the first call after the restart
                across += "".join(rest)
            stored = http.get("/api/conversations/pg").json()["messages"]
            stored += http.get("/api/conversations/pg2").json()["messages"]
    finally:
        cluster.remove()
    assert health.status_code == 503 and health.json()["status"] == "degraded" and health.json()["database"] is False
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "database_unavailable"
    events = parse_sse(seen)
    assert "message" in names(events) and names(events).count("error") == 1
    assert events[-1][0] == "error" and events[-1][1]["code"] == "database_unavailable"
    assert not release_first
    assert again.status_code == 200 and names(parse_sse(across))[-1] == "done"
    assert [m["content"] for m in stored] == ["first", "kept", "again", "echo: again", "across", "a b c d"]
    for text in (index.text, health.text, refused.text, seen, log.read_text()):
        assert POSTGRES_PASSWORD not in text


@pytest.fixture(scope="session")
def spare_postgres() -> Iterator[PostgresCluster]:
    """A cluster of the tests' own, to freeze, restart, or make read-only."""
    cluster = PostgresCluster()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def spare(spare_postgres: PostgresCluster) -> Iterator[PostgresCluster]:
    empty_postgres(spare_postgres.url)
    yield spare_postgres
    spare_postgres.thaw()
    spare_postgres.sql("ALTER DATABASE chat RESET default_transaction_read_only")


def test_a_frozen_postgresql_never_hangs_the_server_and_sigterm_still_stops_it(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, spare: PostgresCluster, tmp_path: Path
) -> None:
    # As in a network partition or a frozen host: the database's kernel still acknowledges.
    env = process_env(settings_for, DATABASE_URL=spare.url, DATABASE_TIMEOUT="1", SHUTDOWN_GRACE_SECONDS="1")
    with service_process(env, tmp_path) as (process, url), httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/api/chat", json={"message": "first", "conversation_id": "f"}).status_code == 200
        spare.freeze()
        health = http.get("/health")
        refused = http.post("/api/chat", json={"message": "hi", "conversation_id": "f"})
        listed = http.get("/api/conversations")
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)  # raises if the server waits on the database
    assert health.status_code == 503 and health.json()["reasons"] == ["database not answering"]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "database_unavailable"
    assert listed.status_code == 503 and listed.json()["error"]["code"] == "database_unavailable"
    assert process.returncode is not None


def test_a_read_only_postgresql_answers_database_unavailable_and_health_says_so(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, spare: PostgresCluster
) -> None:
    # As after a failover to a standby, or with default_transaction_read_only set.
    with TestClient(server.create_app(settings_for(DATABASE_URL=spare.url))):
        pass  # the schema, while the database takes writes
    spare.sql("ALTER DATABASE chat SET default_transaction_read_only = on")
    with TestClient(server.create_app(settings_for(DATABASE_URL=spare.url))) as client:
        refused = client.post("/api/chat", json={"message": "hi", "conversation_id": "ro"})
        health = client.get("/health")
        listed = client.get("/api/conversations")
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "database_unavailable"
    assert health.status_code == 503 and health.json()["reasons"] == ["database is read-only"]
    assert listed.status_code == 200  # reading still works
    assert upstream.requests == []


def test_a_role_that_may_only_read_and_write_the_tables_runs_the_server(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, spare: PostgresCluster
) -> None:
    with TestClient(server.create_app(settings_for(DATABASE_URL=spare.url))):
        pass  # the owner creates the schema once
    spare.sql("DROP ROLE IF EXISTS chat_app")
    spare.sql(f"CREATE ROLE chat_app LOGIN PASSWORD '{POSTGRES_PASSWORD}'")
    spare.sql(readme_grants(), database="chat")
    app_url = spare.url.replace("chat:", "chat_app:", 1)
    with TestClient(server.create_app(settings_for(DATABASE_URL=app_url))) as client:
        answered = client.post("/api/chat", json={"message": "hi", "conversation_id": "dml"})
        deleted = client.delete("/api/conversations/dml")
    assert answered.status_code == 200 and deleted.status_code == 204


def faked_clock(faketime: str) -> dict[str, str]:
    """The environment that runs a process on another clock (libfaketime's FAKETIME), its monotonic clock real."""
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail("This test runs a process on another clock with libfaketime: apt-get install -y faketime")
    return {"LD_PRELOAD": str(found[0]), "FAKETIME": faketime, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def readme_grants() -> str:
    """The grants the README gives a role that only reads and writes the tables."""
    blocks = re.findall(r"```sql\n(.*?)```", (HERE / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    return next(block for block in blocks if "GRANT" in block)


def test_leases_run_on_the_databases_clock_whatever_the_instances_clocks_say(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, postgres_url: str, tmp_path: Path
) -> None:
    # Instance B's clock is two hours ahead: on its own clock, A's lease would look expired long ago.
    empty_postgres(postgres_url)
    env = process_env(settings_for, DATABASE_URL=postgres_url)
    ahead = {**env, **faked_clock("+2h")}
    upstream.reset(Reply(content="a b c d", fault="stall"))
    with service_process(env, tmp_path) as (_, a), service_process(ahead, tmp_path) as (b_process, b):
        clock = httpx.get(b + "/health").headers["date"]
        with held_stream(a, {"message": "held by A", "conversation_id": "clock"}, upstream):
            taken = httpx.post(b + "/api/chat", json={"message": "B", "conversation_id": "clock"}, timeout=10)
            upstream.end_hang()
    assert email.utils.parsedate_to_datetime(clock) > datetime.now(UTC) + timedelta(hours=1)
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "conversation_busy"


@ON_POSTGRESQL
def test_stores_opening_together_on_an_empty_database_create_the_schema_once(database: dict[str, str]) -> None:
    async def open_together() -> None:
        stores = [server.PostgresStore(database["DATABASE_URL"], 1, 5.0) for _ in range(8)]
        try:
            await asyncio.gather(*(store.open() for store in stores))
        finally:
            await asyncio.gather(*(store.close() for store in stores))

    asyncio.run(open_together())
    with psycopg.connect(database["DATABASE_URL"]) as connection:
        versions = connection.execute("SELECT version FROM schema_version").fetchall()
    assert versions == [(server.SCHEMA_VERSION,)]


# ---------------------------------------------------------------------------
# MCP servers and approvals
# ---------------------------------------------------------------------------

# A real MCP server (FastMCP, the MCP SDK's own), written to a file and run by the tests over
# stdio (the server starts it) or Streamable HTTP (python FILE http PORT).
FAKE_MCP_SERVER = """
import os, sys, time
from pathlib import Path
from pydantic import BaseModel
from mcp.server.fastmcp import FastMCP

mcp = FastMCP("fake", log_level="WARNING")


class Point(BaseModel):
    x: int
    y: int


@mcp.tool()
def echo(text: str) -> str:
    '''Return the text unchanged.'''
    return text


@mcp.tool()
def write_file(path: str, text: str) -> str:
    '''Write text to a file.'''
    Path(path).write_text(text)
    return f"wrote {len(text)} characters"


@mcp.tool()
def sleep(seconds: float, marker: str = "") -> str:
    '''Sleep, then answer; first write the marker file, if one is named.'''
    if marker:
        Path(marker).write_text("sleeping")
    time.sleep(seconds)
    return f"slept {seconds}"


@mcp.tool()
def die() -> str:
    '''End the server's process mid-call.'''
    os._exit(3)


@mcp.tool()
def env(name: str) -> str:
    '''A variable of the server's environment.'''
    return os.environ.get(name, "<unset>")


@mcp.tool()
def distance(p: Point) -> str:
    '''A tool whose schema refers to a definition.'''
    return str(abs(p.x) + abs(p.y))


if sys.argv[1:2] == ["http"]:
    import uvicorn
    uvicorn.run(mcp.streamable_http_app(), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
else:
    mcp.run()
"""


@pytest.fixture
def mcp_file(tmp_path: Path) -> Path:
    path = tmp_path / "fake_mcp.py"
    path.write_text(FAKE_MCP_SERVER, encoding="utf-8")
    return path


def mcp_config(tmp_path: Path, servers: dict[str, Any]) -> str:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": servers}), encoding="utf-8")
    return str(path)


def stdio_server(mcp_file: Path, **extra: Any) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(mcp_file)], **extra}


@contextlib.contextmanager
def http_mcp_server(mcp_file: Path) -> Iterator[str]:
    """The fake MCP server over Streamable HTTP in a process of its own; its /mcp URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(mcp_file), "http", str(port)], start_new_session=True)
    try:
        assert wait_until(lambda: connectable(port), timeout=30), "the MCP server did not start"
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def connectable(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def approve(url: str, conversation_id: str, call_id: str, decision: str) -> httpx.Response:
    path = f"{url}/api/conversations/{conversation_id}/approvals/{call_id}"
    return httpx.post(path, json={"decision": decision}, timeout=10)


@contextlib.contextmanager
def approval_stream(url: str, body: dict[str, Any]) -> Iterator[tuple[list[str], Iterator[str]]]:
    """A stream read up to its approval_required event: what came so far, and the rest."""
    with httpx.Client(timeout=30) as http, http.stream("POST", url + "/api/chat/stream", json=body) as response:
        seen, received = [], response.iter_text()
        for text in received:
            seen.append(text)
            if "event: approval_required" in "".join(seen):
                break
        yield seen, received


@pytest.mark.parametrize(
    "body",
    [
        {"decision": {}},
        {"decision": ["approve"]},
        {"decision": None},
        {"decision": "approve", "why": "ok"},
        ["deny"],
        5.1,
    ],
    ids=["an-object", "a-list", "null", "another-field", "a-list-body", "a-number-body"],
)
def test_a_decision_that_is_not_approve_or_deny_is_refused_and_the_call_still_waits(
    service: ServerThread, body: Any
) -> None:
    service.call(service.app_ctx.store.ask_approval("c", "call_x", 300))
    path = f"{service.url}/api/conversations/c/approvals/call_x"
    refused = httpx.post(path, json=body, timeout=10)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "validation_error"
    assert approve(service.url, "c", "call_x", "deny").status_code == 204


def test_an_mcp_tool_runs_once_a_person_approves_it(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, mcp_file: Path, tmp_path: Path
) -> None:
    target = tmp_path / "written.txt"
    config = mcp_config(tmp_path, {"files": stdio_server(mcp_file)})
    upstream.reset(
        Reply(tool_calls=[("files__write_file", {"path": str(target), "text": "hello"})]), Reply(content="Done.")
    )
    with ServerThread(server.create_app(settings_for(MCP_CONFIG=config))) as service:
        with approval_stream(service.url, {"message": "write it", "conversation_id": "a"}) as (seen, rest):
            assert not target.exists()  # nothing runs before the decision
            decided = approve(service.url, "a", "call_0", "approve")
            seen += list(rest)
        again = approve(service.url, "a", "call_0", "deny")
        stored = httpx.get(service.url + "/api/conversations/a", timeout=10).json()["messages"]
    events = parse_sse("".join(seen))
    assert decided.status_code == 204 and again.status_code == 409
    assert names(events) == ["status", "status", "tool_call", "approval_required", "status", "status", "tool_result",
                             "status", "chunk", "message", "done"]  # fmt: skip
    assert events[2][1]["server"] == "files" and events[3][1] == {**events[2][1]}
    assert events[6][1]["is_error"] is False and events[6][1]["approval"] == "approved"
    assert target.read_text() == "hello"
    assert stored[2]["approval"] == "approved" and stored[2]["server"] == "files"


@BOTH_DATABASES
@pytest.mark.parametrize("decision", ["deny", "time-out"])
def test_a_denied_or_unanswered_mcp_tool_never_runs_and_the_model_is_told_why(
    settings_for: Callable[..., server.Settings],
    upstream: FakeModelAPI,
    mcp_file: Path,
    tmp_path: Path,
    decision: str,
) -> None:
    target = tmp_path / "written.txt"
    config = mcp_config(tmp_path, {"files": stdio_server(mcp_file)})
    upstream.reset(Reply(tool_calls=[("files__write_file", {"path": str(target), "text": "x"})]), Reply(content="OK."))
    timeout = "0.5" if decision == "time-out" else "300"
    settings = settings_for(MCP_CONFIG=config, APPROVAL_TIMEOUT_SECONDS=timeout)
    with ServerThread(server.create_app(settings)) as service:
        with approval_stream(service.url, {"message": "write", "conversation_id": "d"}) as (seen, rest):
            if decision == "deny":
                assert approve(service.url, "d", "call_0", "deny").status_code == 204
            seen += list(rest)
        late = approve(service.url, "d", "call_0", "approve")
    result = next(data for name, data in parse_sse("".join(seen)) if name == "tool_result")
    expected = {"deny": ("denied", "The user denied"), "time-out": ("expired", "Nobody approved")}[decision]
    assert (
        result["is_error"] is True and result["approval"] == expected[0] and result["content"].startswith(expected[1])
    )
    assert not target.exists() and late.status_code == 409 and late.json()["error"]["code"] == "approval_decided"
    told = [m for m in upstream.requests[1]["messages"] if m["role"] == "tool"]
    assert told[0]["content"].startswith(expected[1])


@pytest.mark.parametrize("face", ["/api/chat", "/v1/chat/completions"])
def test_faces_that_cannot_ask_never_run_a_tool_that_needs_approval(
    settings_for: Callable[..., server.Settings],
    upstream: FakeModelAPI,
    mcp_file: Path,
    tmp_path: Path,
    face: str,
) -> None:
    target = tmp_path / "written.txt"
    servers = {"files": stdio_server(mcp_file, requireApproval=["write_file"])}
    calls = [("files__write_file", {"path": str(target), "text": "x"}), ("files__echo", {"text": "safe"})]
    upstream.reset(Reply(tool_calls=calls), Reply(content="OK."))
    with TestClient(server.create_app(settings_for(MCP_CONFIG=mcp_config(tmp_path, servers)))) as client:
        body = {"message": "go"} if face == "/api/chat" else {"messages": [{"role": "user", "content": "go"}]}
        assert client.post(face, json=body).status_code == 200
    told = {m["tool_call_id"]: m["content"] for m in upstream.requests[1]["messages"] if m["role"] == "tool"}
    assert not target.exists()
    assert told["call_0"].startswith("This tool needs a person's approval") and told["call_1"] == "safe"


def test_an_mcp_server_over_streamable_http_serves_its_tools_with_their_whole_schemas(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, mcp_file: Path, tmp_path: Path
) -> None:
    upstream.reset(Reply(tool_calls=[("remote__distance", {"p": {"x": 3, "y": -4}})]), Reply(content="7."))
    with http_mcp_server(mcp_file) as url:
        config = mcp_config(tmp_path, {"remote": {"url": url, "requireApproval": False}})
        with TestClient(server.create_app(settings_for(MCP_CONFIG=config))) as client:
            health = client.get("/health").json()
            reply = client.post("/api/chat", json={"message": "how far?"}).json()
    tools = {t["function"]["name"]: t["function"] for t in upstream.requests[0]["tools"]}
    assert health["mcp"] == {"remote": "ok"} and reply["tool_calls"][0]["result"] == "7"
    assert {"get_current_time", "calculate", "remote__echo", "remote__distance"} <= set(tools)
    parameters = tools["remote__distance"]["parameters"]
    assert parameters["properties"]["p"] == {"$ref": "#/$defs/Point"} and "Point" in parameters["$defs"]


def test_an_mcp_server_that_fails_at_start_up_is_left_out_and_the_service_runs(
    settings_for: Callable[..., server.Settings],
    upstream: FakeModelAPI,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    servers = {"missing": {"command": "/no/such/command"}, "refused": {"url": f"http://127.0.0.1:{free_port()}/mcp"}}
    caplog.set_level(logging.WARNING, logger="autogen_chat")
    with TestClient(server.create_app(settings_for(MCP_CONFIG=mcp_config(tmp_path, servers)))) as client:
        health = client.get("/health").json()
        reply = client.post("/api/chat", json={"message": "hi"})
    assert set(health["mcp"]) == {"missing", "refused"} and all(
        v.startswith("failed: ") for v in health["mcp"].values()
    )
    assert health["status"] == "degraded" and reply.status_code == 200
    assert [t["function"]["name"] for t in upstream.requests[0]["tools"]] == ["get_current_time", "calculate"]
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line for line in lines)


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_an_mcp_server_that_dies_or_hangs_mid_call_gives_an_error_result_and_the_next_call_reconnects(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, mcp_file: Path, tmp_path: Path, fault: str
) -> None:
    call = ("s__die", {}) if fault == "dies" else ("s__sleep", {"seconds": 30})
    servers = {"s": stdio_server(mcp_file, requireApproval=False, timeout=1)}
    upstream.reset(Reply(tool_calls=[call]), Reply(content="Hm."), Reply(tool_calls=[("s__echo", {"text": "back"})]),
                   Reply(content="Back."))  # fmt: skip
    with TestClient(server.create_app(settings_for(MCP_CONFIG=mcp_config(tmp_path, servers)))) as client:
        first = client.post("/api/chat", json={"message": "break it"}).json()
        second = client.post("/api/chat", json={"message": "again"}).json()
    assert first["status"] == "success" and first["tool_calls"][0]["is_error"] is True
    if fault == "hangs":
        assert first["tool_calls"][0]["result"] == "The tool did not answer within 1 s."
    assert second["tool_calls"][0] == {**second["tool_calls"][0], "result": "back", "is_error": False}


def test_an_mcp_server_gets_its_secrets_from_the_environment_and_never_the_servers_keys(
    settings_for: Callable[..., server.Settings],
    upstream: FakeModelAPI,
    mcp_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_KEY", SERVICE_KEY)  # in the server's own environment, as in production
    monkeypatch.setenv("MY_TOKEN", "t-123")
    servers = {"s": stdio_server(mcp_file, requireApproval=False, env={"TOKEN": "Bearer ${MY_TOKEN}"})}
    calls = [("s__env", {"name": "TOKEN"}), ("s__env", {"name": "API_KEY"}), ("s__env", {"name": "MY_TOKEN"})]
    upstream.reset(Reply(tool_calls=calls), Reply(content="Seen."))
    settings = settings_for(MCP_CONFIG=mcp_config(tmp_path, servers), MY_TOKEN="t-123")
    with TestClient(server.create_app(settings)) as client:
        results = [c["result"] for c in client.post("/api/chat", json={"message": "env?"}).json()["tool_calls"]]
    assert results == ["Bearer t-123", "<unset>", "<unset>"]


@BOTH_DATABASES
def test_a_decision_posted_to_another_instance_reaches_the_waiting_turn(
    settings_for: Callable[..., server.Settings],
    upstream: FakeModelAPI,
    mcp_file: Path,
    tmp_path: Path,
) -> None:
    # As with WORKERS=2 behind one port: the decision may land on a process the turn is not in.
    config = mcp_config(tmp_path, {"files": stdio_server(mcp_file)})
    upstream.reset(Reply(tool_calls=[("files__echo", {"text": "across"})]), Reply(content="Done."))
    env = process_env(settings_for, MCP_CONFIG=config)
    with service_processes(2, env, tmp_path) as [(_, a), (_, b)]:
        with approval_stream(a, {"message": "echo", "conversation_id": "x"}) as (seen, rest):
            decided = approve(b, "x", "call_0", "approve")
            seen += list(rest)
    result = next(data for name, data in parse_sse("".join(seen)) if name == "tool_result")
    assert decided.status_code == 204 and result["content"] == "across" and result["approval"] == "approved"


def mcp_children(pid: int) -> list[int]:
    """The processes of the fake MCP server below `pid` (the workers' children)."""
    below = {pid}
    for _ in range(3):  # the workers, then their children
        below |= {int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat") if _parent(stat) in below}
    return sorted(child for child in below if b"fake_mcp.py" in _cmdline(child))


def _cmdline(pid: int) -> bytes:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def _parent(stat: Path) -> int:
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    return -1


def alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return False


@pytest.mark.parametrize("how", ["sigterm", "workers-killed"])
def test_no_mcp_server_process_outlives_the_service(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, mcp_file: Path, tmp_path: Path, how: str
) -> None:
    # One of the servers is busy in a call, so it would not notice its stdin close for a minute.
    marker = tmp_path / "sleeping"
    servers = {"s": stdio_server(mcp_file, requireApproval=False, timeout=120)}
    env = process_env(settings_for, MCP_CONFIG=mcp_config(tmp_path, servers), WORKERS="2")
    upstream.reset(Reply(tool_calls=[("s__sleep", {"seconds": 60, "marker": str(marker)})]), Reply(content="x"))
    with service_process(env, tmp_path, "server.py") as (process, url):
        assert wait_until(lambda: len(mcp_children(process.pid)) == 2), "each worker starts its MCP server"
        children = mcp_children(process.pid)
        workers = [pid for pid in child_processes(process.pid) if pid not in children]
        with httpx.Client(timeout=30) as http, http.stream("POST", url + "/api/chat/stream", json={"message": "z"}):
            assert wait_until(marker.exists), "the tool call did not start"
            if how == "sigterm":
                os.killpg(process.pid, signal.SIGTERM)
            else:
                for worker in workers:
                    os.kill(worker, signal.SIGKILL)
            assert wait_until(lambda: not any(alive(child) for child in children), 30), "an MCP server lived on"


@pytest.mark.parametrize(
    "text, says",
    [
        ("{not json", "is not valid JSON"),
        ('{"servers": {}}', 'must be an object with "mcpServers"'),
        ('{"mcpServers": {"a": {"command": "x", "url": "http://y"}}}', 'either a "command"'),
        ('{"mcpServers": {"a": {"command": "x", "requireAproval": false}}}', "unknown keys ['requireAproval']"),
        ('{"mcpServers": {"a": {"url": "http://h/${NO_SUCH_VARIABLE}"}}}', "${NO_SUCH_VARIABLE}"),
        ('{"mcpServers": {"a": {"command": "x", "timeout": 0}}}', '"timeout"'),
        ('{"mcpServers": {"a": {"command": "x", "requireApproval": "yes"}}}', '"requireApproval"'),
    ],
    ids=["not-json", "no-mcpservers", "command-and-url", "misspelt-key", "missing-variable", "timeout", "approval"],
)
def test_a_bad_mcp_config_stops_start_up_with_one_line_naming_it(
    settings_for: Callable[..., server.Settings], tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(server.SettingsError) as error:
        settings_for(MCP_CONFIG=str(path))
    assert str(error.value).startswith(f"MCP_CONFIG={str(path)!r}") and says in str(error.value)
    assert "\n" not in str(error.value)


def test_a_disabled_mcp_server_is_not_started_and_a_set_mcp_config_must_exist(
    settings_for: Callable[..., server.Settings], tmp_path: Path
) -> None:
    config = mcp_config(tmp_path, {"off": {"command": "/no/such", "disabled": True}})
    assert settings_for(MCP_CONFIG=config).mcp_servers == ()
    with pytest.raises(server.SettingsError, match="cannot be read"):
        settings_for(MCP_CONFIG=str(tmp_path / "missing.json"))


def test_the_example_mcp_config_reads_as_documented(settings_for: Callable[..., server.Settings]) -> None:
    settings = settings_for(MCP_CONFIG=str(HERE / "mcp.example.json"), SEARCH_MCP_TOKEN="t")
    [files] = settings.mcp_servers  # the HTTP one is disabled
    assert files.name == "files" and files.needs_approval("write_file") and not files.needs_approval("read_file")
    assert files.params.args[-3:] == ["-y", "@modelcontextprotocol/server-filesystem", "/srv/shared"]


def test_a_published_mcp_server_run_with_npx_works_as_users_paste_it(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, tmp_path: Path
) -> None:
    if shutil.which("npx") is None:
        pytest.fail("This test runs @modelcontextprotocol/server-everything: apt-get install -y nodejs npm")
    servers = {"everything": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-everything@2026.8.31"],
                              "requireApproval": ["echo"], "timeout": 120}}  # fmt: skip
    upstream.reset(Reply(tool_calls=[("everything__get-sum", {"a": 2, "b": 3})]), Reply(content="5."))
    with TestClient(server.create_app(settings_for(MCP_CONFIG=mcp_config(tmp_path, servers)))) as client:
        health = client.get("/health").json()
        reply = client.post("/api/chat", json={"message": "2+3 with the tool"}).json()
    assert health["mcp"] == {"everything": "ok"}
    assert "5" in reply["tool_calls"][0]["result"] and reply["tool_calls"][0]["is_error"] is False


# ---------------------------------------------------------------------------
# OpenAI-compatible /v1 face
# ---------------------------------------------------------------------------

SYSTEM = server.DEFAULT_SYSTEM_MESSAGE
ASK = [{"role": "user", "content": "2+2?"}]


@pytest.fixture
def sdk(service: ServerThread) -> Iterator[openai.OpenAI]:
    """The official SDK pointed at the service, as an app would be: any key, no retries."""
    with openai.OpenAI(base_url=service.url + "/v1", api_key="any-key-an-app-sends", max_retries=0) as client:
        yield client


def v1_frames(text: str) -> list[Any]:
    """The frames of a /v1 stream, each a `data:` line: parsed JSON, or '[DONE]'."""
    frames = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: ") and "\n" not in block, block
            frames.append(block[6:] if block == "data: [DONE]" else json.loads(block[6:]))
    return frames


def joined(chunks: list[Any], name: str) -> str:
    return "".join(getattr(c.choices[0].delta, name, None) or "" for c in chunks if c.choices)


def stored_total(url: str) -> int:
    return httpx.get(url + "/api/conversations", timeout=10).json()["total"]


def test_v1_models_lists_the_agent_as_one_model(sdk: openai.OpenAI) -> None:
    [model] = sdk.models.list().data
    assert model.id == "autogen-agent" and model.object == "model"
    assert model.owned_by == "autogen-chat" and model.created > 0


def test_v1_model_id_comes_from_its_setting(settings_for: Callable[..., server.Settings]) -> None:
    with TestClient(server.create_app(settings_for(AGENT_MODEL_ID="my-agent"))) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["my-agent"]


def test_v1_plain_completion_answers_a_chat_completion_and_stores_nothing(
    sdk: openai.OpenAI, upstream: FakeModelAPI, service: ServerThread
) -> None:
    upstream.reset(Reply(content="Paris is the capital."))
    reply = sdk.chat.completions.create(model="any-model", messages=[{"role": "user", "content": "Capital of France?"}])
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-") and reply.model == "any-model"
    [choice] = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == "Paris is the capital."
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (11, 7, 18)
    sent = [(m["role"], m["content"]) for m in upstream.requests[0]["messages"]]
    assert sent == [("system", SYSTEM), ("user", "Capital of France?")]
    assert stored_total(service.url) == 0 and not service.app_ctx.turns


def test_v1_stream_sends_role_first_then_content_one_finish_usage_and_done(
    sdk: openai.OpenAI, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="你好 世界 from the model"))
    chunks = list(
        sdk.chat.completions.create(model="m", messages=ASK, stream=True, stream_options={"include_usage": True})
    )
    first = chunks[0].choices[0].delta
    assert (first.role, first.content) == ("assistant", "")
    assert joined(chunks, "content") == "你好 世界 from the model"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    # As OpenAI places it: once, on a last chunk with no choices; every other chunk has usage null.
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 18
    assert chunks[-2].choices[0].finish_reason == "stop" and all(c.usage is None for c in chunks[:-1])
    assert {(c.id, c.object, c.created, c.model) for c in chunks} == {
        (chunks[0].id, "chat.completion.chunk", chunks[0].created, "m")
    }
    assert all(c.choices[0].delta.tool_calls is None for c in chunks if c.choices)


def test_v1_stream_is_data_lines_only_and_ends_with_done(service: ServerThread, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(content="a b"))
    body = {"model": "m", "messages": ASK, "stream": True}
    response = httpx.post(service.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = v1_frames(response.text)
    assert frames[-1] == "[DONE]" and "[DONE]" not in frames[:-1]
    assert [f["choices"][0]["finish_reason"] for f in frames[:-1]] == [None, None, None, "stop"]
    assert all("usage" not in f for f in frames[:-1])  # only when asked for


def test_v1_tool_run_shows_its_call_and_result_in_reasoning_content_and_the_answer_in_content(
    sdk: openai.OpenAI, upstream: FakeModelAPI
) -> None:
    call, answer = Reply(tool_calls=[("calculate", {"expression": "(2 + 3) * 4 ** 2"})]), Reply(content="It is 80.")
    upstream.reset(call, answer, Reply(**call.__dict__), Reply(content="It is 80."))
    chunks = list(sdk.chat.completions.create(model="m", messages=ASK, stream=True))
    reasoning = joined(chunks, "reasoning_content")
    assert '🔧 calculate({"expression": "(2 + 3) * 4 ** 2"})' in reasoning and "🔧 calculate → 80" in reasoning
    assert joined(chunks, "content") == "It is 80."
    assert all(c.choices[0].delta.tool_calls is None for c in chunks if c.choices)
    message = sdk.chat.completions.create(model="m", messages=ASK).choices[0].message
    assert message.content == "It is 80." and message.reasoning_content == reasoning.strip()  # type: ignore[attr-defined]
    assert message.tool_calls is None
    assert upstream.requests[1]["messages"][-1] == {"role": "tool", "tool_call_id": "call_0", "content": "80"}


def test_v1_stateless_mode_answers_while_the_database_cannot_be_written(
    monkeypatch: pytest.MonkeyPatch, settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    monkeypatch.setattr(server, "SQLITE_BUSY_TIMEOUT_MS", 100)
    settings = settings_for()
    with ServerThread(server.create_app(settings)) as service, httpx.Client(base_url=service.url, timeout=10) as http:
        with sqlite_write_lock(settings.database_path):
            stored = http.post("/api/chat", json={"message": "hi"})
            answered = http.post("/v1/chat/completions", json={"messages": ASK})
    assert stored.status_code == 503 and stored.json()["error"]["code"] == "database_unavailable"
    assert answered.status_code == 200 and answered.json()["choices"][0]["message"]["content"] == "echo: 2+2?"


@pytest.mark.parametrize(
    "reply",
    [
        Reply(reasoning="Two and two make four.", content="It is 4."),
        Reply(content="<think>Two and two make four.</think> It is 4."),
    ],
    ids=["reasoning-content", "think-tags"],
)
def test_v1_a_reasoning_models_thoughts_arrive_as_reasoning_content(
    sdk: openai.OpenAI, upstream: FakeModelAPI, reply: Reply
) -> None:
    upstream.reset(reply)
    chunks = list(sdk.chat.completions.create(model="m", messages=ASK, stream=True))
    assert joined(chunks, "reasoning_content") == "Two and two make four."
    assert joined(chunks, "content") == "It is 4."


def test_v1_an_answer_the_model_cut_at_its_token_limit_finishes_with_length(
    sdk: openai.OpenAI, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="the start of", finish_reason="length"), Reply(content="cut", finish_reason="length"))
    chunks = list(sdk.chat.completions.create(model="m", messages=ASK, stream=True, max_tokens=3))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert sdk.chat.completions.create(model="m", messages=ASK, max_tokens=3).choices[0].finish_reason == "length"
    assert [r["max_tokens"] for r in upstream.requests] == [3, 3]


V1_FAULTS = [
    ("429", Reply(status=429, headers={"Retry-After": "7"}), openai.RateLimitError, "upstream_rate_limited", 429),
    ("401", Reply(status=401), openai.InternalServerError, "upstream_auth", 502),
    ("500", Reply(status=500), openai.InternalServerError, "upstream_error", 502),
]  # fmt: skip


@pytest.mark.parametrize("fault, error, code, status", [f[1:] for f in V1_FAULTS], ids=[f[0] for f in V1_FAULTS])
def test_v1_an_upstream_fault_raises_the_sdks_error_in_openais_shape(
    sdk: openai.OpenAI, upstream: FakeModelAPI, fault: Reply, error: type[Exception], code: str, status: int
) -> None:
    upstream.reset(fault, Reply(**fault.__dict__))
    with pytest.raises(error) as answered:
        sdk.chat.completions.create(model="m", messages=ASK)
    with pytest.raises(openai.APIError) as streamed:
        list(sdk.chat.completions.create(model="m", messages=ASK, stream=True))
    assert answered.value.status_code == status  # type: ignore[attr-defined]
    # An error the server has no code for says what the provider said.
    message = "The model API answered 500: scripted failure" if code == "upstream_error" else server.ERRORS[code][1]
    body = {"message": message, "type": answered.value.body["type"], "param": None, "code": code}  # type: ignore[attr-defined]
    assert answered.value.body == body and streamed.value.body == body  # type: ignore[attr-defined]
    if status == 429:
        assert answered.value.response.headers["retry-after"] == "7"  # type: ignore[attr-defined]


def test_v1_an_error_during_a_stream_is_one_error_frame_then_done(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="a b c d", fault="drop"))
    body = {"messages": ASK, "stream": True}
    frames = v1_frames(httpx.post(service.url + "/v1/chat/completions", json=body, timeout=10).text)
    message = server.ERRORS["upstream_error"][1]
    assert frames[-2] == {
        "error": {"message": message, "type": "server_error", "param": None, "code": "upstream_error"}
    }
    assert frames[-1] == "[DONE]" and all(f["choices"][0]["finish_reason"] is None for f in frames[:-2])


@BOTH_DATABASES
def test_v1_stateful_mode_runs_on_a_stored_conversation_across_two_requests(
    sdk: openai.OpenAI, upstream: FakeModelAPI, service: ServerThread
) -> None:
    upstream.reset(Reply(content="Nice to meet you, Ada."), Reply(content="You are Ada."))
    first = sdk.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "I am Ada."}], extra_headers={"X-Conversation-Id": "v1-ada"}
    )
    assert first.headers["x-conversation-id"] == "v1-ada"
    history = [{"role": "user", "content": "the app's copy"}, {"role": "assistant", "content": "is not used"}]
    messages = [*history, {"role": "user", "content": "Who am I?"}]
    second = sdk.chat.completions.create(
        model="m", messages=messages, extra_body={"conversation_id": "v1-ada"}, stream=True
    )
    assert joined(list(second), "content") == "You are Ada."
    sent = [(m["role"], m["content"]) for m in upstream.requests[1]["messages"][1:]]
    assert sent == [("user", "I am Ada."), ("assistant", "Nice to meet you, Ada."), ("user", "Who am I?")]
    [listed] = httpx.get(service.url + "/api/conversations", timeout=10).json()["conversations"]
    assert listed["conversation_id"] == "v1-ada" and listed["message_count"] == 4


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_v1_stateful_mode_with_deepseek_thinking_completes_tool_turns_and_the_turns_after_them(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, stream: bool
) -> None:
    upstream.reset(*tool_turn("6*7", "42."), Reply(content="Yes."), *tool_turn("7*8", "56."), strict="deepseek")
    answers = []
    with ServerThread(server.create_app(settings_for(THINKING="enabled"))) as service:
        with openai.OpenAI(base_url=service.url + "/v1", api_key="k", max_retries=0) as sdk:
            for text in ("What is 6*7?", "Sure?", "And 7*8?"):
                messages = [{"role": "user", "content": text}]
                reply = sdk.chat.completions.create(
                    model="m", messages=messages, extra_body={"conversation_id": "v1-think"}, stream=stream
                )
                answers.append(joined(list(reply), "content") if stream else reply.choices[0].message.content)
    assert answers == ["42.", "Yes.", "56."]
    sent = [m.get("reasoning_content") for m in upstream.requests[-1]["messages"] if m["role"] == "assistant"]
    assert sent == [DEFAULT_REASONING, DEFAULT_REASONING, None, DEFAULT_REASONING]


def test_v1_stateful_mode_is_busy_while_a_turn_of_that_conversation_runs(
    sdk: openai.OpenAI, upstream: FakeModelAPI, service: ServerThread
) -> None:
    upstream.reset(Reply(content="a b c d e", fault="hang"))
    with held_stream(service.url, {"message": "x", "conversation_id": "busy"}, upstream):
        with pytest.raises(openai.ConflictError) as busy:
            sdk.chat.completions.create(model="m", messages=ASK, extra_headers={"X-Conversation-Id": "busy"})
    assert busy.value.body["code"] == "conversation_busy"  # type: ignore[index]


def test_v1_stream_sends_empty_deltas_while_the_model_is_quiet(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="a b c d", fault="hang"))  # hangs after "a b"
    ping = '"delta":{"content":""},"finish_reason":null}]}\n\n'
    with ServerThread(server.create_app(settings_for(PING_INTERVAL="0.05"))) as service:
        body = {"messages": ASK, "stream": True}
        with httpx.Client(timeout=10) as http:
            with http.stream("POST", service.url + "/v1/chat/completions", json=body) as response:
                seen = ""
                for text in response.iter_text():
                    seen += text
                    if ping in seen.partition('"content":" b"')[2]:
                        break
    deltas = [f["choices"][0]["delta"] for f in v1_frames(seen[: seen.rindex("\n\n") + 2])]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d for d in deltas[1:] if d != {"content": ""}] == [{"content": "a"}, {"content": " b"}]
    assert deltas[-1] == {"content": ""}


def test_v1_client_disconnect_cancels_the_turn_and_closes_the_model_request(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="a b c d e", fault="hang"))
    with httpx.Client(timeout=10) as http:
        with http.stream(
            "POST", service.url + "/v1/chat/completions", json={"messages": ASK, "stream": True}
        ) as response:
            for text in response.iter_text():
                if '"content":"a"' in text:
                    break
    assert upstream.disconnected.wait(5), "the model request was not closed"
    assert wait_until(lambda: not service.app_ctx.turns)


def test_v1_sampling_fields_reach_every_model_call_and_other_fields_do_not(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(tool_calls=[("calculate", {"expression": "1+1"})]), Reply(content="2"))
    sampling = {"temperature": 0.2, "top_p": 0.9, "presence_penalty": 0.1, "frequency_penalty": -0.5, "seed": 7}
    ignored = {
        "n": 1,
        "logit_bias": {"50256": -100},
        "response_format": {"type": "text"},
        "user": "u-1",
        "logprobs": False,
    }
    body = {"messages": ASK, **sampling, **ignored, "max_completion_tokens": 300, "stop": "END"}
    assert httpx.post(service.url + "/v1/chat/completions", json=body, timeout=10).status_code == 200
    for request in upstream.requests:
        assert request | {**sampling, "max_tokens": 300, "stop": ["END"]} == request
        assert not set(ignored) & set(request) and "max_completion_tokens" not in request


def test_v1_regenerating_sends_the_same_history_to_the_model_again(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, *ASK]}
    for _ in range(2):
        assert httpx.post(service.url + "/v1/chat/completions", json=body, timeout=10).status_code == 200
    assert upstream.requests[0]["messages"] == upstream.requests[1]["messages"]
    assert len(upstream.requests[0]["messages"]) == 4


def test_v1_client_system_messages_stay_when_the_history_window_cuts(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    earlier = [{"role": role, "content": f"{role} {i}"} for i in range(3) for role in ("user", "assistant")]
    body = {"messages": [{"role": "system", "content": "Be brief."}, *earlier, *ASK]}
    with TestClient(server.create_app(settings_for(MAX_HISTORY_MESSAGES="3"))) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    sent = [(m["role"], m["content"]) for m in upstream.requests[0]["messages"]]
    assert sent == [
        ("system", SYSTEM + "\nBe brief."),
        ("user", "user 2"),
        ("assistant", "assistant 2"),
        ("user", "2+2?"),
    ]


def test_v1_with_deepseek_thinking_the_stateless_history_carries_no_invented_reasoning(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    upstream.reset(*tool_turn("6*7", "42."), *tool_turn("7*8", "56."), strict="deepseek")
    with ServerThread(server.create_app(settings_for(THINKING="enabled"))) as service:
        with openai.OpenAI(base_url=service.url + "/v1", api_key="any", max_retries=0) as sdk:
            first = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "What is 6*7?"}])
            earlier = first.choices[0].message.model_dump(
                exclude_none=True
            )  # with the reasoning_content an app may keep
            messages = [{"role": "user", "content": "What is 6*7?"}, earlier, {"role": "user", "content": "And 7*8?"}]
            second = sdk.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
    assert second.choices[0].message.content == "56."
    sent = [m for m in upstream.requests[-1]["messages"] if m["role"] == "assistant"]
    assert sent[0] == {"role": "assistant", "content": "42."}  # the app's copy, without reasoning
    assert [m.get("reasoning_content") for m in sent[1:]] == [DEFAULT_REASONING]  # this turn's tool call


EARLIER = [{"role": "user", "content": "1+1?"}]
CLEAN = [("system", SYSTEM), ("user", "1+1?"), ("assistant", "It is 2."), ("user", "2+2?")]
TOOL_LINES = '🔧 calculate({"expression": "1+1"})\n\n🔧 calculate → 2'
APP_BODIES = [
    ("open-webui", {
        "model": "autogen-agent", "stream": True, "stream_options": {"include_usage": True},
        "user": {"name": "Ada", "id": "u-1", "email": "ada@example.com", "role": "user"}, "chat_id": "c-1", "id": "m-1",
        "messages": [*EARLIER, {"role": "assistant", "content": '<details type="reasoning" done="true" duration="1">\n'
                     f"<summary>Thought for 1 seconds</summary>\n> {TOOL_LINES}\n</details>\nIt is 2."}, *ASK],
    }, CLEAN),
    ("lobechat", {
        "model": "autogen-agent", "stream": True, "temperature": 0.6, "top_p": 1, "frequency_penalty": 0,
        "presence_penalty": 0,
        "messages": [{"role": "system", "content": "Answer briefly."},
                     {"role": "user", "content": [{"type": "text", "text": "1+1?"}]},
                     {"role": "assistant", "content": "It is 2."},
                     {"role": "user", "content": [{"type": "text", "text": "2+2?"},
                                                  {"type": "text", "text": "Thanks."}]}],
    }, [("system", SYSTEM + "\nAnswer briefly."), *CLEAN[1:3], ("user", "2+2?\nThanks.")]),
    ("nextchat", {
        "model": "autogen-agent", "stream": True, "temperature": 0.5, "presence_penalty": 0, "frequency_penalty": 0,
        "top_p": 1,
        "messages": [{"role": "developer", "content": "Formatting re-enabled"}, *EARLIER,
                     {"role": "assistant", "content": "<!--THINKING-->\n> "
                      + TOOL_LINES.replace("\n\n", "\n\n> ") + "\n<!--/THINKING-->\n\nIt is 2."}, *ASK],
    }, [("system", SYSTEM + "\nFormatting re-enabled"), *CLEAN[1:]]),
    ("cherry-studio", {
        "model": "autogen-agent", "stream": True, "stream_options": {"include_usage": True}, "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "web_search", "parameters": {"type": "object"}}}],
        "messages": [*EARLIER, {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "t1", "type": "function", "function": {"name": "web_search", "arguments": "{}"}}]},
                     {"role": "tool", "tool_call_id": "t1", "content": "search results"},
                     {"role": "assistant", "content": "It is 2."}, *ASK],
    }, [*CLEAN[:2], ("assistant", None), ("tool", "search results"), *CLEAN[2:]]),  # its own tool's call and result
    ("chatbox", {
        "model": "autogen-agent", "stream": False, "max_tokens": 2048, "temperature": 0.7,
        "messages": [{"role": "system", "content": [{"type": "text", "text": "Be kind."}]}, *EARLIER,
                     {"role": "assistant", "content": "<think>mulling</think>It is 2.", "reasoning_content": "mulling"},
                     {"role": "user", "content": [{"type": "text", "text": "2+2?"}]}],
    }, [("system", SYSTEM + "\nBe kind."), *CLEAN[1:]]),
    ("tool-lines-in-content", {
        "messages": [*EARLIER, {"role": "assistant", "content": f"{TOOL_LINES}\n\nIt is 2."}, *ASK],
        "user": "u-1", "n": 1,
    }, CLEAN),
]  # fmt: skip


@pytest.mark.parametrize("body, sent", [a[1:] for a in APP_BODIES], ids=[a[0] for a in APP_BODIES])
def test_v1_app_shaped_requests_are_accepted_and_the_model_gets_clean_history(
    service: ServerThread, upstream: FakeModelAPI, body: dict[str, Any], sent: list[tuple[str, str]]
) -> None:
    response = httpx.post(service.url + "/v1/chat/completions", json=body, timeout=10)
    assert response.status_code == 200
    request = upstream.requests[0]
    assert [(m["role"], m["content"]) for m in request["messages"]] == sent
    client_tools = [t["function"]["name"] for t in body.get("tools", [])]  # offered beside the agent's own
    assert [t["function"]["name"] for t in request["tools"]] == ["get_current_time", "calculate", *client_tools]
    assert "tool_calls" not in response.text
    assert stored_total(service.url) == 0


PIXEL = (  # a 1x1 PNG
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def image_message(url: str) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}],
    }


def test_v1_a_user_image_reaches_a_vision_model_with_its_text(service: ServerThread, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(content="A pixel."), Reply(content="Still a pixel."))
    body = {"messages": [image_message(PIXEL), {"role": "assistant", "content": "A pixel."}, image_message(PIXEL)]}
    for stream in (False, True):
        assert (
            httpx.post(service.url + "/v1/chat/completions", json={**body, "stream": stream}, timeout=10).status_code
            == 200
        )
    for request in upstream.requests:
        images = [m["content"] for m in request["messages"] if m["role"] == "user"]
        assert len(images) == 2
        for content in images:
            assert [part["type"] for part in content] == ["text", "image_url"] and content[0]["text"] == "What is this?"
            assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")


class CountingText(str):
    """A text that counts the searches made in it."""

    searches = 0

    def find(self, *args: Any) -> int:  # type: ignore[override]
        CountingText.searches += 1
        return super().find(*args)


@pytest.mark.parametrize(
    "text, kept",
    [
        ("<think>" * 37_000 + "kept", "<think>" * 37_000 + "kept"),
        ("<think>a</think>" * 10_000 + "kept", "kept"),
        (
            '<details type="reasoning">' * 20_000 + "<!--THINKING-->x<!--/THINKING-->kept",
            '<details type="reasoning">' * 20_000 + "kept",
        ),
    ],
    ids=["opened-never-closed", "many-closed", "mixed"],
)
def test_folded_reasoning_is_stripped_in_a_number_of_searches_linear_in_the_folds(text: str, kept: str) -> None:
    # A regex such as <think>.*?</think> takes quadratic time on the first text: 35 s on the loop.
    CountingText.searches = 0
    assert server.without_folded_reasoning(CountingText(text)) == kept
    assert CountingText.searches <= 2 * text.count("</") + 8


def test_v1_an_assistant_message_of_unclosed_think_tags_is_answered_with_its_text_kept(
    sdk: openai.OpenAI, upstream: FakeModelAPI
) -> None:
    earlier = "<think>" * 37_000  # 259 kB: froze the worker for 35 s when stripped by a regex
    sdk.chat.completions.create(model="m", messages=[*ASK, {"role": "assistant", "content": earlier}, *ASK])
    assert [m["content"] for m in upstream.requests[0]["messages"] if m["role"] == "assistant"] == [earlier]


def open_webui_request(history_bytes: int) -> dict[str, Any]:
    """As Open WebUI sends a chat: its 36 built-in tool definitions and the whole history."""
    tools = [{"type": "function", "function": {"name": f"tool_{i}", "description": "d" * 500,
              "parameters": {"type": "object", "properties": {"q": {}}}}} for i in range(36)]  # fmt: skip
    turns = []
    while sum(len(m["content"]) for m in turns) < history_bytes:
        turns += [{"role": "user", "content": "question " * 200}, {"role": "assistant", "content": "answer " * 400}]
    return {"model": "autogen-agent", "messages": [*turns, *ASK], "tools": tools, "stream": True}


def test_v1_a_long_chat_from_an_app_with_its_tool_definitions_is_accepted(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    body = open_webui_request(1_000_000)
    assert len(json.dumps(body)) > 1_000_000
    response = httpx.post(service.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200 and v1_frames(response.text)[-1] == "[DONE]"
    sent = upstream.requests[0]["messages"]
    assert len(sent) <= 1 + 40 and sent[-1]["content"] == "2+2?"  # the server's system message and the window


@pytest.mark.parametrize(
    "response_format, env, status",
    [
        ({"type": "json_object"}, {}, 200),
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}, {}, 400),
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
         {"MODEL_STRUCTURED_OUTPUT": "true"}, 200),
        ({"type": "json_object"}, {"MODEL_NAME": "qwen2.5"}, 400),
        ({"type": "text"}, {"MODEL_NAME": "qwen2.5"}, 200),
        ({"type": "yaml"}, {}, 400),
    ],
    ids=["json-object", "json-schema-unsupported", "json-schema", "json-object-unsupported", "text", "unknown"],
)  # fmt: skip
def test_v1_response_format_reaches_the_model_or_is_refused_naming_the_capability(
    settings_for: Callable[..., server.Settings],
    upstream: FakeModelAPI,
    response_format: dict[str, Any],
    env: dict[str, str],
    status: int,
) -> None:
    with TestClient(server.create_app(settings_for(**env))) as client:
        response = client.post("/v1/chat/completions", json={"messages": ASK, "response_format": response_format})
    assert response.status_code == status
    if status == 400:
        assert response.json()["error"]["param"] == "response_format" and upstream.requests == []
    elif response_format["type"] == "text":
        assert "response_format" not in upstream.requests[0]
    else:
        assert all(request["response_format"] == response_format for request in upstream.requests)


def test_v1_a_refused_request_is_logged_with_the_status_it_was_sent(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="autogen_chat")
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    assert [r.getMessage() for r in caplog.records] == ["POST /v1/chat/completions -> 400 validation_error"]


def test_autogens_own_openai_client_reads_a_v1_stream_with_its_finish_reason_and_usage(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    from autogen_core.models import UserMessage
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    async def ask() -> list[Any]:
        info = {"vision": False, "function_calling": True, "json_output": False, "family": "unknown",
                "structured_output": False}  # fmt: skip
        client = OpenAIChatCompletionClient(model="autogen-agent", base_url=service.url + "/v1", api_key="any",
                                            model_info=info, max_retries=0,
                                            stream_options={"include_usage": True})  # fmt: skip
        try:
            return [item async for item in client.create_stream([UserMessage(content="2+2?", source="user")])]
        finally:
            await client.close()

    upstream.reset(Reply(content="Four."))
    *chunks, result = asyncio.run(ask())
    assert "".join(chunks) == "Four." and result.content == "Four."
    assert result.finish_reason == "stop"  # 'unknown' when usage came on the finish chunk too
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (11, 7)


def test_autogens_own_assistant_agent_runs_its_tool_through_v1_beside_the_agents_tools(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    from autogen_agentchat.agents import AssistantAgent
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    ran: list[str] = []

    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return "sunny, 21 °C"

    async def ask() -> str:
        info = {"vision": False, "function_calling": True, "json_output": False, "family": "unknown",
                "structured_output": False}  # fmt: skip
        client = OpenAIChatCompletionClient(model="autogen-agent", base_url=service.url + "/v1", api_key="any",
                                            model_info=info, max_retries=0)  # fmt: skip
        agent = AssistantAgent("app", model_client=client, tools=[get_weather], reflect_on_tool_use=True)
        try:
            result = await agent.run(task="Weather in Paris?")
        finally:
            await client.close()
        return str(result.messages[-1].content)

    upstream.reset(Reply(tool_calls=[("get_weather", {"city": "Paris"})]), Reply(content="Sunny in Paris."))
    assert asyncio.run(ask()) == "Sunny in Paris." and ran == ["Paris"]
    names = [t["function"]["name"] for t in upstream.requests[0]["tools"]]
    assert names == ["get_current_time", "calculate", "get_weather"]
    last = upstream.requests[1]["messages"][-1]
    assert (last["role"], last["content"]) == ("tool", "sunny, 21 °C")


CLIENT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_news", "description": "Today's news.",
                                      "parameters": {"type": "object", "properties": {}}}},
]  # fmt: skip


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "stream"])
def test_v1_a_client_tool_call_goes_back_to_the_client_and_its_result_brings_the_answer(
    sdk: openai.OpenAI, upstream: FakeModelAPI, streamed: bool
) -> None:
    upstream.reset(Reply(tool_calls=[("get_weather", {"city": "Paris"})], call_ids=("w1",)), Reply(content="Sunny."))
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    if streamed:
        chunks = list(sdk.chat.completions.create(model="m", messages=asked, tools=CLIENT_TOOLS, stream=True))  # type: ignore[arg-type]
        deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert (deltas[0].id, deltas[0].type, deltas[0].function.name, deltas[0].function.arguments) == (
            "w1", "function", "get_weather", "")  # fmt: skip
        arguments = "".join(d.function.arguments or "" for d in deltas)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        call = {"id": "w1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    else:
        answer = sdk.chat.completions.create(model="m", messages=asked, tools=CLIENT_TOOLS)  # type: ignore[arg-type]
        finish, message = [answer.choices[0].finish_reason], answer.choices[0].message
        assert message.content is None
        call = message.tool_calls[0].model_dump()  # type: ignore[index]
    assert finish == ["tool_calls"] and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    result = [*asked, {"role": "assistant", "content": None, "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "w1", "content": "sunny, 21 °C"}]  # fmt: skip
    final = sdk.chat.completions.create(model="m", messages=result, tools=CLIENT_TOOLS)  # type: ignore[arg-type]
    assert final.choices[0].message.content == "Sunny." and final.choices[0].finish_reason == "stop"
    sent = upstream.requests[1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool"] and sent[-1][
        "content"
    ] == "sunny, 21 °C"
    names = [t["function"]["name"] for t in upstream.requests[0]["tools"]]
    assert names == ["get_current_time", "calculate", "get_weather", "get_news"]


def test_v1_the_agents_tools_run_and_the_clients_come_back_from_one_reply_even_two_of_them(
    sdk: openai.OpenAI, upstream: FakeModelAPI
) -> None:
    calls = [("calculate", {"expression": "6*7"}), ("get_weather", {"city": "Rome"}), ("get_news", {})]
    upstream.reset(Reply(tool_calls=calls, call_ids=("a", "w", "n")), Reply(content="Done."))
    answer = sdk.chat.completions.create(model="m", messages=ASK, tools=CLIENT_TOOLS)  # type: ignore[arg-type]
    message = answer.choices[0].message
    assert [c.id for c in message.tool_calls or []] == ["w", "n"]
    assert "🔧 calculate → 42" in message.reasoning_content  # type: ignore[attr-defined]
    assert len(upstream.requests) == 1  # the turn ended with the client's calls: no second model call
    follow = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": "w", "content": "rain"},
        {"role": "tool", "tool_call_id": "n", "content": "none"},
    ]
    again = sdk.chat.completions.create(model="m", messages=follow, tools=CLIENT_TOOLS)  # type: ignore[arg-type]
    assert again.choices[0].message.content == "Done."
    sent = upstream.requests[1]["messages"]
    assert [m["tool_call_id"] for m in sent if m["role"] == "tool"] == ["w", "n"]


def test_v1_client_tools_go_round_after_round(sdk: openai.OpenAI, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(tool_calls=[("get_news", {})], call_ids=("n1",)),
                   Reply(tool_calls=[("get_weather", {"city": "Oslo"})], call_ids=("w1",)),
                   Reply(content="Cold news."))  # fmt: skip
    messages: list[Any] = [{"role": "user", "content": "News and weather?"}]
    for _ in range(3):
        answer = sdk.chat.completions.create(model="m", messages=messages, tools=CLIENT_TOOLS)  # type: ignore[arg-type]
        message = answer.choices[0].message
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls or []:
            messages.append({"role": "tool", "tool_call_id": call.id, "content": f"{call.function.name} done"})
    assert messages[-1]["content"] == "Cold news." and len(upstream.requests) == 3
    assert [m["role"] for m in upstream.requests[2]["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
    ]


def test_v1_tool_choice_and_parallel_tool_calls_reach_the_models_first_call(
    sdk: openai.OpenAI, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(tool_calls=[("calculate", {"expression": "1+1"})]), Reply(content="2."))
    choice = {"type": "function", "function": {"name": "calculate"}}
    sdk.chat.completions.create(model="m", messages=ASK, tools=CLIENT_TOOLS, tool_choice=choice,  # type: ignore[arg-type]
                                parallel_tool_calls=False)  # fmt: skip
    first, second = upstream.requests
    assert first["tool_choice"] == choice and first["parallel_tool_calls"] is False
    assert second["tool_choice"] == "auto"  # only the first: else the model would call it for ever


@pytest.mark.parametrize(
    "extra, param",
    [({"tools": [{"type": "function", "function": {"name": "calculate"}}]}, "tools[0]"),
     ({"tools": CLIENT_TOOLS, "conversation_id": "stored"}, "tools"),
     ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
     ({"tools": CLIENT_TOOLS, "tool_choice": "sometimes"}, "tool_choice")],
    ids=["named-as-the-agents-tool", "with-a-stored-conversation", "not-a-function", "bad-tool-choice"],
)  # fmt: skip
def test_v1_client_tools_that_cannot_be_offered_are_refused_naming_the_field(
    client: TestClient, upstream: FakeModelAPI, extra: dict[str, Any], param: str
) -> None:
    response = client.post("/v1/chat/completions", json={"messages": ASK, **extra})
    assert response.status_code == 400 and response.json()["error"]["param"] == param and upstream.requests == []


def test_v1_with_deepseek_thinking_a_client_tools_round_trip_passes_the_reasoning_back(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    # The client sends its tool call back without reasoning_content: DeepSeek refuses the next
    # request unless the server, which kept it, puts it back.
    upstream.reset(Reply(tool_calls=[("get_weather", {"city": "Paris"})]), Reply(content="Sunny."), strict="deepseek")
    with ServerThread(server.create_app(settings_for(THINKING="enabled"))) as service:
        with openai.OpenAI(base_url=service.url + "/v1", api_key="any", max_retries=0) as sdk:
            asked = [{"role": "user", "content": "Weather?"}]
            first = sdk.chat.completions.create(model="m", messages=asked, tools=CLIENT_TOOLS)  # type: ignore[arg-type]
            call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
            follow = [*asked, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                      {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]  # fmt: skip
            second = sdk.chat.completions.create(model="m", messages=follow, tools=CLIENT_TOOLS)  # type: ignore[arg-type]
    assert second.choices[0].message.content == "Sunny."
    sent = [m for m in upstream.requests[-1]["messages"] if m["role"] == "assistant"]
    assert sent[0]["reasoning_content"] == DEFAULT_REASONING


def test_v1_an_image_for_a_model_without_vision_is_refused_naming_the_setting(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    with TestClient(server.create_app(settings_for(MODEL_VISION="false"))) as client:
        response = client.post("/v1/chat/completions", json={"messages": [image_message(PIXEL)]})
    assert response.status_code == 400 and "MODEL_VISION" in response.json()["error"]["message"]
    assert upstream.requests == []


def png(width: int, height: int, rows: bytes) -> str:
    """A 1-bit greyscale PNG as a data: URI."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(body).decode()


def test_v1_a_decompression_bomb_is_refused_before_it_is_decoded(client: TestClient, upstream: FakeModelAPI) -> None:
    bomb = png(10_000, 10_000, bytes(10_000 * 1_251))  # 100M pixels in about 12 KB: 300 MB once decoded to RGB
    response = client.post("/v1/chat/completions", json={"messages": [image_message(bomb)]})
    assert response.status_code == 400 and "cannot be read" in response.json()["error"]["message"]
    assert upstream.requests == []


V1_BAD_REQUESTS = [
    ("body-not-json", {"content": b"{nope"}, 400, "invalid_json", None),
    ("json-not-object", {"json": ["hi"]}, 400, INVALID, None),
    ("no-messages", {"json": {"model": "m"}}, 400, INVALID, "messages"),
    ("messages-empty", {"json": {"messages": []}}, 400, INVALID, "messages"),
    ("no-user-message", {"json": {"messages": [{"role": "system", "content": "hi"}]}}, 400, INVALID, "messages"),
    ("bad-role", {"json": {"messages": [{"role": "wizard", "content": "hi"}, *ASK]}}, 400, INVALID, "messages[0].role"),
    ("message-not-object", {"json": {"messages": ["hi"]}}, 400, INVALID, "messages[0]"),
    ("content-not-text", {"json": {"messages": [{"role": "user", "content": 5}]}}, 400, INVALID, "messages[0].content"),
    ("image-not-readable", {"json": {"messages": [image_message("data:image/png;base64,AA==")]}},
     400, INVALID, "messages[0].content"),
    ("image-by-url", {"json": {"messages": [image_message("https://example.com/a.png")]}},
     400, INVALID, "messages[0].content"),
    ("image-url-not-text", {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": 5}}]}]}}, 400, INVALID, "messages[0].content"),
    ("part-type-an-object", {"json": {"messages": [{"role": "user", "content": [{"type": {}, "text": "hi"}]}]}}, 400,
     INVALID, "messages[0].content"),
    ("image-in-assistant-message", {"json": {"messages": [
        {**image_message(PIXEL), "role": "assistant"}, *ASK]}}, 400, INVALID, "messages[0].content"),
    ("image-with-conversation-id", {"json": {"messages": [image_message(PIXEL)], "conversation_id": "c"}},
     400, INVALID, "messages"),
    ("audio-part", {"json": {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}},
     400, INVALID, "messages[0].content"),
    ("last-user-message-empty", {"json": {"messages": [{"role": "user", "content": " "}]}}, 400, INVALID, "messages"),
    ("stream-not-bool", {"json": {"messages": ASK, "stream": "yes"}}, 400, INVALID, "stream"),
    ("include-usage-not-bool", {"json": {"messages": ASK, "stream_options": {"include_usage": 1}}},
     400, INVALID, "stream_options.include_usage"),
    ("model-not-string", {"json": {"messages": ASK, "model": 5}}, 400, INVALID, "model"),
    ("model-too-long", {"json": {"messages": ASK, "model": "m" * 257}}, 400, INVALID, "model"),
    ("model-lone-surrogate", {"content": b'{"messages": [{"role": "user", "content": "hi"}], "model": "\\ud800"}'},
     400, INVALID, "model"),
    ("stop-lone-surrogate", {"content": b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}'},
     400, INVALID, "stop[0]"),
    ("tool-content-not-text", {"json": {"messages": [{"role": "tool", "content": 5}, *ASK]}},
     400, INVALID, "messages[0].content"),
    ("temperature-out-of-range", {"json": {"messages": ASK, "temperature": 5}}, 400, INVALID, "temperature"),
    ("max-tokens-not-whole", {"json": {"messages": ASK, "max_tokens": 1.5}}, 400, INVALID, "max_tokens"),
    ("stop-not-strings", {"json": {"messages": ASK, "stop": [1]}}, 400, INVALID, "stop"),
    ("bad-conversation-id", {"json": {"messages": ASK}, "headers": {"X-Conversation-Id": "../x"}},
     400, INVALID, "X-Conversation-Id"),
    ("message-too-long", {"json": {"messages": [{"role": "user", "content": "x" * 32001}]}},
     400, INVALID, "messages[0].content"),
    ("stream-options-not-object", {"json": {"messages": ASK, "stream_options": False}}, 400, INVALID, "stream_options"),
    ("tool-choice-named-by-an-object-without-tools",
     {"json": {"messages": ASK, "tool_choice": {"type": "function", "function": {"name": {}}}}},
     400, INVALID, "tool_choice"),
    ("tool-choice-function-a-list", {"json": {"messages": ASK, "tool_choice": {"type": "function", "function": [1]}}},
     400, INVALID, "tool_choice"),
    ("max-tokens-bad-beside-max-completion-tokens",
     {"json": {"messages": ASK, "max_completion_tokens": 5, "max_tokens": "x"}}, 400, INVALID, "max_tokens"),
    ("empty-conversation-header", {"json": {"messages": ASK}, "headers": {"X-Conversation-Id": ""}},
     400, INVALID, "X-Conversation-Id"),
    ("bad-body-conversation-id-under-a-header",
     {"json": {"messages": ASK, "conversation_id": ""}, "headers": {"X-Conversation-Id": "ok"}},
     400, INVALID, "conversation_id"),
    ("lone-surrogate", {"content": b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}'},
     400, INVALID, "messages[0].content"),
    ("lone-surrogate-in-a-part", {"content": b'{"messages": [{"role": "user", "content": [{"type": "text", '
                                             b'"text": "\\udfff"}]}]}'}, 400, INVALID, "messages[0].content[0].text"),
    ("body-too-large", {"content": b"x" * (8 * 2**20 + 1)}, 413, "payload_too_large", None),
]  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, status, code, param", [b[1:] for b in V1_BAD_REQUESTS], ids=[b[0] for b in V1_BAD_REQUESTS]
)
def test_v1_bad_input_gets_openais_error_shape_naming_the_field_and_changes_nothing(
    client: TestClient, upstream: FakeModelAPI, kwargs: dict[str, Any], status: int, code: str, param: str | None
) -> None:
    response = client.post("/v1/chat/completions", **kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert response.json() == {
        "error": {"message": error["message"], "type": "invalid_request_error", "param": param, "code": code}
    }
    assert error["message"] and upstream.requests == []
    assert client.get("/api/conversations").json()["total"] == 0


@pytest.mark.parametrize(
    "method, path, status, code",
    [("GET", "/v1/chat/completions", 405, "method_not_allowed"), ("GET", "/v1/nothing", 404, "not_found")],
    ids=["wrong-method", "unknown-path"],
)
def test_v1_routing_errors_come_in_openais_shape(
    client: TestClient, method: str, path: str, status: int, code: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == status and response.json()["error"]["code"] == code


def test_server_key_guards_v1_and_the_sdk_raises_its_authentication_error(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    with ServerThread(server.create_app(settings_for(SERVER_API_KEY=SERVER_KEY))) as service:
        for key in ("wrong", SERVICE_KEY):
            with openai.OpenAI(base_url=service.url + "/v1", api_key=key, max_retries=0) as wrong:
                with pytest.raises(openai.AuthenticationError) as refused:
                    wrong.chat.completions.create(model="m", messages=ASK)
                message = server.ERRORS["unauthorized"][1]
                error = {"message": message, "type": "authentication_error", "param": None, "code": "unauthorized"}
                assert refused.value.body == error
                with pytest.raises(openai.AuthenticationError):
                    wrong.models.list()
        with openai.OpenAI(base_url=service.url + "/v1", api_key=SERVER_KEY, max_retries=0) as right:
            assert right.chat.completions.create(model="m", messages=ASK).choices[0].message.content == "echo: 2+2?"
            assert right.models.list().data[0].id == "autogen-agent"
    assert len(upstream.requests) == 1


def test_cors_preflight_of_a_browser_app_using_the_openai_sdk_passes(
    settings_for: Callable[..., server.Settings],
) -> None:
    requested = (
        "authorization,content-type,x-conversation-id,x-stainless-arch,x-stainless-lang,x-stainless-os,"
        "x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version,x-stainless-timeout"
    )
    headers = {
        "Origin": "https://chat.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": requested,
    }
    settings = settings_for(CORS_ORIGINS="https://chat.example", SERVER_API_KEY=SERVER_KEY)
    with TestClient(server.create_app(settings)) as client:
        for path in ("/v1/chat/completions", "/v1/models"):
            response = client.options(path, headers=headers)
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == "https://chat.example"
            allowed = response.headers["access-control-allow-headers"].lower()
            assert set(requested.split(",")) <= {name.strip() for name in allowed.split(",")}
        exposed = client.get("/health", headers={"Origin": "https://chat.example"}).headers
    assert "x-conversation-id" in exposed["access-control-expose-headers"].lower()


# ---------------------------------------------------------------------------
# AG-UI
# ---------------------------------------------------------------------------

AGUI_EVENT = pydantic.TypeAdapter(agui.Event)


def agui_message(role: str, content: Any = None, **extra: Any) -> dict[str, Any]:
    return {"id": uuid.uuid4().hex, "role": role, **({"content": content} if content is not None else {}), **extra}


def agui_input(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"threadId": "thread-1", "runId": "run-1", "messages": list(messages), **extra}


def agui_run(url: str, body: dict[str, Any], **kwargs: Any) -> tuple[httpx.Response, list[Any]]:
    """A run, its events parsed by ag-ui-protocol's own models."""
    response = httpx.post(url + "/api/ag-ui", json=body, timeout=30, **kwargs)
    lines = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    return response, [AGUI_EVENT.validate_json(line) for line in lines] if response.status_code == 200 else []


def kinds(events: list[Any]) -> list[str]:
    return [event.type.value for event in events]


def test_ag_ui_streams_thinking_and_text_as_ag_ui_events_in_their_order(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(reasoning="let me think", content="Hello there"))
    response, events = agui_run(service.url, agui_input(agui_message("user", "hi")))
    assert response.headers["content-type"].startswith("text/event-stream")
    assert kinds(events) == [
        "RUN_STARTED", "REASONING_START", "REASONING_MESSAGE_START", "REASONING_MESSAGE_CONTENT",
        "REASONING_MESSAGE_CONTENT", "REASONING_MESSAGE_CONTENT", "REASONING_MESSAGE_END", "REASONING_END",
        "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END", "RUN_FINISHED",
    ]  # fmt: skip
    assert (events[0].thread_id, events[0].run_id, events[0].protocol_version) == ("thread-1", "run-1", "1.0")
    assert "".join(e.delta for e in events if e.type.value == "TEXT_MESSAGE_CONTENT") == "Hello there"
    assert "".join(e.delta for e in events if e.type.value == "REASONING_MESSAGE_CONTENT") == "let me think"
    finished = events[-1]
    assert finished.outcome.type == "success" and finished.usage[0].input_tokens == 11
    assert finished.usage[0].output_tokens == 7 and finished.usage[0].model == "deepseek-flash"
    assert stored_total(service.url) == 0  # stateless: nothing is stored


def test_ag_ui_runs_the_agents_tools_and_answers_in_a_new_assistant_message(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(
        Reply(content="Let me see.", tool_calls=[("calculate", {"expression": "6*7"})]), Reply(content="42.")
    )
    _, events = agui_run(service.url, {"threadId": "t", "messages": [agui_message("user", "6*7?")]})
    types = kinds(events)
    assert types[types.index("TEXT_MESSAGE_END") + 1 : types.index("TOOL_CALL_RESULT") + 1] == [
        "TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT"]  # fmt: skip
    start = next(e for e in events if e.type.value == "TOOL_CALL_START")
    texts = [e.message_id for e in events if e.type.value == "TEXT_MESSAGE_START"]
    result = next(e for e in events if e.type.value == "TOOL_CALL_RESULT")
    assert start.tool_call_name == "calculate" and start.parent_message_id == texts[0] and len(set(texts)) == 2
    assert result.tool_call_id == start.tool_call_id and result.content == "42"
    assert events[0].run_id.startswith("run_")  # none was given: one is made


def test_ag_ui_goes_on_from_the_history_the_client_keeps(service: ServerThread, upstream: FakeModelAPI) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "calculate", "arguments": '{"expression": "6*7"}'}}
    history = [agui_message("system", "Be brief."), agui_message("user", "6*7?"),
               agui_message("assistant", "Let me see.", toolCalls=[call]),
               agui_message("tool", "42", toolCallId="c1"), agui_message("assistant", "42."),
               agui_message("user", "And doubled?")]  # fmt: skip
    _, events = agui_run(service.url, agui_input(*history, context=[{"description": "user", "value": "Ada"}]))
    sent = upstream.requests[0]["messages"]
    assert kinds(events)[-1] == "RUN_FINISHED"
    assert [(m["role"], m.get("content")) for m in sent] == [
        ("system", f"{SYSTEM}\nBe brief.\nContext from the application:\n- user: Ada"), ("user", "6*7?"),
        ("assistant", "Let me see."), ("assistant", None), ("tool", "42"), ("assistant", "42."),
        ("user", "And doubled?"),
    ]  # fmt: skip
    assert sent[3]["tool_calls"][0]["id"] == "c1" and sent[4]["tool_call_id"] == "c1"


def test_ag_ui_an_upstream_failure_ends_the_run_with_run_error_and_no_run_finished(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(status=500))
    _, events = agui_run(service.url, agui_input(agui_message("user", "hi")))
    assert kinds(events) == ["RUN_STARTED", "RUN_ERROR"]
    assert events[-1].code == "upstream_error" and events[-1].message == "The model API answered 500: scripted failure"


AGUI_BAD = [
    ("not-run-input", {"threadId": "t", "messages": "hi"}),
    ("no-messages", {"threadId": "t", "messages": []}),
    ("ends-with-assistant", {"threadId": "t", "messages": [agui_message("assistant", "hi")]}),
    ("result-of-no-call", {"threadId": "t", "messages": [agui_message("user", "hi"),
                                                         agui_message("tool", "x", toolCallId="nope")]}),
    ("too-long", {"threadId": "t", "messages": [agui_message("user", "x" * 32001)]}),
    ("tool-named-as-ours", {"threadId": "t", "messages": [agui_message("user", "hi")],
                            "tools": [{"name": "calculate", "description": "mine"}]}),
]  # fmt: skip


@pytest.mark.parametrize("body", [b[1] for b in AGUI_BAD], ids=[b[0] for b in AGUI_BAD])
def test_ag_ui_bad_input_is_refused_before_any_stream_in_the_api_shape(
    client: TestClient, upstream: FakeModelAPI, body: dict[str, Any]
) -> None:
    response = client.post("/api/ag-ui", json=body)
    assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error"
    assert response.json()["status"] == "error" and upstream.requests == []


def test_ag_ui_needs_the_server_key_when_one_is_set(settings_for: Callable[..., server.Settings]) -> None:
    with TestClient(server.create_app(settings_for(SERVER_API_KEY=SERVER_KEY))) as client:
        refused = client.post("/api/ag-ui", json=agui_input(agui_message("user", "hi")))
        answered = client.post("/api/ag-ui", json=agui_input(agui_message("user", "hi")),
                               headers={"Authorization": f"Bearer {SERVER_KEY}"})  # fmt: skip
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert answered.status_code == 200 and "RUN_FINISHED" in answered.text


def test_ag_ui_abort_cancels_the_run_and_closes_the_model_request(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="a b c d e", fault="hang"))
    body = agui_input(agui_message("user", "hi"))
    with httpx.Client(timeout=10) as http, http.stream("POST", service.url + "/api/ag-ui", json=body) as response:
        for text in response.iter_text():
            if "TEXT_MESSAGE_CONTENT" in text:
                break
    assert upstream.disconnected.wait(5), "the model request stayed open"
    assert wait_until(lambda: not service.app_ctx.turns)


def test_ag_ui_a_tool_that_needs_approval_interrupts_the_run_and_the_resume_decides_it(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, mcp_file: Path, tmp_path: Path
) -> None:
    target = tmp_path / "written.txt"
    config = mcp_config(tmp_path, {"files": stdio_server(mcp_file)})
    arguments = {"path": str(target), "text": "yes"}
    upstream.reset(Reply(tool_calls=[("files__write_file", arguments)]), Reply(content="Written."))
    asked = agui_message("user", "write it")
    with ServerThread(server.create_app(settings_for(MCP_CONFIG=config))) as service:
        _, first = agui_run(service.url, agui_input(asked))
        [interrupt] = first[-1].outcome.interrupts
        call = {
            "id": "call_0",
            "type": "function",
            "function": {"name": "files__write_file", "arguments": json.dumps(arguments)},
        }
        resume = [{"interruptId": interrupt.id, "status": "resolved", "payload": {"approved": True}}]
        _, second = agui_run(service.url, agui_input(asked, agui_message("assistant", toolCalls=[call]), resume=resume))
    assert (
        first[-1].outcome.type == "interrupt" and interrupt.tool_call_id == "call_0" and interrupt.reason == "tool_call"
    )
    assert "TOOL_CALL_RESULT" not in kinds(first) and len(upstream.requests) == 2
    assert kinds(second)[:2] == ["RUN_STARTED", "TOOL_CALL_RESULT"] and second[1].content.startswith("wrote")
    assert target.read_text() == "yes" and second[-1].outcome.type == "success"
    assert [m for m in upstream.requests[1]["messages"] if m["role"] == "tool"][0]["content"].startswith("wrote")


def test_ag_ui_a_denied_resume_runs_nothing_and_the_model_hears_why(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, mcp_file: Path, tmp_path: Path
) -> None:
    target = tmp_path / "written.txt"
    config = mcp_config(tmp_path, {"files": stdio_server(mcp_file)})
    call = {"id": "c9", "type": "function",
            "function": {"name": "files__write_file",
                         "arguments": json.dumps({"path": str(target), "text": "no"})}}  # fmt: skip
    upstream.reset(Reply(content="As you wish."))
    resume = [{"interruptId": "c9", "status": "resolved", "payload": {"approved": False}}]
    messages = [agui_message("user", "write it"), agui_message("assistant", toolCalls=[call])]
    with ServerThread(server.create_app(settings_for(MCP_CONFIG=config))) as service:
        _, events = agui_run(service.url, agui_input(*messages, resume=resume))
    assert not target.exists() and kinds(events)[1] == "TOOL_CALL_RESULT"
    assert events[1].content == "The user denied this tool call: it was not run."


def test_ag_ui_frontend_tools_end_the_run_with_their_calls_pending_and_the_next_run_answers(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    tools = [{"name": "confirm_order", "description": "Ask the user to confirm.",
              "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}]  # fmt: skip
    upstream.reset(
        Reply(tool_calls=[("confirm_order", {"order": "A1"})], call_ids=("front-1",)), Reply(content="Ordered.")
    )
    asked = agui_message("user", "order A1")
    _, first = agui_run(service.url, agui_input(asked, tools=tools))
    call = {"id": "front-1", "type": "function", "function": {"name": "confirm_order", "arguments": '{"order": "A1"}'}}
    answered = [
        asked,
        agui_message("assistant", toolCalls=[call]),
        agui_message("tool", '{"ok": true}', toolCallId="front-1"),
    ]
    _, second = agui_run(service.url, agui_input(*answered, tools=tools))
    assert kinds(first) == ["RUN_STARTED", "TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "RUN_FINISHED"]
    assert first[-1].outcome.type == "success" and first[-1].outcome.pending_tool_call_ids == ["front-1"]
    assert "confirm_order" in [t["function"]["name"] for t in upstream.requests[0]["tools"]]
    assert kinds(second)[-1] == "RUN_FINISHED" and "Ordered." in [e.delta for e in second if hasattr(e, "delta")]
    assert [m["content"] for m in upstream.requests[1]["messages"] if m["role"] == "tool"] == ['{"ok": true}']


AGUI_CHECK = """
import { HttpAgent } from "@ag-ui/client";
const [url, input] = [process.argv[2], JSON.parse(process.argv[3])];
const agent = new HttpAgent({ url, threadId: input.threadId, initialMessages: input.messages });
const seen = [];
agent.subscribe({ onEvent: ({ event }) => { seen.push(event.type); } });
await agent.runAgent({ runId: input.runId, tools: input.tools ?? [] });  // rejects on any breach of the protocol
console.log(JSON.stringify({ seen, messages: agent.messages.map((m) => m.role) }));
"""


@pytest.fixture(scope="session")
def agui_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """@ag-ui/client from the npm registry, in a folder of the tests' own."""
    if shutil.which("npm") is None:
        pytest.fail("The AG-UI client test runs @ag-ui/client under Node: apt-get install -y nodejs npm")
    folder = tmp_path_factory.mktemp("agui-js")
    subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "@ag-ui/client@1.0.0"], cwd=folder,
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (folder / "check.mjs").write_text(AGUI_CHECK, encoding="utf-8")
    return folder


def test_ag_ui_runs_pass_the_ag_ui_clients_own_verifier(
    agui_client: Path, service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(reasoning="hm", content="Let me see.", tool_calls=[("calculate", {"expression": "6*7"})]),
                   Reply(reasoning="so", content="42."))  # fmt: skip
    body = json.dumps(agui_input(agui_message("user", "6*7?")))
    done = subprocess.run(["node", "check.mjs", service.url + "/api/ag-ui", body], cwd=agui_client,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["seen"][0] == "RUN_STARTED" and seen["seen"][-1] == "RUN_FINISHED"
    assert seen["messages"] == ["user", "reasoning", "assistant", "tool", "reasoning", "assistant"]


# ---------------------------------------------------------------------------
# /v1/responses
# ---------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                "strict": True}  # fmt: skip


@pytest.fixture
def strict_sdk(service: ServerThread) -> Iterator[openai.OpenAI]:
    """The SDK validating every Response against its own models (a missing required field fails)."""
    with openai.OpenAI(base_url=service.url + "/v1", api_key="any", max_retries=0,
                       _strict_response_validation=True) as client:  # fmt: skip
        yield client


def responses_events(text: str) -> list[dict[str, Any]]:
    """The events of a /v1/responses stream: each `event:` line names its data's type; [DONE] ends it."""
    blocks = [block for block in text.split("\n\n") if block and not block.startswith(":")]
    assert blocks[-1] == "data: [DONE]"
    events = []
    for block in blocks[:-1]:
        name, data = block.split("\n")
        events.append(json.loads(data.removeprefix("data: ")))
        assert name == f"event: {events[-1]['type']}"
    return events


def post_response(url: str, **body: Any) -> httpx.Response:
    return httpx.post(url + "/v1/responses", json=body, timeout=10)


def test_responses_create_answers_a_response_of_reasoning_then_message_with_usage_details(
    strict_sdk: openai.OpenAI, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(reasoning="France, so Paris.", content="Paris.", cached_tokens=4, reasoning_tokens=3))
    response = strict_sdk.responses.create(model="my-model", input="Capital of France?")
    assert re.fullmatch(r"resp_[0-9a-f]{32}", response.id) and response.object == "response"
    assert (response.status, response.model, response.output_text) == ("completed", "my-model", "Paris.")
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "France, so Paris."  # type: ignore[union-attr]
    assert message.type == "message" and message.content[0].annotations == []  # type: ignore[union-attr]
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (11, 7, 18)  # type: ignore[union-attr]
    assert usage.input_tokens_details.cached_tokens == 4 and usage.output_tokens_details.reasoning_tokens == 3  # type: ignore[union-attr]
    assert response.created_at > 0 and response.store is True  # type: ignore[attr-defined]


def test_responses_stream_sends_each_item_in_open_responses_order_with_increasing_sequence_numbers(
    sdk: openai.OpenAI, service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(reasoning="think hard", content="It is 4."), Reply(reasoning="think hard", content="It is 4."))
    with sdk.responses.stream(model="m", input="2+2?") as stream:
        seen = list(stream)
        final = stream.get_final_response()
    assert final.output_text == "It is 4." and [e.sequence_number for e in seen] == list(range(len(seen)))
    events = responses_events(post_response(service.url, input="2+2?", stream=True).text)
    kinds = [event["type"].removeprefix("response.") for event in events]
    item = ["output_item.added", "content_part.added"]
    done = ["content_part.done", "output_item.done"]
    assert kinds == ["created", "in_progress", *item, "reasoning_text.delta", "reasoning_text.delta",
                     "reasoning_text.done", *done, *item, "output_text.delta", "output_text.delta",
                     "output_text.delta", "output_text.done", *done, "completed"]  # fmt: skip
    assert [e.type for e in seen] == [event["type"] for event in events]
    assert events[0]["response"]["output"] == [] and events[-1]["response"]["status"] == "completed"
    streamed = ["".join(e["delta"] for e in events if e.get("output_index") == i and "delta" in e) for i in (0, 1)]
    assert [item["content"][0]["text"] for item in events[-1]["response"]["output"]] == streamed
    assert [event["output_index"] for event in events if "delta" in event] == [0, 0, 1, 1, 1]


@BOTH_DATABASES
def test_responses_previous_response_id_continues_one_stored_conversation_over_three_turns_and_a_restart(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="Hi Ada."), Reply(content="Noted: tea."), Reply(content="Ada, who likes tea."))
    settings, previous, ids = settings_for(), None, []
    for text in ("I am Ada.", "I like tea.", "Who am I?"):
        with ServerThread(server.create_app(settings)) as service:  # a new server for each turn
            with openai.OpenAI(base_url=service.url + "/v1", api_key="any", max_retries=0) as sdk:
                response = sdk.responses.create(model="m", input=text, previous_response_id=previous)
            previous = response.id
            ids.append(response.id)
    sent = [(m["role"], m["content"]) for m in upstream.requests[2]["messages"][1:]]
    assert sent == [("user", "I am Ada."), ("assistant", "Hi Ada."), ("user", "I like tea."),
                    ("assistant", "Noted: tea."), ("user", "Who am I?")]  # fmt: skip
    with ServerThread(server.create_app(settings)) as service, httpx.Client(base_url=service.url) as http:
        [listed] = http.get("/api/conversations").json()["conversations"]
        stored = [http.get(f"/v1/responses/{response_id}").json() for response_id in ids]
    assert listed["message_count"] == 6 and {s["conversation"]["id"] for s in stored} == {listed["conversation_id"]}
    assert [s["previous_response_id"] for s in stored] == [None, ids[0], ids[1]]
    assert stored[2]["output"][0]["content"][0]["text"] == "Ada, who likes tea."


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_responses_retrieve_gives_the_stored_response_as_the_client_got_it(
    sdk: openai.OpenAI, service: ServerThread, upstream: FakeModelAPI, stream: bool
) -> None:
    upstream.reset(Reply(tool_calls=[("calculate", {"expression": "6*7"})], content="Let me see."),
                   Reply(reasoning="so", content="42."))  # fmt: skip
    answered = post_response(service.url, input="6*7?", stream=stream)
    got = responses_events(answered.text)[-1]["response"] if stream else answered.json()
    assert sdk.responses.retrieve(got["id"]).model_dump(exclude_unset=True) == got
    assert httpx.get(f"{service.url}/v1/responses/{got['id']}", timeout=10).json() == got
    assert [item["type"] for item in got["output"]] == ["message", "reasoning", "message"]
    assert "🔧 calculate → 42" in got["output"][1]["content"][0]["text"]


def test_responses_an_unknown_or_deleted_response_is_404_and_an_unknown_previous_one_400(
    sdk: openai.OpenAI, service: ServerThread, upstream: FakeModelAPI
) -> None:
    response = sdk.responses.create(model="m", input="hi")
    assert httpx.delete(f"{service.url}/api/conversations/{response.conversation.id}", timeout=10).status_code == 204  # type: ignore[union-attr]
    for gone in (response.id, "resp_nope", "x" * 300):
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.responses.retrieve(gone)
        assert missing.value.body["type"] == "invalid_request_error" and missing.value.code == "not_found"  # type: ignore[index]
    for previous in (response.id, "resp_" + "0" * 32, "not-ours"):
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.responses.create(model="m", input="again", previous_response_id=previous)
        assert (refused.value.code, refused.value.param) == ("previous_response_not_found", "previous_response_id")
    assert len(upstream.requests) == 1


def test_responses_continuing_a_response_that_is_not_the_last_of_its_conversation_is_409(
    sdk: openai.OpenAI, service: ServerThread, upstream: FakeModelAPI
) -> None:
    first = sdk.responses.create(model="m", input="one")
    sdk.responses.create(model="m", input="two", previous_response_id=first.id)
    with pytest.raises(openai.ConflictError) as refused:
        sdk.responses.create(model="m", input="branch", previous_response_id=first.id)
    assert refused.value.code == "response_not_latest" and len(upstream.requests) == 2


def test_responses_with_store_false_keep_nothing(sdk: openai.OpenAI, service: ServerThread) -> None:
    response = sdk.responses.create(model="m", input="hi", store=False)
    assert response.output_text == "echo: hi" and response.conversation is None  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(response.id)
    assert stored_total(service.url) == 0


def test_responses_input_items_and_instructions_become_what_the_model_reads(
    sdk: openai.OpenAI, upstream: FakeModelAPI
) -> None:
    items = [
        {"type": "message", "role": "developer", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Bonjour"}]},
        {"role": "user", "content": "Thanks"},
    ]
    sdk.responses.create(model="m", input=items, instructions="Be brief.", temperature=0.2, max_output_tokens=50)  # type: ignore[arg-type]
    sent = upstream.requests[0]
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("system", f"{SYSTEM}\nAnswer in French.\nBe brief."), ("user", "Hello"), ("assistant", "Bonjour"),
        ("user", "Thanks"),
    ]  # fmt: skip
    assert (sent["temperature"], sent["max_tokens"]) == (0.2, 50)


def test_responses_instructions_apply_to_their_own_turn_only(sdk: openai.OpenAI, upstream: FakeModelAPI) -> None:
    first = sdk.responses.create(model="m", input="one", instructions="Be brief.")
    second = sdk.responses.create(model="m", input="two", previous_response_id=first.id)
    assert [m["content"] for m in upstream.requests[1]["messages"] if m["role"] == "system"] == [SYSTEM]
    assert (first.instructions, second.instructions) == ("Be brief.", None)


def test_responses_a_cut_answer_is_incomplete_for_max_output_tokens(sdk: openai.OpenAI, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(content="the start of", finish_reason="length"))
    response = sdk.responses.create(model="m", input="Tell me a story.", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]
    assert response.output[-1].status == "incomplete" and response.output_text == "the start of"  # type: ignore[union-attr]


def test_responses_an_answer_after_a_cut_tool_call_is_complete(sdk: openai.OpenAI, upstream: FakeModelAPI) -> None:
    upstream.reset(Reply(tool_calls=[("calculate", {"expression": "1+1"})], finish_reason="length"), Reply(content="2"))
    response = sdk.responses.create(model="m", input="1+1?")
    assert response.status == "completed" and response.output[-1].status == "completed"  # type: ignore[union-attr]


@pytest.mark.parametrize("store", [True, False], ids=["previous-response", "items-sent-back"])
def test_responses_a_client_function_call_goes_to_the_client_and_its_output_brings_the_answer(
    sdk: openai.OpenAI, upstream: FakeModelAPI, store: bool
) -> None:
    upstream.reset(Reply(reasoning="I need the weather.", tool_calls=[("get_weather", {"city": "Oslo"})]),
                   Reply(content="Snow in Oslo."))  # fmt: skip
    first = sdk.responses.create(model="m", input="Weather in Oslo?", tools=[WEATHER_TOOL], store=store)  # type: ignore[list-item]
    call = first.output[-1]
    assert call.type == "function_call" and (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})  # type: ignore[union-attr]
    output = {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "snow"}'}  # type: ignore[union-attr]
    if store:
        second = sdk.responses.create(model="m", input=[output], tools=[WEATHER_TOOL], previous_response_id=first.id)  # type: ignore[list-item]
    else:  # as openai-agents does: the items of the first response, sent back
        items = [{"role": "user", "content": "Weather in Oslo?"}, *[i.model_dump() for i in first.output], output]
        second = sdk.responses.create(model="m", input=items, tools=[WEATHER_TOOL], store=False)  # type: ignore[arg-type, list-item]
    assert second.output_text == "Snow in Oslo."
    sent = upstream.requests[1]["messages"]
    assert sent[-2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert sent[-1] == {"role": "tool", "tool_call_id": call.call_id, "content": '{"sky": "snow"}'}  # type: ignore[union-attr]
    assert upstream.requests[0]["tools"][-1]["function"]["name"] == "get_weather"


def test_responses_a_reply_calling_an_agent_tool_and_a_client_function_streams_what_it_stores(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(tool_calls=[("get_weather", {"city": "Oslo"}), ("calculate", {"expression": "6*7"})]))
    streamed = responses_events(post_response(service.url, input="Both?", tools=[WEATHER_TOOL], stream=True).text)
    completed = streamed[-1]["response"]
    assert httpx.get(f"{service.url}/v1/responses/{completed['id']}", timeout=10).json() == completed
    assert [item["type"] for item in completed["output"]] == ["reasoning", "function_call"]
    added = [event["item"]["type"] for event in streamed if event["type"] == "response.output_item.added"]
    assert added == ["reasoning", "function_call"]


def test_responses_a_reply_calling_an_agent_tool_and_a_client_function_is_continued_by_the_functions_output(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(tool_calls=[("get_weather", {"city": "Oslo"}), ("calculate", {"expression": "6*7"})]),
                   Reply(content="Snow, and 42."))  # fmt: skip
    first = post_response(service.url, input="Both?", tools=[WEATHER_TOOL]).json()
    output = {"type": "function_call_output", "call_id": first["output"][-1]["call_id"], "output": "snow"}
    second = post_response(service.url, input=[output], tools=[WEATHER_TOOL], previous_response_id=first["id"])
    assert second.status_code == 200 and second.json()["output"][-1]["content"][0]["text"] == "Snow, and 42."
    sent = upstream.requests[1]["messages"]
    assert [m["role"] for m in sent[-3:]] == ["assistant", "tool", "tool"]
    assert {m["tool_call_id"]: m["content"] for m in sent[-2:]} == {"call_0": "snow", "call_1": "42"}


def test_responses_a_turn_that_ends_while_another_waits_for_the_lease_makes_that_one_409(
    service: ServerThread, upstream: FakeModelAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = post_response(service.url, input="I am Ada.").json()
    store, checked = service.app_ctx.store, threading.Event()
    loop = service.server.servers[0].get_loop()  # type: ignore[attr-defined]
    other_done = asyncio.Event()
    real = store.artifact

    async def pausing_after_the_first_check(artifact_id: str) -> Any:
        found = await real(artifact_id)
        if not checked.is_set():  # the first request: it has checked, and now the other one runs to its end
            checked.set()
            await other_done.wait()
        return found

    monkeypatch.setattr(store, "artifact", pausing_after_the_first_check)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post_response, service.url, input="B", previous_response_id=first["id"])
        assert checked.wait(10)
        other = post_response(service.url, input="A", previous_response_id=first["id"])
        loop.call_soon_threadsafe(other_done.set)
        refused = waiting.result(10)
    assert other.status_code == 200 and refused.status_code == 409
    assert refused.json()["error"]["code"] == "response_not_latest" and len(upstream.requests) == 2


def test_responses_continuing_with_the_items_a_client_sends_back_reads_only_the_new_ones(
    sdk: openai.OpenAI, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(reasoning="hm", content="Hi Ada."), Reply(content="You are Ada."))
    first = sdk.responses.create(model="m", input="I am Ada.")
    items = [{"role": "user", "content": "I am Ada."}, *[i.model_dump() for i in first.output],
             {"role": "user", "content": "Who am I?"}]  # fmt: skip
    with pytest.raises(openai.BadRequestError):  # the user message it sent before is not new
        sdk.responses.create(model="m", input=items, previous_response_id=first.id)  # type: ignore[arg-type]
    second = sdk.responses.create(model="m", input=items[1:], previous_response_id=first.id)  # type: ignore[arg-type]
    assert second.output_text == "You are Ada."
    sent = [(m["role"], m["content"]) for m in upstream.requests[1]["messages"][1:]]
    assert sent == [("user", "I am Ada."), ("assistant", "Hi Ada."), ("user", "Who am I?")]


def test_responses_continuing_a_function_call_without_its_output_is_refused(
    sdk: openai.OpenAI, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(tool_calls=[("get_weather", {"city": "Oslo"})]))
    first = sdk.responses.create(model="m", input="Weather?", tools=[WEATHER_TOOL])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.responses.create(model="m", input="never mind", previous_response_id=first.id)
    assert refused.value.param == "input" and "function_call_output" in refused.value.message
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_responses_an_upstream_failure_mid_answer_fails_the_response_and_stores_nothing(
    sdk: openai.OpenAI, service: ServerThread, upstream: FakeModelAPI, stream: bool
) -> None:
    upstream.reset(Reply(content="a b c d", fault="drop"))
    answered = post_response(service.url, input="hi", stream=stream)
    if stream:
        events = responses_events(answered.text)
        assert events[-1]["type"] == "response.failed" and events[-1]["response"]["status"] == "failed"
        assert events[-1]["response"]["error"] == {
            "code": "upstream_error",
            "message": server.ERRORS["upstream_error"][1],
        }
        assert httpx.get(f"{service.url}/v1/responses/{events[0]['response']['id']}", timeout=10).status_code == 404
    else:
        assert answered.status_code == 502 and answered.json()["error"]["code"] == "upstream_error"
    assert stored_total(service.url) == 0


RESPONSES_BAD_INPUT = [
    ("no-input", {}, "input"),
    ("input-number", {"input": 5}, "input"),
    ("unknown-item", {"input": [{"type": "web_search_call", "id": "x"}]}, "input[0]"),
    ("unknown-reference", {"input": [{"type": "item_reference", "id": "msg_nope"}]}, "input[0]"),
    ("output-without-call", {"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input[0]"),
    ("bad-role", {"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
    ("hosted-tool", {"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
    ("tool-named-as-ours", {"input": "hi", "tools": [{**WEATHER_TOOL, "name": "calculate"}]}, "tools[0]"),
    ("bad-format", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ("bad-tokens", {"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ("bad-temperature", {"input": "hi", "temperature": 3}, "temperature"),
    ("background", {"input": "hi", "background": True}, "background"),
    ("image-no-vision", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content"),
    ("previous-not-a-string", {"input": "hi", "previous_response_id": 5}, "previous_response_id"),
    ("tool-choice-without-tools", {"input": "hi", "tool_choice": {"type": "function", "name": {}}}, "tool_choice"),
    ("tool-choice-chat-shaped",
     {"input": "hi", "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     "tool_choice"),
    ("type-a-list", {"input": [{"type": [], "role": "user", "content": "hi"}]}, "input[0].type"),
    ("role-a-list", {"input": [{"role": [], "content": "hi"}]}, "input[0].role"),
    ("part-type-an-object", {"input": [{"role": "user", "content": [{"type": {}}]}]}, "input[0].content"),
    ("empty-message", {"input": [{"role": "user", "content": ""}]}, "input"),
    ("empty-parts", {"input": [{"role": "user", "content": []}]}, "input"),
    ("only-reasoning", {"input": [{"type": "reasoning", "summary": []}]}, "input"),
]  # fmt: skip


@pytest.mark.parametrize("body, param", [c[1:] for c in RESPONSES_BAD_INPUT], ids=[c[0] for c in RESPONSES_BAD_INPUT])
def test_responses_bad_input_gets_a_400_in_openais_shape_naming_the_field_and_changes_nothing(
    service: ServerThread, upstream: FakeModelAPI, body: dict[str, Any], param: str
) -> None:
    refused = post_response(service.url, model="m", **body)
    assert_documented(refused)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert upstream.requests == [] and stored_total(service.url) == 0


def test_responses_take_the_server_key_and_a_busy_conversation_is_409(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    with ServerThread(server.create_app(settings_for(SERVER_API_KEY=SERVER_KEY))) as service:
        with openai.OpenAI(base_url=service.url + "/v1", api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError):
                wrong.responses.create(model="m", input="hi")
            with pytest.raises(openai.AuthenticationError):
                wrong.responses.retrieve("resp_" + "0" * 32)
        with openai.OpenAI(base_url=service.url + "/v1", api_key=SERVER_KEY, max_retries=0) as right:
            first = right.responses.create(model="m", input="hi")
            upstream.reset(Reply(content="a b c d", fault="hang"))
            with right.responses.stream(model="m", input="slow", previous_response_id=first.id) as slow:
                next(iter(slow))
                with pytest.raises(openai.ConflictError) as busy:
                    right.responses.create(model="m", input="meanwhile", previous_response_id=first.id)
    assert busy.value.code == "conversation_busy"


def test_responses_with_images_store_nothing_or_are_refused_for_a_stored_conversation(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    parts = [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": png(1, 1, b"\x00\x00")},
    ]
    upstream.reset(Reply(content="A pixel."))
    with ServerThread(server.create_app(settings_for(MODEL_VISION="true"))) as service:
        refused = post_response(service.url, input=[{"role": "user", "content": parts}])
        answered = post_response(service.url, input=[{"role": "user", "content": parts}], store=False)
        assert stored_total(service.url) == 0
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"
    assert answered.status_code == 200 and len(upstream.requests) == 1
    assert upstream.requests[0]["messages"][-1]["content"][1]["type"] == "image_url"


def test_responses_an_item_reference_to_a_stored_item_is_read_as_that_item(
    sdk: openai.OpenAI, upstream: FakeModelAPI
) -> None:
    first = sdk.responses.create(model="m", input="I am Ada.")
    items = [{"role": "user", "content": "I am Ada."}, {"type": "item_reference", "id": first.output[-1].id},
             {"role": "user", "content": "Who am I?"}]  # fmt: skip
    sdk.responses.create(model="m", input=items)  # type: ignore[arg-type]
    sent = [(m["role"], m["content"]) for m in upstream.requests[1]["messages"][1:]]
    assert sent == [("user", "I am Ada."), ("assistant", "echo: I am Ada."), ("user", "Who am I?")]


def test_responses_openai_agents_runs_with_its_default_responses_model_and_a_function_tool(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    import agents  # openai-agents: the README's test command installs it

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"snow in {city}"

    upstream.reset(Reply(reasoning="look it up", tool_calls=[("get_weather", {"city": "Oslo"})]),
                   Reply(content="It snows in Oslo."), Reply(content="Still snowing."))  # fmt: skip
    agents.set_tracing_disabled(True)

    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=service.url + "/v1", api_key="any", max_retries=0) as client:
            model = agents.OpenAIResponsesModel(model="m", openai_client=client)
            agent = agents.Agent(name="Assistant", instructions="Be brief.", model=model, tools=[get_weather])
            first = await agents.Runner.run(agent, "Weather in Oslo?")
            streamed = agents.Runner.run_streamed(agent, "And now?", previous_response_id=first.last_response_id)
            async for _ in streamed.stream_events():
                pass
            return first.final_output, streamed.final_output

    assert asyncio.run(run()) == ("It snows in Oslo.", "Still snowing.")
    assert upstream.requests[1]["messages"][-1]["content"] == "snow in Oslo"
    assert [m["content"] for m in upstream.requests[2]["messages"] if m["role"] == "user"][-1] == "And now?"


AI_SDK_CHECK = """
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, streamText, tool, stepCountIs } from "ai";
import { z } from "zod";
const openai = createOpenAI({ baseURL: process.argv[2], apiKey: "any" });
const weather = tool({ description: "The weather in a city.", inputSchema: z.object({ city: z.string() }),
                       execute: async ({ city }) => `snow in ${city}` });
const first = await generateText({ model: openai.responses("m"), prompt: "Weather in Oslo?",
                                   tools: { get_weather: weather }, stopWhen: stepCountIs(3) });
const second = streamText({ model: openai.responses("m"), prompt: "And now?",
                            providerOptions: { openai: { previousResponseId: first.response.id } } });
let text = "";
for await (const part of second.textStream) text += part;
console.log(JSON.stringify({ first: first.text, steps: first.steps.length, second: text }));
"""


@pytest.fixture(scope="session")
def ai_sdk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Vercel AI SDK and its OpenAI provider from the npm registry, in a folder of the tests' own."""
    if shutil.which("npm") is None:
        pytest.fail("The AI SDK test runs the ai package under Node: apt-get install -y nodejs npm")
    folder = tmp_path_factory.mktemp("ai-sdk")
    packages = ["ai@7.0.173", "@ai-sdk/openai@4.0.118", "zod@4"]
    subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", *packages], cwd=folder, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    (folder / "check.mjs").write_text(AI_SDK_CHECK, encoding="utf-8")
    return folder


def test_responses_the_vercel_ai_sdk_runs_a_tool_loop_and_continues_by_previous_response_id(
    ai_sdk: Path, service: ServerThread, upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(tool_calls=[("get_weather", {"city": "Oslo"})]), Reply(content="It snows in Oslo."),
                   Reply(content="Still snowing."))  # fmt: skip
    done = subprocess.run(["node", "check.mjs", service.url + "/v1"], cwd=ai_sdk, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"first": "It snows in Oslo.", "steps": 2,
                                                        "second": "Still snowing."}  # fmt: skip
    assert upstream.requests[1]["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_0",
        "content": "snow in Oslo",
    }
    assert [m["content"] for m in upstream.requests[2]["messages"] if m["role"] == "user"] == [
        "Weather in Oslo?",
        "And now?",
    ]


# ---------------------------------------------------------------------------
# Metrics and traces
# ---------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, **kwargs: Any) -> Samples:
    """Every sample /metrics gives: (name, sorted labels) -> value."""
    response = httpx.get(url + "/metrics", timeout=10, **kwargs)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert "_created" not in response.text
    families = text_string_to_metric_families(response.text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families for s in family.samples}


def moved(before: Samples, after: Samples) -> dict[str, float]:
    """What moved between two scrapes, as `name{label=value,...}`; sums and buckets but +Inf
    left out (where a duration falls is not for a test to say)."""
    changes = {}
    for (name, labels), value in after.items():
        if name.endswith("_sum") or (name.endswith("_bucket") and dict(labels)["le"] != "+Inf"):
            continue
        if value != before.get((name, labels), 0.0):
            shown = ",".join(f"{key}={item}" for key, item in labels)
            changes[f"{name}{{{shown}}}"] = value - before.get((name, labels), 0.0)
    return changes


def counted(name: str, label: str, counts: dict[str, int]) -> dict[str, float]:
    """A histogram's movements as `moved` shows them: its count and +Inf bucket, by a label's values."""
    movements: dict[str, float] = {}
    for value, count in counts.items():
        movements[f"{name}_count{{{label}={value}}}"] = count
        movements[f"{name}_bucket{{{','.join(sorted([f'{label}={value}', 'le=+Inf']))}}}"] = count
    return movements


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_exactly_with_the_turns_and_refusals_of_every_face(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    before = scrape(service.url)
    upstream.reset(
        Reply(content="plain"),
        Reply(tool_calls=[("calculate", {"expression": "6*7"})]),
        Reply(content="42"),
        Reply(content="via v1"),
        Reply(status=500),
        Reply(content="a b c d", fault="hold"),
    )
    with httpx.Client(base_url=service.url, timeout=10) as http:
        assert stream(service.url, {"message": "hi", "conversation_id": "plain"})[0].status_code == 200
        assert http.post("/api/chat", json={"message": "6*7?", "conversation_id": "tool"}).status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": ASK}).status_code == 200
        assert http.post("/api/chat", json={"message": "fail", "conversation_id": "fail"}).status_code == 502
        assert http.post("/v1/chat/completions", json={"messages": []}).status_code == 400
        assert http.get("/api/conversations/none").status_code == 404
        with held_stream(service.url, {"message": "wait", "conversation_id": "busy"}, upstream) as (_, rest):
            busy = http.post("/api/chat/stream", json={"message": "again", "conversation_id": "busy"})
            upstream.end_hang()
            assert "event: done" in "".join(rest)
    assert busy.status_code == 409
    assert wait_until(lambda: not service.app_ctx.turns)
    after = scrape(service.url)
    completed = {"api_stream": 2, "api_json": 1, "v1": 1}
    assert moved(before, after) == {
        "autogen_chat_turns_total{face=api_stream,outcome=done}": 2,
        "autogen_chat_turns_total{face=api_json,outcome=done}": 1,
        "autogen_chat_turns_total{face=v1,outcome=done}": 1,
        "autogen_chat_turns_total{face=api_json,outcome=upstream_error}": 1,
        "autogen_chat_turns_total{face=v1,outcome=validation_error}": 1,
        "autogen_chat_turns_total{face=api_stream,outcome=conversation_busy}": 1,
        "autogen_chat_errors_total{code=upstream_error}": 1,
        "autogen_chat_errors_total{code=validation_error}": 1,
        "autogen_chat_errors_total{code=not_found}": 1,
        "autogen_chat_errors_total{code=conversation_busy}": 1,
        "autogen_chat_tokens_total{type=input}": 5 * 11,  # one model call each, two for the tool turn
        "autogen_chat_tokens_total{type=output}": 5 * 7,
        "autogen_chat_tool_calls_total{outcome=ok,tool=calculate}": 1,
        **counted("autogen_chat_turn_duration_seconds", "face", completed),
        **counted("autogen_chat_time_to_first_token_seconds", "face", completed),
        # Each stored turn takes the lease and loads its conversation, and a completed one saves
        # (which lets the lease go); a failed one lets it go; the busy one asks twice (a turn here
        # holds it: it waits that turn's handover time first).
        **counted("autogen_chat_database_seconds", "op", {"acquire_lease": 6, "load_state": 4, "save_turn": 3,
                                                          "release_lease": 1, "get_conversation": 1}),
    }  # fmt: skip
    assert sample(after, "autogen_chat_turn_duration_seconds_sum", face="api_json") > 0
    assert sample(after, "autogen_chat_info", version=server.__version__, model="deepseek-flash") == 1


def test_tokens_are_counted_by_type_as_the_model_api_reports_them(
    service: ServerThread, upstream: FakeModelAPI
) -> None:
    before = scrape(service.url)
    upstream.reset(Reply(content="cached", usage=(100, 40), cached_tokens=30, reasoning_tokens=10), strict="deepseek")
    assert stream(service.url, {"message": "hi"})[0].status_code == 200
    after = scrape(service.url)
    tokens = {kind: sample(after, "autogen_chat_tokens_total", type=kind) - sample(before, "autogen_chat_tokens_total",
              type=kind) for kind in ("input", "output", "cached_input", "reasoning")}  # fmt: skip
    assert tokens == {"input": 100, "output": 40, "cached_input": 30, "reasoning": 10}


def test_open_turns_counts_a_stream_while_it_runs_and_not_after(service: ServerThread, upstream: FakeModelAPI) -> None:
    assert sample(scrape(service.url), "autogen_chat_open_turns") == 0
    upstream.reset(Reply(content="a b c d", fault="hold"))
    with held_stream(service.url, {"message": "wait"}, upstream) as (_, rest):
        assert sample(scrape(service.url), "autogen_chat_open_turns") == 1
        upstream.end_hang()
        assert "event: done" in "".join(rest)
    assert wait_until(lambda: sample(scrape(service.url), "autogen_chat_open_turns") == 0)


def test_metrics_need_the_server_key_when_one_is_set(settings_for: Callable[..., server.Settings]) -> None:
    with ServerThread(server.create_app(settings_for(SERVER_API_KEY=SERVER_KEY))) as service:
        refused = httpx.get(service.url + "/metrics")
        wrong = httpx.get(service.url + "/metrics", headers={"Authorization": "Bearer wrong"})
        samples = scrape(service.url, headers={"Authorization": f"Bearer {SERVER_KEY}"})
        document = httpx.get(service.url + "/openapi.json").json()
    assert refused.status_code == wrong.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert sample(samples, "autogen_chat_errors_total", code="unauthorized") == 2
    assert document["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]


def worker_environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(pair.decode().split("=", 1) for pair in pairs if b"=" in pair)


def test_with_two_workers_metrics_sum_every_worker_even_killed_ones_and_logs_are_json(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, tmp_path: Path
) -> None:
    env = process_env(settings_for, WORKERS="2", LOG_FORMAT="json")
    log = tmp_path / "server.log"
    upstream.reset(*[Reply(content=f"answer {index}") for index in range(6)], Reply(content="a b c d", fault="hang"))
    with log.open("wb") as output, service_processes(1, env, tmp_path, "server.py", output=output) as [(process, url)]:
        workers = child_processes(process.pid)
        directory = Path(worker_environ(workers[0])["PROMETHEUS_MULTIPROC_DIR"])
        assert "pydantic_core" not in Path(f"/proc/{process.pid}/maps").read_text()  # its JSON lines need no app
        for index in range(6):
            assert httpx.post(url + "/api/chat", json={"message": f"q{index}"}, timeout=10).status_code == 200
        with held_stream(url, {"message": "wait"}, upstream):
            assert sample(scrape(url), "autogen_chat_open_turns") == 1
            for pid in workers:  # the held turn's worker among them: it never gets to its lifespan's end
                os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda: len(set(child_processes(process.pid)) - set(workers)) == 2, timeout=30)
        assert wait_until(lambda: health_status(url) == 200, timeout=30)
        after = scrape(url)  # answered by a new worker, which ran no turn
    assert sample(after, "autogen_chat_turns_total", face="api_json", outcome="done") == 6
    assert sample(after, "autogen_chat_tokens_total", type="input") == 6 * 11  # the held call never ended
    assert sample(after, "autogen_chat_open_turns") == 0
    assert sample(after, "autogen_chat_info", version=server.__version__, model="deepseek-flash") == 1
    assert not directory.exists()  # made for the workers, removed when the server stopped
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(line["logger"] == "uvicorn.error" and "parent process" in line["message"] for line in lines)
    assert any(line["logger"] == "autogen_chat" and line["message"].startswith("model ") for line in lines)


class TraceCollector:
    """An OTLP/HTTP collector on loopback: the spans it was sent, decoded from protobuf."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.app = Starlette(routes=[Route("/v1/traces", self.export, methods=["POST"])])

    async def export(self, request: Request) -> Response:
        assert request.headers["content-type"] == "application/x-protobuf"
        sent = ExportTraceServiceRequest.FromString(await request.body())
        for resource in sent.resource_spans:
            service_name = {kv.key: any_value(kv.value) for kv in resource.resource.attributes}["service.name"]
            for scope in resource.scope_spans:
                self.spans += [span_fields(span, scope.scope.name, service_name) for span in scope.spans]
        return Response(ExportTraceServiceResponse().SerializeToString(), media_type="application/x-protobuf")

    def named(self, prefix: str) -> list[dict[str, Any]]:
        return [span for span in self.spans if span["name"].startswith(prefix)]


def span_fields(span: Any, scope: str, service_name: str) -> dict[str, Any]:
    return {
        "name": span.name,
        "kind": span.kind,
        "scope": scope,
        "service": service_name,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent": span.parent_span_id.hex() or None,
        "start": span.start_time_unix_nano,
        "status": span.status.code,
        "attributes": {kv.key: any_value(kv.value) for kv in span.attributes},
    }


def any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


@pytest.fixture
def collector() -> Iterator[tuple[TraceCollector, ServerThread]]:
    received = TraceCollector()
    with ServerThread(received.app) as thread:
        yield received, thread


def test_each_turn_is_one_invoke_agent_span_with_its_model_and_tool_calls_under_it(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, collector: tuple[TraceCollector, Any]
) -> None:
    received, receiver = collector
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(server.JsonFormatter())
    logging.getLogger("autogen_chat").addHandler(handler)
    calls = [("calculate", {"expression": "6*7"}), ("calculate", {"expression": "1/0"})]
    upstream.reset(Reply(tool_calls=calls), Reply(content="42"), Reply(status=500))
    try:
        with ServerThread(server.create_app(settings_for(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url))) as service:
            with httpx.Client(base_url=service.url, timeout=10) as http:
                assert http.post("/api/chat", json={"message": "6*7?", "conversation_id": "traced"}).status_code == 200
                assert "event: error" in http.post("/api/chat/stream", json={"message": "x"}).text
    finally:
        logging.getLogger("autogen_chat").removeHandler(handler)
    assert wait_until(lambda: len(received.named("invoke_agent")) == 2)  # sent as the server stopped, at the latest
    tool_turn, failed = sorted(received.named("invoke_agent"), key=lambda span: "error.type" in span["attributes"])
    assert tool_turn["name"] == "invoke_agent assistant" and tool_turn["kind"] == 1 and tool_turn["parent"] is None
    assert tool_turn["attributes"] == {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": "127.0.0.1",
        "gen_ai.request.model": "deepseek-flash", "gen_ai.agent.name": "assistant",
        "gen_ai.conversation.id": "traced", "gen_ai.usage.input_tokens": 22, "gen_ai.usage.output_tokens": 14,
        "gen_ai.usage.cache_read.input_tokens": 0, "gen_ai.usage.reasoning.output_tokens": 0,
    }  # fmt: skip
    assert failed["attributes"]["error.type"] == "upstream_error" and failed["status"] == 2
    chats = sorted((span for span in received.named("chat ") if span["parent"] == tool_turn["span_id"]),
                   key=lambda span: span["start"])  # fmt: skip
    assert [span["attributes"]["gen_ai.response.finish_reasons"] for span in chats] == [["tool_calls"], ["stop"]]
    assert {span["name"] for span in chats} == {"chat deepseek-flash"} and {span["kind"] for span in chats} == {3}
    assert {key: value for key, value in chats[0]["attributes"].items() if "finish" not in key} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "127.0.0.1", "gen_ai.request.model": "deepseek-flash",
        "gen_ai.request.stream": True, "server.address": "127.0.0.1", "server.port": upstream_port(settings_for),
        "gen_ai.conversation.id": "traced", "gen_ai.usage.input_tokens": 11, "gen_ai.usage.output_tokens": 7,
        "gen_ai.usage.cache_read.input_tokens": 0, "gen_ai.usage.reasoning.output_tokens": 0,
    }  # fmt: skip
    tool, failed_tool = sorted(
        received.named("execute_tool"), key=lambda span: span["attributes"]["gen_ai.tool.call.id"]
    )
    assert tool["name"] == "execute_tool calculate" and tool["kind"] == 1 and tool["parent"] == tool_turn["span_id"]
    assert tool["attributes"] == {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "calculate",
                                  "gen_ai.tool.call.id": "call_0", "gen_ai.tool.type": "function",
                                  "gen_ai.conversation.id": "traced"}  # fmt: skip
    assert failed_tool["attributes"]["error.type"] == "error" and failed_tool["status"] == 2  # division by zero
    [failed_chat] = [span for span in received.named("chat ") if span["parent"] == failed["span_id"]]
    assert failed_chat["attributes"]["error.type"] == "upstream_error" and failed_chat["status"] == 2
    assert len(received.spans) == 7
    assert {span["trace_id"] for span in [tool_turn, *chats, tool, failed_tool]} == {tool_turn["trace_id"]}
    assert failed["trace_id"] != tool_turn["trace_id"]
    assert {(span["scope"], span["service"]) for span in received.spans} == {("autogen-chat", "autogen-chat")}
    assert not isinstance(trace_api.get_tracer_provider(), TracerProvider)  # AutoGen's spans still go nowhere
    logged = [json.loads(line) for line in lines.getvalue().splitlines()]
    [failure] = [line for line in logged if "failed" in line["message"]]
    assert failure["trace_id"] == failed["trace_id"] and failure["span_id"] == failed["span_id"]
    assert all("trace_id" not in line for line in logged if line is not failure)


def upstream_port(settings_for: Callable[..., server.Settings]) -> int:
    return urlsplit(settings_for().base_url).port  # type: ignore[return-value]


@pytest.mark.parametrize("capture", ["true", ""], ids=["opted-in", "default"])
def test_spans_hold_messages_and_tool_arguments_only_when_the_user_opts_in(
    settings_for: Callable[..., server.Settings],
    upstream: FakeModelAPI,
    collector: tuple[TraceCollector, Any],
    capture: str,
) -> None:
    received, receiver = collector
    upstream.reset(Reply(tool_calls=[("calculate", {"expression": "6*7"})]), Reply(content="它是 42"))
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.url + "/v1/traces",
           "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": capture}  # fmt: skip
    with ServerThread(server.create_app(settings_for(**env))) as service:
        assert httpx.post(service.url + "/api/chat", json={"message": "6*7 是多少？"}, timeout=10).status_code == 200
    assert wait_until(lambda: len(received.named("invoke_agent")) == 1 and received.named("execute_tool"))
    [turn], [tool] = received.named("invoke_agent"), received.named("execute_tool")
    content = {key: value for span in (turn, tool) for key, value in span["attributes"].items()
               if key.endswith(("messages", "arguments", "result"))}  # fmt: skip
    expected = {
        "gen_ai.input.messages": [{"role": "user", "parts": [{"type": "text", "content": "6*7 是多少？"}]}],
        "gen_ai.output.messages": [{"role": "assistant", "parts": [{"type": "text", "content": "它是 42"}]}],
        "gen_ai.tool.call.arguments": {"expression": "6*7"},
        "gen_ai.tool.call.result": "42",
    }
    decoded = {key: value if key.endswith("result") else json.loads(value) for key, value in content.items()}
    assert decoded == (expected if capture else {})


def test_without_an_endpoint_nothing_of_the_opentelemetry_sdk_is_loaded(
    settings_for: Callable[..., server.Settings], upstream: FakeModelAPI, tmp_path: Path
) -> None:
    code = """if True:
        import json, sys, warnings
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
        import server
        settings = server.Settings.from_env(json.loads(sys.argv[1]))
        with TestClient(server.create_app(settings)) as client:
            assert client.post("/api/chat", json={"message": "hi"}).json()["message"] == "echo: hi"
        print(sorted(name for name in sys.modules if name.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))))
    """
    env = {**process_env(settings_for), "DATABASE_PATH": str(tmp_path / "chat.db")}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(env)], cwd=HERE, capture_output=True, text=True,
                         check=True, env={k: v for k, v in os.environ.items() if k not in ENV_NAMES})  # fmt: skip
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "env, endpoint",
    [({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http://collector:4318/v1/traces"),
     ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
       "https://traces.example/otlp"}, "https://traces.example/otlp"), ({}, None)],
    ids=["base", "traces", "none"],
)  # fmt: skip
def test_traces_go_to_the_traces_endpoint_as_set_else_under_the_base_endpoint(
    env: dict[str, str], endpoint: str | None
) -> None:
    assert server.Settings.from_env(env).traces_endpoint == endpoint


# ---------------------------------------------------------------------------
# The chat page, in a real browser
# ---------------------------------------------------------------------------


def textbox(page: Page) -> Any:
    return page.get_by_role("textbox", name="Message")


def send_message(page: Page, text: str) -> None:
    textbox(page).fill(text)
    textbox(page).press("Enter")


def chat_via_api(url: str, message: str, conversation_id: str) -> None:
    response = httpx.post(url + "/api/chat", json={"message": message, "conversation_id": conversation_id}, timeout=10)
    assert response.status_code == 200


def stored_messages(url: str, conversation_id: str) -> list[dict[str, Any]]:
    return httpx.get(f"{url}/api/conversations/{conversation_id}", timeout=10).json()["messages"]


def test_chat_page_is_served_with_a_policy_that_runs_only_its_own_script(client: TestClient) -> None:
    path = "/chat"
    response = client.get(path)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-cache"
    policy = response.headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy.split("style-src")[0]
    again = client.get(path, headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304 and again.headers["content-security-policy"] == policy
    assert client.get("/").json()["chat_page"] == "/chat"


def test_the_chat_page_is_not_served_under_static_where_its_api_paths_would_break(client: TestClient) -> None:
    # Its API paths are relative to the page: under /static/ they would be /static/api/...
    assert client.get("/static/chat.html").status_code == 404


def test_page_shows_the_answer_while_the_model_is_still_streaming(
    tab: Tab, service: ServerThread, upstream: FakeModelAPI
) -> None:
    page = tab.page
    upstream.reset(Reply(content="first second third fourth", fault="hold"))
    page.goto(tab.url + "/chat")
    send_message(page, "hi")
    assert wait_until(lambda: upstream.hanging == 1)
    answer = page.locator(".answer")
    expect(answer).to_have_text("first second")  # while the model holds its stream open
    expect(page.get_by_role("status")).to_have_text("Writing…")
    expect(textbox(page)).to_be_disabled()
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    upstream.end_hang()
    expect(answer).to_have_text("first second third fourth")
    expect(textbox(page)).to_be_enabled()
    expect(textbox(page)).to_be_focused()


def test_page_shows_thinking_tool_cards_and_markdown(tab: Tab, service: ServerThread, upstream: FakeModelAPI) -> None:
    page = tab.page
    chat_via_api(service.url, "Plan a weekend in Hangzhou", "older")
    chat_via_api(service.url, "What time is it in Tokyo?", "old")
    upstream.reset(
        Reply(
            reasoning="The user wants a product and the time on Mars.",
            tool_calls=[("calculate", {"expression": "6 * 7"}), ("get_current_time", {"timezone": "Mars/Base"})],
        ),
        Reply(content="6 × 7 is **42**; Mars has *no* time zone.\n\n- `calculate` worked\n- the clock did not"),
    )
    page.goto(tab.url + "/chat")
    send_message(page, "What is 6 × 7, and what time is it on Mars?")
    answer = page.locator(".answer")
    expect(answer.locator("strong")).to_have_text("42")
    thought = page.locator("details.thought")
    expect(thought).to_contain_text("The user wants a product and the time on Mars.")
    expect(thought.locator(".thought-text")).to_be_hidden()  # folded once the answer began
    thought.locator("summary").click()
    expect(thought.locator(".thought-text")).to_be_visible()
    calculator, clock = page.locator(".tool").all()
    expect(calculator.locator(".tool-name")).to_have_text("calculate")
    expect(calculator.locator(".arguments")).to_contain_text('"expression": "6 * 7"')
    expect(calculator.locator(".result")).to_have_text("Result: 42")
    expect(calculator).not_to_have_class(re.compile("error"))
    expect(clock.locator(".tool-name")).to_have_text("get_current_time")
    expect(clock).to_have_class(re.compile("error"))
    expect(clock.locator(".tool-state")).to_have_text("error")
    expect(clock.locator(".result")).to_contain_text("Mars/Base")
    expect(answer.locator("em")).to_have_text("no")
    expect(answer.locator("li code")).to_have_text("calculate")
    expect(page.locator("#conversations li a")).to_have_text(
        ["What is 6 × 7, and what time is it on Mars?", "What time is it in Tokyo?", "Plan a weekend in Hangzhou"]
    )


def test_the_page_speaks_chinese_to_a_chinese_browser(
    chromium: Chromium, service: ServerThread, upstream: FakeModelAPI, tmp_path: Path
) -> None:
    chat_via_api(service.url, "周末去杭州怎么安排？", "older")
    chat_via_api(service.url, "东京现在几点？", "old")
    upstream.reset(
        Reply(
            reasoning="用户想知道 6 × 7，还想知道火星上的时间。",
            tool_calls=[("calculate", {"expression": "6 * 7"}), ("get_current_time", {"timezone": "Mars/Base"})],
        ),
        Reply(content="6 × 7 = **42**。\n\n- `calculate` 算出了结果\n- 火星没有 *IANA 时区*，查不到时间"),
    )
    tab = chromium.open(service.url, locale="zh-CN")
    page = tab.page
    page.goto(tab.url + "/chat")
    expect(page.locator("html")).to_have_attribute("lang", "zh-CN")
    message = page.get_by_role("textbox", name="消息")
    expect(message).to_have_attribute("placeholder", "给智能体发消息（Enter 发送，Shift+Enter 换行）")
    message.fill("6 × 7 是多少？火星上现在几点？")
    message.press("Enter")
    expect(page.locator(".answer strong")).to_have_text("42")
    expect(page.locator("details.thought summary")).to_have_text("思考过程")
    expect(page.locator(".tool .result").first).to_have_text("结果：42")
    expect(page.locator(".tool.error .tool-state")).to_have_text("出错")
    expect(page.get_by_role("button", name="新对话")).to_be_visible()
    expect(page.get_by_role("button", name="删除“东京现在几点？”")).to_be_attached()
    page.locator("details.thought summary").click()
    # README_SCREENSHOT=static/screenshot.png pytest -k chinese_browser renews the README's picture.
    target = os.environ.get("README_SCREENSHOT")
    if target and not subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True).stdout.strip():
        pytest.fail(
            "README_SCREENSHOT needs a Chinese font, or the picture shows boxes: apt-get install fonts-wqy-zenhei"
        )
    page.screenshot(path=HERE / target if target else tmp_path / "chat.png")


@pytest.mark.parametrize(
    "content",
    [
        '<img src=x onerror="window.pwned=1">',
        "<script>window.pwned=1</script>",
        "[click](javascript:window.pwned=1)",
        '**<b onmouseover="window.pwned=1">bold</b>**',
    ],
    ids=["img-onerror", "script", "javascript-link", "html-inside-markdown"],
)
def test_html_in_an_answer_shows_as_text_live_and_from_history(
    tab: Tab, service: ServerThread, upstream: FakeModelAPI, content: str
) -> None:
    page = tab.page
    upstream.reset(Reply(content=content))
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: dialogs.append(dialog.message))
    page.goto(tab.url + "/chat")
    send_message(page, "say it")
    answer = page.locator(".answer")
    for _ in range(2):  # as it streams in, then as stored history after a reload
        expect(answer).to_contain_text(content.replace("**", ""))
        assert answer.locator("img, script, a, b").count() == 0
        assert page.evaluate("window.pwned") is None
        page.reload()
    assert dialogs == []


def test_a_reload_or_the_shared_link_reopens_the_conversation_with_its_history(
    tab: Tab, chromium: Chromium, service: ServerThread, upstream: FakeModelAPI
) -> None:
    page = tab.page
    upstream.reset(
        Reply(reasoning="Add them.", tool_calls=[("calculate", {"expression": "2 + 3"})]),
        Reply(content="It is `5`."),
        Reply(content="Then 6."),
    )
    page.goto(tab.url + "/chat")
    send_message(page, "What is 2 + 3?")
    expect(page.locator(".answer")).to_have_text("It is 5.")
    send_message(page, "And one more?")
    expect(page.locator(".answer").nth(1)).to_have_text("Then 6.")
    expect(page).to_have_url(re.compile(r"/chat\?c=[0-9a-f-]{36}$"))
    shared = chromium.open(service.url).page  # another browser: no storage in common
    for opened in (page, shared):
        opened.reload() if opened is page else opened.goto(page.url)
        expect(opened.locator(".user .bubble")).to_have_text(["What is 2 + 3?", "And one more?"])
        expect(opened.locator("details.thought")).to_contain_text("Add them.")
        expect(opened.locator(".tool .result")).to_have_text("Result: 5")
        expect(opened.locator(".answer")).to_have_text(["It is 5.", "Then 6."])
        expect(opened.locator(".answer code")).to_have_text("5")
        expect(opened.locator("#conversations li.current")).to_have_text("What is 2 + 3?×")


def test_delete_asks_first_and_removes_the_conversation_from_the_list(
    tab: Tab, service: ServerThread, upstream: FakeModelAPI
) -> None:
    page = tab.page
    chat_via_api(service.url, "keep me", "keep")
    chat_via_api(service.url, "drop me", "drop")
    page.goto(tab.url + "/chat?c=drop")
    items = page.locator("#conversations li a")
    expect(items).to_have_text(["drop me", "keep me"])  # newest first
    delete = page.get_by_role("button", name="Delete “drop me”")
    page.once("dialog", lambda dialog: dialog.dismiss())
    delete.click()
    expect(items).to_have_text(["drop me", "keep me"])
    page.once("dialog", lambda dialog: dialog.accept())
    delete.click()
    expect(items).to_have_text(["keep me"])
    assert httpx.get(service.url + "/api/conversations/drop").status_code == 404
    expect(page).to_have_url(tab.url + "/chat")  # the open conversation was the deleted one
    page.reload()
    expect(items).to_have_text(["keep me"])


def test_stop_aborts_the_turn_and_leaves_the_stored_conversation_unchanged(
    tab: Tab, service: ServerThread, upstream: FakeModelAPI
) -> None:
    page = tab.page
    upstream.reset(Reply(content="saved"), Reply(content="never finished at all", fault="hold"))
    chat_via_api(service.url, "first", "s")
    before = stored_messages(service.url, "s")
    page.goto(tab.url + "/chat?c=s")
    expect(page.locator(".answer")).to_have_text("saved")
    send_message(page, "second")
    expect(page.locator(".answer").nth(1)).to_have_text("never finished")
    assert wait_until(lambda: upstream.hanging == 1)
    page.get_by_role("button", name="Stop").click()
    expect(page.locator(".notice")).to_have_text("Stopped. Nothing of this turn was saved.")
    assert upstream.disconnected.wait(5), "the model request was not closed"
    assert wait_until(lambda: not service.app_ctx.turns)
    assert stored_messages(service.url, "s") == before
    expect(textbox(page)).to_be_enabled()
    expect(textbox(page)).to_have_value("second")  # kept, to send again


def test_the_page_asks_once_for_the_server_key_and_sends_it_as_a_bearer(
    chromium: Chromium, settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    with ServerThread(server.create_app(settings_for(SERVER_API_KEY=SERVER_KEY))) as service:
        tab = chromium.open(service.url)
        page = tab.page
        page.goto(tab.url + "/chat")
        key = page.get_by_role("textbox", name="This server needs its key (SERVER_API_KEY):")
        expect(key).to_be_visible()
        key.fill(SERVER_KEY)
        key.press("Enter")
        expect(page.locator("#list-end")).to_have_text("No conversations yet.")
        send_message(page, "hi")
        expect(page.locator(".answer")).to_have_text("echo: hi")
        assert page.evaluate("localStorage.getItem('autogen-chat.server-key')") == SERVER_KEY
        page.reload()
        expect(page.locator("#conversations li a")).to_have_text(["hi"])
        expect(page.locator(".answer")).to_have_text("echo: hi")
        expect(key).to_be_hidden()
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    "locale, banner",
    [("en-US", "Demo model: no API_KEY is set"), ("zh-CN", "演示模型：没有设置 API_KEY")],
    ids=["english", "chinese"],
)
def test_without_an_api_key_the_page_says_the_demo_model_answers_in_the_browsers_language(
    chromium: Chromium, settings_for: Callable[..., server.Settings], locale: str, banner: str
) -> None:
    with ServerThread(server.create_app(settings_for(API_KEY=""))) as service:
        tab = chromium.open(service.url, locale=locale)
        tab.page.goto(tab.url + "/chat")
        expect(tab.page.locator("#banner")).to_contain_text(banner)
        tab.page.locator("#input").fill("(2+3)*4?")
        tab.page.locator("#input").press("Enter")
        expect(tab.page.locator(".tool-name")).to_have_text("calculate")
        expect(tab.page.locator(".answer")).to_contain_text("20")


@pytest.mark.parametrize("width, short", [(390, True), (1100, False)], ids=["phone", "desktop"])
def test_the_composers_placeholder_fits_on_one_line_at_any_width(
    chromium: Chromium, service: ServerThread, width: int, short: bool
) -> None:
    tab = chromium.open(service.url, viewport={"width": width, "height": 800})
    tab.page.goto(tab.url + "/chat")
    fits = tab.page.evaluate("""() => {
        const input = document.getElementById("input"), style = getComputedStyle(input);
        const measure = document.createElement("canvas").getContext("2d");
        measure.font = style.font;
        const room = input.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
        return [input.placeholder, measure.measureText(input.placeholder).width <= room];
    }""")  # fmt: skip
    assert fits == ["Message the agent" if short else "Message the agent (Enter sends, Shift+Enter adds a line)", True]
    expect(tab.page.locator("#banner")).to_be_hidden()


class ScriptedStream:
    """POST /api/chat/stream answered with the bytes a test writes, each part in a write of its own."""

    def __init__(self) -> None:
        self.parts: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def endpoint(self, request: Request) -> StreamingResponse:
        async def body() -> Any:
            while (part := await self.parts.get()) is not None:
                yield part

        return StreamingResponse(body(), media_type="text/event-stream")


def sse_bytes(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(
        f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode() for name, data in events
    )


# No message event: the answer must come whole from the chunks alone.
SCRIPTED_TURN = sse_bytes(
    ("status", {"status": "started", "conversation_id": "scripted"}),
    ("chunk", {"content": "Hello 世界"}),
    ("tool_call", {"id": "c1", "name": "calculate", "arguments": '{"expression": "1 + 1"}'}),
    ("tool_result", {"call_id": "c1", "name": "calculate", "content": "2", "is_error": False}),
    ("chunk", {"content": "Then"}),
    ("chunk", {"content": " **more**"}),
    ("done", {"conversation_id": "scripted", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}),
)
FIRST_EVENT_END = SCRIPTED_TURN.index(b"\n\n") + 2
CRLF_TURN = SCRIPTED_TURN.replace(b"\n", b"\r\n")  # what the SSE spec allows, though this server never sends it


@pytest.mark.parametrize(
    "stream, cut",
    [
        (SCRIPTED_TURN, None),
        (SCRIPTED_TURN, SCRIPTED_TURN.index("世".encode()) + 1),
        (SCRIPTED_TURN, SCRIPTED_TURN.index(b"\n\n", FIRST_EVENT_END) + 1),
        (SCRIPTED_TURN, SCRIPTED_TURN.index(b"data:", FIRST_EVENT_END) + 2),
        (CRLF_TURN, CRLF_TURN.index(b"event: tool_call\r") + len(b"event: tool_call\r")),
    ],
    ids=[
        "all-events-in-one-read",
        "split-inside-a-character",
        "split-between-the-two-newlines",
        "split-in-a-field",
        "crlf-split-between-cr-and-lf",
    ],
)
def test_the_page_reads_events_however_the_stream_is_cut_into_reads(
    chromium: Chromium, settings_for: Callable[..., server.Settings], stream: bytes, cut: int | None
) -> None:
    scripted = ScriptedStream()
    app = server.create_app(settings_for())
    app.router.routes.insert(0, Route("/api/chat/stream", scripted.endpoint, methods=["POST"]))
    with ServerThread(app) as service:
        tab = chromium.open(service.url)
        page = tab.page
        page.goto(tab.url + "/chat")
        send_message(page, "hi")
        if cut is not None:
            service.call(scripted.parts.put(stream[:cut]))
            # The first event has been read: the rest can only come in a later read.
            expect(page).to_have_url(re.compile(r"\?c=scripted$"))
        service.call(scripted.parts.put(stream[cut:]))
        service.call(scripted.parts.put(None))
        expect(page.locator(".answer")).to_have_text(["Hello 世界", "Then more"])
        expect(page.locator(".answer strong")).to_have_text("more")
        expect(page.locator(".tool .result")).to_have_text("Result: 2")
        expect(textbox(page)).to_be_enabled()
        expect(page.locator(".notice")).to_have_count(0)


def test_enter_sends_and_shift_enter_starts_a_new_line(tab: Tab, service: ServerThread, upstream: FakeModelAPI) -> None:
    page = tab.page
    page.goto(tab.url + "/chat")
    textbox(page).type("line one")
    textbox(page).press("Shift+Enter")
    textbox(page).type("line two")
    expect(page.locator(".user")).to_have_count(0)
    textbox(page).press("Enter")
    expect(page.locator(".user .bubble")).to_have_text("line one\nline two")
    expect(page.locator(".answer br")).to_have_count(1)
    assert page.locator(".answer").inner_html() == "<p>echo: line one<br>line two</p>"


def test_a_busy_conversation_and_a_too_long_message_get_clear_messages(
    chromium: Chromium, settings_for: Callable[..., server.Settings], upstream: FakeModelAPI
) -> None:
    upstream.reset(Reply(content="a b c d", fault="hang"))
    with ServerThread(server.create_app(settings_for(MAX_MESSAGE_CHARS="20"))) as service:
        tab = chromium.open(service.url)
        page = tab.page
        with held_stream(service.url, {"message": "x", "conversation_id": "b"}, upstream):
            page.goto(tab.url + "/chat?c=b")
            send_message(page, "again")
            expect(page.locator(".notice.error")).to_have_text(
                "This conversation is still answering another message; try again in a moment."
            )
        send_message(page, "a message longer than twenty characters")
        expect(page.locator(".notice.error").nth(1)).to_have_text(
            "The request was not accepted: 'message' is longer than MAX_MESSAGE_CHARS (20)."
        )


def test_a_malformed_conversation_link_gets_a_clear_message(tab: Tab, service: ServerThread) -> None:
    page = tab.page
    page.goto(tab.url + "/chat?c=not%20an%20id")
    expect(page.locator(".notice.error")).to_have_text(
        "The request was not accepted: 'conversation_id' must match ^[A-Za-z0-9_.:-]{1,128}$"
        " and be neither '.' nor '..'."
    )


def test_the_conversation_list_pages_in_more_as_it_is_scrolled(
    tab: Tab, service: ServerThread, upstream: FakeModelAPI
) -> None:
    page = tab.page
    for index in range(25):
        chat_via_api(service.url, f"conversation {index}", f"c{index}")
    page.goto(tab.url + "/chat")
    items = page.locator("#conversations li a")
    expect(items).to_have_count(20)
    expect(items.first).to_have_text("conversation 24")
    page.locator("#list-end").scroll_into_view_if_needed()
    expect(items).to_have_count(25)
    expect(items.last).to_have_text("conversation 0")


def test_at_phone_width_the_list_opens_from_a_menu_and_nothing_scrolls_sideways(
    chromium: Chromium, service: ServerThread, upstream: FakeModelAPI
) -> None:
    chat_via_api(service.url, "on the phone", "phone")
    tab = chromium.open(service.url, viewport={"width": 375, "height": 700}, is_mobile=True)
    page = tab.page
    page.goto(tab.url + "/chat")
    conversation = page.get_by_role("link", name="on the phone")
    expect(conversation).not_to_be_in_viewport()
    expect(textbox(page)).to_be_in_viewport()
    menu = page.get_by_role("button", name="Conversations")
    menu.click()
    expect(menu).to_have_attribute("aria-expanded", "true")
    expect(conversation).to_be_in_viewport()
    conversation.click()
    expect(page.locator(".answer")).to_have_text("echo: on the phone")
    expect(conversation).not_to_be_in_viewport()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


MARKDOWN = [
    ("plain <b>text</b> & more", "<p>plain &lt;b&gt;text&lt;/b&gt; &amp; more</p>"),
    ("line one\nline two\n\nnext", "<p>line one<br>line two</p><p>next</p>"),
    ("**bold**, *it*, _it_, snake_case_name, ~~gone~~",
     "<p><strong>bold</strong>, <em>it</em>, <em>it</em>, snake_case_name, <del>gone</del></p>"),
    ("a `<i>code</i>` b", "<p>a <code>&lt;i&gt;code&lt;/i&gt;</code> b</p>"),
    ("```html\n<script>x()</script>\n\n**not bold**\n```",
     '<pre><code class="language-html">&lt;script&gt;x()&lt;/script&gt;\n\n**not bold**</code></pre>'),
    ("```\nstill streaming", "<pre><code>still streaming</code></pre>"),
    ("- one\n- **two**\n  - nested", "<ul><li>one</li><li><strong>two</strong><ul><li>nested</li></ul></li></ul>"),
    ("3. three\n4. four", '<ol start="3"><li>three</li><li>four</li></ol>'),
    ("[docs](https://example.com/a?b=1&c=2)",
     '<p><a href="https://example.com/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer nofollow">docs</a></p>'),
    ("see https://example.com/x.",
     ('<p>see <a href="https://example.com/x" target="_blank" rel="noopener noreferrer nofollow">'
     "https://example.com/x</a>.</p>")),
    ("[see https://a.example](https://b.example)",
     '<p><a href="https://b.example/" target="_blank" rel="noopener noreferrer nofollow">see https://a.example</a></p>'),
    ("[x](javascript:alert(1)) [y](data:text/html,hi) [z](ftp://h/)",
     "<p>[x](javascript:alert(1)) [y](data:text/html,hi) [z](ftp://h/)</p>"),
    ("## Title\n> quoted", "<h4>Title</h4><blockquote><p>quoted</p></blockquote>"),
    ("| a | b |\n|---|---|\n| 1 | `2` |",
     "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody><tr><td>1</td><td><code>2</code></td></tr></tbody></table>"),
    ("\\*not italic\\*", "<p>*not italic*</p>"),
    ("a *b *c and **d", "<p>a *b *c and **d</p>"),
    ("text\n---\nmore", "<p>text</p><hr><p>more</p>"),
]  # fmt: skip


def test_markdown_renders_the_common_forms_and_never_html(tab: Tab, service: ServerThread) -> None:
    page = tab.page
    page.goto(tab.url + "/chat")
    rendered = [
        page.evaluate(
            "text => { const box = document.createElement('div'); box.append(renderMarkdown(text)); "
            "return box.innerHTML; }",
            text,
        )
        for text, _ in MARKDOWN
    ]
    assert rendered == [html for _, html in MARKDOWN]


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_the_page_asks_before_an_mcp_tool_acts_and_shows_the_decision_after_a_reload(
    chromium: Chromium,
    settings_for: Callable[..., server.Settings],
    upstream: FakeModelAPI,
    mcp_file: Path,
    tmp_path: Path,
    decision: str,
) -> None:
    target = tmp_path / "written.txt"
    config = mcp_config(tmp_path, {"files": stdio_server(mcp_file)})
    upstream.reset(Reply(tool_calls=[("files__write_file", {"path": str(target), "text": "hi"})]),
                   Reply(content="Done as you said."))  # fmt: skip
    with ServerThread(server.create_app(settings_for(MCP_CONFIG=config))) as service:
        page = chromium.open(service.url).page
        page.goto(chromium.tabs[0].url + "/chat")
        send_message(page, "write the file")
        card = page.locator(".tool")
        expect(card.locator(".tool-state")).to_have_text("needs your approval")
        expect(card.locator(".tool-server")).to_have_text("files")
        assert not target.exists()
        card.get_by_role("button", name=decision.title()).click()
        shown = "approved · done" if decision == "approve" else "denied"
        expect(card.locator(".tool-state")).to_have_text(shown)
        expect(page.locator(".answer")).to_have_text("Done as you said.")
        expect(card.locator("button")).to_have_count(0)
        page.reload()
        expect(page.locator(".tool .tool-state")).to_have_text(shown)
    assert target.exists() is (decision == "approve")


def test_the_page_shows_text_beside_a_tool_call_before_its_card_once_live_and_after_a_reload(
    tab: Tab, service: ServerThread, upstream: FakeModelAPI
) -> None:
    page = tab.page
    upstream.reset(Reply(content="Let me check.", tool_calls=[("calculate", {"expression": "6*7"})]),
                   Reply(content="It is 42."))  # fmt: skip
    page.goto(tab.url + "/chat")
    send_message(page, "6*7?")
    for _ in ("live", "reloaded"):
        expect(page.locator(".msg.assistant .answer, .msg.assistant .tool-name")).to_have_text(
            ["Let me check.", "calculate", "It is 42."]
        )
        page.reload()


DEEP_MARKDOWN = {
    "quotes": ">" * 100_000 + " deep",
    "lists": "\n".join("  " * level + "- deep" for level in range(3000)),
    "emphasis": "**_" * 20_000 + "deep" + "_**" * 20_000,
}


@pytest.mark.parametrize("text", DEEP_MARKDOWN.values(), ids=DEEP_MARKDOWN.keys())
def test_deeply_nested_markdown_renders_as_text_past_a_depth_and_never_fails_the_page(
    tab: Tab, service: ServerThread, text: str
) -> None:
    page = tab.page
    page.goto(tab.url + "/chat")
    script = "text => { const box = document.createElement('div'); box.append(renderMarkdown(text)); return box; }"
    assert "deep" in page.evaluate_handle(script, text).evaluate("box => box.textContent")


def test_an_answer_nested_deeper_than_the_renderer_goes_is_shown_saved_and_reopened(
    tab: Tab, service: ServerThread, upstream: FakeModelAPI
) -> None:
    page = tab.page
    upstream.reset(Reply(content=">" * 50_000 + " deep"))
    page.goto(tab.url + "/chat")
    send_message(page, "nest")
    expect(page.locator(".answer").last).to_contain_text("deep")
    expect(page.locator(".notice.error")).to_have_count(0)
    expect(textbox(page)).to_have_value("")  # saved: not put back to send again
    page.reload()
    expect(page.locator(".answer").last).to_contain_text("deep")


@pytest.mark.parametrize(
    "reply, notice, saved",
    [
        (Reply(content="a b c d", fault="error_event"), "The model API failed: overloaded", False),
        (Reply(content="a b c d", finish_reason="length"), "The answer was cut off at the model's length limit.", True),
    ],
    ids=["error-event", "cut-at-the-length-limit"],
)
def test_an_error_event_or_a_cut_answer_is_explained_in_the_conversation(
    tab: Tab, service: ServerThread, upstream: FakeModelAPI, reply: Reply, notice: str, saved: bool
) -> None:
    page = tab.page
    upstream.reset(reply)
    page.goto(tab.url + "/chat")
    send_message(page, "hi")
    expect(page.locator(".notice")).to_have_text(notice)
    expect(page.locator(".answer")).to_contain_text("a b")
    expect(textbox(page)).to_have_value("" if saved else "hi")  # unsaved: kept to send again
    expect(page.locator("#conversations li")).to_have_count(1 if saved else 0)


def test_what_start_up_built_is_frozen_out_of_the_garbage_collectors_full_passes(client: TestClient) -> None:
    # A full pass over the ~110 000 objects of AutoGen, pydantic and the SDKs stalls every open stream for ~70 ms.
    assert gc.get_freeze_count() > 50_000
