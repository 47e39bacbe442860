"""A self-hostable chat backend: an AutoGen agent behind a tiny HTTP API, streamed as SSE.

One AutoGen ``AssistantAgent`` talks to any OpenAI-compatible chat API (DeepSeek by
default; OpenAI, Azure OpenAI, Ollama, LM Studio by ``BASE_URL``). Conversations are
kept in SQLite by ``conversation_id``. Settings come from the environment and ``.env``.

Run:

    pip install -r requirements.txt
    python server.py

Try:

    curl -N localhost:8000/api/chat/stream -d '{"message": "现在东京几点？"}'
"""

from __future__ import annotations

import ast
import asyncio
import functools
import hmac
import ipaddress
import json
import logging
import math
import operator
import os
import re
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring  # json's own C escaper, as with ensure_ascii=False
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import httpx
import openai
import pydantic
import uvicorn
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import (
    ModelClientStreamingChunkEvent,
    TextMessage,
    ToolCallExecutionEvent,
    ToolCallRequestEvent,
    ToolCallSummaryMessage,
)
from autogen_core import CancellationToken
from autogen_core.model_context import BufferedChatCompletionContext, ChatCompletionContextState
from autogen_core.models import LLMMessage, ModelInfo, UserMessage
from autogen_core.tools import FunctionTool, ToolSchema
from autogen_ext.models.openai import OpenAIChatCompletionClient
from autogen_ext.models.openai import _model_info as autogen_model_info
from dotenv import dotenv_values
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

__version__ = "1.0.0"

logger = logging.getLogger("autogen_chat")

# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

DEFAULT_SYSTEM_MESSAGE = (
    "You are a helpful assistant. Answer in the user's language. "
    "Use the tools when they help: get_current_time for dates and times, "
    "calculate for arithmetic."
)
CONVERSATION_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")

# AutoGen only knows OpenAI's model names; these are the DeepSeek ones it must be told about.
KNOWN_MODEL_INFO: dict[str, ModelInfo] = {
    "deepseek-chat": ModelInfo(
        vision=False, function_calling=True, json_output=True, family="unknown", structured_output=False
    ),
    "deepseek-reasoner": ModelInfo(
        vision=False, function_calling=False, json_output=True, family="r1", structured_output=False
    ),
}
DEFAULT_MODEL_INFO = ModelInfo(
    vision=False, function_calling=True, json_output=False, family="unknown", structured_output=False
)
MODEL_INFO_FLAGS = {
    "MODEL_VISION": "vision",
    "MODEL_FUNCTION_CALLING": "function_calling",
    "MODEL_JSON_OUTPUT": "json_output",
    "MODEL_STRUCTURED_OUTPUT": "structured_output",
}


class SettingsError(ValueError):
    """A setting has a value the server cannot run with; the message names it."""


def _env_number(env: Mapping[str, str], name: str, default: float, minimum: float = 0) -> Any:
    """A whole number when the default is one, else any number; at least `minimum`."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    kind = type(default)
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a {'whole ' if kind is int else ''}number") from None
    if not math.isfinite(value) or value < minimum:
        raise SettingsError(f"{name}={raw!r} must be a number of at least {minimum}")
    return value


def _env_bool(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return None
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{name}={raw!r} must be true or false")


def _env_url(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise SettingsError(f"{name}={raw!r} is not an http(s) URL")
    return raw


def _model_info(env: Mapping[str, str], model: str) -> ModelInfo:
    """DeepSeek's or AutoGen's own info for the model, else a default; MODEL_* override."""
    info = KNOWN_MODEL_INFO.get(model)
    if info is None:
        try:
            # Private in 0.7.5, but the only way to ask AutoGen what it knows.
            info = autogen_model_info.get_info(model)
        except (KeyError, ValueError):
            info = DEFAULT_MODEL_INFO
    info = ModelInfo(**info)
    for name, key in MODEL_INFO_FLAGS.items():
        flag = _env_bool(env, name)
        if flag is not None:
            info[key] = flag  # type: ignore[literal-required]
    info["family"] = env.get("MODEL_FAMILY", "").strip() or info["family"]
    return info


def _tool_names(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("TOOLS")
    names = tuple(TOOLS) if raw is None else tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = [name for name in names if name not in TOOLS]
    if unknown:
        raise SettingsError(f"TOOLS={raw!r} names unknown tools {unknown}; known: {list(TOOLS)}")
    return names


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None
    model_name: str = "deepseek-chat"
    base_url: str = "https://api.deepseek.com"
    host: str = "0.0.0.0"
    port: int = 8000
    system_message: str = DEFAULT_SYSTEM_MESSAGE
    database_path: str = "conversations.db"
    max_history_messages: int = 40
    cors_origins: tuple[str, ...] = ("*",)
    request_timeout: float = 60.0
    max_retries: int = 2
    ping_interval: float = 15.0
    tools: tuple[str, ...] = ("get_current_time", "calculate")
    model_info: Mapping[str, Any] = field(default_factory=lambda: dict(KNOWN_MODEL_INFO["deepseek-chat"]))
    max_message_chars: int = 32000
    max_body_bytes: int = 256 * 1024
    server_api_key: str | None = None
    shutdown_grace_seconds: float = 10.0
    lease_seconds: float = 90.0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        model = env.get("MODEL_NAME", "").strip() or cls.model_name
        log_level = env.get("LOG_LEVEL", "").strip().upper() or cls.log_level
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingsError(f"LOG_LEVEL={log_level!r} must be DEBUG, INFO, WARNING or ERROR")
        origins = tuple(o.strip() for o in env.get("CORS_ORIGINS", "*").split(",") if o.strip())
        return cls(
            api_key=env.get("API_KEY", "").strip() or None,
            model_name=model,
            base_url=_env_url(env, "BASE_URL", cls.base_url),
            host=env.get("HOST", "").strip() or cls.host,
            port=_env_number(env, "PORT", cls.port, 1),
            system_message=env.get("SYSTEM_MESSAGE", "").strip() or DEFAULT_SYSTEM_MESSAGE,
            database_path=env.get("DATABASE_PATH", "").strip() or cls.database_path,
            max_history_messages=_env_number(env, "MAX_HISTORY_MESSAGES", cls.max_history_messages, 1),
            cors_origins=origins,
            request_timeout=_env_number(env, "REQUEST_TIMEOUT", cls.request_timeout, 0.001),
            max_retries=_env_number(env, "MAX_RETRIES", cls.max_retries),
            ping_interval=_env_number(env, "PING_INTERVAL", cls.ping_interval, 0.001),
            tools=_tool_names(env),
            model_info=_model_info(env, model),
            max_message_chars=_env_number(env, "MAX_MESSAGE_CHARS", cls.max_message_chars, 1),
            max_body_bytes=_env_number(env, "MAX_BODY_BYTES", cls.max_body_bytes, 64),
            server_api_key=env.get("SERVER_API_KEY", "").strip() or None,
            shutdown_grace_seconds=_env_number(env, "SHUTDOWN_GRACE_SECONDS", cls.shutdown_grace_seconds, 0.001),
            lease_seconds=_env_number(env, "LEASE_SECONDS", cls.lease_seconds, 0.001),
            log_level=log_level,
        )


def load_settings() -> Settings:
    """Settings from ``.env`` in the working directory, overridden by the real environment."""
    env = {k: v for k, v in dotenv_values(".env").items() if v is not None}
    env.update(os.environ)
    return Settings.from_env(env)


# ---------------------------------------------------------------------------
# Errors and SSE formatting
# ---------------------------------------------------------------------------

ERRORS: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "The request body is not valid JSON."),
    "unauthorized": (401, "Send the server key as 'Authorization: Bearer <SERVER_API_KEY>'."),
    "not_found": (404, "Not found."),
    "method_not_allowed": (405, "Method not allowed."),
    "conversation_busy": (409, "A turn of this conversation is still running; try again."),
    "payload_too_large": (413, "The request is too large."),
    "unsupported_media_type": (415, "Send the body as JSON (Content-Type: application/json)."),
    "validation_error": (422, "The request is not valid."),
    "upstream_rate_limited": (429, "The model API is rate limiting requests; try again later."),
    "internal_error": (500, "Internal server error."),
    "upstream_auth": (502, "The model API rejected the key: check API_KEY in .env."),
    "upstream_error": (502, "The model API failed to answer."),
    "upstream_unreachable": (502, "The model API cannot be reached: check BASE_URL in .env."),
    "upstream_incomplete": (502, "The model API ended its answer early; nothing was saved."),
    "model_not_found": (502, "The model API does not know this model."),
    "not_configured": (503, "The model is not configured: set API_KEY in .env and restart."),
    "server_shutting_down": (503, "The server is shutting down; try again shortly."),
    "upstream_timeout": (504, "The model API did not answer in time (REQUEST_TIMEOUT)."),
}


class ApiError(Exception):
    """An error for the client: a code from ERRORS, with an optional clearer message."""

    def __init__(self, code: str, message: str | None = None, retry_after: int | None = None):
        super().__init__(code)
        self.code = code
        self.status_code = ERRORS[code][0]
        self.message = message or ERRORS[code][1]
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after is not None:
            error["retry_after"] = self.retry_after
        return error

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        if self.code == "unauthorized":
            headers["WWW-Authenticate"] = "Bearer"
        content = {"status": "error", "error": self.body()}
        return JSONResponse(content, status_code=self.status_code, headers=headers)


class UpstreamIncomplete(Exception):
    """The model's stream ended without a finish reason: the answer was cut."""


def upstream_error(exc: BaseException, settings: Settings) -> ApiError:
    """Map a failure of the model API to a client error; never passes its text on."""
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return ApiError("upstream_auth")
    if isinstance(exc, openai.RateLimitError):
        wait = exc.response.headers.get("retry-after", "")
        return ApiError("upstream_rate_limited", retry_after=int(wait) if wait.isdigit() else None)
    if isinstance(exc, openai.NotFoundError):
        model = settings.model_name
        return ApiError("model_not_found", f"The model API does not know MODEL_NAME={model!r}.")
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
        return ApiError("upstream_timeout")
    if isinstance(exc, openai.APIConnectionError | httpx.ConnectError):
        return ApiError("upstream_unreachable")
    if isinstance(exc, UpstreamIncomplete):
        return ApiError("upstream_incomplete")
    if isinstance(exc, openai.APIError | httpx.HTTPError | json.JSONDecodeError):
        return ApiError("upstream_error")
    return ApiError("internal_error")


# One encoder for all: json.dumps() with any option builds a new encoder on every call.
dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # one line, Chinese readable

Event = tuple[str, dict[str, Any]]
PING: Event = ("ping", {})


def sse_event(event: Event) -> bytes:
    # JSON escapes newlines, so one data: line always carries the whole event.
    name, data = event
    if name in TEXT_EVENTS:  # one per token: skip the dict encoder
        return f'event: {name}\ndata: {{"content":{encode_basestring(data["content"])}}}\n\n'.encode()
    return SSE_PING if event is PING else f"event: {name}\ndata: {dumps(data)}\n\n".encode()


TEXT_EVENTS = {"chunk", "thought"}


SSE_PING = b": ping\n\n"
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 200
MAX_RESULT_BITS = 4096
BINARY_OPERATORS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY_OPERATORS: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def get_current_time(timezone: str = "UTC") -> str:
    """Current date and time in an IANA time zone such as 'Asia/Shanghai' or 'UTC'."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"Unknown time zone {timezone!r}; use an IANA name like 'Asia/Tokyo'.") from None
    now = datetime.now(zone)
    return f"{now.isoformat(timespec='seconds')} ({now.strftime('%A')}, {timezone})"


def calculate(expression: str) -> str:
    """Evaluate arithmetic: numbers, + - * / // % ** and parentheses, e.g. '(2 + 3) * 4 ** 2'."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"Expression too long (at most {MAX_EXPRESSION_CHARS} characters).")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"Not an arithmetic expression: {expression!r}") from None
    return str(_evaluate(tree.body))


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPERATORS:
        return UNARY_OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        # An int power is computed exactly, however long it takes: bound it before. A float
        # power overflows with an error instead.
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and abs(right) * left.bit_length() > MAX_RESULT_BITS:
            raise ValueError("Result too large.")
        try:
            result = BINARY_OPERATORS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("Division by zero.") from None
        except OverflowError:
            raise ValueError("Result too large.") from None
        if isinstance(result, complex) or _too_large(result):
            raise ValueError("Result too large or not a real number.")
        return result
    raise ValueError(f"Unsupported in arithmetic: {type(node).__name__}.")


def _too_large(value: int | float) -> bool:
    return value.bit_length() > MAX_RESULT_BITS if isinstance(value, int) else not math.isfinite(value)


TOOLS: dict[str, Callable[..., str]] = {"get_current_time": get_current_time, "calculate": calculate}


class Tool(FunctionTool):
    """A FunctionTool whose schema is built once: AutoGen 0.7.5 rebuilds it (a pydantic JSON
    schema, about 1 ms a tool) on every model call."""

    @functools.cached_property
    def schema(self) -> ToolSchema:  # type: ignore[override]
        return super().schema


def build_tools(names: tuple[str, ...]) -> list[FunctionTool]:
    return [Tool(TOOLS[name], description=TOOLS[name].__doc__ or name) for name in names]


# ---------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    state TEXT NOT NULL,
    message_count INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_update ON conversations (updated_at DESC, id);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
CREATE TABLE IF NOT EXISTS leases (
    conversation_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""


class Store:
    """Conversations in SQLite. Calls are synchronous: in WAL mode with synchronous=NORMAL
    each is well under a millisecond, cheaper than a hop to a thread."""

    def __init__(self, path: str) -> None:
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA busy_timeout=5000")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise SettingsError(f"DATABASE_PATH={path!r} cannot be opened or written: {exc}") from None

    def close(self) -> None:
        self.db.close()

    def ping(self) -> bool:
        try:
            self.db.execute("SELECT 1 FROM conversations LIMIT 1").fetchall()
        except sqlite3.Error:
            return False
        return True

    def acquire_lease(self, conversation_id: str, owner: str, seconds: float) -> bool:
        now = time.time()
        cursor = self.db.execute(
            "INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT (conversation_id) DO UPDATE"
            " SET owner = excluded.owner, expires_at = excluded.expires_at"
            " WHERE leases.expires_at < ?",
            (conversation_id, owner, now + seconds, now),
        )
        return cursor.rowcount == 1

    def renew_lease(self, conversation_id: str, owner: str, seconds: float) -> None:
        self.db.execute(
            "UPDATE leases SET expires_at = ? WHERE conversation_id = ? AND owner = ?",
            (time.time() + seconds, conversation_id, owner),
        )

    def release_lease(self, conversation_id: str, owner: str) -> None:
        self.db.execute("DELETE FROM leases WHERE conversation_id = ? AND owner = ?", (conversation_id, owner))

    def load_state(self, conversation_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT state FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def save_turn(
        self, conversation_id: str, state: Mapping[str, Any], messages: list[dict[str, Any]], lease: str
    ) -> None:
        """Store a completed turn, the agent's new state and the turn's messages, and release
        the turn's lease, in one transaction."""
        now = utc_now()
        with self._transaction() as db:
            row = db.execute("SELECT message_count FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
            seq = row[0] if row else 0
            title = messages[0].get("content", "")[:80]
            db.execute(
                "INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE"
                " SET state = excluded.state, message_count = excluded.message_count,"
                " updated_at = excluded.updated_at",
                (conversation_id, title, dumps(state), seq + len(messages), now, now),
            )
            db.execute("DELETE FROM leases WHERE conversation_id = ? AND owner = ?", (conversation_id, lease))
            db.executemany(
                "INSERT INTO messages VALUES (?, ?, ?)",
                [(conversation_id, seq + i, dumps(m)) for i, m in enumerate(messages)],
            )

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def list_conversations(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        rows = self.db.execute(
            "SELECT id, title, message_count, created_at, updated_at FROM conversations"
            " ORDER BY updated_at DESC, id LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        total = self.db.execute("SELECT count(*) FROM conversations").fetchone()[0]
        keys = ("conversation_id", "title", "message_count", "created_at", "updated_at")
        return [dict(zip(keys, row, strict=True)) for row in rows], total

    def get_conversation(self, conversation_id: str) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT id, title, created_at, updated_at FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            return None
        bodies = self.db.execute(
            "SELECT body FROM messages WHERE conversation_id = ? ORDER BY seq", (conversation_id,)
        ).fetchall()
        keys = ("conversation_id", "title", "created_at", "updated_at")
        return {**dict(zip(keys, row, strict=True)), "messages": [json.loads(b) for (b,) in bodies]}

    def delete_conversation(self, conversation_id: str) -> bool:
        cursor = self.db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
        return cursor.rowcount > 0


# ---------------------------------------------------------------------------
# Agent and turns
# ---------------------------------------------------------------------------


class Chunk(ChatCompletionChunk):
    """A streamed chunk parsed by pydantic's validator (about 4 us) instead of the SDK's
    pure-Python constructor (about 100 us, once the largest cost per token), which stays
    for chunks of unusual APIs that do not validate (say, an unknown finish reason)."""

    @classmethod
    def build(cls, *, response: httpx.Response, data: Any) -> ChatCompletionChunk:
        try:
            return ChatCompletionChunk.model_validate(data)
        except pydantic.ValidationError:
            return ChatCompletionChunk.construct(**data)


class ChatClient(OpenAIChatCompletionClient):
    """AutoGen's OpenAI client, reading the stream its own way. Per turn it posts AutoGen's
    request body as it is: the SDK's create() first walks every message through each of six
    message types to apply aliases chat messages do not have (0.25 ms a message, 10 ms a turn
    at 40). Per token it awaits the stream directly: AutoGen 0.7.5 wraps each read in a task
    linked to the cancellation token, and a Turn cancels its task with the token anyway.
    And a stream that ends without a finish reason fails rather than pass as complete."""

    async def _create_stream_chunks(
        self, tool_params: list[Any], oai_messages: list[Any], create_args: dict[str, Any], cancellation_token: Any
    ) -> AsyncIterator[ChatCompletionChunk]:
        body = {**create_args, "messages": oai_messages, "stream": True}
        options = {"timeout": body.pop("timeout")} if "timeout" in body else {}
        if tool_params:
            body["tools"] = tool_params
        request = asyncio.ensure_future(
            self._client.post(
                "/chat/completions",
                body=body,
                options=options,
                cast_to=ChatCompletion,
                stream=True,
                stream_cls=openai.AsyncStream[Chunk],
            )
        )
        if cancellation_token is not None:
            cancellation_token.link_future(request)
        finished = False
        async for chunk in await request:
            finished = finished or bool(chunk.choices and chunk.choices[0].finish_reason)
            yield chunk
        if not finished:
            raise UpstreamIncomplete


def make_client(settings: Settings) -> ChatClient:
    return ChatClient(
        model=settings.model_name,
        api_key=settings.api_key or "",
        base_url=settings.base_url,
        model_info=ModelInfo(**settings.model_info),  # type: ignore[typeddict-item]
        timeout=settings.request_timeout,
        max_retries=settings.max_retries,
        # Real APIs send the usage chunk only when asked.
        stream_options={"include_usage": True},
    )


def history_window(messages: list[LLMMessage], size: int) -> list[LLMMessage]:
    """The last `size` messages, widened back to a user message so no tool result is cut
    from its call (the current turn stays whole even when it alone is longer)."""
    start = max(0, len(messages) - size)
    for index in range(start, len(messages)):
        if isinstance(messages[index], UserMessage):
            return messages[index:]
    for index in range(start - 1, -1, -1):
        if isinstance(messages[index], UserMessage):
            return messages[index:]
    return messages


class HistoryWindow(BufferedChatCompletionContext):
    """Sends the history window to the model and saves only that window: the full history
    lives in the messages table, so loading turn 100 costs the same as turn 2."""

    async def get_messages(self) -> list[LLMMessage]:
        return history_window(self._messages, self._buffer_size)

    async def save_state(self) -> Mapping[str, Any]:
        return ChatCompletionContextState(messages=await self.get_messages()).model_dump()


class ThinkSplitter:
    """Splits one model message's streamed text into thought and answer.

    AutoGen 0.7.5 wraps DeepSeek's reasoning_content in <think>...</think> inside the
    chunks, and local R1 models put the same tags in their content. A tag may be split
    across chunks; once answer text has begun, a '<think>' is just text.
    """

    def __init__(self) -> None:
        self.thinking = False
        self.answering = False
        self.pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        if self.answering:
            return [("chunk", text)]
        text, self.pending, parts = self.pending + text, "", []
        while text:
            if self.thinking:
                index = text.find("</think>")
                if index < 0:
                    keep = _partial_tag_length(text, "</think>")
                    text, self.pending = text[: len(text) - keep], text[len(text) - keep :]
                    parts += [("thought", text)] if text else []
                    break
                parts += [("thought", text[:index])] if index else []
                self.thinking, text = False, text[index + len("</think>") :]
                continue
            stripped = text.lstrip()
            if stripped.startswith("<think>"):
                self.thinking, text = True, stripped[len("<think>") :]
            elif "<think>".startswith(stripped):
                self.pending = text  # only white space so far, or a tag cut in two
                break
            else:
                self.answering = True
                parts.append(("chunk", stripped))
                break
        return parts

    def flush(self) -> list[tuple[str, str]]:
        text, self.pending = self.pending, ""
        if not self.thinking:
            text = text.lstrip()
        return [("thought" if self.thinking else "chunk", text)] if text else []


def without_thought(text: str) -> str:
    """The answer of a message that starts with a <think> block, as local R1 models write."""
    head = text.lstrip()
    if head.startswith("<think>") and "</think>" in head:
        return head.split("</think>", 1)[1].lstrip()
    return text


def _partial_tag_length(text: str, tag: str) -> int:
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


@dataclass(eq=False)
class AppContext:
    """What the lifespan creates and the handlers share, kept on app.state.ctx."""

    settings: Settings
    store: Store
    client: ChatClient | None
    tools: list[FunctionTool]
    openapi: bytes = b""
    turns: set[Turn] = field(default_factory=set)
    shutting_down: bool = False


class Turn:
    """One message run through the agent in its own task, its events queued for the
    response. Holds the conversation's lease until close(); saves only if it completes."""

    def __init__(self, ctx: AppContext, conversation_id: str, message: str, lease: str):
        self.ctx = ctx
        self.conversation_id = conversation_id
        self.message = message
        self.lease = lease
        self.events: asyncio.Queue[Event | None] = asyncio.Queue()
        self.token = CancellationToken()
        self.stop_reason: str | None = None
        self.records: list[dict[str, Any]] = [{"role": "user", "content": message, "created_at": utc_now()}]
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.splitter = ThinkSplitter()
        self.stream_id: str | None = None
        self.thought: list[str] = []
        self.released = False
        self.loop = asyncio.get_running_loop()
        self.last_event = self.renewed = self.loop.time()
        self.timer = self.loop.call_later(self._next_tick(), self._tick)
        self.task = asyncio.create_task(self._pump())
        ctx.turns.add(self)

    def stop(self, reason: str) -> None:
        """End the turn early; the client gets an error event with this code."""
        if not self.task.done():
            self.stop_reason = reason
            self.token.cancel()
            self.task.cancel()

    async def close(self) -> None:
        """Cancel the turn if still running, wait until it has unwound, release the lease."""
        try:
            if not self.task.done():
                self.token.cancel()
                self.task.cancel()
                # On disconnect Starlette cancels the response's anyio scope, which re-delivers
                # the cancellation at every await: shield the wait for the turn to unwind.
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([self.task])
        finally:
            self.timer.cancel()
            self.ctx.turns.discard(self)
            self._release()  # for a task cancelled before it ever ran

    def _release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            self.ctx.store.release_lease(self.conversation_id, self.lease)
        except sqlite3.Error:
            logger.warning("could not release the lease of conversation %s", self.conversation_id)

    def _next_tick(self) -> float:
        settings = self.ctx.settings
        due = min(self.last_event + settings.ping_interval, self.renewed + settings.lease_seconds / 3)
        return max(due - self.loop.time(), 0.001)

    def _tick(self) -> None:
        """One timer per turn, not per event: pings a quiet stream and renews the lease."""
        now, settings = self.loop.time(), self.ctx.settings
        if now - self.last_event >= settings.ping_interval:
            self.events.put_nowait(PING)
            self.last_event = now
        if now - self.renewed >= settings.lease_seconds / 3:
            try:
                self.ctx.store.renew_lease(self.conversation_id, self.lease, settings.lease_seconds)
            except sqlite3.Error:
                logger.warning("could not renew the lease of conversation %s", self.conversation_id)
            self.renewed = now
        self.timer = self.loop.call_later(self._next_tick(), self._tick)

    async def _pump(self) -> None:
        try:
            async for event in self._run():
                self.events.put_nowait(event)
                self.last_event = self.loop.time()
        finally:
            # Both before the response task runs again: a client that reads the last event
            # and sends its next message at once never meets this turn's lease.
            self.events.put_nowait(None)
            self._release()

    async def _run(self) -> AsyncIterator[Event]:
        yield "status", {"status": "started", "conversation_id": self.conversation_id}
        try:
            agent = await self._agent()
            task = TextMessage(content=self.message, source="user")
            async for event in agent.run_stream(task=task, cancellation_token=self.token, output_task_messages=False):
                for item in self._translate(event):
                    yield item
            state = await agent.save_state()
            self.ctx.store.save_turn(self.conversation_id, state, self.records, self.lease)
            self.released = True  # in the same transaction
        except asyncio.CancelledError:
            if self.stop_reason is None:
                raise
            yield "error", ApiError(self.stop_reason).body()
            raise
        except Exception as exc:
            error = upstream_error(exc, self.ctx.settings)
            self._log_failure(error, exc)
            yield "error", error.body()
            return
        yield "done", {"conversation_id": self.conversation_id, "usage": self.usage}

    async def _agent(self) -> AssistantAgent:
        settings, tools = self.ctx.settings, self.ctx.tools
        agent = AssistantAgent(
            "assistant",
            model_client=self.ctx.client,  # type: ignore[arg-type]
            tools=tools or None,
            system_message=settings.system_message,
            model_client_stream=True,
            reflect_on_tool_use=bool(tools),
            model_context=HistoryWindow(settings.max_history_messages),
        )
        state = self.ctx.store.load_state(self.conversation_id)
        if state is not None:
            await agent.load_state(state)
        return agent

    def _translate(self, event: Any) -> Iterator[Event]:
        """AutoGen's run_stream events as the API's events; records what gets saved."""
        if isinstance(event, ModelClientStreamingChunkEvent):
            if event.full_message_id != self.stream_id:
                self.stream_id, self.splitter = event.full_message_id, ThinkSplitter()
            yield from self._texts(self.splitter.feed(event.content))
        elif isinstance(event, ToolCallRequestEvent):
            yield from self._texts(self.splitter.flush())
            calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in event.content]
            self._record(event, content=None, tool_calls=calls)
            yield "status", {"status": "calling_tool"}
            for call in calls:
                yield "tool_call", call
        elif isinstance(event, ToolCallExecutionEvent):
            for result in event.content:
                data = {
                    "call_id": result.call_id,
                    "name": result.name,
                    "content": result.content,
                    "is_error": bool(result.is_error),
                }
                self.records.append({"role": "tool", **data, "created_at": utc_now()})
                yield "tool_result", data
            yield "status", {"status": "responding"}
        elif isinstance(event, TextMessage | ToolCallSummaryMessage) and event.source != "user":
            yield from self._texts(self.splitter.flush())
            content = without_thought(event.content)
            self._record(event, content=content)
            yield "message", {"content": content, "source": event.source}

    def _texts(self, parts: list[tuple[str, str]]) -> Iterator[Event]:
        for kind, text in parts:
            if kind == "thought":
                self.thought.append(text)
            yield kind, {"content": text}

    def _record(self, event: Any, **body: Any) -> None:
        if event.models_usage is not None:
            self.usage["prompt_tokens"] += event.models_usage.prompt_tokens
            self.usage["completion_tokens"] += event.models_usage.completion_tokens
        if self.thought:
            body["thought"], self.thought = "".join(self.thought), []
        self.records.append({"role": "assistant", **body, "created_at": utc_now()})

    def _log_failure(self, error: ApiError, exc: Exception) -> None:
        if error.code == "internal_error":
            logger.exception("turn of conversation %s failed", self.conversation_id)
            return
        status = getattr(exc, "status_code", None)
        logger.warning(
            "turn of conversation %s failed: %s (%s%s)",
            self.conversation_id,
            error.code,
            type(exc).__name__,
            f" {status}" if status else "",
        )


async def stream_turn(turn: Turn) -> AsyncIterator[bytes]:
    """The turn's events as SSE; events that queued up while the last write was going out
    leave together in one write, so a busy server makes fewer, larger writes."""
    while True:
        batch = [await turn.events.get()]
        while not turn.events.empty():
            batch.append(turn.events.get_nowait())
        body = b"".join(sse_event(event) for event in batch if event is not None)
        if body:
            yield body
        if batch[-1] is None:
            return


async def collect_turn(turn: Turn) -> dict[str, Any]:
    """The turn's events folded into the JSON reply of POST /api/chat."""
    reply: dict[str, Any] = {"message": "", "conversation_id": turn.conversation_id}
    calls: dict[str, dict[str, Any]] = {}
    try:
        while (event := await turn.events.get()) is not None:
            name, data = event
            if name == "message":
                reply["message"] = data["content"]
            elif name == "tool_call":
                calls[data["id"]] = {**data, "result": None, "is_error": False}
            elif name == "tool_result" and data["call_id"] in calls:
                calls[data["call_id"]].update(result=data["content"], is_error=data["is_error"])
            elif name == "done":
                reply["usage"] = data["usage"]
            elif name == "error":
                raise ApiError(data["code"], data["message"], data.get("retry_after"))
    finally:
        await turn.close()
    return {**reply, "status": "success", "tool_calls": list(calls.values())}


class TurnStream(StreamingResponse):
    """The SSE response of a turn; closes the turn however the response ends."""

    def __init__(self, turn: Turn) -> None:
        super().__init__(stream_turn(turn), media_type="text/event-stream", headers=SSE_HEADERS)
        self.turn = turn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.turn.close()


# ---------------------------------------------------------------------------
# Request parsing
# ---------------------------------------------------------------------------

# curl -d sends application/x-www-form-urlencoded; a JSON body is accepted under it so the
# five-minute curl demo works. Types that cannot hold JSON are refused with 415.
JSON_CONTENT_TYPES = {"", "application/json", "application/x-www-form-urlencoded", "text/plain"}


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON; refused while reading once it passes `limit` bytes."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in JSON_CONTENT_TYPES and not content_type.endswith("+json"):
        raise ApiError("unsupported_media_type")
    too_large = ApiError("payload_too_large", f"The body is larger than MAX_BODY_BYTES ({limit} bytes).")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except ValueError:
        raise ApiError("invalid_json") from None


CHAT_REQUEST_FIELDS = {"message", "conversation_id"}


def parse_chat_request(data: Any, settings: Settings) -> tuple[str, str]:
    """(message, conversation_id) from a chat body; a new id when none is given."""
    if not isinstance(data, dict):
        raise ApiError("validation_error", 'The body must be a JSON object: {"message": "..."}.')
    unknown = sorted(set(data) - CHAT_REQUEST_FIELDS)
    if unknown:  # a misspelt conversation_id would otherwise start a new conversation
        raise ApiError(
            "validation_error", f"Unknown field(s) {unknown}; a chat body has {sorted(CHAT_REQUEST_FIELDS)}."
        )
    message = check_message(data.get("message"), settings.max_message_chars)
    conversation_id = data.get("conversation_id")
    if conversation_id is None:
        return message, str(uuid.uuid4())
    return message, check_conversation_id(conversation_id)


def check_message(value: Any, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ApiError("validation_error", "'message' must be a string with more than white space.")
    if len(value) > limit:
        raise ApiError("validation_error", f"'message' is longer than MAX_MESSAGE_CHARS ({limit}).")
    try:
        value.encode()
    except UnicodeEncodeError:  # JSON can escape a lone surrogate, which no text can hold
        raise ApiError("validation_error", "'message' holds a lone surrogate (\\ud800-\\udfff).") from None
    return value


def check_conversation_id(value: Any) -> str:
    if not isinstance(value, str) or not CONVERSATION_ID_PATTERN.fullmatch(value):
        raise ApiError("validation_error", "'conversation_id' must match ^[A-Za-z0-9_.:-]{1,128}$.")
    return value


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ApiError("validation_error", f"'{name}' must be a whole number from {low} to {high}.")
    return int(raw)


# ---------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------


def context(request: Request) -> AppContext:
    return request.app.state.ctx


async def index(request: Request) -> JSONResponse:
    settings = context(request).settings
    return JSONResponse(
        {
            "name": "autogen-chat",
            "version": __version__,
            "model": settings.model_name,
            "base_url_host": urlsplit(settings.base_url).hostname,
            "endpoints": {
                "chat": "POST /api/chat",
                "chat_stream": "POST /api/chat/stream",
                "conversations": "GET /api/conversations",
                "conversation": "GET|DELETE /api/conversations/{conversation_id}",
                "health": "GET /health",
            },
            "docs": {"openapi": "/openapi.json", "swagger_ui": "/docs", "redoc": "/redoc"},
        }
    )


async def health(request: Request) -> JSONResponse:
    ctx = context(request)
    database = ctx.store.ping()
    reasons = []
    if ctx.client is None:
        reasons.append("model not configured: set API_KEY in .env")
    if not database:
        reasons.append("database not answering")
    if ctx.shutting_down:
        reasons.append("shutting down")
    body = {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "model": ctx.settings.model_name,
        "agent_ready": ctx.client is not None and not ctx.shutting_down,
        "database": database,
        "open_turns": len(ctx.turns),
    }
    return JSONResponse(body, status_code=200 if database else 503)


async def start_turn(request: Request) -> Turn:
    ctx = context(request)
    if ctx.client is None:
        raise ApiError("not_configured")
    if ctx.shutting_down:
        raise ApiError("server_shutting_down")
    data = await read_json(request, ctx.settings.max_body_bytes)
    message, conversation_id = parse_chat_request(data, ctx.settings)
    lease = uuid.uuid4().hex
    if not ctx.store.acquire_lease(conversation_id, lease, ctx.settings.lease_seconds):
        raise ApiError("conversation_busy")
    return Turn(ctx, conversation_id, message, lease)


async def chat(request: Request) -> JSONResponse:
    turn = await start_turn(request)
    return JSONResponse(await collect_turn(turn))


async def chat_stream(request: Request) -> TurnStream:
    turn = await start_turn(request)
    return TurnStream(turn)


async def list_conversations(request: Request) -> JSONResponse:
    limit = query_int(request, "limit", 20, 1, 100)
    offset = query_int(request, "offset", 0, 0, 10**9)
    items, total = context(request).store.list_conversations(limit, offset)
    return JSONResponse({"conversations": items, "total": total, "limit": limit, "offset": offset})


async def conversation(request: Request) -> Response:
    ctx = context(request)
    conversation_id = check_conversation_id(request.path_params["conversation_id"])
    if request.method == "DELETE":
        return delete_conversation(ctx, conversation_id)
    found = ctx.store.get_conversation(conversation_id)
    if found is None:
        raise ApiError("not_found", f"No conversation {conversation_id!r}.")
    return JSONResponse(found)


def delete_conversation(ctx: AppContext, conversation_id: str) -> Response:
    # Taking the lease means a running turn cannot save the conversation back afterwards.
    lease = uuid.uuid4().hex
    if not ctx.store.acquire_lease(conversation_id, lease, ctx.settings.lease_seconds):
        raise ApiError("conversation_busy")
    try:
        deleted = ctx.store.delete_conversation(conversation_id)
    finally:
        ctx.store.release_lease(conversation_id, lease)
    if not deleted:
        raise ApiError("not_found", f"No conversation {conversation_id!r}.")
    return Response(status_code=204)


async def openapi_json(request: Request) -> Response:
    return Response(context(request).openapi, media_type="application/json")


async def swagger_ui(request: Request) -> HTMLResponse:
    return HTMLResponse(SWAGGER_UI_HTML)


async def redoc(request: Request) -> HTMLResponse:
    return HTMLResponse(REDOC_HTML)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    if exc.status_code < 500 and exc.code != "not_found":
        logger.info("%s %s -> %s %s", request.method, request.url.path, exc.status_code, exc.code)
    return exc.response()


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "internal_error")
    response = ApiError(code).response()
    response.headers.update(exc.headers or {})
    return response


async def server_error(request: Request, exc: Exception) -> Response:
    return ApiError("internal_error").response()


SECURED_PREFIXES = ("/api/", "/v1/")


class RequireServerKey:
    """With SERVER_API_KEY set, /api/* and /v1/* need 'Authorization: Bearer <key>'."""

    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.expected is not None
            and scope["type"] == "http"
            and scope["path"].startswith(SECURED_PREFIXES)
            and scope["method"] != "OPTIONS"
            and not hmac.compare_digest(dict(scope["headers"]).get(b"authorization", b""), self.expected)
        ):
            await ApiError("unauthorized").response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------
# OpenAPI document
# ---------------------------------------------------------------------------


OPENAPI_PATH = Path(__file__).with_name("openapi.json")


def openapi_document(settings: Settings) -> bytes:
    """openapi.json as served: the message limit of the settings and, with SERVER_API_KEY set, the
    bearer key on the /api and /v1 operations."""
    document = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))
    message = document["components"]["schemas"]["ChatRequest"]["properties"]["message"]
    message["maxLength"] = settings.max_message_chars
    if settings.server_api_key:
        for path, item in document["paths"].items():
            if path.startswith(SECURED_PREFIXES):
                for operation in item.values():
                    operation["security"] = [{"bearer": []}]
    return dumps(document).encode()


SWAGGER_UI_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>AutoGen chat backend - Swagger UI</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"""

REDOC_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>AutoGen chat backend - ReDoc</title></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="https://cdn.jsdelivr.net/npm/redoc@2/bundles/redoc.standalone.js"></script>
</body></html>"""


# ---------------------------------------------------------------------------
# Lifespan and shutdown
# ---------------------------------------------------------------------------


def begin_shutdown(ctx: AppContext) -> None:
    """Refuse new turns; open turns get SHUTDOWN_GRACE_SECONDS to finish, then are stopped."""
    if ctx.shutting_down:
        return
    ctx.shutting_down = True
    grace = ctx.settings.shutdown_grace_seconds
    logger.info("shutting down: %d open turn(s) get %.0f s to finish", len(ctx.turns), grace)
    asyncio.get_running_loop().call_later(grace, stop_turns, ctx)


def stop_turns(ctx: AppContext) -> None:
    for turn in list(ctx.turns):
        turn.stop("server_shutting_down")


def watch_for_shutdown(ctx: AppContext) -> Callable[[], None]:
    """Chain onto the server's SIGTERM/SIGINT handlers, so open streams hear of shutdown.

    uvicorn waits for open responses before it runs the lifespan's shutdown, so that is
    too late to tell a stream; its own handlers stay in charge of stopping the server.
    """
    loop = asyncio.get_running_loop()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(sig: int, frame: Any) -> None:
        loop.call_soon_threadsafe(begin_shutdown, ctx)
        if callable(previous[sig]):
            previous[sig](sig, frame)  # type: ignore[operator]

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    try:
        for sig in previous:
            signal.signal(sig, handler)
    except ValueError:  # not the main thread (an embedding app, a test client)
        return lambda: None
    return restore


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    logging.getLogger("autogen_core").setLevel(logging.WARNING)  # its INFO events log whole prompts
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per model call
    store = Store(settings.database_path)
    client = make_client(settings) if settings.api_key else None
    tools = build_tools(settings.tools) if settings.model_info["function_calling"] else []
    ctx = app.state.ctx = AppContext(settings, store, client, tools, openapi_document(settings))
    if client is None:
        logger.warning("API_KEY is not set: chat answers 503 until it is set in .env")
    if not settings.server_api_key and not is_loopback(settings.host):
        logger.warning("HOST=%s is reachable from other machines and SERVER_API_KEY is not set", settings.host)
    restore_signals = watch_for_shutdown(ctx)
    logger.info(
        "model %s at %s, database %s", settings.model_name, urlsplit(settings.base_url).hostname, settings.database_path
    )
    try:
        yield
    finally:
        restore_signals()
        stop_turns(ctx)
        await asyncio.gather(*(turn.close() for turn in list(ctx.turns)))
        if client is not None:
            await client.close()
        store.close()


# ---------------------------------------------------------------------------
# Application
# ---------------------------------------------------------------------------

routes = [
    Route("/", index),
    Route("/health", health),
    Route("/api/chat", chat, methods=["POST"]),
    Route("/api/chat/stream", chat_stream, methods=["POST"]),
    Route("/api/conversations", list_conversations),
    Route("/api/conversations/{conversation_id}", conversation, methods=["GET", "DELETE"]),
    Route("/openapi.json", openapi_json),
    Route("/docs", swagger_ui),
    Route("/redoc", redoc),
]


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or load_settings()
    wildcard = "*" in settings.cors_origins
    middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            allow_credentials=not wildcard,  # never credentials together with '*'
            expose_headers=["Retry-After"],
        ),
        Middleware(RequireServerKey, key=settings.server_api_key),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.settings = settings
    return app


try:
    app = create_app()
except SettingsError as exc:
    raise SystemExit(f"Configuration error: {exc}") from None


if __name__ == "__main__":
    settings: Settings = app.state.settings
    try:
        Store(settings.database_path).close()  # one clear line before uvicorn, not a traceback
    except SettingsError as exc:
        raise SystemExit(f"Configuration error: {exc}") from None
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
