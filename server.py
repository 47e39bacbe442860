"""A self-hostable chat backend: an AutoGen agent behind a tiny HTTP API, streamed as SSE.

One AutoGen ``AssistantAgent`` with tools talks to any OpenAI-compatible chat API
(DeepSeek by default; OpenAI, Azure OpenAI, Ollama, LM Studio by ``BASE_URL``). Each of its
turns is one stream of events that every face renders: named SSE events at
``/api/chat/stream``, JSON at ``/api/chat``, stored conversations at ``/api/conversations``,
an OpenAI-compatible model at ``/v1`` (chat apps, openai SDKs), a chat page at ``/chat``,
the API documents at ``/docs`` and ``/redoc``, and Prometheus metrics at ``/metrics``; with an
OpenTelemetry endpoint set, each turn is traced. Conversations live in SQLite
(``DATABASE_PATH``), or in one PostgreSQL shared by several instances (``DATABASE_URL``).
Settings come from the environment and the ``.env`` beside this file.

Run:

    python3 -m venv .venv && .venv/bin/pip install -r requirements.txt
    .venv/bin/python server.py

Try:

    curl -N localhost:8000/api/chat/stream -d '{"message": "现在东京几点？"}'

The module reads top to bottom: settings and limits; errors and SSE; tools; storage; the
AutoGen adapter; the turn; the faces, one section each; metrics and traces; lifespan; routes;
the app.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextvars
import copy
import dataclasses
import difflib
import enum
import functools
import gc
import gzip
import hashlib
import hmac
import importlib.metadata
import inspect
import io
import ipaddress
import itertools
import json
import logging
import logging.config
import math
import operator
import os
import re
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring  # json's own C escaper, as with ensure_ascii=False
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
import anyio
import httpx
import openai
import psycopg
import psycopg_pool
import pydantic
import uvicorn
from ag_ui import core as agui
from ag_ui.encoder import EventEncoder as AgUiEncoder
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import MultiModalMessage, TextMessage, ToolCallExecutionEvent, ToolCallRequestEvent
from autogen_core import CancellationToken, FunctionCall, Image
from autogen_core.model_context import ChatCompletionContext, ChatCompletionContextState
from autogen_core.models import (
    AssistantMessage,
    ChatCompletionClient,
    CreateResult,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    LLMMessage,
    ModelInfo,
    RequestUsage,
    SystemMessage,
    UserMessage,
)
from autogen_core.tools import FunctionTool, ImageResultContent, TextResultContent, ToolSchema, Workbench
from autogen_core.tools import ToolResult as WorkbenchResult
from autogen_ext.models.openai import _model_info as _autogen_model_info
from autogen_ext.tools.mcp import McpWorkbench, StdioServerParams, StreamableHttpServerParams
from dotenv import dotenv_values
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from PIL import Image as PILImage
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

__version__ = "1.1.0"

logger = logging.getLogger("autogen_chat")
HERE = Path(__file__).resolve().parent
P = ParamSpec("P")
T = TypeVar("T")

# ---------------------------------------------------------------------------
# Settings and limits
# ---------------------------------------------------------------------------

# Limits that shape behaviour but that no user should need to change; each says why it is
# what it is. The ones a user may need to change are settings (below).
HANDOVER_SECONDS = 0.25  # a new turn waits this long for a just-stopped turn of its conversation here
SQLITE_BUSY_TIMEOUT_MS = 5000  # a locked SQLite file: the store's thread waits this long, off the loop
POSTGRES_PING_SECONDS = 1.0  # /health answers within this even when PostgreSQL does not
POSTGRES_CONNECT_SECONDS = 10  # start-up waits this long for PostgreSQL before it gives up
POSTGRES_CLOSE_SECONDS = 2.0  # shutdown waits this long for the pool; the pool's own default is 5 s
MAX_EXPRESSION_CHARS = 200  # calculate(): longer input is no arithmetic a chat needs
MAX_RESULT_BITS = 4096  # calculate(): a bigger number is useless in a chat and slow to print
MAX_TOOL_RESULT_CHARS = 20_000  # a tool result the model reads is cut here (about 5k tokens), saying so
MAX_TOOL_RESULT_SHOWN = 500  # /v1 shows each tool result in reasoning_content cut to this
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a tool name every chat completions API takes
MAX_MODEL_FIELD_CHARS = 256  # /v1 echoes 'model' in every chunk: a longer one is refused
MAX_IMAGE_PIXELS = 50_000_000  # an image larger than this is refused before it is decoded
PARSE_OFF_LOOP_BYTES = 64 * 1024  # a larger body is parsed on a thread: a few MB of JSON take tens of ms
MCP_START_SECONDS = 30.0  # an MCP server may take this long to start (npx fetches its package first)
CALL_REASONING_SECONDS = 86_400.0  # a client's tool may take this long to answer and still get its reasoning back
MODEL_CHECK_SECONDS = 30.0  # /health?check=model asks the model API at most this often
MODEL_CHECK_TIMEOUT = 5.0  # and waits this long for its answer
APPROVAL_POLL_SECONDS = 0.5  # a turn waiting for a decision made in another worker or instance asks this often

DEFAULT_SYSTEM_MESSAGE = (
    "You are a helpful assistant. Answer in the user's language. "
    "Use the tools when they help: get_current_time for dates and times, "
    "calculate for arithmetic."
)
CONVERSATION_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
CONVERSATION_ID_RULE = "'conversation_id' must match ^[A-Za-z0-9_.:-]{1,128}$ and be neither '.' nor '..'"

# AutoGen only knows OpenAI's model names; these are DeepSeek's current ones (its Models &
# Pricing page): deepseek-flash is V4.1 Flash and reads images; deepseek-v4-flash is still
# accepted and served by the same model, documented without images; deepseek-v4-pro is text only.
KNOWN_MODEL_INFO: dict[str, ModelInfo] = {
    name: ModelInfo(vision=vision, function_calling=True, json_output=True, family="unknown", structured_output=False)
    for name, vision in (("deepseek-flash", True), ("deepseek-v4-flash", False), ("deepseek-v4-pro", False))
}
# Names DeepSeek retired on 2026-07-24; its API refuses them since. Each with what to set instead.
RETIRED_MODELS = {"deepseek-chat": "deepseek-flash", "deepseek-reasoner": "deepseek-flash"}
DEEPSEEK_HOSTS = {"api.deepseek.com"}
OPENAI_HOSTS = {"api.openai.com"}
THINKING_MODES = ("enabled", "disabled")
REASONING_EFFORTS = ("low", "high", "max")
DEFAULT_MODEL_INFO = ModelInfo(
    vision=False, function_calling=True, json_output=False, family="unknown", structured_output=False
)
MODEL_INFO_FLAGS = {
    "MODEL_VISION": "vision",
    "MODEL_FUNCTION_CALLING": "function_calling",
    "MODEL_JSON_OUTPUT": "json_output",
    "MODEL_STRUCTURED_OUTPUT": "structured_output",
}
LOG_FORMATS = ("text", "json")
# Every variable the settings read; .env.example lists exactly these. A name in .env close to
# one of them (APIKEY, MODEL) is warned about at start-up. Of OpenTelemetry's, the settings read
# where traces go and whether spans hold message content, from .env too; every other OTEL_*
# variable is the SDK's own, which it reads from the real environment only.
ENV_NAMES = (
    "API_KEY", "MODEL_NAME", "BASE_URL", "THINKING", "REASONING_EFFORT", *MODEL_INFO_FLAGS, "MODEL_FAMILY",
    "HOST", "PORT", "WORKERS", "SERVER_API_KEY", "CORS_ORIGINS", "SYSTEM_MESSAGE", "TOOLS", "MAX_TOOL_ROUNDS",
    "DATABASE_PATH", "DATABASE_URL", "DATABASE_POOL_SIZE", "DATABASE_TIMEOUT", "MAX_HISTORY_MESSAGES",
    "REQUEST_TIMEOUT", "MAX_RETRIES", "MAX_MESSAGE_CHARS", "MAX_BODY_BYTES", "V1_MAX_BODY_BYTES", "PING_INTERVAL",
    "SHUTDOWN_GRACE_SECONDS", "LEASE_SECONDS", "LOG_LEVEL", "AGENT_MODEL_ID", "MCP_CONFIG", "APPROVAL_TIMEOUT_SECONDS",
    "LOG_FORMAT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
)  # fmt: skip


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


def _env_database_url(env: Mapping[str, str]) -> str | None:
    raw = env.get("DATABASE_URL", "").strip()
    if raw and urlsplit(raw).scheme not in {"postgresql", "postgres"}:
        shown = redact_url(raw)
        raise SettingsError(f"DATABASE_URL={shown!r} must be a postgresql:// URL, or unset for SQLite at DATABASE_PATH")
    return raw or None


def _env_path(env: Mapping[str, str], name: str, default: str) -> str:
    """A path; a relative one is taken from the folder of server.py (and of its .env)."""
    return str(HERE / (env.get(name, "").strip() or default))


def redact_url(url: str) -> str:
    """The URL with its password, in the user part or the query, shown as ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _env_choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    raw = env.get(name, "").strip()
    if raw and raw not in choices:
        raise SettingsError(f"{name}={raw!r} must be one of {', '.join(choices)}, or empty for the model's default")
    return raw or None


def _thinking_api(base_url: str, thinking: str | None, effort: str | None) -> bool:
    """Whether the API takes DeepSeek's thinking fields: DeepSeek's own, or any other where
    the user set THINKING or REASONING_EFFORT. (Reasoning is passed back wherever the API
    streamed it, whatever the host.)"""
    host = urlsplit(base_url).hostname
    for name, value in (("THINKING", thinking), ("REASONING_EFFORT", effort)):
        if value and host in OPENAI_HOSTS:
            raise SettingsError(f"{name}={value!r} is a DeepSeek setting; OpenAI's API (BASE_URL) refuses it")
    return host in DEEPSEEK_HOSTS or bool(thinking or effort)


def retired_model_note(model: str) -> str:
    """For a model name DeepSeek retired, what to set instead; else nothing."""
    if model not in RETIRED_MODELS:
        return ""
    return f"DeepSeek retired MODEL_NAME={model} on 2026-07-24: set MODEL_NAME={RETIRED_MODELS[model]} in .env."


def _model_info(env: Mapping[str, str], model: str) -> ModelInfo:
    """DeepSeek's or AutoGen's own info for the model, else a default; MODEL_* override."""
    info = ModelInfo(**(KNOWN_MODEL_INFO.get(model) or autogen_model_info(model) or DEFAULT_MODEL_INFO))
    for name, key in MODEL_INFO_FLAGS.items():
        flag = _env_bool(env, name)
        if flag is not None:
            info[key] = flag  # type: ignore[literal-required]
    info["family"] = env.get("MODEL_FAMILY", "").strip() or info["family"]
    return info


def _tool_names(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("TOOLS")
    names = tuple(BUILT_IN_TOOLS) if raw is None else tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = [name for name in names if name not in BUILT_IN_TOOLS]
    if unknown:
        raise SettingsError(f"TOOLS={raw!r} names unknown tools {unknown}; known: {list(BUILT_IN_TOOLS)}")
    return names


def _cors_origins(env: Mapping[str, str], server_api_key: str | None) -> tuple[str, ...]:
    """The origins whose pages may call. Unset: none without a server key (another local page
    could read and run conversations), any with one (the key guards them)."""
    raw = env.get("CORS_ORIGINS", "").strip()
    if not raw:
        return ("*",) if server_api_key else ()
    return tuple(origin.strip() for origin in raw.split(",") if origin.strip())


@dataclass(frozen=True)
class Settings:
    api_key: str | None = field(default=None, repr=False)  # secrets stay out of any repr (logs, tracebacks)
    model_name: str = "deepseek-flash"
    base_url: str = "https://api.deepseek.com"
    host: str = "0.0.0.0"
    port: int = 8000
    workers: int = 1
    system_message: str = DEFAULT_SYSTEM_MESSAGE
    database_path: str = str(HERE / "conversations.db")
    database_url: str | None = field(default=None, repr=False)  # may hold a password
    database_pool_size: int = 4
    database_timeout: float = 5.0
    max_history_messages: int = 40
    cors_origins: tuple[str, ...] = ()
    request_timeout: float = 60.0
    max_retries: int = 2
    ping_interval: float = 15.0
    tools: tuple[str, ...] = ("get_current_time", "calculate")
    max_tool_rounds: int = 8
    model_info: Mapping[str, Any] = field(default_factory=lambda: dict(KNOWN_MODEL_INFO["deepseek-flash"]))
    max_message_chars: int = 32000
    max_body_bytes: int = 256 * 1024
    v1_max_body_bytes: int = 8 * 1024 * 1024
    server_api_key: str | None = field(default=None, repr=False)
    shutdown_grace_seconds: float = 10.0
    lease_seconds: float = 90.0
    log_level: str = "INFO"
    thinking: str | None = None
    reasoning_effort: str | None = None
    thinking_api: bool = True
    agent_model_id: str = "autogen-agent"
    mcp_config: str | None = None  # the MCP_CONFIG file read, if any
    mcp_servers: tuple[McpServer, ...] = ()
    approval_timeout: float = 300.0
    log_format: str = "text"  # or json: one JSON object a line
    traces_endpoint: str | None = None  # the OTLP/HTTP traces URL; None: no tracing
    capture_content: bool = False  # spans hold the messages and tool arguments and results
    env_file: str | None = None  # the .env that was read, if any
    notes: tuple[str, ...] = ()  # warnings found while reading, logged at start-up

    @classmethod
    def from_env(cls, env: Mapping[str, str], env_file: str | None = None) -> Settings:
        model = env.get("MODEL_NAME", "").strip() or cls.model_name
        base_url = _env_url(env, "BASE_URL", cls.base_url)
        thinking = _env_choice(env, "THINKING", THINKING_MODES)
        effort = _env_choice(env, "REASONING_EFFORT", REASONING_EFFORTS)
        server_api_key = env.get("SERVER_API_KEY", "").strip() or None
        mcp_config, servers = mcp_servers(env)
        return cls(
            api_key=env.get("API_KEY", "").strip() or None,
            model_name=model,
            base_url=base_url,
            host=env.get("HOST", "").strip() or cls.host,
            port=_env_number(env, "PORT", cls.port, 1),
            workers=_env_number(env, "WORKERS", cls.workers, 1),
            system_message=env.get("SYSTEM_MESSAGE", "").strip() or DEFAULT_SYSTEM_MESSAGE,
            database_path=_env_path(env, "DATABASE_PATH", "conversations.db"),
            database_url=_env_database_url(env),
            database_pool_size=_env_number(env, "DATABASE_POOL_SIZE", cls.database_pool_size, 1),
            database_timeout=_env_number(env, "DATABASE_TIMEOUT", cls.database_timeout, 0.1),
            max_history_messages=_env_number(env, "MAX_HISTORY_MESSAGES", cls.max_history_messages, 1),
            cors_origins=_cors_origins(env, server_api_key),
            request_timeout=_env_number(env, "REQUEST_TIMEOUT", cls.request_timeout, 0.001),
            max_retries=_env_number(env, "MAX_RETRIES", cls.max_retries),
            ping_interval=_env_number(env, "PING_INTERVAL", cls.ping_interval, 0.001),
            tools=_tool_names(env),
            max_tool_rounds=_env_number(env, "MAX_TOOL_ROUNDS", cls.max_tool_rounds, 1),
            model_info=_model_info(env, model),
            max_message_chars=_env_number(env, "MAX_MESSAGE_CHARS", cls.max_message_chars, 1),
            max_body_bytes=_env_number(env, "MAX_BODY_BYTES", cls.max_body_bytes, 64),
            v1_max_body_bytes=_env_number(env, "V1_MAX_BODY_BYTES", cls.v1_max_body_bytes, 64),
            server_api_key=server_api_key,
            shutdown_grace_seconds=_env_number(env, "SHUTDOWN_GRACE_SECONDS", cls.shutdown_grace_seconds, 0.001),
            lease_seconds=_env_number(env, "LEASE_SECONDS", cls.lease_seconds, 0.001),
            log_level=_env_log_level(env),
            thinking=thinking,
            reasoning_effort=effort,
            thinking_api=_thinking_api(base_url, thinking, effort),
            agent_model_id=env.get("AGENT_MODEL_ID", "").strip() or cls.agent_model_id,
            mcp_config=mcp_config,
            mcp_servers=servers,
            approval_timeout=_env_number(env, "APPROVAL_TIMEOUT_SECONDS", cls.approval_timeout, 0.001),
            log_format=_env_log_format(env),
            traces_endpoint=_traces_endpoint(env),
            capture_content=bool(_env_bool(env, "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT")),
            env_file=env_file,
        )


def _env_log_level(env: Mapping[str, str]) -> str:
    level = env.get("LOG_LEVEL", "").strip().upper() or Settings.log_level
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"LOG_LEVEL={level!r} must be DEBUG, INFO, WARNING or ERROR")
    return level


def _env_log_format(env: Mapping[str, str]) -> str:
    log_format = env.get("LOG_FORMAT", "").strip().lower() or Settings.log_format
    if log_format not in LOG_FORMATS:
        raise SettingsError(f"LOG_FORMAT={log_format!r} must be text or json")
    return log_format


def _traces_endpoint(env: Mapping[str, str]) -> str | None:
    """Where traces go, as the OTLP exporter resolves it: the traces URL as it is, else the base
    URL with /v1/traces; None when neither is set (no tracing)."""
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if traces:
        return _env_url(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
    if base:
        return _env_url(env, "OTEL_EXPORTER_OTLP_ENDPOINT", "").removesuffix("/") + "/v1/traces"
    return None


ENV_FILE = HERE / ".env"


def load_settings(env_file: Path = ENV_FILE) -> Settings:
    """Settings from the .env beside server.py (whatever the working directory), overridden
    by the real environment."""
    dotenv = {k: v for k, v in dotenv_values(env_file).items() if v is not None} if env_file.is_file() else {}
    settings = Settings.from_env({**dotenv, **os.environ}, str(env_file) if env_file.is_file() else None)
    mcp_text = Path(settings.mcp_config).read_text(encoding="utf-8") if settings.mcp_config else ""
    return dataclasses.replace(settings, notes=tuple(misspelt_settings(dotenv, env_file, mcp_text)))


def misspelt_settings(dotenv: Mapping[str, str], env_file: Path, mcp_text: str) -> Iterator[str]:
    """A warning for each name in .env that is not a setting but close to one (APIKEY, MODEL)."""
    for name in dotenv:
        if name in ENV_NAMES or f"${{{name}}}" in mcp_text:  # a secret an MCP server's entry takes
            continue
        if name.startswith("OTEL_"):
            yield f"{name} in {env_file} is not read: the OpenTelemetry SDK takes it from the real environment only"
        elif close := difflib.get_close_matches(name, ENV_NAMES, 1, 0.6):
            yield f"{name} in {env_file} is not a setting: did you mean {close[0]}?"


# ---------------------------------------------------------------------------
# Errors and SSE
# ---------------------------------------------------------------------------

# Every error a client can get: its code, HTTP status and default message. Each face gives it
# in one shape (ErrorShape below): the /api faces and AG-UI's refusals as API_ERRORS, /v1 as
# OPENAI_ERRORS; inside a stream as the face's own error event.
ERRORS: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "The request body is not valid JSON."),
    "previous_response_not_found": (400, "No stored response has this previous_response_id."),
    "unauthorized": (401, "Send the server key as 'Authorization: Bearer <SERVER_API_KEY>'."),
    "origin_not_allowed": (403, "Pages of this origin may not call this server: list it in CORS_ORIGINS."),
    "not_found": (404, "Not found."),
    "method_not_allowed": (405, "Method not allowed."),
    "conversation_busy": (409, "A turn of this conversation is still running; try again."),
    "turn_superseded": (409, "Another turn took this conversation over while this one ran; nothing was saved."),
    "response_not_latest": (
        409,
        "A later turn continued this response's conversation: continue from its last response.",
    ),
    "approval_decided": (409, "This tool call was decided already, or its time to decide ran out."),
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
    "server_shutting_down": (503, "The server is shutting down; try again shortly."),
    "database_unavailable": (503, "The database is not answering; try again shortly."),
    "upstream_timeout": (504, "The model API did not answer in time (REQUEST_TIMEOUT)."),
}
RETRY_AFTER = {409: 1, 503: 5}  # seconds to wait before trying again, by status, unless the error knows better


class ApiError(Exception):
    """An error for the client: a code from ERRORS, with an optional clearer message and,
    for /v1, the request field at fault (`param`)."""

    def __init__(
        self, code: str, message: str | None = None, retry_after: int | None = None, param: str | None = None
    ) -> None:
        super().__init__(code)
        self.code = code
        self.status_code = ERRORS[code][0]
        self.message = message or ERRORS[code][1]
        self.retry_after = RETRY_AFTER.get(self.status_code) if retry_after is None else retry_after
        self.param = param

    def detail(self) -> dict[str, Any]:
        """code, message and retry_after: what every face says of an error."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after is not None:
            error["retry_after"] = self.retry_after
        return error

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        if self.code == "unauthorized":
            headers["WWW-Authenticate"] = "Bearer"
        return headers


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError("validation_error", message, param=param)


@dataclass(frozen=True)
class ErrorShape:
    """How a face answers an error with an HTTP response: its status and body."""

    name: str
    body: Callable[[ApiError], dict[str, Any]]
    statuses: Mapping[int, int] = field(default_factory=dict)  # the face's status for ours, where it differs

    def status(self, error: ApiError) -> int:
        return self.statuses.get(error.status_code, error.status_code)

    def response(self, error: ApiError) -> JSONResponse:
        return JSONResponse(self.body(error), status_code=self.status(error), headers=error.headers())


def openai_error(error: ApiError) -> dict[str, Any]:
    """OpenAI's error object: the type by status, as its SDKs map it."""
    status = error.status_code
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}}


API_ERRORS = ErrorShape("api", lambda error: {"status": "error", "error": error.detail()})
# OpenAI answers every malformed request with 400.
OPENAI_ERRORS = ErrorShape("openai", openai_error, {415: 400, 422: 400})


class UpstreamIncomplete(Exception):
    """The model's stream ended without a finish reason: the answer was cut."""


class DatabaseUnavailable(Exception):
    """The database cannot answer now (locked, unreachable, read-only, restarting); the client may retry."""


class LeaseLost(Exception):
    """Another turn took over this turn's conversation: this turn must save nothing."""


WHOLE_NUMBER = re.compile(r"[0-9]{1,18}")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # half a UTF-16 pair: no UTF-8 text (database, model API) holds it


def whole_number(text: str) -> int | None:
    """A plain ASCII whole number, else None: str.isdigit() also passes '²', which int() refuses."""
    return int(text) if WHOLE_NUMBER.fullmatch(text) else None


def as_text(text: str) -> str:
    """Text fit for UTF-8: a lone surrogate (JSON may escape one) becomes U+FFFD."""
    return text if text.isascii() or not LONE_SURROGATE.search(text) else LONE_SURROGATE.sub("\ufffd", text)


def upstream_error(exc: BaseException, settings: Settings) -> ApiError:
    """The client's error for a failure of the turn: of the model API, the database, or a bug."""
    if isinstance(exc, openai.APIStatusError):
        return _status_error(exc, settings)
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException) and not _cannot_connect(exc):
        return ApiError("upstream_timeout")
    if isinstance(exc, openai.APIConnectionError | httpx.ConnectError):
        return ApiError("upstream_unreachable")
    known = {UpstreamIncomplete: "upstream_incomplete", DatabaseUnavailable: "database_unavailable"}
    known |= {LeaseLost: "turn_superseded", ApiError: ""}
    for kind, code in known.items():
        if isinstance(exc, kind):
            return exc if isinstance(exc, ApiError) else ApiError(code)
    if isinstance(exc, openai.APIError | httpx.HTTPError | json.JSONDecodeError):
        return ApiError("upstream_error", _upstream_said(exc, settings))
    return ApiError("internal_error")


def _status_error(exc: openai.APIStatusError, settings: Settings) -> ApiError:
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return ApiError("upstream_auth")
    if isinstance(exc, openai.RateLimitError):
        return ApiError("upstream_rate_limited", retry_after=whole_number(exc.response.headers.get("retry-after", "")))
    if _is_unknown_model(exc):
        model = settings.model_name
        message = f"The model API does not know MODEL_NAME={model!r}. {retired_model_note(model)}"
        return ApiError("model_not_found", message.strip())
    if isinstance(exc, openai.NotFoundError):
        base = settings.base_url
        hint = "" if urlsplit(base).path.rstrip("/").endswith("/v1") else " (does it end in /v1?)"
        return ApiError("upstream_error", f"The model API has no chat completions under BASE_URL={base}{hint}.")
    return ApiError("upstream_error", _upstream_said(exc, settings))


def _is_unknown_model(exc: openai.APIStatusError) -> bool:
    # DeepSeek answers an unknown model name with a 400 "Model Not Exist", OpenAI with a 404
    # whose code is model_not_found; other 404s are a wrong BASE_URL.
    body = exc.body if isinstance(exc.body, dict) else {}
    return body.get("message") == "Model Not Exist" or body.get("code") == "model_not_found"


# What looks like a credential in an upstream's message: key-like tokens, bearer values, long secrets.
SECRET_LIKE = re.compile(r"(?i)\b(?:sk|pk|rk|key|token)[-_][A-Za-z0-9_-]{6,}|\bbearer\s+\S+|\b[A-Za-z0-9_-]{32,}\b")


def _upstream_said(exc: BaseException, settings: Settings) -> str:
    """Our message with the upstream's own words, of anything that looks like a key redacted."""
    body = getattr(exc, "body", None)
    said = body.get("message") if isinstance(body, dict) else None
    said = said if isinstance(said, str) and said.strip() else getattr(exc, "message", "") or ""
    if settings.api_key:
        said = said.replace(settings.api_key, "***")
    said = SECRET_LIKE.sub("***", as_text(" ".join(said[:2000].split())))[:500]
    status = getattr(exc, "status_code", None)
    prefix = f"The model API answered {status}" if status else "The model API failed"
    return f"{prefix}: {said}" if said else ERRORS["upstream_error"][1]


def _cannot_connect(exc: BaseException | None) -> bool:
    # httpx-aiohttp passes every failure to connect on as httpx.ConnectTimeout, which the SDK
    # reports as a timeout: a refused connection or an unknown host is found among its causes.
    while exc is not None:
        if isinstance(exc, aiohttp.ClientConnectorError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def failure_cause(exc: BaseException) -> str:
    """What failed, for a log line: a refused connection is called one, not a time-out."""
    status = getattr(exc, "status_code", None)
    if _cannot_connect(exc):
        return "connection refused or host unknown"
    return f"{type(exc).__name__}{f' {status}' if status else ''}"


# One encoder for all: json.dumps() with any option builds a new encoder on every call.
dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # one line, Chinese readable
SSE_PING = b": ping\n\n"  # a comment: every SSE parser skips it, proxies see a live stream
SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def sse(name: str | None, data: Any) -> bytes:
    """One server-sent event; JSON escapes newlines, so one data: line carries it whole."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {dumps(data)}\n\n".encode()


def sse_text(name: str, text: str) -> bytes:
    """An event whose data is {"content": text}: one per token, so it skips the dict encoder."""
    return f'event: {name}\ndata: {{"content":{encode_basestring(text)}}}\n\n'.encode()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------
# Tools: the built-ins
# ---------------------------------------------------------------------------

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
        if _too_large(node.value):  # 1e999 parses as inf
            raise ValueError("Number too large.")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPERATORS:
        return UNARY_OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPERATORS:
        return _binary(node.op, _evaluate(node.left), _evaluate(node.right))
    raise ValueError(f"Unsupported in arithmetic: {type(node).__name__}.")


def _binary(op: ast.operator, left: float, right: float) -> int | float:
    if isinstance(op, ast.Pow) and _power_too_large(left, right):
        raise ValueError("Result too large.")
    try:
        result = BINARY_OPERATORS[type(op)](left, right)
    except ZeroDivisionError:
        raise ValueError("Division by zero.") from None
    except OverflowError:
        raise ValueError("Result too large.") from None
    if isinstance(result, complex) or _too_large(result):
        raise ValueError("Result too large or not a real number.")
    return result


def _power_too_large(base: float, exponent: float) -> bool:
    """Whether int ** int surely passes MAX_RESULT_BITS: Python computes it exactly, however
    long that takes. |base| has b bits, so |base| ** n has at least (b - 1) * n + 1. Other
    powers are floats, which overflow with an error instead."""
    if not isinstance(base, int) or not isinstance(exponent, int) or exponent <= 0:
        return False
    return (abs(base).bit_length() - 1) * exponent + 1 > MAX_RESULT_BITS


def _too_large(value: float) -> bool:
    return value.bit_length() > MAX_RESULT_BITS if isinstance(value, int) else not math.isfinite(value)


BUILT_IN_TOOLS: dict[str, Callable[..., str]] = {"get_current_time": get_current_time, "calculate": calculate}


# ---------------------------------------------------------------------------
# Tools: what the agent may call, and the gate a call passes
# ---------------------------------------------------------------------------

ToolRun = Callable[[Mapping[str, Any], CancellationToken], Awaitable[WorkbenchResult]]


@dataclass(frozen=True)
class ToolSpec:
    """A tool as the model sees it (`schema`, under the name it calls) and as the server runs it."""

    schema: ToolSchema
    run: ToolRun
    server: str | None = None  # the MCP server it comes from; None: built in
    approval: bool = False  # a person must allow each call first
    timeout: float | None = None  # seconds a call may take
    ready: Callable[[], Awaitable[None]] | None = None  # before the timed call: an MCP session reconnects


class ToolOutcome(enum.StrEnum):
    """How a tool call ended, as the events and the metrics tell it."""

    OK = "ok"
    ERROR = "error"
    DENIED = "denied"
    TIMEOUT = "timeout"


class Approval(enum.StrEnum):
    """A person's decision on a tool call, and the life of one: PENDING moves once, to one of
    the others, in the store (SQL that updates only a pending row), whichever side is first."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"


class Gate(Protocol):
    """What a face lets happen to a tool call that needs a person's approval, and to a call of a
    client's tool: asked for and awaited (the SSE stream), refused (faces that cannot ask), or
    handed over to the client, ending the turn (client tools; AG-UI's interrupts)."""

    async def approve(self, call: FunctionCall, spec: ToolSpec) -> str | None:
        """None to run the call; else why it was not run, for the model to read."""
        ...

    def hand_over(self, call: FunctionCall) -> None:
        """The call is the client's to run: the turn ends once this round of calls is done."""
        ...


def built_in_tools(names: Sequence[str]) -> list[ToolSpec]:
    return [_function_spec(FunctionTool(BUILT_IN_TOOLS[name], description=BUILT_IN_TOOLS[name].__doc__ or name))
            for name in names]  # fmt: skip


def _function_spec(tool: FunctionTool) -> ToolSpec:
    async def run(arguments: Mapping[str, Any], token: CancellationToken) -> WorkbenchResult:
        try:
            value = await tool.run_json(arguments, token)
        except Exception as exc:  # noqa: BLE001 - the model reads what went wrong and goes on
            return tool_result(tool.name, str(exc), is_error=True)
        return tool_result(tool.name, tool.return_value_as_string(value))

    return ToolSpec(schema=tool.schema, run=run)  # built once: FunctionTool rebuilds it at every call


def tool_result(name: str, text: str, is_error: bool = False) -> WorkbenchResult:
    return WorkbenchResult(name=name, result=[TextResultContent(content=text)], is_error=is_error)


def _cut(part: TextResultContent | ImageResultContent) -> TextResultContent | ImageResultContent:
    """A tool's text as the model reads it: fit for UTF-8, cut at MAX_TOOL_RESULT_CHARS, saying so."""
    if not isinstance(part, TextResultContent):
        return part
    text, more = as_text(part.content[:MAX_TOOL_RESULT_CHARS]), len(part.content) - MAX_TOOL_RESULT_CHARS
    return TextResultContent(content=f"{text}\n[cut: {more} more characters]" if more > 0 else text)


class Toolbox(Workbench):
    """The tools of one turn as AutoGen's agent sees them: the server's tools, and the client's
    (called by the model, run by the client). Each call passes the face's gate first where it
    needs to, runs within its time limit and is remembered with its outcome."""

    def __init__(
        self, tools: Sequence[ToolSpec], client_tools: Sequence[ToolSchema], gate: Gate, watch: TurnWatch
    ) -> None:
        self.specs = {spec.schema["name"]: spec for spec in tools}
        self.client_tools = {schema["name"] for schema in client_tools}
        self.schemas = [spec.schema for spec in tools] + list(client_tools)
        self.gate, self.watch = gate, watch
        self.outcomes: dict[str, ToolOutcome] = {}
        self.requested: dict[str, str] = {}  # each call's arguments as the model wrote them

    async def list_tools(self) -> list[ToolSchema]:
        return self.schemas

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        cancellation_token: CancellationToken | None = None,
        call_id: str | None = None,
    ) -> WorkbenchResult:
        call_id = call_id or ""
        call = FunctionCall(id=call_id, name=name, arguments=self.requested.get(call_id) or dumps(arguments or {}))
        if name in self.client_tools:
            self.gate.hand_over(call)
            return tool_result(name, "(run by the client)")
        with self.watch.tool_call(call) as ended:
            result, outcome = await self._gated(self.specs[name], call, arguments or {}, cancellation_token)
            self.outcomes[call.id] = outcome
            ended(outcome, result)
        return result

    async def _gated(
        self, spec: ToolSpec, call: FunctionCall, arguments: Mapping[str, Any], token: CancellationToken | None
    ) -> tuple[WorkbenchResult, ToolOutcome]:
        """The call, if the gate lets it through, with its result cut as the model reads it."""
        if spec.approval and (refusal := await self.gate.approve(call, spec)) is not None:
            return tool_result(call.name, refusal, is_error=True), ToolOutcome.DENIED
        result, outcome = await self._run(spec, arguments, token)
        return result.model_copy(update={"result": [_cut(part) for part in result.result]}), outcome

    @staticmethod
    async def _run(
        spec: ToolSpec, arguments: Mapping[str, Any], token: CancellationToken | None
    ) -> tuple[WorkbenchResult, ToolOutcome]:
        try:
            if spec.ready is not None:
                await spec.ready()
            async with asyncio.timeout(spec.timeout):
                result = await spec.run(arguments, token or CancellationToken())
        except TimeoutError:
            text = f"The tool did not answer within {spec.timeout:g} s."
            return tool_result(spec.schema["name"], text, is_error=True), ToolOutcome.TIMEOUT
        except Exception:  # AutoGen's agent waits for ever on a tool that raises: never let one
            logger.exception("tool %s failed", spec.schema["name"])
            return tool_result(spec.schema["name"], "The tool failed.", is_error=True), ToolOutcome.ERROR
        return result, ToolOutcome.ERROR if result.is_error else ToolOutcome.OK

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def reset(self) -> None:
        pass

    async def save_state(self) -> Mapping[str, Any]:
        return {}

    async def load_state(self, state: Mapping[str, Any]) -> None:
        pass


# ---------------------------------------------------------------------------
# Tools: MCP servers
# ---------------------------------------------------------------------------
# MCP_CONFIG names a file in Claude Desktop's format, {"mcpServers": {NAME: SERVER}}, so that
# users paste what they have. SERVER is {"command", "args", "env", "cwd"} (stdio) or
# {"url", "headers"} (Streamable HTTP), plus ours: "requireApproval" (true, the default; false;
# or the server's own tool names), "timeout" (seconds per call, default 60) and "disabled".
# Keys that start with _ are comments (mcp.example.json has some).

MCP_STDIO_KEYS = {"command", "args", "env", "cwd"}
MCP_HTTP_KEYS = {"url", "headers"}
MCP_OUR_KEYS = {"requireApproval", "timeout", "disabled", "type"}
MCP_TYPES = {"stdio", "http", "streamable-http", "streamableHttp"}
MCP_DEFAULT_TIMEOUT = 60.0
MCP_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A stdio server is a child of the worker, in a session of its own (so the MCP SDK can stop its
# process group). On Linux it also dies with the worker, even a killed one: this starts it with
# PR_SET_PDEATHSIG, which execve keeps, and gives up if the worker is already gone.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; parent = os.getppid(); "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL); "
    "os.getppid() == parent or sys.exit(1); os.execvp(sys.argv[1], sys.argv[1:])"
)


@dataclass(frozen=True)
class McpServer:
    """One server of MCP_CONFIG, as the file says (its secrets taken from the environment)."""

    name: str
    params: StdioServerParams | StreamableHttpServerParams = field(repr=False)
    approval: bool | frozenset[str] = True  # True: every tool; a set: those of the server's own names
    timeout: float = MCP_DEFAULT_TIMEOUT

    def needs_approval(self, tool: str) -> bool:
        return self.approval if isinstance(self.approval, bool) else tool in self.approval


def mcp_servers(env: Mapping[str, str]) -> tuple[str | None, tuple[McpServer, ...]]:
    """MCP_CONFIG's path and its servers, less the disabled ones; (None, ()) with no file."""
    raw = env.get("MCP_CONFIG", "").strip()
    path = HERE / (raw or "mcp.json")
    if not raw and not path.is_file():
        return None, ()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"MCP_CONFIG={str(path)!r} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise SettingsError(f"MCP_CONFIG={str(path)!r} is not valid JSON: {exc}") from None
    servers = document.get("mcpServers") if isinstance(document, dict) else None
    if not isinstance(servers, dict):
        raise SettingsError(f'MCP_CONFIG={str(path)!r} must be an object with "mcpServers": {{NAME: SERVER}}')
    parsed = [mcp_server(name, server, env, str(path)) for name, server in servers.items()]
    return str(path), tuple(server for server in parsed if server is not None)


def mcp_server(name: str, server: Any, env: Mapping[str, str], path: str) -> McpServer | None:
    def wrong(what: str) -> SettingsError:
        return SettingsError(f"MCP_CONFIG={path!r}: server {name!r} {what}")

    if not name or not isinstance(server, dict):
        raise wrong("must be an object with a command or a url")
    unknown = sorted(key for key in set(server) - MCP_STDIO_KEYS - MCP_HTTP_KEYS - MCP_OUR_KEYS if key[:1] != "_")
    if unknown:
        raise wrong(f"has unknown keys {unknown}")
    if server.get("disabled") is True:
        return None
    timeout = server.get("timeout", MCP_DEFAULT_TIMEOUT)
    if not is_number(timeout) or timeout <= 0:
        raise wrong('has a "timeout" that is not a number of seconds above 0')
    return McpServer(name, mcp_params(server, env, wrong, timeout), mcp_approval(server, wrong), float(timeout))


def mcp_params(
    server: dict[str, Any], env: Mapping[str, str], wrong: Callable[[str], SettingsError], timeout: float
) -> StdioServerParams | StreamableHttpServerParams:
    if ("command" in server) == ("url" in server) or server.get(
        "type", "stdio" if "command" in server else "http"
    ) not in MCP_TYPES:
        raise wrong('must have either a "command" (stdio) or a "url" (Streamable HTTP)')
    expand = functools.partial(mcp_expand, env=env, wrong=wrong)
    # The session's own read limit covers starting up; each call has its own limit (Toolbox).
    timeout = max(timeout, MCP_START_SECONDS)
    if "url" in server:
        if not isinstance(server["url"], str) or not _strings(server.get("headers", {})):
            raise wrong('needs a "url" string and "headers" of strings')
        headers = {key: expand(value) for key, value in server.get("headers", {}).items()}
        return StreamableHttpServerParams(
            url=expand(server["url"]), headers=headers, timeout=timeout, sse_read_timeout=timeout
        )
    command, args = server["command"], server.get("args", [])
    if not isinstance(command, str) or not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise wrong('needs a "command" string and "args" of strings')
    if not _strings(server.get("env", {})) or not isinstance(server.get("cwd", ""), str):
        raise wrong('needs "env" of strings and a "cwd" string')
    child_env = {key: expand(value) for key, value in server.get("env", {}).items()}
    if sys.platform == "linux":
        command, args = sys.executable, ["-c", DIE_WITH_PARENT, command, *args]
    cwd = str(HERE / server["cwd"]) if server.get("cwd") else None
    return StdioServerParams(command=command, args=args, env=child_env or None, cwd=cwd, read_timeout_seconds=timeout)


def _strings(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def mcp_approval(server: dict[str, Any], wrong: Callable[[str], SettingsError]) -> bool | frozenset[str]:
    approval = server.get("requireApproval", True)
    if isinstance(approval, bool):
        return approval
    if isinstance(approval, list) and all(isinstance(name, str) for name in approval):
        return frozenset(approval)
    raise wrong('has a "requireApproval" that is not true, false or a list of tool names')


def mcp_expand(value: str, env: Mapping[str, str], wrong: Callable[[str], SettingsError]) -> str:
    """${VAR} from the server's environment (.env included): secrets stay out of the file."""
    missing = [name for name in MCP_VARIABLE.findall(value) if name not in env]
    if missing:
        raise wrong(f"uses ${{{missing[0]}}}, which is not set in the environment or .env")
    return MCP_VARIABLE.sub(lambda match: env[match[1]], value)


def model_tool_name(server: str, tool: str, taken: set[str]) -> str:
    """NAME__TOOL as the model sees it: the characters chat APIs allow, at most 64, unique."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{server}__{tool}")[:64]
    for number in itertools.count(2):
        if name not in taken:
            return name
        name = f"{name[: 64 - len(str(number)) - 1]}_{number}"
    raise AssertionError  # unreachable: itertools.count never ends


class McpConnection:
    """One MCP server's session in this worker, from the lifespan's start to its end. Its tools
    are listed once; a call that finds the session dead or stuck (the server died, or timed
    out) leaves it to be reconnected at the next call, never retried itself: a tool may act."""

    def __init__(self, server: McpServer) -> None:
        self.server = server
        self.workbench: McpWorkbench | None = None
        self.status = "starting"  # ok, or "failed: <reason>", as /health shows it
        self.specs: list[ToolSpec] = []
        self.stale = False
        self.restarting = asyncio.Lock()

    async def start(self) -> list[Any]:
        """Connect and list the tools; a server that cannot be reached is logged and left out."""
        try:
            async with asyncio.timeout(max(self.server.timeout, MCP_START_SECONDS)):
                tools = await self._connect()
        except Exception as exc:  # noqa: BLE001 - any failure of a server leaves it out, in one line
            self.status = f"failed: {mcp_reason(exc)}"
            logger.warning("MCP server %s left out: %s", self.server.name, mcp_reason(exc))
            await self.stop()
            return []
        self.status = "ok"
        logger.info("MCP server %s: %d tools", self.server.name, len(tools))
        return tools

    def name_tools(self, tools: list[Any], taken: set[str]) -> None:
        self.specs = [self._spec(tool, taken) for tool in tools]

    async def _connect(self) -> list[Any]:
        self.workbench = McpWorkbench(self.server.params)
        await self.workbench.start()
        return await mcp_tools(self.workbench)

    def _spec(self, tool: Any, taken: set[str]) -> ToolSpec:
        name = model_tool_name(self.server.name, tool.name, taken)
        taken.add(name)
        schema = ToolSchema(name=name, description=tool.description or "", parameters=tool.inputSchema)

        async def run(arguments: Mapping[str, Any], token: CancellationToken) -> WorkbenchResult:
            return await self.call(tool.name, arguments)

        approval, timeout = self.server.needs_approval(tool.name), self.server.timeout
        return ToolSpec(schema, run, self.server.name, approval, timeout, ready=self.reconnect_if_stale)

    async def call(self, tool: str, arguments: Mapping[str, Any]) -> WorkbenchResult:
        if self.workbench is None:
            return tool_result(tool, f"The MCP server {self.server.name} is not connected.", is_error=True)
        done = False
        try:
            # No cancellation token: McpWorkbench links it to a coroutine, whose cancel() fails.
            result = await self.workbench.call_tool(tool, dict(arguments), None)
            done = True
        finally:
            self.stale = self.stale or not done  # timed out or cancelled mid-call: the session may be stuck
        self.stale = self.stale or (result.is_error and mcp_session_lost(result))
        return result

    async def reconnect_if_stale(self) -> None:
        async with self.restarting:
            if not self.stale:
                return
            await self.stop()
            try:
                async with asyncio.timeout(max(self.server.timeout, MCP_START_SECONDS)):
                    await self._connect()
                self.status, self.stale = "ok", False
            except Exception as exc:  # noqa: BLE001 - the call says it; the next one tries again
                self.status = f"failed: {mcp_reason(exc)}"
                await self.stop()

    async def stop(self) -> None:
        workbench, self.workbench = self.workbench, None
        if workbench is not None:
            with suppress(Exception):  # a workbench that never connected raises on stop
                await workbench.stop()


def mcp_reason(exc: BaseException) -> str:
    """One line for a server that failed: the innermost cause of an exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# What McpWorkbench answers when the session is gone (the server died): the next call reconnects.
MCP_SESSION_LOST = ("Connection closed", "MCP Actor not running", "not connected")


def mcp_session_lost(result: WorkbenchResult) -> bool:
    text = result.to_text().strip()
    return not text or any(sign in text for sign in MCP_SESSION_LOST)


class ToolSet:
    """The agent's tools in this worker: the built-ins TOOLS names, and every MCP server's, whose
    sessions live from the lifespan's start to its end."""

    def __init__(self, settings: Settings) -> None:
        calling = bool(settings.model_info["function_calling"])
        self.built_in = built_in_tools(settings.tools) if calling else []
        self.connections = [McpConnection(server) for server in settings.mcp_servers] if calling else []

    async def start(self) -> None:
        listed = await asyncio.gather(*(connection.start() for connection in self.connections))
        taken = {spec.schema["name"] for spec in self.built_in}
        for connection, tools in zip(self.connections, listed, strict=True):  # in order: the same names in every worker
            connection.name_tools(tools, taken)

    async def stop(self) -> None:
        await asyncio.gather(*(connection.stop() for connection in self.connections))

    @property
    def specs(self) -> list[ToolSpec]:
        return self.built_in + [spec for connection in self.connections for spec in connection.specs]

    def health(self) -> dict[str, str]:
        return {connection.server.name: connection.status for connection in self.connections}


# ---------------------------------------------------------------------------
# Storage: the contract, and what both databases share
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """A face's own record of a turn (a Responses API object), saved with the turn by its id."""

    conversation_id: str
    body: dict[str, Any]
    latest: bool  # no turn of its conversation came after


class Store(Protocol):
    """Where conversations live, and the leases that let one turn at a time run on each.
    SQLiteStore (DATABASE_PATH) and PostgresStore (DATABASE_URL) keep it alike, with the same
    SQL (STATEMENTS) and the same rows. Every call raises DatabaseUnavailable when the
    database cannot answer in time; a call that failed changed nothing."""

    async def open(self) -> None:
        """Create or check the schema and connect: SettingsError if the database cannot be used."""

    async def close(self) -> None: ...

    async def health(self) -> str | None:
        """None while the database answers and takes writes; else what is wrong."""

    async def acquire_lease(self, conversation_id: str, owner: str, seconds: float) -> bool:
        """Take the conversation's lease for `seconds`, on the database's clock, unless another
        owner holds one that has not expired."""

    async def renew_lease(self, conversation_id: str, owner: str, seconds: float) -> bool:
        """Extend the lease if `owner` still holds it; False when another turn has taken it."""

    async def release_lease(self, conversation_id: str, owner: str) -> None:
        """Delete the lease if `owner` holds it."""

    async def load_state(self, conversation_id: str) -> dict[str, Any] | None:
        """The agent's saved state (its history window), or None for a new conversation."""

    async def save_turn(
        self,
        conversation_id: str,
        state: Mapping[str, Any],
        records: Sequence[Mapping[str, Any]],
        lease: str,
        artifact: tuple[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Store a completed turn (the agent's state and the turn's records, appended, and the face's
        artifact of it by its id) and delete its lease, in one transaction; LeaseLost, and nothing
        stored, if the lease is gone."""

    async def artifact(self, artifact_id: str) -> Artifact | None:
        """An artifact a face saved with a turn."""

    async def list_conversations(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """A page of conversation summaries, most recently updated first, and how many there are."""

    async def get_conversation(self, conversation_id: str) -> dict[str, Any] | None:
        """The conversation with all its records, or None."""

    async def delete_conversation(self, conversation_id: str) -> bool:
        """Delete the conversation, its records and its approvals; False if there was none."""

    async def ask_approval(self, conversation_id: str, call_id: str, seconds: float) -> None:
        """A tool call now waits `seconds` for a person's decision (PENDING)."""

    async def decide_approval(
        self, conversation_id: str, call_id: str, decision: Approval
    ) -> tuple[bool, Approval | None]:
        """Move a pending approval that has not expired to `decision`: whether it moved, and the
        state it is in (None: no such call waits or waited)."""

    async def approval(self, conversation_id: str, call_id: str) -> Approval | None:
        """The state of a tool call's approval."""

    async def expire_approval(self, conversation_id: str, call_id: str) -> Approval:
        """Nobody decided in time: a pending approval becomes EXPIRED. Its state after (a decision
        that came first stands)."""

    async def remember_calls(self, reasoning: Mapping[str, str], seconds: float) -> None:
        """Keep, for `seconds`, the reasoning behind each call id: the calls went to a stateless
        client (its own tools, or a decision to make), whose next request brings them back without
        it, and a thinking model wants it back."""

    async def recall_calls(self, call_ids: Sequence[str]) -> dict[str, str]:
        """The reasoning kept for those of the call ids that have some."""


# The SQL both databases run, with %s for a parameter. A dialect states all they differ in:
# column types in the schema, the placeholder, and the database's own clock (leases never
# trust the clocks of the machines that run the server).
SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS conversations (
    id text PRIMARY KEY,
    title text NOT NULL,
    state text NOT NULL,
    message_count integer NOT NULL,
    created_at text NOT NULL,
    updated_at text NOT NULL
);
CREATE INDEX IF NOT EXISTS conversations_by_update ON conversations (updated_at DESC, id);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq integer NOT NULL,
    body text NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
CREATE TABLE IF NOT EXISTS leases (
    conversation_id text PRIMARY KEY,
    owner text NOT NULL,
    expires_at {clock_type} NOT NULL
);
CREATE TABLE IF NOT EXISTS approvals (
    conversation_id text NOT NULL,
    call_id text NOT NULL,
    state text NOT NULL,
    expires_at {clock_type} NOT NULL,
    PRIMARY KEY (conversation_id, call_id)
);
CREATE TABLE IF NOT EXISTS call_reasoning (
    call_id text PRIMARY KEY,
    reasoning text NOT NULL,
    expires_at {clock_type} NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    id text PRIMARY KEY,
    conversation_id text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    position integer NOT NULL,
    body text NOT NULL
);
"""
SCHEMA_VERSION = 4  # 2: approvals; 3: call_reasoning; 4: artifacts
STATEMENTS = {
    "acquire_lease": "INSERT INTO leases VALUES (%s, %s, {later}) ON CONFLICT (conversation_id) DO UPDATE"
    " SET owner = excluded.owner, expires_at = excluded.expires_at WHERE leases.expires_at < {now}",
    "renew_lease": "UPDATE leases SET expires_at = {later} WHERE conversation_id = %s AND owner = %s",
    "release_lease": "DELETE FROM leases WHERE conversation_id = %s AND owner = %s",
    "load_state": "SELECT state FROM conversations WHERE id = %s",
    # The new rows' first seq is the count before them: message_count after, less their number.
    "save_conversation": "INSERT INTO conversations VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE"
    " SET state = excluded.state, message_count = conversations.message_count + excluded.message_count,"
    " updated_at = excluded.updated_at RETURNING message_count",
    "save_message": "INSERT INTO messages VALUES (%s, %s, %s)",
    "save_artifact": "INSERT INTO artifacts VALUES (%s, %s, %s, %s)",
    "artifact": "SELECT a.conversation_id, a.body, a.position = c.message_count FROM artifacts a"
    " JOIN conversations c ON c.id = a.conversation_id WHERE a.id = %s",
    "list_conversations": "SELECT id, title, message_count, created_at, updated_at FROM conversations"
    " ORDER BY updated_at DESC, id LIMIT %s OFFSET %s",
    "count_conversations": "SELECT count(*) FROM conversations",
    "get_conversation": "SELECT id, title, created_at, updated_at FROM conversations WHERE id = %s",
    "get_messages": "SELECT body FROM messages WHERE conversation_id = %s ORDER BY seq",
    "delete_conversation": "DELETE FROM conversations WHERE id = %s",
    "delete_approvals": "DELETE FROM approvals WHERE conversation_id = %s",
    # An approval's life: asked (pending, until it expires), then decided once, or expired.
    "ask_approval": "INSERT INTO approvals VALUES (%s, %s, 'pending', {later}) ON CONFLICT (conversation_id, call_id)"
    " DO UPDATE SET state = 'pending', expires_at = excluded.expires_at",
    "decide_approval": "UPDATE approvals SET state = %s WHERE conversation_id = %s AND call_id = %s"
    " AND state = 'pending' AND expires_at > {now}",
    "expire_approval": "UPDATE approvals SET state = 'expired' WHERE conversation_id = %s AND call_id = %s"
    " AND state = 'pending'",
    "approval": "SELECT state FROM approvals WHERE conversation_id = %s AND call_id = %s",
    # The reasoning of a model reply whose tool calls went to a stateless client, by call id.
    "remember_call": "INSERT INTO call_reasoning VALUES (%s, %s, {later}) ON CONFLICT (call_id)"
    " DO UPDATE SET reasoning = excluded.reasoning, expires_at = excluded.expires_at",
    "forget_calls": "DELETE FROM call_reasoning WHERE expires_at < {now}",
    "recall_call": "SELECT reasoning FROM call_reasoning WHERE call_id = %s",
    "schema_version": "SELECT max(version) FROM schema_version",
    "clear_schema_version": "DELETE FROM schema_version",
    "set_schema_version": "INSERT INTO schema_version VALUES (%s)",
}


@dataclass(frozen=True)
class Dialect:
    """What SQLite and PostgreSQL write differently."""

    placeholder: str
    clock_type: str
    now: str  # the database's clock, as leases.expires_at holds it
    later: str  # that clock plus a parameter's seconds

    def sql(self, name: str) -> str:
        statement = STATEMENTS[name].format(now=self.now, later=self.later)
        return statement.replace("%s", self.placeholder)

    @property
    def schema(self) -> str:
        return SCHEMA.format(clock_type=self.clock_type)


SQLITE = Dialect(
    "?", "real", "(julianday('now') - 2440587.5) * 86400.0", "(julianday('now') - 2440587.5) * 86400.0 + ?"
)
POSTGRES = Dialect("%s", "timestamptz", "now()", "now() + make_interval(secs => %s)")
SUMMARY_KEYS = ("conversation_id", "title", "message_count", "created_at", "updated_at")
CONVERSATION_KEYS = ("conversation_id", "title", "created_at", "updated_at")


def summary_row(row: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(SUMMARY_KEYS, row, strict=True))


def conversation_row(row: Sequence[Any], bodies: Sequence[Sequence[str]]) -> dict[str, Any]:
    return {**dict(zip(CONVERSATION_KEYS, row, strict=True)), "messages": [json.loads(b) for (b,) in bodies]}


def conversation_values(conversation_id: str, state: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> tuple:
    """The parameters of save_conversation: the title is the first message's start."""
    now, first = utc_now(), records[0].get("content") if records else None
    title = first[:80] if isinstance(first, str) else ""
    return conversation_id, title, dumps(state), len(records), now, now


def message_values(conversation_id: str, count: int, records: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """The parameters of save_message for each record, given message_count after the save."""
    first = count - len(records)
    return [(conversation_id, first + index, dumps(record)) for index, record in enumerate(records)]


def open_store(settings: Settings) -> Store:
    """The store the settings choose, not yet opened."""
    if settings.database_url:
        return PostgresStore(settings.database_url, settings.database_pool_size, settings.database_timeout)
    return SQLiteStore(settings.database_path)


def database_name(settings: Settings) -> str:
    """The database in use, fit for a log line: never its password."""
    return redact_url(settings.database_url) if settings.database_url else settings.database_path


async def check_store(settings: Settings) -> None:
    """Open and close the store: SettingsError if the database cannot be used."""
    store = open_store(settings)
    await store.open()
    await store.close()


# ---------------------------------------------------------------------------
# Storage: SQLite
# ---------------------------------------------------------------------------


def off_the_loop_if_locked(
    method: Callable[Concatenate[SQLiteStore, P], T],
) -> Callable[Concatenate[SQLiteStore, P], Awaitable[T]]:
    """Run a SQLiteStore method at once, on the loop's connection that never waits; or, when
    that finds the file locked, on the store's own thread, whose connection waits out
    busy_timeout there: a lock held by another process must not stall the event loop. A call
    that failed changed nothing (one statement, or a rolled-back transaction): it can run again."""

    @functools.wraps(method)
    async def call(self: SQLiteStore, *args: P.args, **kwargs: P.kwargs) -> T:
        if not self.queued:  # else after the queued calls, in order
            with suppress(sqlite3.OperationalError):
                return method(self, *args, **kwargs)
        loop = asyncio.get_running_loop()
        self.queued += 1
        work = self.thread.submit(method, self, *args, **kwargs)
        # Counted until the thread is done with it: a cancelled caller does not stop the thread,
        # and a call that overtook it on the loop would run out of order.
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(self._dequeue))
        try:
            return await asyncio.wrap_future(work)
        except sqlite3.OperationalError as exc:
            raise DatabaseUnavailable(f"SQLite: {exc}") from None

    return call


class SQLiteStore:
    """Conversations in one SQLite file (WAL, synchronous=NORMAL). A call runs at once on the
    event loop (a few microseconds, cheaper than any hop to a thread) unless the file is
    locked: then it waits on the store's one thread, which runs such calls in turn."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.on_thread = threading.local()  # .blocking is set on the store's thread
        self.thread = ThreadPoolExecutor(1, "sqlite", initializer=lambda: setattr(self.on_thread, "blocking", True))
        self.queued = 0
        self.blocking: sqlite3.Connection | None = None  # the thread's, waits busy_timeout
        self.quick: sqlite3.Connection | None = None  # the loop's, busy_timeout=0

    def _dequeue(self) -> None:
        self.queued -= 1

    @property
    def db(self) -> sqlite3.Connection:
        """The connection of the thread the call runs on."""
        db = self.blocking if getattr(self.on_thread, "blocking", False) else self.quick
        if db is None:
            raise sqlite3.OperationalError("the store is not open")
        return db

    async def open(self) -> None:
        try:
            self.blocking = self._connect(SQLITE_BUSY_TIMEOUT_MS)
            self.blocking.executescript(SQLITE.schema)
            with self._transaction(self.blocking):
                self.blocking.execute(SQLITE.sql("clear_schema_version"))
                self.blocking.execute(SQLITE.sql("set_schema_version"), (SCHEMA_VERSION,))
        except sqlite3.Error as exc:
            await self.close()
            raise SettingsError(f"DATABASE_PATH={self.path!r} cannot be opened or written: {exc}") from None
        self.quick = self._connect(0)

    def _connect(self, busy_timeout_ms: int) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    async def close(self) -> None:
        for db in (self.quick, self.blocking):
            if db is not None:
                await asyncio.get_running_loop().run_in_executor(self.thread, db.close)
        self.thread.shutdown()

    async def health(self) -> str | None:
        try:
            await self._select_one()
        except (sqlite3.Error, DatabaseUnavailable):
            return "database not answering"
        return None

    @off_the_loop_if_locked
    def _select_one(self) -> None:
        self.db.execute("SELECT 1 FROM conversations LIMIT 1").fetchall()

    @off_the_loop_if_locked
    def acquire_lease(self, conversation_id: str, owner: str, seconds: float) -> bool:
        return self.db.execute(SQLITE.sql("acquire_lease"), (conversation_id, owner, seconds)).rowcount == 1

    @off_the_loop_if_locked
    def renew_lease(self, conversation_id: str, owner: str, seconds: float) -> bool:
        return self.db.execute(SQLITE.sql("renew_lease"), (seconds, conversation_id, owner)).rowcount == 1

    @off_the_loop_if_locked
    def release_lease(self, conversation_id: str, owner: str) -> None:
        self.db.execute(SQLITE.sql("release_lease"), (conversation_id, owner))

    @off_the_loop_if_locked
    def load_state(self, conversation_id: str) -> dict[str, Any] | None:
        row = self.db.execute(SQLITE.sql("load_state"), (conversation_id,)).fetchone()
        return json.loads(row[0]) if row else None

    @off_the_loop_if_locked
    def save_turn(
        self,
        conversation_id: str,
        state: Mapping[str, Any],
        records: Sequence[Mapping[str, Any]],
        lease: str,
        artifact: tuple[str, Mapping[str, Any]] | None = None,
    ) -> None:
        db = self.db
        with self._transaction(db):
            if db.execute(SQLITE.sql("release_lease"), (conversation_id, lease)).rowcount != 1:
                raise LeaseLost
            values = conversation_values(conversation_id, state, records)
            (count,) = db.execute(SQLITE.sql("save_conversation"), values).fetchone()
            db.executemany(SQLITE.sql("save_message"), message_values(conversation_id, count, records))
            if artifact is not None:
                db.execute(SQLITE.sql("save_artifact"), (artifact[0], conversation_id, count, dumps(artifact[1])))

    @off_the_loop_if_locked
    def artifact(self, artifact_id: str) -> Artifact | None:
        row = self.db.execute(SQLITE.sql("artifact"), (artifact_id,)).fetchone()
        return Artifact(row[0], json.loads(row[1]), bool(row[2])) if row else None

    @staticmethod
    @contextmanager
    def _transaction(db: sqlite3.Connection) -> Iterator[None]:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT must not leave the write lock held
                db.execute("ROLLBACK")
            raise

    @off_the_loop_if_locked
    def list_conversations(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        rows = self.db.execute(SQLITE.sql("list_conversations"), (limit, offset)).fetchall()
        (total,) = self.db.execute(SQLITE.sql("count_conversations")).fetchone()
        return [summary_row(row) for row in rows], total

    @off_the_loop_if_locked
    def get_conversation(self, conversation_id: str) -> dict[str, Any] | None:
        row = self.db.execute(SQLITE.sql("get_conversation"), (conversation_id,)).fetchone()
        if row is None:
            return None
        return conversation_row(row, self.db.execute(SQLITE.sql("get_messages"), (conversation_id,)).fetchall())

    @off_the_loop_if_locked
    def delete_conversation(self, conversation_id: str) -> bool:
        with self._transaction(self.db):
            self.db.execute(SQLITE.sql("delete_approvals"), (conversation_id,))
            return self.db.execute(SQLITE.sql("delete_conversation"), (conversation_id,)).rowcount > 0

    @off_the_loop_if_locked
    def ask_approval(self, conversation_id: str, call_id: str, seconds: float) -> None:
        self.db.execute(SQLITE.sql("ask_approval"), (conversation_id, call_id, seconds))

    @off_the_loop_if_locked
    def decide_approval(self, conversation_id: str, call_id: str, decision: Approval) -> tuple[bool, Approval | None]:
        moved = self.db.execute(SQLITE.sql("decide_approval"), (str(decision), conversation_id, call_id)).rowcount
        return moved == 1, self._approval(conversation_id, call_id)

    @off_the_loop_if_locked
    def approval(self, conversation_id: str, call_id: str) -> Approval | None:
        return self._approval(conversation_id, call_id)

    @off_the_loop_if_locked
    def expire_approval(self, conversation_id: str, call_id: str) -> Approval:
        self.db.execute(SQLITE.sql("expire_approval"), (conversation_id, call_id))
        return self._approval(conversation_id, call_id) or Approval.EXPIRED

    def _approval(self, conversation_id: str, call_id: str) -> Approval | None:
        row = self.db.execute(SQLITE.sql("approval"), (conversation_id, call_id)).fetchone()
        return Approval(row[0]) if row else None

    @off_the_loop_if_locked
    def remember_calls(self, reasoning: Mapping[str, str], seconds: float) -> None:
        with self._transaction(self.db):
            self.db.execute(SQLITE.sql("forget_calls"))
            self.db.executemany(SQLITE.sql("remember_call"), [(c, r, seconds) for c, r in reasoning.items()])

    @off_the_loop_if_locked
    def recall_calls(self, call_ids: Sequence[str]) -> dict[str, str]:
        rows = ((c, self.db.execute(SQLITE.sql("recall_call"), (c,)).fetchone()) for c in call_ids)
        return {call_id: row[0] for call_id, row in rows if row}


# ---------------------------------------------------------------------------
# Storage: PostgreSQL
# ---------------------------------------------------------------------------

POSTGRES_SCHEMA_LOCK = 0x636861740001  # any fixed number: the key of the advisory lock around schema changes


def cut_off(connection: psycopg.AsyncConnection) -> None:
    """Shut the connection's socket: its query fails at once. Cancelling a psycopg query instead
    waits for the server to hear the cancel, which a frozen host never does; statement_timeout
    and TCP keepalives do not help either, as its kernel still acknowledges."""
    with suppress(OSError), socket.socket(fileno=os.dup(connection.pgconn.socket)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


class PostgresStore:
    """Conversations in PostgreSQL, shared by any number of instances. One connection pool
    per process, each call borrowing a connection only for its own statements and bounded by
    DATABASE_TIMEOUT; leases run on the database's clock."""

    def __init__(self, url: str, pool_size: int, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self.pool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=pool_size,
            max_size=pool_size,
            timeout=timeout,
            # A connection that cannot be made is given up at once, not retried with a growing
            # back-off (1 s, 2 s, 4 s, ...): a call that needs one makes the pool try again then,
            # so the first call after the database comes back finds it.
            reconnect_timeout=0,
            # No prepared statements: they do not survive PgBouncer in transaction mode.
            kwargs={"autocommit": True, "prepare_threshold": None, "connect_timeout": POSTGRES_CONNECT_SECONDS},
            open=False,
        )

    async def open(self) -> None:
        try:
            connection = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=POSTGRES_CONNECT_SECONDS
            )
            async with connection:
                await self._schema(connection)
            await self.pool.open(wait=True, timeout=POSTGRES_CONNECT_SECONDS)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            await self.close()  # else its workers go on trying to connect
            raise SettingsError(f"DATABASE_URL={redact_url(self.url)!r} cannot be used: {self._reason(exc)}") from None

    async def _schema(self, connection: psycopg.AsyncConnection) -> None:
        """Create or upgrade the schema, unless it is current: a role that may only read and
        write the tables can run the server."""
        with suppress(psycopg.errors.UndefinedTable):
            cursor = await connection.execute(POSTGRES.sql("schema_version"))
            if (await cursor.fetchone() or (None,))[0] == SCHEMA_VERSION:
                return
        # One transaction behind an advisory lock: instances starting together on an empty
        # database take turns, where concurrent CREATE TABLE IF NOT EXISTS can fail.
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(%s)", (POSTGRES_SCHEMA_LOCK,))
            await connection.execute(POSTGRES.schema)
            await connection.execute(POSTGRES.sql("clear_schema_version"))
            await connection.execute(POSTGRES.sql("set_schema_version"), (SCHEMA_VERSION,))

    def _reason(self, exc: BaseException) -> str:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        password = urlsplit(self.url).password
        return reason.replace(password, "***") if password else reason

    async def close(self) -> None:
        await self.pool.close(timeout=POSTGRES_CLOSE_SECONDS)

    async def _call(self, work: Callable[[psycopg.AsyncConnection], Awaitable[T]], timeout: float | None = None) -> T:
        """Run `work` on a pooled connection within the time limit. A connection found dead (the
        server restarted) makes the pool test all it holds, and the work runs once more on a
        fresh one, unless it failed while committing; so a restart costs no call."""
        try:
            return await self._attempt(work, timeout or self.timeout)
        except _DeadConnection as dead:
            if dead.committing:
                raise DatabaseUnavailable("PostgreSQL: the connection died during COMMIT") from None
        checking = asyncio.ensure_future(self.pool.check())
        await asyncio.wait([checking], timeout=timeout or self.timeout)  # left to finish if the host hangs
        try:
            return await self._attempt(work, timeout or self.timeout)
        except _DeadConnection:
            raise DatabaseUnavailable("PostgreSQL: connection lost") from None

    async def _attempt(self, work: Callable[[psycopg.AsyncConnection], Awaitable[T]], timeout: float) -> T:
        watchdog: Watchdog | None = None
        try:
            async with self.pool.connection(timeout) as db:
                watchdog = Watchdog(db, timeout)
                try:
                    return await work(db)
                finally:
                    watchdog.cancel()
        except psycopg.errors.ReadOnlySqlTransaction:
            raise DatabaseUnavailable("PostgreSQL: the database is read-only") from None
        except psycopg_pool.PoolTimeout:
            raise DatabaseUnavailable("PostgreSQL: no connection in time") from None
        except (psycopg.OperationalError, _DeadConnection) as exc:
            if watchdog is not None and watchdog.fired:
                raise DatabaseUnavailable("PostgreSQL: no answer in time") from None
            raise exc if isinstance(exc, _DeadConnection) else _DeadConnection(committing=False) from None

    async def health(self) -> str | None:
        async def read_only(db: psycopg.AsyncConnection) -> bool:
            cursor = await db.execute("SELECT current_setting('transaction_read_only')")
            return (await cursor.fetchone() or ("off",))[0] == "on"

        try:
            return "database is read-only" if await self._call(read_only, POSTGRES_PING_SECONDS) else None
        except (DatabaseUnavailable, psycopg.Error):
            return "database not answering"

    async def _rowcount(self, name: str, *args: Any) -> int:
        async def run(db: psycopg.AsyncConnection) -> int:
            return (await db.execute(POSTGRES.sql(name), args)).rowcount

        return await self._call(run)

    async def _rows(self, name: str, *args: Any) -> list[tuple[Any, ...]]:
        async def run(db: psycopg.AsyncConnection) -> list[tuple[Any, ...]]:
            return await (await db.execute(POSTGRES.sql(name), args)).fetchall()

        return await self._call(run)

    async def acquire_lease(self, conversation_id: str, owner: str, seconds: float) -> bool:
        return await self._rowcount("acquire_lease", conversation_id, owner, seconds) == 1

    async def renew_lease(self, conversation_id: str, owner: str, seconds: float) -> bool:
        return await self._rowcount("renew_lease", seconds, conversation_id, owner) == 1

    async def release_lease(self, conversation_id: str, owner: str) -> None:
        await self._rowcount("release_lease", conversation_id, owner)

    async def load_state(self, conversation_id: str) -> dict[str, Any] | None:
        rows = await self._rows("load_state", conversation_id)
        return json.loads(rows[0][0]) if rows else None

    async def save_turn(
        self,
        conversation_id: str,
        state: Mapping[str, Any],
        records: Sequence[Mapping[str, Any]],
        lease: str,
        artifact: tuple[str, Mapping[str, Any]] | None = None,
    ) -> None:
        async def save(db: psycopg.AsyncConnection) -> None:
            stage = "writing"
            try:
                async with db.transaction():
                    if (await db.execute(POSTGRES.sql("release_lease"), (conversation_id, lease))).rowcount != 1:
                        raise LeaseLost
                    values = conversation_values(conversation_id, state, records)
                    (count,) = await (await db.execute(POSTGRES.sql("save_conversation"), values)).fetchone() or (0,)
                    async with db.cursor() as insert:
                        await insert.executemany(
                            POSTGRES.sql("save_message"), message_values(conversation_id, count, records)
                        )
                    if artifact is not None:
                        await db.execute(
                            POSTGRES.sql("save_artifact"), (artifact[0], conversation_id, count, dumps(artifact[1]))
                        )
                    stage = "committing"  # a failure from here on may have committed
            except psycopg.OperationalError as exc:
                raise _DeadConnection(committing=stage == "committing") from exc

        await self._call(save)

    async def artifact(self, artifact_id: str) -> Artifact | None:
        rows = await self._rows("artifact", artifact_id)
        return Artifact(rows[0][0], json.loads(rows[0][1]), rows[0][2]) if rows else None

    async def list_conversations(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        async def page(db: psycopg.AsyncConnection) -> tuple[list[dict[str, Any]], int]:
            rows = await (await db.execute(POSTGRES.sql("list_conversations"), (limit, offset))).fetchall()
            (total,) = await (await db.execute(POSTGRES.sql("count_conversations"))).fetchone() or (0,)
            return [summary_row(row) for row in rows], total

        return await self._call(page)

    async def get_conversation(self, conversation_id: str) -> dict[str, Any] | None:
        async def get(db: psycopg.AsyncConnection) -> dict[str, Any] | None:
            row = await (await db.execute(POSTGRES.sql("get_conversation"), (conversation_id,))).fetchone()
            if row is None:
                return None
            bodies = await (await db.execute(POSTGRES.sql("get_messages"), (conversation_id,))).fetchall()
            return conversation_row(row, bodies)

        return await self._call(get)

    async def delete_conversation(self, conversation_id: str) -> bool:
        async def delete(db: psycopg.AsyncConnection) -> bool:
            async with db.transaction():
                await db.execute(POSTGRES.sql("delete_approvals"), (conversation_id,))
                return (await db.execute(POSTGRES.sql("delete_conversation"), (conversation_id,))).rowcount > 0

        return await self._call(delete)

    async def ask_approval(self, conversation_id: str, call_id: str, seconds: float) -> None:
        await self._rowcount("ask_approval", conversation_id, call_id, seconds)

    async def decide_approval(
        self, conversation_id: str, call_id: str, decision: Approval
    ) -> tuple[bool, Approval | None]:
        moved = await self._rowcount("decide_approval", str(decision), conversation_id, call_id)
        return moved == 1, await self.approval(conversation_id, call_id)

    async def approval(self, conversation_id: str, call_id: str) -> Approval | None:
        rows = await self._rows("approval", conversation_id, call_id)
        return Approval(rows[0][0]) if rows else None

    async def expire_approval(self, conversation_id: str, call_id: str) -> Approval:
        await self._rowcount("expire_approval", conversation_id, call_id)
        return await self.approval(conversation_id, call_id) or Approval.EXPIRED

    async def remember_calls(self, reasoning: Mapping[str, str], seconds: float) -> None:
        async def remember(db: psycopg.AsyncConnection) -> None:
            async with db.transaction(), db.cursor() as cursor:
                await cursor.execute(POSTGRES.sql("forget_calls"))
                await cursor.executemany(POSTGRES.sql("remember_call"), [(c, r, seconds) for c, r in reasoning.items()])

        await self._call(remember)

    async def recall_calls(self, call_ids: Sequence[str]) -> dict[str, str]:
        found = {call_id: await self._rows("recall_call", call_id) for call_id in call_ids}
        return {call_id: rows[0][0] for call_id, rows in found.items() if rows}


class _DeadConnection(Exception):
    """A pooled connection that the server closed (a restart, a failover)."""

    def __init__(self, committing: bool) -> None:
        super().__init__("dead connection")
        self.committing = committing


class Watchdog:
    """Cuts a connection off when its call passes the time limit (see cut_off)."""

    def __init__(self, connection: psycopg.AsyncConnection, seconds: float) -> None:
        self.fired = False
        self.handle = asyncio.get_running_loop().call_later(seconds, self._fire, connection)

    def _fire(self, connection: psycopg.AsyncConnection) -> None:
        self.fired = True
        cut_off(connection)

    def cancel(self) -> None:
        self.handle.cancel()


# ---------------------------------------------------------------------------
# The model API: streamed chat completions
# ---------------------------------------------------------------------------

# Reasons a model ends a complete answer. "length": cut at the token limit, kept and reported as
# such. Any other reason (content_filter, DeepSeek's insufficient_system_resource) means the API
# cut the answer: nothing of it is saved.
FINISH_REASONS = {"stop", "tool_calls", "function_call", "length"}


class ChunkStream(openai.AsyncStream[ChatCompletionChunk]):
    """The model's SSE stream read here rather than by the SDK's decoder: each chunk is
    validated by pydantic straight from its JSON bytes (no json.loads, no dict walk), a
    quarter less CPU per token. As the SDK does, an event with an "error" raises APIError;
    chunks of unusual APIs that do not validate (say, an unknown finish reason) are built
    unvalidated."""

    async def __stream__(self) -> AsyncIterator[ChatCompletionChunk]:  # type: ignore[override]
        done = False
        async for data in sse_data(self.response.aiter_bytes()):
            if done or data.startswith(b"[DONE]"):
                done = True  # read on to the end: the connection goes back to the pool
                continue
            if b'"error"' not in data:
                with suppress(pydantic.ValidationError):
                    yield ChatCompletionChunk.model_validate_json(data)
                    continue
            yield self._slow_chunk(json.loads(data))

    def _slow_chunk(self, data: Any) -> ChatCompletionChunk:
        if isinstance(data, dict) and data.get("error"):
            error = data["error"]
            message = error.get("message") if isinstance(error, dict) else None
            if not isinstance(message, str) or not message:
                message = "An error occurred during streaming"
            raise openai.APIError(message=message, request=self.response.request, body=error)
        return ChatCompletionChunk.construct(**data)


async def sse_data(stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The data of each server-sent event (its data lines joined by newlines); comments,
    event names and ids are dropped. Lines may end in CRLF, LF or CR."""
    buffer, data = b"", []
    async for received in stream:
        *lines, buffer = (buffer + received).splitlines(keepends=True) or [b""]
        if buffer.endswith(b"\n"):  # a CR alone waits: it may be half of a CRLF
            lines.append(buffer)
            buffer = b""
        for line in lines:
            line = line.rstrip(b"\r\n")
            if line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            elif not line and data:
                yield b"\n".join(data)
                data = []
    if buffer.startswith(b"data:"):
        data.append(buffer.rstrip(b"\r").removeprefix(b"data:").removeprefix(b" "))
    if data:
        yield b"\n".join(data)


class ChunkSource(Protocol):
    """A streamed completion being read: its chunks, and close() to let go of the request."""

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]: ...
    async def close(self) -> None: ...


class ModelAPI:
    """The model API that every turn of this process calls: one openai client over aiohttp,
    which parses HTTP in C (a turn and each token cost about 40% less CPU than over httpx;
    the README's performance section). The request body is posted as built here: the SDK's
    create() walks every message through each of six types for aliases chat messages do not
    have (0.25 ms a message, 10 ms a turn at 40)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.checked: tuple[float, str] | None = None  # when /health?check=model last asked, and what it found
        self.client = openai.AsyncOpenAI(
            api_key=settings.api_key or "",
            base_url=settings.base_url,
            timeout=settings.request_timeout,
            max_retries=settings.max_retries,
            http_client=openai.DefaultAioHttpClient(),
        )

    async def open(self, body: Mapping[str, Any]) -> ChunkSource:
        return await self.client.post(
            "/chat/completions", body=body, cast_to=ChatCompletion, stream=True, stream_cls=ChunkStream
        )

    async def check(self) -> str:
        """Whether the model API answers, asked for its model list (no tokens spent); kept for a while."""
        now = time.monotonic()
        if self.checked is None or now - self.checked[0] > MODEL_CHECK_SECONDS:
            self.checked = (now, await self._list_models())
        return self.checked[1]

    async def _list_models(self) -> str:
        options: Any = {"max_retries": 0, "timeout": MODEL_CHECK_TIMEOUT}
        try:
            # Read as plain JSON: a gateway may answer 200 with a sign-in page, which the SDK's
            # models.list() returns as text and then fails on.
            listed = await self.client.get("/models", cast_to=object, options=options)
        except openai.APIError as exc:
            error = upstream_error(exc, self.settings)
            return f"failed: {error.code}: {error.message}"
        except ValueError:  # a JSON content type on a body that is not JSON
            listed = None
        if not isinstance(listed, dict) or not isinstance(listed.get("data"), list):
            return "failed: upstream_error: GET /models did not answer a model list: is BASE_URL the API's?"
        return "ok"

    async def close(self) -> None:
        await self.client.close()


# ---------------------------------------------------------------------------
# The model API: the demo model
# ---------------------------------------------------------------------------
# With no API_KEY the server answers from this small scripted model instead: through the real
# agent, tools and faces, streamed as an OpenAI-compatible API streams, so that the stream, the
# tool events and the page can be seen, and a client built, before there is a key. It is never
# used when a key is set, and every face says when it is (/, /health, /v1/models, the page).

DEMO_PACE_SECONDS = 0.02  # between the demo model's words: slow enough to see the stream
DEMO_TIME_ZONES = {
    "UTC": ("UTC", "utc"), "Asia/Tokyo": ("东京", "tokyo"),
    "Asia/Shanghai": ("北京", "上海", "中国", "beijing", "shanghai", "china"),
    "America/New_York": ("纽约", "new york"), "Europe/London": ("伦敦", "london"), "Europe/Paris": ("巴黎", "paris"),
    "Europe/Berlin": ("柏林", "berlin"), "America/Los_Angeles": ("洛杉矶", "los angeles"),
    "Asia/Singapore": ("新加坡", "singapore"), "Australia/Sydney": ("悉尼", "sydney"),
}  # fmt: skip
DEMO_TIME_WORDS = re.compile(r"几点|时间|日期|今天|星期|\btime\b|\bdate\b|\bclock\b|\btoday\b", re.IGNORECASE)
DEMO_ARITHMETIC = re.compile(r"[-+*/%^×÷().\d\s]{3,}")
DEMO_CJK = "\u3000-\u303f\u4e00-\u9fff\uff00-\uffef\u201c\u201d"  # Chinese, its punctuation and quotes
DEMO_PIECES = re.compile(rf"\s*[{DEMO_CJK}]{{1,3}}|\s*[^\s{DEMO_CJK}]+|\s+")
DEMO_TEXT = {
    "zh": {
        "time": ("用户想知道时间，用 get_current_time 查一下。", ""),
        "math": ("这是一道算术题，用 calculate 来算。", "结果是 {result}。"),
        "other": (
            "没有设置 API_KEY，我是内置的演示模型。",
            "我是内置的演示模型：还没有设置 API_KEY。我能演示查询时间（问“现在东京几点？”）和算术"
            "（问“(2+3)*4 等于多少？”）。要和真正的模型对话，在 server.py 旁边的 .env 里写上"
            " API_KEY=你的密钥，然后重启服务。",
        ),
    },
    "en": {
        "time": ("The user asks for the time; get_current_time will tell.", ""),
        "math": ("This is arithmetic; calculate will do it.", "The result is {result}."),
        "other": (
            "No API_KEY is set: I am the built-in demo model.",
            'I am the built-in demo model: no API_KEY is set yet. I can show a time lookup (ask "What time is it '
            'in Tokyo?") and arithmetic (ask "What is (2+3)*4?"). To talk to a real model, put API_KEY=your-key in '
            "the .env beside server.py and restart the server.",
        ),
    },
}


class DemoModelAPI:
    """The demo model, in the place of ModelAPI (see above)."""

    async def open(self, body: Mapping[str, Any]) -> ChunkSource:
        return DemoStream(demo_chunks(body))

    async def check(self) -> str:
        return "demo"

    async def close(self) -> None:
        pass


class DemoStream:
    """The demo model's chunks, a word at a time."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        for chunk in self.chunks:
            await asyncio.sleep(DEMO_PACE_SECONDS)
            yield ChatCompletionChunk.model_validate(chunk)

    async def close(self) -> None:
        pass


def demo_chunks(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The demo model's answer to a chat completion request, as streamed chunks."""
    reasoning, text, call = demo_answer(body["messages"], {tool["function"]["name"] for tool in body.get("tools", [])})
    deltas = [{"reasoning_content": word} for word in demo_words(reasoning)] + [
        {"content": w} for w in demo_words(text)
    ]
    if call is not None:
        deltas.append({"tool_calls": [{"index": 0, "id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                                       "function": {"name": call[0], "arguments": dumps(call[1])}}]})  # fmt: skip
    finish = "tool_calls" if call is not None else "stop"
    chunks = [demo_chunk([{"index": 0, "delta": delta, "finish_reason": None}]) for delta in deltas]
    chunks.append(demo_chunk([{"index": 0, "delta": {}, "finish_reason": finish}]))
    if (body.get("stream_options") or {}).get("include_usage"):
        prompt = sum(len(str(m.get("content") or "")) for m in body["messages"]) // 4 + 1
        usage = {"prompt_tokens": prompt, "completion_tokens": (len(reasoning) + len(text)) // 4 + 1}
        chunks.append(demo_chunk([], usage | {"total_tokens": sum(usage.values())}))
    return chunks


def demo_chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {"id": "demo", "object": "chat.completion.chunk", "created": 0, "model": "demo", "choices": choices,
            "usage": usage}  # fmt: skip


def demo_answer(messages: Sequence[Mapping[str, Any]], tools: set[str]) -> tuple[str, str, tuple[str, dict] | None]:
    """(reasoning, text, tool call) for the conversation so far: a tool first where one helps."""
    asked = next((m for m in reversed(messages) if m["role"] == "user"), {"content": ""})
    question = asked["content"] if isinstance(asked["content"], str) else " ".join(
        part.get("text", "") for part in asked["content"] if isinstance(part, dict))  # fmt: skip
    text = DEMO_TEXT["zh" if re.search(r"[\u4e00-\u9fff]", question) else "en"]
    if messages[-1]["role"] == "tool":  # the tool's result is in: answer with it
        result = messages[-1]["content"]
        if DEMO_TIME_WORDS.search(question):
            return "", demo_time(result, text is DEMO_TEXT["zh"]), None
        return "", text["math"][1].format(result=result), None
    expression = max((m.strip() for m in DEMO_ARITHMETIC.findall(question)), key=len, default="")
    if DEMO_TIME_WORDS.search(question) and "get_current_time" in tools:
        return text["time"][0], "", ("get_current_time", {"timezone": demo_time_zone(question)})
    if re.search(r"\d\s*[-+*/%^×÷]\s*[\d(]", expression) and "calculate" in tools:
        expression = expression.replace("×", "*").replace("÷", "/").replace("^", "**")
        return text["math"][0], "", ("calculate", {"expression": expression})
    return text["other"][0], text["other"][1], None


def demo_time(result: str, chinese: bool) -> str:
    """get_current_time's result ('2026-12-01T21:30:47+09:00 (Tuesday, Asia/Tokyo)') said plainly."""
    stamp, _, rest = result.partition(" (")
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return result  # the tool's error, as it is
    zone = rest.rstrip(")").rpartition(", ")[2]
    names = DEMO_TIME_ZONES.get(zone, (zone, zone))
    if chinese:
        return f"{names[0]}现在是 {moment:%Y-%m-%d %H:%M}，星期{'一二三四五六日'[moment.weekday()]}。"
    place = zone if zone == "UTC" or zone not in DEMO_TIME_ZONES else names[-1].title()
    return f"In {place} it is {moment:%H:%M} on {moment:%A}, {moment:%Y-%m-%d}."


def demo_time_zone(question: str) -> str:
    lowered = question.lower()
    return next((zone for zone, names in DEMO_TIME_ZONES.items() if any(name in lowered for name in names)), "UTC")


def demo_words(text: str) -> list[str]:
    """The text in the pieces a model streams: words, or up to three characters of Chinese."""
    return DEMO_PIECES.findall(text)


@dataclass(frozen=True, slots=True)
class Tokens:
    """Tokens as the provider counts them: `prompt` includes the `cached` ones, `completion`
    the `reasoning` ones (DeepSeek bills a cache hit at a fiftieth of a miss)."""

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    reasoning: int = 0

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    @classmethod
    def of(cls, usage: Any) -> Tokens:
        """From a chunk's usage: OpenAI's details, else DeepSeek's prompt_cache_hit_tokens."""
        prompt_details, completion_details = usage.prompt_tokens_details, usage.completion_tokens_details
        cached = getattr(prompt_details, "cached_tokens", None)
        cached = cached if cached is not None else (usage.model_extra or {}).get("prompt_cache_hit_tokens")
        reasoning = getattr(completion_details, "reasoning_tokens", None)
        return cls(usage.prompt_tokens or 0, usage.completion_tokens or 0, int(cached or 0), int(reasoning or 0))


class ThinkTags:
    """The reasoning a local R1-style model writes into its content: a message that opens with
    <think> has its reasoning up to </think>, then the answer (less the white space between).
    Any other content is the answer, exactly as written. A tag may be cut across chunks."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self) -> None:
        self.state = "start"  # start -> thinking -> after -> answering; or start -> answering
        self.pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        """("reasoning" | "text", part) for what can be told apart so far."""
        parts: list[tuple[str, str]] = []
        text, self.pending = self.pending + text, ""
        while text:
            if self.state == "answering":
                parts.append(("text", text))
                break
            if self.state == "start":
                text = self._start(text)
            elif self.state == "thinking":
                text = self._thinking(text, parts)
            else:  # after </think>: the white space before the answer is not the answer's
                text = text.lstrip()
                self.state = "answering" if text else self.state
        return parts

    def _start(self, text: str) -> str:
        head = text.lstrip()
        if head.startswith(self.OPEN):
            self.state = "thinking"
            return head[len(self.OPEN) :]
        if self.OPEN.startswith(head):  # white space, or the tag cut in two: wait for more
            self.pending = text
            return ""
        self.state = "answering"
        return text

    def _thinking(self, text: str, parts: list[tuple[str, str]]) -> str:
        index = text.find(self.CLOSE)
        if index < 0:
            keep = next((n for n in range(len(self.CLOSE) - 1, 0, -1) if text.endswith(self.CLOSE[:n])), 0)
            text, self.pending = text[: len(text) - keep], text[len(text) - keep :]
            parts += [("reasoning", text)] if text else []
            return ""
        parts += [("reasoning", text[:index])] if index else []
        self.state = "after"
        return text[index + len(self.CLOSE) :]

    def flush(self) -> list[tuple[str, str]]:
        text, self.pending = self.pending, ""
        return [("reasoning" if self.state == "thinking" else "text", text)] if text else []


class ModelReply:
    """One streamed completion as it arrives. Reasoning (the API's reasoning_content, or an
    R1-style model's <think> block in its content) and answer text go to the turn at once,
    exactly as written; tool calls and usage are gathered for the result AutoGen reads."""

    def __init__(self, emit: Callable[[TurnEvent], None], think_tags: bool) -> None:
        self.emit = emit
        self.tags: ThinkTags | None = ThinkTags() if think_tags else None
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.tokens = Tokens()

    def feed(self, chunk: ChatCompletionChunk) -> None:
        if chunk.usage is not None:  # on the last chunk, with or without a choice
            self.tokens = Tokens.of(chunk.usage)
        if not chunk.choices:
            return
        choice = chunk.choices[0]
        self.finish_reason = choice.finish_reason or self.finish_reason
        delta = choice.delta
        reasoning = (delta.model_extra or {}).get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            self.tags = None  # the API says where the reasoning is: the content is all answer
            self._part("reasoning", reasoning)
        if delta.content:
            for kind, text in self.tags.feed(delta.content) if self.tags else [("text", delta.content)]:
                self._part(kind, text)
        for call in delta.tool_calls or ():
            self._call_part(call)

    def _part(self, kind: str, text: str) -> None:
        text = as_text(text)
        (self.reasoning if kind == "reasoning" else self.text).append(text)
        self.emit(ReasoningDelta(text) if kind == "reasoning" else TextDelta(text))

    def _call_part(self, delta: Any) -> None:
        call = self.calls.setdefault(delta.index, {"id": "", "name": "", "arguments": []})
        call["id"] = delta.id or call["id"]
        if delta.function is not None:
            call["name"] += as_text(delta.function.name or "")
            call["arguments"].append(as_text(delta.function.arguments or ""))

    def result(self) -> CreateResult:
        """What AutoGen's agent reads; UpstreamIncomplete if the stream ended without a reason."""
        for kind, text in self.tags.flush() if self.tags else ():
            self._part(kind, text)
        if self.finish_reason not in FINISH_REASONS:
            raise UpstreamIncomplete
        calls = [
            FunctionCall(
                id=c["id"] or f"call_{uuid.uuid4().hex[:24]}", name=c["name"], arguments="".join(c["arguments"])
            )
            for _, c in sorted(self.calls.items())
        ]
        self.emit(Usage(self.tokens, self.finish_reason))
        finish = "function_calls" if calls else "length" if self.finish_reason == "length" else "stop"
        usage = RequestUsage(prompt_tokens=self.tokens.prompt, completion_tokens=self.tokens.completion)
        reasoning = "".join(self.reasoning) or None
        return CreateResult(finish_reason=finish, content=calls or "".join(self.text), usage=usage, cached=False,
                            thought=reasoning)  # fmt: skip


# ---------------------------------------------------------------------------
# The AutoGen adapter: the agent's memory, and the messages it sends
# ---------------------------------------------------------------------------
# Every reach into AutoGen's private parts sits in the adapter's two sections, each with its reason:
# - autogen_ext.models.openai._model_info.get_info: the only way to ask what AutoGen knows of
#   a model name (vision, function calling), so that known OpenAI models need no MODEL_* flags;
# - ChatCompletionContext._messages: the base class's list, which its subclasses keep;
# - McpWorkbench._actor: its session, asked for the tools as the server lists them (mcp_tools).
# The rest is AutoGen's public API: AssistantAgent, ChatCompletionClient, Workbench, messages.
# check_autogen() fails start-up on any other version than the one this was written against.
AUTOGEN_VERSION = "0.7.5"
AGENT_NAME = "assistant"


def check_autogen() -> None:
    for name in ("autogen-agentchat", "autogen-core", "autogen-ext"):
        found = importlib.metadata.version(name)
        if found != AUTOGEN_VERSION:
            raise SettingsError(
                f"{name} {found} is installed; this server needs {AUTOGEN_VERSION}: see requirements.txt"
            )


def autogen_model_info(model: str) -> ModelInfo | None:
    try:
        return _autogen_model_info.get_info(model)
    except (KeyError, ValueError):
        return None


async def mcp_tools(workbench: McpWorkbench) -> list[Any]:
    """The MCP server's tools (mcp.types.Tool) with their whole input schemas. McpWorkbench's
    list_tools() keeps only properties, required and additionalProperties: it drops $defs and
    leaves each $ref to them dangling (microsoft/autogen#6663), so its session is asked itself."""
    if workbench._actor is None:
        raise RuntimeError("the MCP session did not start")
    listed = await (await workbench._actor.call("list_tools", None))
    return list(listed.tools)


class ClientImage(Image):
    """An image as the client sent it, whose bytes and media type go to the model API as they
    are. AutoGen's Image decodes it on construction and sends it re-encoded as PNG: on the event
    loop, a 3.6 MB JPEG took 2.6 s and went out as 26 MB."""

    def __init__(self, data_uri: str, size: tuple[int, int]) -> None:  # not Image's: that decodes
        self.uri, self.size = data_uri, size

    @property
    def data_uri(self) -> str:
        return self.uri

    def to_base64(self) -> str:
        return self.uri.partition(",")[2]


Content = str | list[str | Image]  # a user message's images come with its text, in order


def history_window(messages: list[LLMMessage], size: int) -> list[LLMMessage]:
    """System messages at the start (a client's, on /v1), then the last `size` messages,
    widened back to a user message so no tool result is cut from its call (the current turn
    stays whole even when it alone is longer)."""
    head = system_head(messages)
    return messages[:head] + _recent(messages[head:], size)


def system_head(messages: Sequence[LLMMessage]) -> int:
    """How many system messages the messages start with."""
    head = 0
    while head < len(messages) and isinstance(messages[head], SystemMessage):
        head += 1
    return head


def _recent(messages: list[LLMMessage], size: int) -> list[LLMMessage]:
    start = max(0, len(messages) - size)
    for index in range(start, len(messages)):
        if isinstance(messages[index], UserMessage):
            return messages[index:]
    for index in range(start - 1, -1, -1):
        if isinstance(messages[index], UserMessage):
            return messages[index:]
    return messages


class HistoryWindow(ChatCompletionContext):
    """The agent's memory of a conversation: sends the history window to the model and saves
    only that window (the full history lives in the messages table, so turn 100 loads as fast
    as turn 2). An AssistantMessage that calls tools keeps the model's reasoning in `thought`;
    the text the model wrote beside the calls ("Let me check.") has no place in AutoGen's
    message, so it is kept here by the first call's id, and saved with the window."""

    STATE_VERSION = 2  # 1 (no version): a tool call's thought was its text unless reasoning was passed back

    def __init__(self, size: int, messages: list[LLMMessage] | None = None, legacy_reasoning: bool = False) -> None:
        super().__init__(messages)
        self.size = size
        self.call_texts: dict[str, str] = {}
        self.legacy_reasoning = legacy_reasoning

    async def get_messages(self) -> list[LLMMessage]:
        return history_window(self._messages, self.size)

    def forget_results(self, call_ids: Collection[str]) -> None:
        """Drop the results of these calls from the last message of results (and it, if it empties)."""
        last = self._messages[-1] if self._messages else None
        if isinstance(last, FunctionExecutionResultMessage):
            last.content = [result for result in last.content if result.call_id not in call_ids]
            if not last.content:
                self._messages.pop()

    async def save_state(self) -> Mapping[str, Any]:
        window = await self.get_messages()
        ids = {m.content[0].id for m in window if isinstance(m, AssistantMessage) and isinstance(m.content, list)}
        texts = {call_id: text for call_id, text in self.call_texts.items() if call_id in ids}
        state = ChatCompletionContextState(messages=window).model_dump()
        return {**state, "call_texts": texts, "version": self.STATE_VERSION}

    async def load_state(self, state: Mapping[str, Any]) -> None:
        self._messages = ChatCompletionContextState.model_validate({"messages": state.get("messages", [])}).messages
        self.call_texts = dict(state.get("call_texts") or {})
        if state.get("version") is None and not self.legacy_reasoning:
            for message in self._messages:  # version 1 kept AutoGen's meaning: the text beside the calls
                if isinstance(message, AssistantMessage) and isinstance(message.content, list) and message.thought:
                    self.call_texts[message.content[0].id], message.thought = message.thought, None


def with_instructions(messages: Sequence[LLMMessage], instructions: str) -> list[LLMMessage]:
    """The messages with a request's instructions after their system messages (which the
    request joins into one): the server's system message first, then the client's."""
    head = system_head(messages)
    return [*messages[:head], SystemMessage(content=instructions), *messages[head:]]


def openai_messages(messages: Sequence[LLMMessage], memory: HistoryWindow, thinking: bool) -> list[dict[str, Any]]:
    """AutoGen's messages as the chat completions API takes them, with the reasoning passed
    back where it is needed (see pass_back)."""
    reasoning = iter(pass_back(messages, thinking))
    sent: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, SystemMessage) and sent and sent[-1]["role"] == "system":
            sent[-1]["content"] += "\n" + message.content  # one system message: some local models take no more
        elif isinstance(message, SystemMessage):
            sent.append({"role": "system", "content": message.content})
        elif isinstance(message, UserMessage):
            sent.append({"role": "user", "content": user_content(message.content)})
        elif isinstance(message, AssistantMessage):
            sent.append(assistant_message(message, memory.call_texts, next(reasoning)))
        elif isinstance(message, FunctionExecutionResultMessage):
            sent += [{"role": "tool", "tool_call_id": r.call_id, "content": r.content} for r in message.content]
    return sent


def user_content(content: str | Sequence[str | Image]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    return [
        {"type": "text", "text": part}
        if isinstance(part, str)
        else {"type": "image_url", "image_url": {"url": part.data_uri}}
        for part in content
    ]


def assistant_message(
    message: AssistantMessage, call_texts: Mapping[str, str], reasoning: str | None
) -> dict[str, Any]:
    sent: dict[str, Any] = {"role": "assistant"}
    if isinstance(message.content, str):
        sent["content"] = message.content
    else:
        sent["content"] = call_texts.get(message.content[0].id) if message.content else None
        sent["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.content
        ]
    if reasoning is not None:
        sent["reasoning_content"] = reasoning
    return sent


def pass_back(messages: Sequence[LLMMessage], thinking: bool) -> list[str | None]:
    """The reasoning_content of each assistant message, in order. A thinking model that called
    tools wants its reasoning back on every assistant message of that turn (user message to
    user message), and refuses the request without it (DeepSeek's rule). It is sent where the
    API streamed reasoning for such a turn, whatever the host (a gateway to DeepSeek), and
    where `thinking` says the API thinks; an empty one stands in for reasoning never kept (a
    turn saved before this server passed it back). OpenAI never streams it: nothing is sent."""
    result: list[str | None] = []
    turn: list[AssistantMessage] = []
    for message in [*messages, None]:
        if message is None or isinstance(message, UserMessage):
            called_tools = any(isinstance(m.content, list) for m in turn)
            reasoned = thinking or any(m.thought for m in turn)
            result += [(m.thought or "") if called_tools and reasoned else None for m in turn]
            turn = []
        elif isinstance(message, AssistantMessage):
            turn.append(message)
    return result


def openai_tool(schema: ToolSchema) -> dict[str, Any]:
    function = {
        "name": schema["name"],
        "description": schema.get("description", ""),
        "parameters": schema.get("parameters", {"type": "object", "properties": {}}),
    }
    if schema.get("strict") is not None:
        function["strict"] = schema["strict"]
    return {"type": "function", "function": function}


# ---------------------------------------------------------------------------
# The AutoGen adapter: the agent's model, and a run of the agent
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOptions:
    """What a request asks of each model call of its turn, beside the server's settings."""

    sampling: Mapping[str, Any] = field(default_factory=dict)  # temperature, top_p, max_tokens, stop, seed, ...
    response_format: Mapping[str, Any] | None = None
    client_tools: Sequence[ToolSchema] = ()
    tool_choice: Any = None  # the client's; for the turn's first model call only
    parallel_tool_calls: bool | None = None
    instructions: str | None = None  # after the system messages, for this turn's model calls only


class AgentModel(ChatCompletionClient):
    """The model as AutoGen's agent calls it in one turn. It builds the request itself (the
    reasoning passed back, the turn's sampling and tools), reads the stream itself (ModelReply)
    and keeps every stream it opened, to close them when the turn ends: AutoGen's nested
    generators, once left, close only when the garbage collector gets to them."""

    def __init__(
        self,
        api: ModelAPI,
        settings: Settings,
        options: ModelOptions,
        memory: HistoryWindow,
        emit: Callable[[TurnEvent], None],
        watch: TurnWatch,
    ) -> None:
        self.api, self.settings, self.options, self.memory, self.emit = api, settings, options, memory, emit
        self.watch = watch
        self.streams: set[ChunkSource] = set()
        self.calls = 0

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(**self.settings.model_info)  # type: ignore[typeddict-item]

    @property
    def capabilities(self) -> ModelInfo:  # type: ignore[override]
        return self.model_info

    def body(self, messages: Sequence[LLMMessage], tools: Sequence[Any], tool_choice: Any) -> dict[str, Any]:
        settings, options = self.settings, self.options
        thinking = settings.thinking_api and settings.thinking != "disabled"
        if options.instructions:
            messages = with_instructions(messages, options.instructions)
        body: dict[str, Any] = {
            "model": settings.model_name,
            "messages": openai_messages(messages, self.memory, thinking),
        }
        body |= {"stream": True, "stream_options": {"include_usage": True}}  # real APIs send usage only when asked
        if settings.thinking:
            body["thinking"] = {"type": settings.thinking}
        if settings.reasoning_effort:
            body["reasoning_effort"] = settings.reasoning_effort
        if tools:
            body["tools"] = [openai_tool(tool if isinstance(tool, dict) else tool.schema) for tool in tools]
            body["tool_choice"] = (
                options.tool_choice if options.tool_choice is not None and not self.calls else tool_choice
            )
            if options.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = options.parallel_tool_calls
        if options.response_format is not None:
            body["response_format"] = options.response_format
        return body | dict(options.sampling)

    async def create_stream(  # type: ignore[override]
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Any] = (),
        tool_choice: Any = "auto",
        json_output: Any = None,
        extra_create_args: Mapping[str, Any] | None = None,
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncIterator[str | CreateResult]:
        reply = ModelReply(self.emit, think_tags=not self.settings.thinking_api)
        with self.watch.model_call():
            stream = await self.api.open(self.body(messages, tools, tool_choice))
            self.calls += 1
            self.streams.add(stream)
            try:
                async for chunk in stream:
                    reply.feed(chunk)
            finally:
                await stream.close()  # aiohttp keeps a connection whose read was cancelled until it is released
                self.streams.discard(stream)
            result = reply.result()
        if isinstance(result.content, list) and reply.text:
            self.memory.call_texts[result.content[0].id] = "".join(reply.text)
        yield result

    async def create(self, messages: Sequence[LLMMessage], **kwargs: Any) -> CreateResult:  # type: ignore[override]
        return [item async for item in self.create_stream(messages, **kwargs)][-1]  # type: ignore[return-value]

    async def close(self) -> None:
        """Close the model responses still open."""
        for stream in list(self.streams):
            await stream.close()

    def actual_usage(self) -> RequestUsage:
        return RequestUsage(prompt_tokens=0, completion_tokens=0)  # counted by the turn, with cache and reasoning

    total_usage = actual_usage

    def count_tokens(self, messages: Sequence[LLMMessage], **kwargs: Any) -> int:
        return 0  # AssistantAgent does not ask; the history window bounds the request by messages

    def remaining_tokens(self, messages: Sequence[LLMMessage], **kwargs: Any) -> int:
        return 1 << 30


async def run_agent(
    ctx: AppContext,
    job: TurnJob,
    emit: Callable[[TurnEvent], None],
    gate: TurnGate,
    token: CancellationToken,
    watch: TurnWatch,
) -> Mapping[str, Any] | None:
    """Run the job through AutoGen's agent, its model's and tools' events going to `emit` as they
    happen. Returns the agent's state to save, for a stored conversation. The run ends early,
    once a round of tool calls is done, where the gate handed a call over to the client."""
    agent, model, toolbox = agent_for(ctx, job, emit, gate, watch)
    if (job.stored or job.history is None) and (state := await ctx.store.load_state(job.conversation_id)) is not None:
        await agent.load_state(state)
    if not job.stored:
        await recall_reasoning(ctx.store, agent.model_context)
    await add_client_results(agent.model_context, job.results)
    await run_decided_calls(agent.model_context, toolbox, gate, emit)
    events = agent.run_stream(task=agent_task(job.message), cancellation_token=token, output_task_messages=False)
    try:
        async for event in events:
            for item in tool_events(event, toolbox, gate):
                emit(item)
            if isinstance(event, ToolCallExecutionEvent) and gate.stops_turn:
                break
    finally:
        await events.aclose()
        await model.close()
    if job.stored:
        await forget_stopped(agent.model_context, gate)
        return await agent.save_state()
    if gate.stops_turn:
        await remember_reasoning(ctx.store, agent.model_context, gate)
    return None


async def add_client_results(memory: ChatCompletionContext, results: Sequence[FunctionExecutionResult]) -> None:
    """The client's tools' results, for the calls its last turn handed over, before the model goes on."""
    if not results:
        return
    messages = await memory.get_messages()
    # Where the model called the agent's tools too, their results follow the calls already.
    answered = messages[-1] if messages and isinstance(messages[-1], FunctionExecutionResultMessage) else None
    asked = messages[-2] if answered is not None and len(messages) > 1 else messages[-1] if messages else None
    done = {result.call_id for result in answered.content} if answered is not None else set()
    waiting = {call.id for call in calls_of(asked)} - done if asked is not None else set()
    if not waiting or {result.call_id for result in results} - waiting:
        raise invalid("The results answer no tool call that this conversation's last turn handed over.", "input")
    if answered is not None:
        answered.content = [*answered.content, *results]
    else:
        await memory.add_message(FunctionExecutionResultMessage(content=list(results)))


async def forget_stopped(memory: ChatCompletionContext, gate: TurnGate) -> None:
    """The stand-in results AutoGen's agent recorded for calls the client runs: a stored conversation
    keeps the calls waiting, for the client's next request to answer."""
    stopped = {call.id for call in gate.handed_over + gate.interrupted}
    if stopped and isinstance(memory, HistoryWindow):
        memory.forget_results(stopped)


def calls_of(message: LLMMessage) -> list[FunctionCall]:
    """The tool calls of an assistant message; none for any other message."""
    if isinstance(message, AssistantMessage) and isinstance(message.content, list):
        return message.content
    return []


async def recall_reasoning(store: Store, memory: ChatCompletionContext) -> None:
    """A stateless client sends a thinking model's tool calls back without the reasoning behind
    them, which the model wants: it is where remember_reasoning kept it (if it is anywhere)."""
    bare = [m for m in await memory.get_messages() if calls_of(m) and not m.thought]  # type: ignore[union-attr]
    if bare:
        with suppress(DatabaseUnavailable):  # a stateless turn needs no database: the model may do without
            known = await store.recall_calls([calls_of(m)[0].id for m in bare])
            for message in bare:
                message.thought = known.get(calls_of(message)[0].id)  # type: ignore[union-attr]


async def remember_reasoning(store: Store, memory: ChatCompletionContext, gate: TurnGate) -> None:
    stopped = {call.id for call in gate.handed_over + gate.interrupted}
    kept = {call.id: m.thought for m in await memory.get_messages() for call in calls_of(m)
            if call.id in stopped and m.thought}  # type: ignore[union-attr]  # fmt: skip
    if kept:
        with suppress(DatabaseUnavailable):
            await store.remember_calls(kept, CALL_REASONING_SECONDS)


def agent_for(
    ctx: AppContext, job: TurnJob, emit: Callable[[TurnEvent], None], gate: TurnGate, watch: TurnWatch
) -> tuple[AssistantAgent, AgentModel, Toolbox]:
    """AutoGen's agent for one turn, with its model, memory and tools (cheap: built per turn)."""
    settings = ctx.settings
    thinking = settings.thinking_api and settings.thinking != "disabled"
    memory = HistoryWindow(settings.max_history_messages, job.history, legacy_reasoning=thinking)
    model = AgentModel(ctx.model_api, settings, job.options, memory, emit, watch)  # type: ignore[arg-type]
    toolbox = Toolbox(ctx.tools.specs, job.options.client_tools, gate, watch)
    agent = AssistantAgent(
        AGENT_NAME,
        model_client=model,
        workbench=[toolbox] if toolbox.schemas else None,
        system_message=settings.system_message,
        model_client_stream=True,
        reflect_on_tool_use=bool(toolbox.schemas),
        max_tool_iterations=settings.max_tool_rounds,
        model_context=memory,
    )
    return agent, model, toolbox


async def run_decided_calls(
    memory: ChatCompletionContext, toolbox: Toolbox, gate: TurnGate, emit: Callable[[TurnEvent], None]
) -> None:
    """Run the calls that waited for a decision the request now brings (AG-UI's resume), and put
    their results in the agent's memory, as the agent would have: the model goes on from there."""
    if not gate.decided:
        return
    messages = await memory.get_messages()
    calls = next((m.content for m in reversed(messages) if isinstance(m, AssistantMessage)), [])
    results = []
    for call in calls if isinstance(calls, list) else []:
        if call.id in gate.decided:
            toolbox.requested[call.id] = call.arguments
            outcome = await toolbox.call_tool(call.name, json.loads(call.arguments or "{}"), None, call.id)
            results.append(FunctionExecutionResult(content=outcome.to_text(), name=call.name, call_id=call.id,
                                                   is_error=outcome.is_error))  # fmt: skip
    await memory.add_message(FunctionExecutionResultMessage(content=results))
    for item in tool_events(ToolCallExecutionEvent(content=results, source="assistant"), toolbox, gate):
        emit(item)


def agent_task(message: Content | None) -> TextMessage | MultiModalMessage | None:
    if message is None or isinstance(message, str):
        return None if message is None else TextMessage(content=message, source="user")
    return MultiModalMessage(content=message, source="user")


def tool_events(event: Any, toolbox: Toolbox, gate: TurnGate) -> Iterator[TurnEvent]:
    """The turn's events for AutoGen's tool events: each call as the model asked for it, each
    result as the tool gave it; none for a call handed to the client or waiting for a decision."""
    if isinstance(event, ToolCallRequestEvent):
        yield Status("calling_tool")
        for call in event.content:
            toolbox.requested[call.id] = call.arguments
            spec = toolbox.specs.get(call.name)
            yield ToolCall(
                call.id, call.name, call.arguments, spec.server if spec else None, call.name in toolbox.client_tools
            )
    elif isinstance(event, ToolCallExecutionEvent):
        results = [r for r in event.content if not gate.stopped(r.call_id)]
        for result in results:
            outcome = toolbox.outcomes.get(result.call_id, ToolOutcome.ERROR if result.is_error else ToolOutcome.OK)
            spec = toolbox.specs.get(result.name)
            server, decision = spec.server if spec else None, gate.decisions.get(result.call_id)
            yield ToolResult(
                result.call_id, result.name, result.content, bool(result.is_error), server, outcome, decision
            )
        if results:
            yield Status("responding")


# ---------------------------------------------------------------------------
# The turn: its events
# ---------------------------------------------------------------------------
# A turn is one message run through the agent: one stream of these events, which every face
# renders. Reasoning and text enter it once, where the model API delivered them (ModelReply);
# tool calls and results where AutoGen's agent reports them (tool_events); approvals where the
# gate asks (TurnGate). The last event is Finished or Failed; Ping keeps a quiet stream alive.


@dataclass(frozen=True, slots=True)
class Started:
    conversation_id: str


@dataclass(frozen=True, slots=True)
class Status:
    status: str  # calling_tool, awaiting_approval, responding


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str
    separator: bool = False  # the blank line between answer text written before and after tool calls


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON, as the model wrote it
    server: str | None = None  # the MCP server of the tool
    client: bool = False  # a client's tool: the client runs it, and the turn ends with it


@dataclass(frozen=True, slots=True)
class ApprovalNeeded:
    id: str
    name: str
    arguments: str
    server: str | None = None


@dataclass(frozen=True, slots=True)
class ToolResult:
    call_id: str
    name: str
    content: str
    is_error: bool
    server: str | None = None
    outcome: ToolOutcome = ToolOutcome.OK
    approval: Approval | None = None  # a person's decision, where one was asked for


@dataclass(frozen=True, slots=True)
class Usage:
    """One model call ended: its tokens and why it ended."""

    tokens: Tokens
    finish_reason: str


@dataclass(frozen=True, slots=True)
class Message:
    """The whole answer, once the agent is done: every TextDelta, joined."""

    content: str


@dataclass(frozen=True, slots=True)
class Finished:
    conversation_id: str
    tokens: Tokens
    finish_reason: str  # stop, length, tool_calls (calls the client runs, or that wait for a decision)
    handed_over: tuple[ToolCall, ...] = ()  # calls of the client's tools
    awaiting_approval: tuple[ToolCall, ...] = ()  # calls that wait for a decision the next request brings


@dataclass(frozen=True, slots=True)
class Failed:
    error: ApiError


@dataclass(frozen=True, slots=True)
class Ping:
    pass


PING = Ping()
TurnEvent = (
    Started | Status | ReasoningDelta | TextDelta | ToolCall | ApprovalNeeded | ToolResult | Usage | Message
    | Finished | Failed | Ping
)  # fmt: skip
SEPARATOR = "\n\n"


@dataclass(eq=False)
class Reply:
    """A turn's events folded into what it said and did: the one fold that every JSON reply
    and the stored records are made of, so that they say the same as the stream."""

    conversation_id: str
    records: list[dict[str, Any]] = field(default_factory=list)  # as stored, in order
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    handed_over: list[ToolCall] = field(default_factory=list)
    tokens: Tokens = Tokens()
    cut: bool = False  # a model call ended at its token limit
    segment: list[str] = field(default_factory=list)  # the text of the model call being read
    thought: list[str] = field(default_factory=list)  # its reasoning
    after_tools: bool = False

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.handed_over else "length" if self.cut else "stop"

    def add(self, event: TurnEvent) -> None:
        match event:
            case ReasoningDelta(text=text):
                self.reasoning.append(text)
                self.thought.append(text)
            case TextDelta(text=text, separator=separator):
                self.text.append(text)
                self.segment += [] if separator else [text]
                self.after_tools = False
            case ToolCall():
                self._call(event)
            case ToolResult():
                self._result(event)
            case Usage(tokens=tokens, finish_reason=reason):
                self.tokens += tokens
                self.cut = reason == "length"  # the last model call's: a cut call the agent went on from is not
            case Message():
                self._record(content="".join(self.segment), usage=usage_fields(self.tokens))

    def needs_separator(self) -> bool:
        """Whether answer text comes after tool calls that came after answer text."""
        return bool(self.text) and self.after_tools

    def _call(self, call: ToolCall) -> None:
        shown = {"id": call.id, "name": call.name, "arguments": call.arguments} | server_field(call.server)
        if call.client:  # recorded, for a stored conversation; the client runs it and answers
            self.handed_over.append(call)
            shown["client"] = True
        else:
            self.tool_calls[call.id] = {**shown, "result": None, "is_error": False}
        last = self.records[-1] if self.records else {}
        if last.get("role") == "assistant" and "tool_calls" in last and not self.segment and not self.thought:
            last["tool_calls"].append(shown)  # another call of the same model reply
        else:
            self._record(content="".join(self.segment) or None, tool_calls=[shown])
        self.after_tools = True

    def _result(self, result: ToolResult) -> None:
        if result.call_id in self.tool_calls:
            self.tool_calls[result.call_id].update(result=result.content, is_error=result.is_error)
        body = {"call_id": result.call_id, "name": result.name, "content": result.content, "is_error": result.is_error}
        body |= server_field(result.server) | ({"approval": str(result.approval)} if result.approval else {})
        self.records.append({"role": "tool", **body, "created_at": utc_now()})

    def _record(self, **body: Any) -> None:
        if self.thought:
            body["thought"] = "".join(self.thought)
        self.records.append({"role": "assistant", **body, "created_at": utc_now()})
        self.segment, self.thought = [], []


def server_field(server: str | None) -> dict[str, str]:
    return {"server": server} if server else {}


def usage_fields(tokens: Tokens) -> dict[str, int]:
    """A turn's usage in the /api faces, summed over its model calls."""
    return {
        "prompt_tokens": tokens.prompt,
        "completion_tokens": tokens.completion,
        "cached_tokens": tokens.cached,
        "reasoning_tokens": tokens.reasoning,
    }


async def fold(events: AsyncIterator[TurnEvent], conversation_id: str) -> Reply:
    """A turn's events folded into its Reply."""
    reply = Reply(conversation_id)
    async for event in events:
        reply.add(event)
    return reply


# ---------------------------------------------------------------------------
# The turn: its lease, and the gate of its tool calls
# ---------------------------------------------------------------------------


class LeaseState(enum.Enum):
    HELD = "held"
    RELEASING = "releasing"
    RELEASED = "released"  # deleted, by a release or by the save of the turn


class Lease:
    """A turn's hold on its conversation: the rule of one turn at a time, across processes and
    instances, kept by the database. HELD from take() until release(), which deletes it in a
    task of its own that cancelling the turn cannot stop, retried while the database fails
    until it would have expired anyway; or until the turn's save deletes it."""

    def __init__(self, ctx: AppContext, conversation_id: str, owner: str) -> None:
        self.ctx, self.conversation_id, self.owner = ctx, conversation_id, owner
        self.state = LeaseState.HELD
        self.releasing: asyncio.Future[None] | None = None

    @classmethod
    async def take(cls, ctx: AppContext, conversation_id: str) -> Lease | None:
        """The conversation's lease, or None while another turn holds it. A turn here that holds
        it may be one its client stopped a moment ago ("stop, then resend"): the closed
        connection can reach the server after the resend. It gets HANDOVER_SECONDS to end."""
        lease = cls(ctx, conversation_id, uuid.uuid4().hex)
        if await ctx.store.acquire_lease(conversation_id, lease.owner, ctx.settings.lease_seconds):
            return lease
        holder = next((turn for turn in ctx.turns if turn.job.conversation_id == conversation_id), None)
        if holder is None:
            return None
        await asyncio.wait([holder.task], timeout=HANDOVER_SECONDS)
        held = await ctx.store.acquire_lease(conversation_id, lease.owner, ctx.settings.lease_seconds)
        return lease if held else None

    async def renew(self) -> bool:
        """Whether the lease is still this turn's, renewed."""
        return await self.ctx.store.renew_lease(self.conversation_id, self.owner, self.ctx.settings.lease_seconds)

    def saved(self) -> None:
        """The save deleted the lease, in its transaction."""
        self._move(LeaseState.RELEASED)

    def release(self) -> asyncio.Future[None]:
        """Delete the lease, once; the future is done after the first try."""
        if self.releasing is None and self.state is LeaseState.RELEASED:
            self.releasing = asyncio.get_running_loop().create_future()
            self.releasing.set_result(None)
        elif self.releasing is None:
            self._move(LeaseState.RELEASING)
            self.releasing = asyncio.ensure_future(self._delete())
        return self.releasing

    async def _delete(self) -> None:
        try:
            await self.ctx.store.release_lease(self.conversation_id, self.owner)
        except DatabaseUnavailable:
            logger.warning("could not release the lease of conversation %s: retrying", self.conversation_id)
            retrying = asyncio.create_task(self._keep_deleting())
            self.ctx.releases.add(retrying)
            retrying.add_done_callback(self.ctx.releases.discard)
            return
        except Exception:
            logger.exception("could not release the lease of conversation %s", self.conversation_id)
        self._move(LeaseState.RELEASED)

    async def _keep_deleting(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ctx.settings.lease_seconds
        while loop.time() < deadline:
            await asyncio.sleep(min(1.0, self.ctx.settings.lease_seconds / 10))  # a pause between tries
            with suppress(DatabaseUnavailable):
                await self.ctx.store.release_lease(self.conversation_id, self.owner)
                break
        self._move(LeaseState.RELEASED)  # deleted, or expired by now

    def _move(self, to: LeaseState) -> None:
        allowed = {
            LeaseState.HELD: {LeaseState.RELEASING, LeaseState.RELEASED},
            LeaseState.RELEASING: {LeaseState.RELEASED},
        }
        assert to in allowed.get(self.state, set()), f"lease: {self.state.value} -> {to.value}"
        self.state = to


class Approvals(enum.Enum):
    """What a face does with a tool call that needs a person's approval."""

    ASK = "ask"  # the SSE stream: approval_required, then a decision posted, or the time-out
    REFUSE = "refuse"  # faces whose clients never see the call id (/api/chat, /v1): not run
    HAND_OVER = "hand_over"  # AG-UI: the run ends with an interrupt naming the call


class TurnGate:
    """The gate of one turn's tool calls (see Gate): its face's Approvals, and what was decided."""

    def __init__(
        self, policy: Approvals, emit: Callable[[TurnEvent], None], ctx: AppContext, conversation_id: str
    ) -> None:
        self.policy, self.emit, self.ctx, self.conversation_id = policy, emit, ctx, conversation_id
        self.handed_over: list[FunctionCall] = []  # the client's tools, for it to run
        self.interrupted: list[FunctionCall] = []  # calls that wait for a decision the next request brings
        self.decisions: dict[str, Approval] = {}
        self.decided: Mapping[str, bool] = {}  # decisions the request brought, by call id (AG-UI's resume)

    @property
    def stops_turn(self) -> bool:
        """Whether the turn ends once this round of tool calls is done: the rest is the client's."""
        return bool(self.handed_over or self.interrupted)

    def stopped(self, call_id: str) -> bool:
        return any(call.id == call_id for call in self.handed_over + self.interrupted)

    async def approve(self, call: FunctionCall, spec: ToolSpec) -> str | None:
        if call.id in self.decided:
            self.decisions[call.id] = Approval.APPROVED if self.decided[call.id] else Approval.DENIED
            return None if self.decided[call.id] else "The user denied this tool call: it was not run."
        if self.policy is Approvals.HAND_OVER:
            self.interrupted.append(call)
            return "(waiting for a person's approval)"
        if self.policy is Approvals.REFUSE:
            return "This tool needs a person's approval, which this client cannot give: the call was not run."
        return await self._ask(call, spec)

    async def _ask(self, call: FunctionCall, spec: ToolSpec) -> str | None:
        """Ask the client (approval_required), then wait for the decision, which is posted to any
        worker or instance and kept in the database, until APPROVAL_TIMEOUT_SECONDS."""
        key = (self.conversation_id, call.id)
        await self.ctx.store.ask_approval(*key, self.ctx.settings.approval_timeout)
        self.emit(ApprovalNeeded(call.id, call.name, call.arguments, spec.server))
        self.emit(Status("awaiting_approval"))
        decision = self.decisions[call.id] = await self._decision(key)
        if decision is Approval.APPROVED:
            self.emit(Status("calling_tool"))
            return None
        if decision is Approval.DENIED:
            return "The user denied this tool call: it was not run."
        return "Nobody approved this tool call in time: it was not run."

    async def _decision(self, key: tuple[str, str]) -> Approval:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ctx.settings.approval_timeout
        woken = self.ctx.approvals[key] = asyncio.Event()  # set by a decision posted to this worker
        try:
            while (state := await self.ctx.store.approval(*key)) is Approval.PENDING:
                if (left := deadline - loop.time()) <= 0:
                    return await self.ctx.store.expire_approval(*key)
                with suppress(TimeoutError):
                    async with asyncio.timeout(min(APPROVAL_POLL_SECONDS, left)):
                        await woken.wait()
                woken.clear()
            return state or Approval.EXPIRED
        finally:
            self.ctx.approvals.pop(key, None)

    def hand_over(self, call: FunctionCall) -> None:
        self.handed_over.append(call)


# ---------------------------------------------------------------------------
# The turn: its life
# ---------------------------------------------------------------------------


class TurnState(enum.Enum):
    RUNNING = "running"  # the agent runs
    STOPPING = "stopping"  # stop() cancelled it; its error event follows
    SAVING = "saving"  # the agent is done; the save is in flight (bounded by the database's time limit)
    ENDING = "ending"  # the last event is made: the lease goes, then the event; nothing may stop it now
    CLOSED = "closed"


TURN_MOVES = {
    TurnState.RUNNING: {TurnState.STOPPING, TurnState.SAVING, TurnState.ENDING, TurnState.CLOSED},
    TurnState.STOPPING: {TurnState.ENDING, TurnState.CLOSED},
    TurnState.SAVING: {TurnState.ENDING, TurnState.CLOSED},
    TurnState.ENDING: {TurnState.CLOSED},
    TurnState.CLOSED: set(),
}


@dataclass(frozen=True)
class TurnJob:
    """What a face asks of a turn."""

    conversation_id: str
    message: Content | None  # None: go on from the history (the results of the client's tools)
    # Where the agent starts: the stored conversation's saved state, if it has one; else `history`.
    # A stored turn holds the conversation's lease and saves; a stateless one only reads.
    history: list[LLMMessage] | None = None
    stored: bool = False
    options: ModelOptions = field(default_factory=ModelOptions)
    approvals: Approvals = Approvals.REFUSE
    decided: Mapping[str, bool] = field(default_factory=dict)  # the request's decisions on waiting calls
    results: Sequence[FunctionExecutionResult] = ()  # the client's tools' results, for a stored conversation
    # The face's own record of the turn, saved with it by its id (a Responses API object): from the Reply.
    artifact: Callable[[Reply], tuple[str, Mapping[str, Any]]] | None = None
    face: str = "api_stream"  # for the logs and the metrics
    # What must still hold once the stored turn has its conversation's lease (it raises ApiError if not):
    # a face's check made before the lease is taken may be stale by then.
    precondition: Callable[[], Awaitable[Any]] | None = None


class Turn:
    """One job run through the agent in its own task, its events queued for the response. A
    stored conversation's turn holds its lease until it ends, and saves only if it completes;
    a stateless one takes no lease and saves nothing."""

    def __init__(self, ctx: AppContext, job: TurnJob, lease: Lease | None) -> None:
        self.ctx, self.job, self.lease = ctx, job, lease
        self.state = TurnState.RUNNING
        self.stop_reason = "internal_error"
        self.events: asyncio.Queue[TurnEvent | None] = asyncio.Queue()
        self.reply = Reply(job.conversation_id)
        for result in job.results:  # the client ran its tools: their results are the turn's start
            body = {"call_id": result.call_id, "name": result.name, "content": result.content, "is_error": False}
            self.reply.records.append({"role": "tool", **body, "client": True, "created_at": utc_now()})
        if isinstance(job.message, str):
            self.reply.records.append({"role": "user", "content": job.message, "created_at": utc_now()})
        self.token = CancellationToken()
        self.gate = TurnGate(job.approvals, self.emit, ctx, job.conversation_id)
        self.gate.decided = job.decided
        self.renewal: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()
        self.last_event = self.renewed = self.loop.time()
        self.timer = self.loop.call_later(self._next_tick(), self._tick)
        self.watch = ctx.telemetry.turn(job)  # the metrics and traces of the turn
        self.task = asyncio.create_task(self._pump(), context=self.watch.context())
        ctx.turns.add(self)

    def _move(self, to: TurnState) -> None:
        """The one place the turn's state changes."""
        assert to in TURN_MOVES[self.state], f"turn: {self.state.value} -> {to.value}"
        self.state = to

    def emit(self, event: TurnEvent) -> None:
        """An event of the turn, for its response and its Reply."""
        if isinstance(event, TextDelta) and self.reply.needs_separator():
            self._deliver(TextDelta(SEPARATOR, separator=True))
        self._deliver(event)

    def _deliver(self, event: TurnEvent) -> None:
        self.watch.event(event)
        self.reply.add(event)
        self.events.put_nowait(event)
        self.last_event = self.loop.time()

    def stop(self, reason: str) -> None:
        """End the turn early; the client gets an error event with this code. A turn that is
        saving or has its last event already is left to finish: the client is told what happened."""
        if self.state is TurnState.RUNNING:
            self._move(TurnState.STOPPING)
            self.stop_reason = reason
            self.token.cancel()
            self.task.cancel()

    async def close(self) -> None:
        """Cancel the turn if it has not reached its end, wait until it has unwound, release the lease."""
        try:
            if not self.task.done() and self.state is not TurnState.ENDING:
                self.token.cancel()
                self.task.cancel()
                # A cancelled turn saves nothing, so its lease need not wait for it to unwind
                # (the model request closing): a client that stops and resends at once gets in.
                self._release()
            # On disconnect Starlette cancels the response's anyio scope, which re-delivers
            # the cancellation at every await: shield the wait for the turn to unwind.
            with anyio.CancelScope(shield=True):
                await asyncio.wait([self.task])
        finally:
            self.timer.cancel()
            if self.renewal is not None:
                self.renewal.cancel()
            self.ctx.turns.discard(self)
            self.watch.close()
            self._release()  # for a task cancelled before it ever ran
            if self.state is not TurnState.CLOSED:
                self._move(TurnState.CLOSED)

    def _release(self) -> asyncio.Future[None] | None:
        return self.lease.release() if self.lease is not None else None

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
        renewing = self.renewal is not None and not self.renewal.done()
        if now - self.renewed >= settings.lease_seconds / 3 and self.lease is not None and not renewing:
            self.renewal = asyncio.create_task(self._renew(self.lease))
            self.renewed = now
        self.timer = self.loop.call_later(self._next_tick(), self._tick)

    async def _renew(self, lease: Lease) -> None:
        try:
            owned = await lease.renew()
        except DatabaseUnavailable:
            logger.warning("could not renew the lease of conversation %s", self.job.conversation_id)
            return
        if not owned and self.state is TurnState.RUNNING:  # a save finds the lease gone itself
            logger.warning(
                "conversation %s was taken over by another turn: stopping this one", self.job.conversation_id
            )
            self.stop("turn_superseded")

    async def _pump(self) -> None:
        try:
            await self._run()
        finally:
            self.timer.cancel()  # no ping or renewal follows the end
            try:
                # _end waited for the release already, or knew better than to (the database failed).
                releasing = self._release()
                if releasing is not None and not releasing.done() and self.state is not TurnState.ENDING:
                    await asyncio.wait([releasing])
            finally:
                self.events.put_nowait(None)

    async def _run(self) -> None:
        self.emit(Started(self.job.conversation_id))
        try:
            state = await run_agent(self.ctx, self.job, self.emit, self.gate, self.token, self.watch)
            if not self.gate.stops_turn:
                self.emit(Message("".join(self.reply.text)))
            if self.lease is not None and state is not None:
                self._move(TurnState.SAVING)
                artifact = self.job.artifact(self.reply) if self.job.artifact else None
                await self.ctx.store.save_turn(
                    self.job.conversation_id, state, self.reply.records, self.lease.owner, artifact
                )
                self.lease.saved()
        except asyncio.CancelledError:
            if self.state is not TurnState.STOPPING:
                raise
            await self._end(Failed(ApiError(self.stop_reason)))
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the turn becomes its error event
            await self._end(Failed(self._failure(exc)))
            return
        await self._end(self._finished())

    def _finished(self) -> Finished:
        reply, interrupted = self.reply, self.gate.interrupted
        waiting = tuple(
            ToolCall(c.id, c.name, c.arguments, reply.tool_calls.get(c.id, {}).get("server")) for c in interrupted
        )
        reason = "tool_calls" if waiting else reply.finish_reason
        return Finished(self.job.conversation_id, reply.tokens, reason, tuple(reply.handed_over), waiting)

    async def _end(self, event: Finished | Failed) -> None:
        """The last event. Before the client can read it, the lease goes: a client that sends its
        next message as soon as it reads the last event never meets this turn's lease. Unless the
        database is what failed: its release would wait out the same time limit, the error first."""
        self._move(TurnState.ENDING)
        self.timer.cancel()
        database_down = isinstance(event, Failed) and event.error.code == "database_unavailable"
        if (releasing := self._release()) is not None and not releasing.done() and not database_down:
            await asyncio.wait([releasing])
        self.emit(event)

    def _failure(self, exc: Exception) -> ApiError:
        error = upstream_error(exc, self.ctx.settings)
        if error.code == "internal_error":
            logger.exception("turn of conversation %s failed", self.job.conversation_id)
        else:
            logger.warning(
                "turn of conversation %s failed: %s (%s)", self.job.conversation_id, error.code, failure_cause(exc)
            )
        return error


async def start_turn(ctx: AppContext, job: TurnJob) -> Turn:
    """The job's turn: on its stored conversation, under the conversation's lease (409 while
    another turn runs), or stateless."""
    if not job.stored:
        return Turn(ctx, job, None)
    lease = await Lease.take(ctx, job.conversation_id)
    if lease is None:
        raise ApiError("conversation_busy")
    if job.precondition is not None:
        try:
            await job.precondition()
        except BaseException:
            await lease.release()
            raise
    return Turn(ctx, job, lease)


async def turn_events(turn: Turn) -> AsyncIterator[TurnEvent]:
    """The turn's events to its end, for a reply folded from them: Failed is raised as its
    ApiError. Closes the turn however the reading ends."""
    try:
        while (event := await turn.events.get()) is not None:
            if isinstance(event, Failed):
                raise event.error
            yield event
    finally:
        await turn.close()


# ---------------------------------------------------------------------------
# Faces: what they share
# ---------------------------------------------------------------------------
# A face renders a turn's events as its protocol's stream, folds them (fold) into its JSON
# reply, and answers errors in its shape. Each face is one section below, with its routes.


class Face(Protocol):
    name: str  # for the logs and the metrics
    errors: ErrorShape

    def render(self, event: TurnEvent) -> bytes:
        """The event as the stream's bytes (b"" for none)."""


class TurnStream(StreamingResponse):
    """A turn rendered by a face as text/event-stream. Events that queued up while the last
    write was going out leave together in one write, so a busy server makes fewer, larger
    writes; the turn is closed however the response ends."""

    def __init__(self, turn: Turn, face: Face, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(
            self._body(turn, face), media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})}
        )
        self.turn = turn

    @staticmethod
    async def _body(turn: Turn, face: Face) -> AsyncIterator[bytes]:
        while True:
            batch = [await turn.events.get()]
            while batch[-1] is not None and not turn.events.empty():
                batch.append(turn.events.get_nowait())
            body = b"".join(face.render(event) for event in batch if event is not None)
            if body:
                yield body
            if batch[-1] is None:  # the end marker ends the stream, whatever was queued behind it
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.turn.close()


async def json_reply(
    request: Request, turn: Turn, reply: Callable[[Reply], dict[str, Any]], headers: Mapping[str, str] | None = None
) -> Response:
    """A turn's events folded into a face's JSON reply. Starlette does not cancel a plain handler
    whose client went away, so this watches for that: the turn is cancelled, saves nothing and
    lets go of its lease."""
    folding = asyncio.ensure_future(fold(turn_events(turn), turn.job.conversation_id))
    gone = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait([folding, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not folding.done():
            folding.cancel()  # turn_events closes the turn as it unwinds
            with anyio.CancelScope(shield=True):
                await asyncio.wait([folding])
    if folding.cancelled():
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return JSONResponse(reply(folding.result()), headers=headers)


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects; only once the body has been read."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def context(request: Request) -> AppContext:
    return request.app.state.ctx


# curl -d sends application/x-www-form-urlencoded; a JSON body is accepted under it so the
# five-minute curl demo works. Types that cannot hold JSON are refused with 415.
JSON_CONTENT_TYPES = {"", "application/json", "application/x-www-form-urlencoded", "text/plain"}


async def read_body(request: Request, limit: int, setting: str) -> bytes:
    """The request body; refused while reading once it passes `limit` bytes (the `setting`)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if (
        not (content_type == "application/json" or content_type.endswith("+json"))
        and content_type not in JSON_CONTENT_TYPES
    ):
        raise ApiError("unsupported_media_type")
    too_large = ApiError("payload_too_large", f"The body is larger than {setting} ({limit} bytes).")
    declared = whole_number(request.headers.get("content-length", ""))
    if declared is not None and declared > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """The body as JSON, with no lone surrogate in any string (the error names where)."""
    try:
        data = json.loads(body)
    except ValueError:
        raise ApiError("invalid_json") from None
    except RecursionError:
        raise ApiError("invalid_json", "The request body is nested too deeply.") from None
    where = lone_surrogate_at(data)
    if where is not None:
        raise invalid(f"'{where}' holds a lone surrogate (\\ud800-\\udfff): it is not text.", where)
    return data


def lone_surrogate_at(data: Any) -> str | None:
    """The path of the first string holding a lone surrogate (messages[3].content), or None."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii() and LONE_SURROGATE.search(value):
                return path or "body"
        elif isinstance(value, dict):
            stack += [(f"{path}.{key}" if path else str(key), item) for key, item in value.items()]
            stack += [(path or "body", key) for key in value]
        elif isinstance(value, list):
            stack += [(f"{path}[{index}]", item) for index, item in enumerate(value)]
    return None


async def off_the_loop(size: int, work: Callable[..., T], *args: Any) -> T:
    """`work` at once when `size` is small, else on a thread: a few MB of JSON take tens of ms
    to parse and check, which would stall every stream; on a thread the loop runs meanwhile."""
    if size <= PARSE_OFF_LOOP_BYTES:
        return work(*args)
    return await anyio.to_thread.run_sync(functools.partial(work, *args))


def origin_allowed(headers: Headers, method: str, origins: Sequence[str]) -> bool:
    """Whether the page that sent this may call: a page of this server, of an origin that
    CORS_ORIGINS lists, or no page at all (curl). '*' opens every request a browser asks CORS
    about first, which a form or a text/plain POST it does not: those stay refused."""
    origin = headers.get("origin")
    if origin is None or origin in origins or urlsplit(origin).netloc == headers.get("host"):
        return True
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    asked_first = method not in {"GET", "HEAD", "POST"} or content_type == "application/json"
    return "*" in origins and (method in {"GET", "HEAD"} or asked_first)


async def turn_body(request: Request, limit: int | None = None, setting: str = "MAX_BODY_BYTES") -> bytes:
    """The body of a request for a turn, which needs the model configured and the server not
    shutting down."""
    ctx = context(request)
    body = await read_body(request, limit or ctx.settings.max_body_bytes, setting)
    if ctx.shutting_down:  # checked once the body is in: it may arrive after the grace period
        raise ApiError("server_shutting_down")
    return body


def check_conversation_id(value: Any, param: str = "conversation_id") -> str:
    if not isinstance(value, str) or not CONVERSATION_ID_PATTERN.fullmatch(value) or value in {".", ".."}:
        raise invalid(CONVERSATION_ID_RULE.replace("'conversation_id'", f"'{param}'") + ".", param)
    return value


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = whole_number(raw)
    if value is None or not low <= value <= high:
        raise invalid(f"'{name}' must be a whole number from {low} to {high}.", name)
    return value


@dataclass
class Said:
    """One message of a client's history, in the terms the agent needs, whatever the face."""

    role: str  # system, user, assistant, tool
    content: Content = ""
    calls: list[FunctionCall] = field(default_factory=list)  # an assistant's tool calls
    call_id: str = ""  # the call a tool message answers
    is_error: bool = False
    thought: str | None = None  # the reasoning behind an assistant's tool calls, if the client kept it
    where: str = ""  # its place in the request, for an error


def client_history(
    said: Sequence[Said], decided: Collection[str] = (), param: str = "messages"
) -> tuple[Content | None, list[LLMMessage]]:
    """(the turn's message, the history before it) of a client's messages: the last message is a
    user's to answer, or the results of tool calls to go on from (None). Every tool call needs its
    result before the next message, but the last message's, where the request decides them."""
    last = said[-1] if said else None
    if last is None or last.role not in {"user", "tool"} and not (last.calls and decided):
        raise invalid("The last message must be a user's, or the results of the assistant's tool calls.", param)
    message = last.content if last.role == "user" else None
    history: list[LLMMessage] = [SystemMessage(content=s.content) for s in said if s.role == "system" and s.content]
    waiting: dict[str, FunctionCall] = {}
    for item in said[:-1] if message is not None else said:
        _check_answered(item, waiting)
        history += _messages_of(item, waiting, history)
    unanswered = [call_id for call_id in waiting if call_id not in decided]
    if unanswered:
        raise invalid(f"Tool call {unanswered[0]!r} has no result: send its result.", param)
    return message, history


def _check_answered(item: Said, waiting: dict[str, FunctionCall]) -> None:
    if item.role == "tool" and item.call_id not in waiting:
        raise invalid(f"{item.where} answers no tool call of the assistant message before it.", item.where)
    if item.role not in {"tool"} and waiting and item.role != "system":
        raise invalid(f"{item.where} comes before the results of tool call {next(iter(waiting))!r}.", item.where)


def _messages_of(item: Said, waiting: dict[str, FunctionCall], history: list[LLMMessage]) -> list[LLMMessage]:
    """The agent's messages for one of the client's (system messages went first)."""
    if item.role == "user" and has_content(item.content):
        return [UserMessage(content=item.content, source="user")]
    if item.role == "assistant":
        said = [AssistantMessage(content=item.content, source="assistant")] if item.content else []
        if item.calls:
            waiting.update((call.id, call) for call in item.calls)
            said.append(AssistantMessage(content=item.calls, source="assistant", thought=item.thought))
        return said
    if item.role == "tool":
        call = waiting.pop(item.call_id)
        result = FunctionExecutionResult(content=str(item.content), name=call.name, call_id=call.id,
                                         is_error=item.is_error)  # fmt: skip
        if history and isinstance(history[-1], FunctionExecutionResultMessage):
            history[-1].content.append(result)  # the results of one reply's calls go together
            return []
        return [FunctionExecutionResultMessage(content=[result])]
    return []


def with_reasoning(said: list[Said]) -> list[Said]:
    """The messages less the reasoning ones, whose text goes to the tool calls after them: a
    thinking model wants it back there."""
    for before, item in itertools.pairwise(said):
        if before.role == "reasoning" and item.calls:
            item.thought = without_face_marks(str(before.content))  # the agent's tool lines are not its thought
    return [item for item in said if item.role not in {"reasoning", "other"}]


def client_tool_schemas(tools: Sequence[tuple[str, str, Any]], taken: Collection[str], param: str) -> list[ToolSchema]:
    """The client's tools as the model sees them: (name, description, JSON schema of the arguments).
    A name the agent's own tools have, or a name no API takes, is a 400."""
    schemas: list[ToolSchema] = []
    for index, (name, description, parameters) in enumerate(tools):
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise invalid(
                f"{param}[{index}] needs a name of letters, digits, _ and - (at most 64).", f"{param}[{index}]"
            )
        if name in taken or name in {schema["name"] for schema in schemas}:
            raise invalid(f"{param}[{index}] is named {name!r}, as a tool of this server or another of the request's "
                          "is: rename it.", f"{param}[{index}]")  # fmt: skip
        parameters = parameters if isinstance(parameters, dict) else {"type": "object", "properties": {}}
        schemas.append(ToolSchema(name=name, description=description or "", parameters=parameters))  # type: ignore[typeddict-item]
    return schemas


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------
# Face: /api (named SSE events, JSON, stored conversations)
# ---------------------------------------------------------------------------

CHAT_REQUEST_FIELDS = {"message", "conversation_id"}


class ApiFace:
    """The service's own face. Its stream names each event: status, thought, chunk, tool_call,
    approval_required, tool_result, message, done or error, and ': ping' comments."""

    errors = API_ERRORS

    def __init__(self, name: str) -> None:
        self.name = name

    def render(self, event: TurnEvent) -> bytes:
        render = API_EVENTS.get(type(event))
        return render(event) if render is not None else b""

    @staticmethod
    def reply(reply: Reply) -> dict[str, Any]:
        """POST /api/chat's answer."""
        return {
            "status": "success",
            "message": "".join(reply.text),
            "conversation_id": reply.conversation_id,
            "tool_calls": list(reply.tool_calls.values()),
            "usage": usage_fields(reply.tokens),
            "finish_reason": reply.finish_reason,
        }


API_STREAM, API_JSON = ApiFace("api_stream"), ApiFace("api_json")


def call_fields(call: ToolCall | ApprovalNeeded) -> dict[str, Any]:
    return {"id": call.id, "name": call.name, "arguments": call.arguments} | server_field(call.server)


def done_fields(done: Finished) -> dict[str, Any]:
    return {
        "conversation_id": done.conversation_id,
        "usage": usage_fields(done.tokens),
        "finish_reason": done.finish_reason,
    }


# Each event as the /api stream names it (none for Usage, and for a client's tool call).
API_EVENTS: dict[type, Callable[[Any], bytes]] = {
    TextDelta: lambda event: sse_text("chunk", event.text),
    ReasoningDelta: lambda event: sse_text("thought", event.text),
    Ping: lambda event: SSE_PING,
    Started: lambda event: sse("status", {"status": "started", "conversation_id": event.conversation_id}),
    Status: lambda event: sse("status", {"status": event.status}),
    ToolCall: lambda event: b"" if event.client else sse("tool_call", call_fields(event)),
    ApprovalNeeded: lambda event: sse("approval_required", call_fields(event)),
    ToolResult: lambda event: sse("tool_result", tool_result_fields(event)),
    Message: lambda event: sse("message", {"content": event.content, "source": "assistant"}),
    Finished: lambda event: sse("done", done_fields(event)),
    Failed: lambda event: sse("error", event.error.detail()),
}


def tool_result_fields(result: ToolResult) -> dict[str, Any]:
    fields = {"call_id": result.call_id, "name": result.name, "content": result.content, "is_error": result.is_error}
    return fields | server_field(result.server) | ({"approval": str(result.approval)} if result.approval else {})


def parse_chat_request(data: Any, settings: Settings) -> tuple[str, str]:
    """(message, conversation_id) from a chat body; a new id when none is given."""
    if not isinstance(data, dict):
        raise invalid('The body must be a JSON object: {"message": "..."}.')
    unknown = sorted(set(data) - CHAT_REQUEST_FIELDS)
    if unknown:  # a misspelt conversation_id would otherwise start a new conversation
        raise invalid(f"Unknown field(s) {unknown}; a chat body has {sorted(CHAT_REQUEST_FIELDS)}.")
    message = data.get("message")
    if not isinstance(message, str) or not message.strip():
        raise invalid("'message' must be a string with more than white space.", "message")
    if len(message) > settings.max_message_chars:
        raise invalid(f"'message' is longer than MAX_MESSAGE_CHARS ({settings.max_message_chars}).", "message")
    conversation_id = data.get("conversation_id")
    return message, str(uuid.uuid4()) if conversation_id is None else check_conversation_id(conversation_id)


async def api_turn(request: Request, face: ApiFace, approvals: Approvals) -> Turn:
    ctx = context(request)
    message, conversation_id = parse_chat_request(parse_json(await turn_body(request)), ctx.settings)
    return await start_turn(ctx, TurnJob(conversation_id, message, stored=True, approvals=approvals, face=face.name))


async def chat_stream(request: Request) -> TurnStream:
    return TurnStream(await api_turn(request, API_STREAM, Approvals.ASK), API_STREAM)


async def chat(request: Request) -> Response:
    return await json_reply(request, await api_turn(request, API_JSON, Approvals.REFUSE), API_JSON.reply)


async def list_conversations(request: Request) -> JSONResponse:
    limit = query_int(request, "limit", 20, 1, 100)
    offset = query_int(request, "offset", 0, 0, 10**9)
    items, total = await context(request).store.list_conversations(limit, offset)
    return JSONResponse({"conversations": items, "total": total, "limit": limit, "offset": offset})


async def conversation(request: Request) -> Response:
    ctx = context(request)
    conversation_id = check_conversation_id(request.path_params["conversation_id"])
    if request.method == "DELETE":
        return await delete_conversation(ctx, conversation_id)
    found = await ctx.store.get_conversation(conversation_id)
    if found is None:
        raise ApiError("not_found", f"No conversation {conversation_id!r}.")
    return JSONResponse(found)


DECISIONS = {"approve": Approval.APPROVED, "deny": Approval.DENIED}
CALL_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


async def decide(request: Request) -> Response:
    """A person's decision on a tool call that waits (approval_required): 204, and the waiting
    turn, in whichever worker or instance, goes on."""
    ctx = context(request)
    conversation_id = check_conversation_id(request.path_params["conversation_id"])
    call_id = request.path_params["call_id"]
    if not CALL_ID_PATTERN.fullmatch(call_id):
        raise invalid("'call_id' must match ^[A-Za-z0-9_.:-]{1,128}$.", "call_id")
    data = parse_json(await read_body(request, ctx.settings.max_body_bytes, "MAX_BODY_BYTES"))
    decision = data.get("decision") if isinstance(data, dict) and set(data) == {"decision"} else None
    if not isinstance(decision, str) or decision not in DECISIONS:
        raise invalid('The body must be {"decision": "approve"} or {"decision": "deny"}.', "decision")
    moved, state = await ctx.store.decide_approval(conversation_id, call_id, DECISIONS[decision])
    if state is None:
        raise ApiError(
            "not_found", f"No tool call {call_id!r} of conversation {conversation_id!r} waits for a decision."
        )
    if not moved:
        raise ApiError("approval_decided", f"Tool call {call_id!r} is {state} already.")
    if (waiting := ctx.approvals.get((conversation_id, call_id))) is not None:
        waiting.set()
    return Response(status_code=204)


async def delete_conversation(ctx: AppContext, conversation_id: str) -> Response:
    # Under the conversation's lease: a running turn cannot save the conversation back afterwards.
    lease = await Lease.take(ctx, conversation_id)
    if lease is None:
        raise ApiError("conversation_busy")
    try:
        deleted = await ctx.store.delete_conversation(conversation_id)
    finally:
        await asyncio.wait([lease.release()])
    if not deleted:
        raise ApiError("not_found", f"No conversation {conversation_id!r}.")
    return Response(status_code=204)


# ---------------------------------------------------------------------------
# Face: /v1, OpenAI-compatible (chat apps, SDKs): reading a request
# ---------------------------------------------------------------------------

V1_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
V1_TEXT_PARTS = {"text", "input_text"}
V1_IMAGE_PARTS = {"image_url"}
NO_VISION = "this model cannot read images (MODEL_VISION)"
# Sampling fields sent with each model call of the turn, with their bounds. Every other field
# (n, logprobs, logit_bias, reasoning_effort, tools, tool_choice, user, ...) is accepted and ignored.
V1_NUMBERS = {"temperature": (0, 2), "top_p": (0, 1), "presence_penalty": (-2, 2), "frequency_penalty": (-2, 2)}
# Reasoning that apps fold into the content they send back: <think> (R1 style), Open WebUI's
# <details type="reasoning">, NextChat's <!--THINKING--> quote.
FOLDED_REASONING = {
    "<think>": "</think>",
    '<details type="reasoning"': "</details>",
    "<!--THINKING-->": "<!--/THINKING-->",
}
# The face's own tool lines in reasoning_content ("🔧 name(arguments)", "🔧 name → result"), found
# again when an app sends them back in content, quoted or not.
TOOL_LINE = re.compile(r"🔧 [A-Za-z_][\w.-]*(?:\(| → )")


@dataclass(frozen=True)
class V1Request:
    """What the agent uses of a chat completion request."""

    message: Content
    history: list[LLMMessage]
    conversation_id: str | None
    stream: bool
    include_usage: bool
    options: ModelOptions
    model: str


def parse_v1_request(
    body: bytes, conversation_header: str | None, settings: Settings, taken: Collection[str] = ()
) -> V1Request:
    """The request, checked; linear in its size (it may be several MB: see off_the_loop)."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise invalid("The body must be a JSON object with 'messages'.")
    message, history = v1_conversation(data.get("messages"), settings)
    # The header wins; a body's conversation_id must be valid all the same.
    given = (("X-Conversation-Id", conversation_header), ("conversation_id", data.get("conversation_id")))
    named = [check_conversation_id(value, param) for param, value in given if value is not None]
    if named and not isinstance(message, str):
        raise invalid("A stored conversation takes a user's text: no images, no tool results.", "messages")
    tools = v1_tools(data.get("tools"), taken)
    if not _optional(bool, data.get("parallel_tool_calls")):
        raise invalid("'parallel_tool_calls' must be true or false.", "parallel_tool_calls")
    if named and tools:
        raise invalid("A stored conversation runs the server's tools only: 'tools' is for stateless requests.", "tools")
    tool_choice = v1_tool_choice(data.get("tool_choice"))  # checked even when there are no tools to choose
    options = {} if data.get("stream_options") is None else data["stream_options"]
    if not isinstance(options, dict):
        raise invalid("'stream_options' must be an object.", "stream_options")
    for param, value in (
        ("stream", data.get("stream")),
        ("stream_options.include_usage", options.get("include_usage")),
    ):
        if not _optional(bool, value):
            raise invalid(f"'{param}' must be true or false.", param)
    return V1Request(
        message=message,
        history=history,
        conversation_id=named[0] if named else None,
        stream=data.get("stream") is True,
        include_usage=options.get("include_usage") is True,
        options=ModelOptions(
            sampling=v1_sampling(data),
            response_format=v1_response_format(data.get("response_format"), settings),
            client_tools=tools,
            tool_choice=tool_choice if tools else None,
            parallel_tool_calls=data.get("parallel_tool_calls") if tools else None,
        ),
        model=v1_model(data.get("model"), settings),
    )


def v1_tools(tools: Any, taken: Collection[str]) -> list[ToolSchema]:
    """The client's function tools, offered to the model beside the agent's own (`taken`)."""
    if tools is None or tools == []:
        return []
    if not isinstance(tools, list):
        raise invalid("'tools' must be a list of function tools.", "tools")
    functions = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict):
            raise invalid(f'tools[{index}] must be {{"type": "function", "function": {{...}}}}.', f"tools[{index}]")
        functions.append((function.get("name"), function.get("description"), function.get("parameters")))
    return client_tool_schemas(functions, taken, "tools")


TOOL_CHOICES = {"none", "auto", "required"}


def v1_tool_choice(choice: Any) -> Any:
    """tool_choice as the model API takes it: none, auto, required, or a function by name."""
    function = choice.get("function") if isinstance(choice, dict) else None
    named = function.get("name") if isinstance(function, dict) else None
    if (
        choice is None
        or (isinstance(choice, str) and choice in TOOL_CHOICES)
        or (isinstance(named, str) and choice.get("type") == "function")
    ):
        return choice
    raise invalid('\'tool_choice\' must be none, auto, required or {"type": "function", ...}.', "tool_choice")


def v1_model(model: Any, settings: Settings) -> str:
    """The model id the reply echoes: any the client names (apps name the one they listed)."""
    if not _optional(str, model) or len(model or "") > MAX_MODEL_FIELD_CHARS:
        raise invalid(f"'model' must be a string of at most {MAX_MODEL_FIELD_CHARS} characters.", "model")
    return model or settings.agent_model_id


def v1_conversation(messages: Any, settings: Settings) -> tuple[Content | None, list[LLMMessage]]:
    """The turn's message and the history before it: the last user message with text or an image
    (what follows it is not read), or, where the messages end with tool results, none: the
    agent goes on from them."""
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list.", "messages")
    vision = bool(settings.model_info["vision"])
    said = [v1_said(message, index, vision) for index, message in enumerate(messages)]
    if said[-1].role != "tool":
        last = max(
            (i for i, item in enumerate(said) if item.role == "user" and has_content(item.content)), default=None
        )
        if last is None:
            raise invalid("'messages' has no user message with text or an image.", "messages")
        said = said[: last + 1]
    message, history = client_history([item for item in said if item.role != "other"])
    check_message(message, settings, f"messages[{len(said) - 1}].content")
    return message, history


def _optional(kind: type, *values: Any) -> bool:
    return all(value is None or isinstance(value, kind) for value in values)


def v1_said(message: Any, index: int, vision: bool) -> Said:
    """A message of the request; developer counts as system; the legacy function role is not read."""
    if not isinstance(message, dict):
        raise invalid(f"messages[{index}] must be an object with a 'role'.", f"messages[{index}]")
    role, where = message.get("role"), f"messages[{index}]"
    if role not in V1_ROLES:
        raise invalid(f"messages[{index}].role must be one of {', '.join(V1_ROLES)}.", f"messages[{index}].role")
    content = message.get("content")
    if role == "function" and (content is None or isinstance(content, str | list)):
        return Said("other", where=where)
    no_images = None if role == "user" and vision else "only user messages hold images" if vision else NO_VISION
    text = v1_content(content, index, no_images)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise invalid(f"{where}.tool_call_id must name the call this result answers.", f"{where}.tool_call_id")
        return Said("tool", text, call_id=call_id, where=where)
    if role == "assistant":
        return Said("assistant", without_face_marks(str(text)), v1_calls(message.get("tool_calls"), where), where=where)
    return Said("system" if role == "developer" else role, text, where=where)


def v1_calls(calls: Any, where: str) -> list[FunctionCall]:
    """An assistant message's tool calls (the client's tools'): OpenAI's shape."""
    if calls is None:
        return []
    parsed = []
    for index, call in enumerate(calls if isinstance(calls, list) else [None]):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not _strings({"id": call.get("id"), **function}) or "id" not in call:
            raise invalid(f"{where}.tool_calls[{index}] needs an id and a function's name and arguments.",
                          f"{where}.tool_calls[{index}]")  # fmt: skip
        parsed.append(
            FunctionCall(id=call["id"], name=function.get("name", ""), arguments=function.get("arguments", ""))
        )
    return parsed


def v1_content(content: Any, index: int, no_images: str | None) -> Content:
    """The string; or the text parts joined, or with images (unless `no_images` says why not)
    the parts in order."""
    if content is None or isinstance(content, str):
        return content or ""
    where = f"messages[{index}].content"
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts.", where)
    parts: list[str | Image] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        kind = kind if isinstance(kind, str) else None  # a list or an object names no kind (and is unhashable)
        if kind in V1_TEXT_PARTS and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind in V1_IMAGE_PARTS and no_images is None:
            parts.append(client_image(part.get("image_url"), where))
        elif kind in V1_IMAGE_PARTS:
            raise invalid(f"messages[{index}] holds an image: {no_images}.", where)
        else:
            raise invalid(f"{where} has a part of type {kind!r}; only text and image parts are read.", where)
    texts = [part for part in parts if isinstance(part, str)]
    return "\n".join(texts) if len(texts) == len(parts) else parts


IMAGE_DATA_URI = re.compile(r"data:image/(png|jpeg|jpg|gif|webp);base64")


def client_image(url: Any, where: str) -> ClientImage:
    """An image part's data: URI, checked without decoding the picture: its header names a
    size within MAX_IMAGE_PIXELS and a format matching its media type."""
    url = url.get("url") if isinstance(url, dict) else url
    head, _, data = url.partition(",") if isinstance(url, str) else ("", "", "")
    kind = IMAGE_DATA_URI.fullmatch(head)
    if kind is None:
        raise invalid(
            f"{where} has an image that is not a base64 data: URI of a PNG, JPEG, GIF or WebP"
            " (the server fetches no URL).",
            where,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PIL only warns of a decompression bomb up to 178M pixels
            picture = PILImage.open(io.BytesIO(base64.b64decode(data, validate=True)))
            picture.verify()
    except Exception:  # noqa: BLE001 - PIL fails on a broken file with many kinds of error
        raise invalid(f"{where} has an image that cannot be read.", where) from None
    if picture.width * picture.height > MAX_IMAGE_PIXELS or (picture.format or "").lower() != kind[1].replace(
        "jpg", "jpeg"
    ):
        raise invalid(f"{where} has an image over {MAX_IMAGE_PIXELS} pixels, or not of its media type.", where)
    return ClientImage(url, picture.size)


def has_content(content: Content) -> bool:
    """Text that is not only white space, or an image."""
    return not isinstance(content, str) or bool(content.strip())


def without_face_marks(text: str) -> str:
    """An earlier answer without what the face or the app added: folded reasoning, tool lines."""
    lines = without_folded_reasoning(text).split("\n")
    return "\n".join(line for line in lines if not TOOL_LINE.match(line.lstrip("> \t"))).strip()


def without_folded_reasoning(text: str) -> str:
    """The text less each folded block (an opening mark to its closing one), in linear time:
    every search of a mark starts past where the last search of that mark ended, and a mark
    with no closing one after it is looked for no more."""
    kept, position = [], 0
    opens = {mark: text.find(mark) for mark in FOLDED_REASONING}
    while live := [(at, mark) for mark, at in opens.items() if at >= 0]:
        at, mark = min(live)
        end = text.find(FOLDED_REASONING[mark], at + len(mark))
        if end < 0:
            opens[mark] = -1
            continue
        kept.append(text[position:at])
        position = end + len(FOLDED_REASONING[mark])
        opens = {m: (text.find(m, position) if 0 <= a < position else a) for m, a in opens.items()}
    return "".join(kept) + text[position:]


def v1_sampling(data: dict[str, Any]) -> dict[str, Any]:
    sampling: dict[str, Any] = {}
    for name, (low, high) in V1_NUMBERS.items():
        value = data.get(name)
        if value is not None:
            if not is_number(value) or not low <= value <= high:
                raise invalid(f"'{name}' must be a number from {low} to {high}.", name)
            sampling[name] = value
    # max_completion_tokens wins, sent as max_tokens: the name DeepSeek and local servers read.
    for name, low in (("max_tokens", 1), ("max_completion_tokens", 1), ("seed", -(2**63))):
        if data.get(name) is not None:
            sampling["max_tokens" if name == "max_completion_tokens" else name] = whole_field(data, name, low)
    stop = data.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None:
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise invalid("'stop' must be a string or a list of up to 4 strings.", "stop")
        sampling["stop"] = stop
    return sampling


def whole_field(data: Mapping[str, Any], name: str, low: int) -> int:
    value = data.get(name)
    if not is_number(value) or value != int(value) or value < low:
        raise invalid(f"'{name}' must be a whole number of at least {low}.", name)
    return int(value)


def v1_response_format(given: Any, settings: Settings, param: str = "response_format") -> dict[str, Any] | None:
    """response_format for the answer: JSON, or JSON of a schema, where the model can."""
    if given is None or (isinstance(given, dict) and given.get("type") == "text"):
        return None
    kind = given.get("type") if isinstance(given, dict) else None
    needs = (
        {"json_object": "json_output", "json_schema": "structured_output"}.get(kind) if isinstance(kind, str) else None
    )
    if needs is None or (kind == "json_schema" and not isinstance(given.get("json_schema"), dict)):
        raise invalid(f'\'{param}\' must be {{"type": "text" | "json_object" | "json_schema", ...}}.', param)
    if not settings.model_info[needs]:
        flag = next(name for name, key in MODEL_INFO_FLAGS.items() if key == needs)
        raise invalid(f"This model cannot answer in {kind} ({flag}=false).", param)
    return given


# ---------------------------------------------------------------------------
# Face: /v1, OpenAI-compatible: replies and routes
# ---------------------------------------------------------------------------

V1_DONE = b"data: [DONE]\n\n"


def v1_usage(tokens: Tokens) -> dict[str, Any]:
    return {
        "prompt_tokens": tokens.prompt,
        "completion_tokens": tokens.completion,
        "total_tokens": tokens.prompt + tokens.completion,
        "prompt_tokens_details": {"cached_tokens": tokens.cached},
        "completion_tokens_details": {"reasoning_tokens": tokens.reasoning},
    }


def tool_line(event: ToolCall | ToolResult) -> str:
    """A readable line for an agent's tool call or result, shown in reasoning_content."""
    if isinstance(event, ToolCall):
        return f"\n\n🔧 {event.name}({event.arguments})\n\n"
    result = " ".join(event.content.split())
    if len(result) > MAX_TOOL_RESULT_SHOWN:
        result = result[:MAX_TOOL_RESULT_SHOWN] + "…"
    return f"🔧 {event.name} → {'⚠️ ' if event.is_error else ''}{result}\n\n"


class V1Completion:
    """One chat completion: the turn's events rendered as chat.completion.chunk frames, or
    folded into a chat.completion; either way with one id, created and model. The answer is
    the content; the reasoning, and a line for each of the agent's tool calls and results,
    are the reasoning_content. Frames are `data:` lines only, no event names or comments:
    some clients' parsers break on both. As OpenAI does, usage comes once, on a last chunk
    with no choices, and every other chunk has "usage": null, when the client asks for it."""

    name = "v1"
    errors = OPENAI_ERRORS

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.client_calls = 0  # the client's tool calls streamed so far: each has its index
        self.tail = ',"usage":null}\n\n' if include_usage else "}\n\n"
        head = dumps(self._object("chat.completion.chunk"))[:-1]
        self.text_head = f'data: {head},"choices":[{{"index":0,"delta":{{'  # a text delta skips the encoder

    def _object(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **fields}

    def render(self, event: TurnEvent) -> bytes:
        match event:
            case TextDelta(text=text):
                return self._text("content", text)
            case ReasoningDelta(text=text):
                return self._text("reasoning_content", text)
            case ToolCall(client=True):
                return self._client_call(event)
            case ToolCall() | ToolResult():
                return self._text("reasoning_content", tool_line(event))
            case Ping():  # an empty delta: apps and proxies see a live stream
                return self._text("content", "")
            case Started():
                return self._frame([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            case Finished():
                return self._finish(event)
            case Failed(error=error):
                return f"data: {dumps(openai_error(error))}\n\n".encode() + V1_DONE
        return b""

    def _text(self, field_name: str, text: str) -> bytes:
        return f'{self.text_head}"{field_name}":{encode_basestring(text)}}},"finish_reason":null}}]{self.tail}'.encode()

    def _client_call(self, call: ToolCall) -> bytes:
        """A call of the client's tool in OpenAI's pieces: its id, type and name first, then its arguments."""
        index, self.client_calls = self.client_calls, self.client_calls + 1
        head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        pieces = [head] + ([{"index": index, "function": {"arguments": call.arguments}}] if call.arguments else [])
        return b"".join(
            self._frame([{"index": 0, "delta": {"tool_calls": [p]}, "finish_reason": None}]) for p in pieces
        )

    def _frame(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        chunk = self._object("chat.completion.chunk", choices=choices)
        if self.include_usage:
            chunk["usage"] = usage
        return f"data: {dumps(chunk)}\n\n".encode()

    def _finish(self, done: Finished) -> bytes:
        frames = self._frame([{"index": 0, "delta": {}, "finish_reason": done.finish_reason}])
        return frames + (self._frame([], v1_usage(done.tokens)) if self.include_usage else b"") + V1_DONE

    def reply(self, reply: Reply) -> dict[str, Any]:
        """The chat.completion."""
        reasoning = v1_reasoning(reply).strip()
        text = "".join(reply.text)
        message = {
            "role": "assistant",
            "content": text or (None if reply.handed_over else ""),
            "reasoning_content": reasoning or None,
        }
        if reply.handed_over:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in reply.handed_over
            ]
        choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}
        return self._object("chat.completion", choices=[choice], usage=v1_usage(reply.tokens))


def v1_reasoning(reply: Reply) -> str:
    """The reasoning_content the stream sends, from the records it was folded into (in order:
    each model call's reasoning, then its tool calls, then their results)."""
    parts: list[str] = []
    for record in reply.records:
        if record["role"] == "assistant":
            parts.append(record.get("thought") or "")
            calls = [c for c in record.get("tool_calls") or () if not c.get("client")]
            parts += [tool_line(ToolCall(c["id"], c["name"], c["arguments"])) for c in calls]
        elif record["role"] == "tool" and not record.get("client"):
            parts.append(
                tool_line(ToolResult(record["call_id"], record["name"], record["content"], record["is_error"]))
            )
    return "".join(parts) + "".join(reply.thought)


async def v1_models(request: Request) -> JSONResponse:
    ctx = context(request)
    owner = "autogen-chat" if ctx.settings.api_key else "autogen-chat-demo"  # the demo model answers
    model = {"id": ctx.settings.agent_model_id, "object": "model", "created": ctx.started, "owned_by": owner}
    return JSONResponse({"object": "list", "data": [model]})


async def v1_chat_completions(request: Request) -> Response:
    """Stateless by default; with X-Conversation-Id (or conversation_id) exactly /api/chat's turn."""
    ctx = context(request)
    body = await turn_body(request, ctx.settings.v1_max_body_bytes, "V1_MAX_BODY_BYTES")
    taken = [spec.schema["name"] for spec in ctx.tools.specs]
    header = request.headers.get("x-conversation-id")
    chat = await off_the_loop(len(body), parse_v1_request, body, header, ctx.settings, taken)
    completion = V1Completion(chat.model, chat.include_usage)
    stateless = chat.conversation_id is None
    cid = chat.conversation_id or completion.id
    job = TurnJob(cid, chat.message, chat.history if stateless else None, not stateless, chat.options, face="v1")
    turn = await start_turn(ctx, job)
    headers = {} if stateless else {"X-Conversation-Id": job.conversation_id}
    if chat.stream:
        return TurnStream(turn, completion, headers)
    return await json_reply(request, turn, completion.reply, headers)


# ---------------------------------------------------------------------------
# Face: AG-UI (CopilotKit, @ag-ui/client)
# ---------------------------------------------------------------------------
# POST /api/ag-ui takes AG-UI's RunAgentInput and answers AG-UI 1.0's events, with the
# ag-ui-protocol package's own models and encoder. Stateless, as /v1: the client's messages are
# the history, nothing is stored. Tools that need approval end the run with an interrupt, which
# the next run's resume decides; the client's own tools (its frontend tools) end the run with
# their calls pending, which the next run's tool messages answer.

AGUI_APPROVAL_SCHEMA = {"type": "object", "properties": {"approved": {"type": "boolean"}}, "required": ["approved"]}


@dataclass(frozen=True)
class AgUiRequest:
    """What the agent uses of a RunAgentInput."""

    thread_id: str
    run_id: str
    message: Content | None
    history: list[LLMMessage]
    decided: dict[str, bool]
    client_tools: list[ToolSchema]


def parse_ag_ui(body: bytes, settings: Settings, taken: Collection[str]) -> AgUiRequest:
    """The run's input, checked; a missing runId is made."""
    data = parse_json(body)
    if isinstance(data, dict):
        data.setdefault("runId", f"run_{uuid.uuid4().hex}")
    try:
        run = agui.RunAgentInput.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise invalid(f"Not a RunAgentInput: {where}: {first['msg']}.", where) from None
    decided = agui_decisions(run.resume or [])
    said = with_reasoning([agui_said(message, index, settings) for index, message in enumerate(run.messages)])
    said.extend(agui_context(run.context or []))
    message, history = client_history(sorted(said, key=lambda s: s.role != "system"), decided)
    check_message(message, settings, "messages")
    tools = [(tool.name, tool.description, tool.parameters) for tool in run.tools or []]
    return AgUiRequest(run.thread_id, run.run_id, message, history, decided, client_tool_schemas(tools, taken, "tools"))


def agui_said(message: Any, index: int, settings: Settings) -> Said:
    where = f"messages[{index}]"
    if isinstance(message, agui.SystemMessage | agui.DeveloperMessage):
        return Said("system", message.content, where=where)
    if isinstance(message, agui.UserMessage):
        return Said("user", agui_content(message.content, where, settings), where=where)
    if isinstance(message, agui.AssistantMessage):
        calls = [
            FunctionCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
            for c in message.tool_calls or []
        ]
        return Said("assistant", message.content or "", calls, where=where)
    if isinstance(message, agui.ToolMessage):
        content = (
            message.content
            if isinstance(message.content, str)
            else dumps([p.model_dump(mode="json") for p in message.content])
        )
        return Said(
            "tool", message.error or content, call_id=message.tool_call_id, is_error=bool(message.error), where=where
        )
    if isinstance(message, agui.ReasoningMessage):
        return Said("reasoning", message.content, where=where)
    return Said("other", where=where)  # activity messages: the agent has no use for them


def agui_content(content: Any, where: str, settings: Settings) -> Content:
    """A user message's text, or its text and images (the model must read images)."""
    if isinstance(content, str):
        return content
    parts: list[str | Image] = []
    for part in content:
        if isinstance(part, agui.TextPart):
            parts.append(part.text)
        elif (
            isinstance(part, agui.ImagePart)
            and isinstance(part.source, agui.DataSource)
            and settings.model_info["vision"]
        ):
            parts.append(client_image(f"data:{part.source.mime_type};base64,{part.source.value}", where))
        else:
            raise invalid(
                f"{where} has a part the agent cannot read: text, and images as data when MODEL_VISION.", where
            )
    texts = [part for part in parts if isinstance(part, str)]
    return "\n".join(texts) if len(texts) == len(parts) else parts


def agui_context(context: Sequence[Any]) -> list[Said]:
    """The app's context entries, for the model to read with the server's system message."""
    if not context:
        return []
    lines = "\n".join(f"- {entry.description}: {entry.value}" for entry in context)
    return [Said("system", f"Context from the application:\n{lines}")]


def agui_decisions(resume: Sequence[Any]) -> dict[str, bool]:
    """The decisions a resume brings, by call id: resolved with {"approved": true} runs the call;
    resolved otherwise, or cancelled, denies it."""
    decided = {}
    for entry in resume:
        payload = entry.payload if isinstance(entry.payload, dict) else {}
        decided[entry.interrupt_id] = entry.status == "resolved" and payload.get("approved") is True
    return decided


def check_message(message: Content | None, settings: Settings, param: str) -> None:
    """The turn's message (None: the turn goes on from tool results) is not empty, nor too long."""
    text = message if isinstance(message, str) else "\n".join(p for p in message or [] if isinstance(p, str))
    if message is not None and not has_content(message):
        raise invalid("The last user message is empty.", param)
    if len(text) > settings.max_message_chars:
        raise invalid(f"The last user message is longer than MAX_MESSAGE_CHARS ({settings.max_message_chars}).", param)


class AgUiRun:
    """One AG-UI run: the turn's events as AG-UI's, each message, reasoning message and tool call
    opened before its content and closed before anything else begins, as the protocol's verifier
    wants. Tool calls belong to the assistant message of the model reply that made them."""

    name = "ag_ui"
    errors = API_ERRORS

    def __init__(self, thread_id: str, run_id: str, settings: Settings) -> None:
        self.thread_id, self.run_id, self.settings = thread_id, run_id, settings
        self.encoder = AgUiEncoder()
        self.message_id = self._id()  # the assistant message of the model reply being read
        self.open: tuple[str, str] | None = None  # ("text" | "reasoning", its id)
        self.after_tools = False

    @staticmethod
    def _id() -> str:
        return uuid.uuid4().hex

    def render(self, event: TurnEvent) -> bytes:
        if isinstance(event, Ping):
            return SSE_PING
        return "".join(self.encoder.encode(e) for e in self._events(event)).encode()

    def _events(self, event: TurnEvent) -> list[Any]:
        match event:
            case Started():
                return [
                    agui.RunStartedEvent(
                        thread_id=self.thread_id, run_id=self.run_id, protocol_version=agui.PROTOCOL_VERSION
                    )
                ]
            case TextDelta(text=text):
                return self._opening("text") + [agui.TextMessageContentEvent(message_id=self.message_id, delta=text)]
            case ReasoningDelta(text=text):
                opening = self._opening("reasoning")
                return opening + [agui.ReasoningMessageContentEvent(message_id=self.open[1], delta=text)]  # type: ignore[index]
            case ToolCall():
                return self._closing() + self._call(event)
            case ToolResult():
                self.after_tools = True
                return [
                    agui.ToolCallResultEvent(
                        message_id=self._id(), tool_call_id=event.call_id, content=event.content, role="tool"
                    )
                ]
            case Finished():
                return self._closing() + [self._finished(event)]
            case Failed(error=error):
                return self._closing() + [agui.RunErrorEvent(message=error.message, code=error.code)]
        return []

    def _opening(self, kind: str) -> list[Any]:
        """What opens a text or reasoning message, closing what is open."""
        if self.open is not None and self.open[0] == kind:
            return []
        events = self._closing()
        if self.after_tools:  # a new model reply: a new assistant message
            self.message_id, self.after_tools = self._id(), False
        if kind == "text":
            self.open = ("text", self.message_id)
            return events + [agui.TextMessageStartEvent(message_id=self.message_id, role="assistant")]
        self.open = ("reasoning", self._id())
        return events + [agui.ReasoningStartEvent(message_id=self.open[1]),
                         agui.ReasoningMessageStartEvent(message_id=self.open[1], role="reasoning")]  # fmt: skip

    def _closing(self) -> list[Any]:
        kind, open_id = self.open or ("", "")
        self.open = None
        if kind == "text":
            return [agui.TextMessageEndEvent(message_id=open_id)]
        if kind == "reasoning":
            return [agui.ReasoningMessageEndEvent(message_id=open_id), agui.ReasoningEndEvent(message_id=open_id)]
        return []

    def _call(self, call: ToolCall) -> list[Any]:
        if self.after_tools:
            self.message_id, self.after_tools = self._id(), False
        start = agui.ToolCallStartEvent(
            tool_call_id=call.id, tool_call_name=call.name, parent_message_id=self.message_id
        )
        arguments = [agui.ToolCallArgsEvent(tool_call_id=call.id, delta=call.arguments)] if call.arguments else []
        return [start, *arguments, agui.ToolCallEndEvent(tool_call_id=call.id)]

    def _finished(self, done: Finished) -> Any:
        usage = [agui_usage(done.tokens, self.settings)] if done.tokens.prompt or done.tokens.completion else None
        if done.awaiting_approval:
            interrupts = [agui_interrupt(call) for call in done.awaiting_approval]
            outcome: Any = agui.RunFinishedInterruptOutcome(interrupts=interrupts)
        else:
            pending = [call.id for call in done.handed_over] or None
            outcome = agui.RunFinishedSuccessOutcome(pending_tool_call_ids=pending)
        return agui.RunFinishedEvent(thread_id=self.thread_id, run_id=self.run_id, outcome=outcome, usage=usage)


def agui_interrupt(call: ToolCall) -> Any:
    """A tool call that waits for a person: the next run's resume answers {"approved": true | false}."""
    message = f"Allow {call.name} to run with {call.arguments}?"
    return agui.Interrupt(id=call.id, reason="tool_call", tool_call_id=call.id, message=message,
                          response_schema=AGUI_APPROVAL_SCHEMA)  # fmt: skip


def agui_usage(tokens: Tokens, settings: Settings) -> Any:
    """The run's tokens in AG-UI's terms; the cached and reasoning ones only where there are some."""
    return agui.TokenUsage(
        provider=provider_name(settings), model=model_shown(settings), input_tokens=tokens.prompt,
        output_tokens=tokens.completion, total_tokens=tokens.prompt + tokens.completion,
        cached_input_tokens=tokens.cached or None, reasoning_tokens=tokens.reasoning or None,
    )  # fmt: skip


async def ag_ui(request: Request) -> Response:
    ctx = context(request)
    body = await turn_body(request, ctx.settings.v1_max_body_bytes, "V1_MAX_BODY_BYTES")
    taken = [spec.schema["name"] for spec in ctx.tools.specs]
    run = await off_the_loop(len(body), parse_ag_ui, body, ctx.settings, taken)
    options = ModelOptions(client_tools=run.client_tools)
    job = TurnJob(run.thread_id, run.message, run.history, options=options, approvals=Approvals.HAND_OVER,
                  decided=run.decided, face="ag_ui")  # fmt: skip
    return TurnStream(await start_turn(ctx, job), AgUiRun(run.thread_id, run.run_id, ctx.settings))


# ---------------------------------------------------------------------------
# Face: /v1/responses, OpenAI's Responses API (openai-agents, Codex, the Vercel AI SDK): reading a request
# ---------------------------------------------------------------------------
# With store (the default) a response is a turn of a stored conversation: a new one, seeded with
# the input, or, with previous_response_id, the conversation of that response, which must be
# its last turn (a conversation here has one line of turns, not branches). Without store it is
# stateless, as /v1 is. The input's items are read as a client's messages (Said); the client's
# function tools are the client tools of /v1. Fields the agent has no use for are ignored.

RESPONSE_ID = re.compile(r"resp_([0-9a-f]{32})")
# The ids of the output items of this server's responses: their response's and their place in it.
OUR_ITEM_ID = re.compile(r"(?:rs|msg|fc)_([0-9a-f]{32})_[0-9]+")
RESPONSE_ROLES = {"user", "assistant", "system", "developer"}
RESPONSE_TEXT_PARTS = {"input_text", "output_text", "text", "refusal"}
OUTPUT_ITEMS = {"reasoning", "function_call"}  # and assistant messages: what a response said


@dataclass(frozen=True)
class ResponsesRequest:
    """What the agent uses of a Responses API request, and what the Response echoes of it."""

    model: str
    said: list[Said]
    previous_response_id: str | None
    store: bool
    stream: bool
    options: ModelOptions
    echo: dict[str, Any]


def parse_responses_request(data: Any, settings: Settings, taken: Collection[str]) -> ResponsesRequest:
    """The request, checked (its item references already resolved: see referenced_items)."""
    if not isinstance(data, dict):
        raise invalid("The body must be a JSON object with 'input'.")
    for name in ("stream", "store", "parallel_tool_calls", "background"):
        if not _optional(bool, data.get(name)):
            raise invalid(f"'{name}' must be true or false.", name)
    if data.get("background") is True:
        raise invalid("This server answers while the client waits: 'background' must be false.", "background")
    previous, store = previous_response_id(data.get("previous_response_id")), data.get("store") is not False
    said = responses_input(data.get("input"), settings, continuing=previous is not None)
    if store and any(not isinstance(item.content, str) for item in said):
        raise invalid('A stored conversation keeps text: send images with "store": false.', "input")
    if not _optional(str, data.get("instructions")):
        raise invalid("'instructions' must be a string.", "instructions")
    tools, tool_choice = responses_tools(data.get("tools"), taken), responses_tool_choice(data.get("tool_choice"))
    options = ModelOptions(
        sampling=responses_sampling(data),
        response_format=responses_format(data.get("text"), settings),
        client_tools=[tool for tool, _ in tools],
        tool_choice=tool_choice if tools else None,
        parallel_tool_calls=data.get("parallel_tool_calls") if tools else None,
        instructions=data.get("instructions") or None,
    )
    model = v1_model(data.get("model"), settings)
    return ResponsesRequest(
        model, said, previous, store, data.get("stream") is True, options, responses_echo(data, tools)
    )


def previous_response_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid("'previous_response_id' must be a string.", "previous_response_id")
    if not RESPONSE_ID.fullmatch(value):  # not one of ours: no need to ask the database
        raise not_stored(value)
    return value


def not_stored(response_id: str) -> ApiError:
    message = f"Previous response with id {response_id[:80]!r} not found."
    return ApiError("previous_response_not_found", message, param="previous_response_id")


def responses_input(given: Any, settings: Settings, continuing: bool) -> list[Said]:
    """The input as the client's messages. Continuing a response, what a response of this server
    said is in its conversation already: those items are passed over (clients send them back)."""
    if isinstance(given, str) and has_content(given):
        return [Said("user", given, where="input")]
    if not isinstance(given, list) or not given:
        raise invalid("'input' must be a text or a non-empty list of items.", "input")
    said: list[Said] = []
    for index, item in enumerate(given):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise invalid(f"{where} must be an object.", where)
        kind = item.get("type", "message" if "role" in item else None)
        if not isinstance(kind, str | None):
            raise invalid(f"{where}.type must be a string.", f"{where}.type")
        said_before = kind in OUTPUT_ITEMS or (kind == "message" and item.get("role") == "assistant")
        if continuing and said_before and isinstance(item.get("id"), str) and OUR_ITEM_ID.fullmatch(item["id"]):
            continue
        if continuing and said_before:
            raise invalid(f"{where}: with previous_response_id, send only what is new: a user message, or "
                          "function_call_output items.", where)  # fmt: skip
        joined_calls(said, responses_item(kind, item, where, settings))
    return with_reasoning(said)


def joined_calls(said: list[Said], item: Said) -> None:
    """The item after the others; the calls of one model reply (its text, then each function_call
    item) make one assistant message."""
    last = said[-1] if said else None
    if item.calls and last is not None and last.role == "assistant":
        last.calls += item.calls
    else:
        said.append(item)


def responses_item(kind: Any, item: dict[str, Any], where: str, settings: Settings) -> Said:
    if kind == "message":
        return responses_message(item, where, settings)
    if kind == "function_call":
        fields = {name: item.get(name) for name in ("call_id", "name", "arguments")}
        if not _strings(fields):
            raise invalid(f"{where} needs a call_id, a name and arguments (a JSON string).", where)
        return Said("assistant", "", [FunctionCall(id=fields["call_id"], name=fields["name"],
                                                   arguments=fields["arguments"])], where=where)  # fmt: skip
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise invalid(f"{where}.call_id must name the function_call this output answers.", f"{where}.call_id")
        output = item.get("output")
        text = output if isinstance(output, str) else responses_text(output, f"{where}.output")
        return Said("tool", text, call_id=item["call_id"], where=where)
    if kind == "reasoning":
        parts = item.get("content") or item.get("summary") or []
        return Said("reasoning", responses_text(parts, where), where=where)
    if kind == "item_reference":
        raise invalid(f"{where} names an item that no stored response of this server holds.", where)
    raise invalid(f"{where} has type {kind!r}: the agent reads message, function_call, function_call_output and "
                  "reasoning items.", where)  # fmt: skip


def responses_message(item: dict[str, Any], where: str, settings: Settings) -> Said:
    role, content = item.get("role"), item.get("content")
    if not isinstance(role, str) or role not in RESPONSE_ROLES:
        raise invalid(f"{where}.role must be one of {', '.join(sorted(RESPONSE_ROLES))}.", f"{where}.role")
    if isinstance(content, str):
        text: Content = content
    elif role == "user" and isinstance(content, list):
        text = responses_parts(content, f"{where}.content", settings)
    else:
        text = responses_text(content, f"{where}.content")
    if role == "assistant":
        return Said("assistant", without_face_marks(str(text)), where=where)
    return Said("system" if role == "developer" else role, text, where=where)


def responses_text(parts: Any, where: str) -> str:
    """The text of a list of text parts (input_text, output_text, reasoning_text, summary_text)."""
    if not isinstance(parts, list):
        raise invalid(f"{where} must be a string or a list of text parts.", where)
    texts = [part.get("text") if isinstance(part, dict) else None for part in parts]
    if not all(isinstance(text, str) for text in texts):
        raise invalid(f"{where} holds a part that is not text.", where)
    return "\n".join(texts)  # type: ignore[arg-type]


def responses_parts(parts: list[Any], where: str, settings: Settings) -> Content:
    """A user message's text and images (input_image with a data: URI, when MODEL_VISION)."""
    read: list[str | Image] = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) and isinstance(part.get("type"), str) else None
        if kind in RESPONSE_TEXT_PARTS and isinstance(part.get("text"), str):
            read.append(part["text"])
        elif kind == "input_image" and settings.model_info["vision"]:
            read.append(client_image(part.get("image_url"), where))
        else:
            no_images = "" if settings.model_info["vision"] else f"; images need a vision model ({NO_VISION})"
            raise invalid(f"{where} has a part of type {kind!r}: the agent reads input_text and input_image"
                          f"{no_images}.", where)  # fmt: skip
    texts = [part for part in read if isinstance(part, str)]
    return "\n".join(texts) if len(texts) == len(read) else read


def responses_tools(tools: Any, taken: Collection[str]) -> list[tuple[ToolSchema, dict[str, Any]]]:
    """The client's function tools (the Responses API's flat shape), each with the shape it echoes."""
    if tools is None or tools == []:
        return []
    if not isinstance(tools, list) or not all(isinstance(tool, dict) and tool.get("type") == "function"
                                              for tool in tools):  # fmt: skip
        raise invalid('\'tools\' must be a list of {"type": "function", "name": ..., "parameters": ...}: '
                      "the server runs its own tools, the client its functions.", "tools")  # fmt: skip
    schemas = client_tool_schemas([(t.get("name"), t.get("description"), t.get("parameters")) for t in tools],
                                  taken, "tools")  # fmt: skip
    return [(schema, {"type": "function", **schema, "strict": tool.get("strict") is True})
            for schema, tool in zip(schemas, tools, strict=True)]  # fmt: skip


def responses_tool_choice(choice: Any) -> Any:
    """tool_choice in the chat completions shape: a function is named flat here, nested there."""
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if choice is None or (isinstance(choice, str) and choice in TOOL_CHOICES):
        return choice
    raise invalid('\'tool_choice\' must be none, auto, required or {"type": "function", "name": ...}.', "tool_choice")


def responses_format(text: Any, settings: Settings) -> dict[str, Any] | None:
    """text.format as chat completions' response_format: a json_schema is flat here, nested there."""
    given = text.get("format") if isinstance(text, dict) else None
    if not _optional(dict, text) or not _optional(dict, given):
        raise invalid("'text' must be an object, and its 'format' too.", "text.format")
    if given is not None and given.get("type") == "json_schema":
        if not isinstance(given.get("name"), str) or not isinstance(given.get("schema"), dict):
            raise invalid("A json_schema format needs a 'name' and a 'schema'.", "text.format")
        nested = {key: given[key] for key in ("name", "schema", "description", "strict") if key in given}
        given = {"type": "json_schema", "json_schema": nested}
    return v1_response_format(given, settings, "text.format")


def responses_sampling(data: dict[str, Any]) -> dict[str, Any]:
    sampling = v1_sampling({name: data.get(name) for name in ("temperature", "top_p")})
    if data.get("max_output_tokens") is not None:
        sampling["max_tokens"] = whole_field(data, "max_output_tokens", 1)
    return sampling


def responses_echo(data: dict[str, Any], tools: list[tuple[ToolSchema, dict[str, Any]]]) -> dict[str, Any]:
    """The request's settings as the Response repeats them, OpenAI's defaults where none was given."""
    metadata = data.get("metadata")
    return {
        "tools": [shown for _, shown in tools],
        "tool_choice": data.get("tool_choice") if tools and data.get("tool_choice") is not None else "auto",
        "parallel_tool_calls": data.get("parallel_tool_calls") is not False,
        "text": {"format": (data.get("text") or {}).get("format") or {"type": "text"}},
        "temperature": data.get("temperature") if data.get("temperature") is not None else 1,
        "top_p": data.get("top_p") if data.get("top_p") is not None else 1,
        "max_output_tokens": data.get("max_output_tokens"),
        "metadata": metadata if isinstance(metadata, dict) else {},
        "user": data.get("user") if isinstance(data.get("user"), str) else None,
        "store": data.get("store") is not False,
        "reasoning": data.get("reasoning") if isinstance(data.get("reasoning"), dict) else None,
        "truncation": "disabled", "background": False, "service_tier": "default", "top_logprobs": 0,
        "presence_penalty": 0, "frequency_penalty": 0, "max_tool_calls": None,
        "safety_identifier": None, "prompt_cache_key": None,
    }  # fmt: skip


async def referenced_items(store: Store, items: list[Any]) -> list[Any]:
    """The input with each item_reference to an output item of a stored response (the Vercel AI
    SDK sends them) replaced by that item."""
    stored: dict[str, Artifact | None] = {}
    resolved = []
    for item in items:
        reference = reference_of(item)
        ours = OUR_ITEM_ID.fullmatch(reference)
        if ours is not None:
            response_id = f"resp_{ours[1]}"
            if response_id not in stored:
                stored[response_id] = await store.artifact(response_id)
            artifact = stored[response_id]
            outputs = artifact.body.get("output", []) if artifact is not None else []
            item = next((output for output in outputs if output.get("id") == reference), item)
        resolved.append(item)
    return resolved


def reference_of(item: Any) -> str:
    """The id an item_reference names ("type" may be left out), else ""."""
    if not isinstance(item, dict) or item.get("type", "item_reference") != "item_reference" or "role" in item:
        return ""
    return item["id"] if isinstance(item.get("id"), str) else ""


def continued_input(said: list[Said], awaited: Mapping[str, str]) -> tuple[Content | None, list[Any], list[str]]:
    """(the message, the results of the client's functions, system texts) of the input that
    continues a response: the function_call_output of each call it handed over, and a message."""
    results = [
        FunctionExecutionResult(content=str(item.content), name=awaited.get(item.call_id, ""), call_id=item.call_id,
                                is_error=False)
        for item in said if item.role == "tool"
    ]  # fmt: skip
    answered = [result.call_id for result in results]
    if sorted(answered) != sorted(awaited):
        waiting = ", ".join(sorted(awaited)) or "none"
        raise invalid(f"The input must answer each function call of the previous response with one "
                      f"function_call_output (calls: {waiting}).", "input")  # fmt: skip
    users = [item for item in said if item.role == "user"]
    if len(users) > 1 or (users and said[-1] is not users[0]) or not (users or results):
        raise invalid("With previous_response_id, 'input' is one user message, or the function_call_output "
                      "items (and then a user message).", "input")  # fmt: skip
    system = [str(item.content) for item in said if item.role == "system"]
    return (users[0].content if users else None), results, system


# ---------------------------------------------------------------------------
# Face: /v1/responses: the Response, its stream, and the routes
# ---------------------------------------------------------------------------
# The output is built from pieces of reasoning (the thinking, and a line for each of the agent's
# tool calls and results) and of text; a piece of another kind than the last starts a new item.
# The stream builds it from the turn's events and a stored or JSON Response from the turn's
# records (response_pieces), the same pieces in the same order, so all three hold the same
# items with the same ids. The client's function calls come last, when the turn ends.

RESPONSE_PARTS = {  # kind: (item type, id prefix, part type, its delta and done events)
    "reasoning": ("reasoning", "rs", "reasoning_text", "response.reasoning_text"),
    "text": ("message", "msg", "output_text", "response.output_text"),
}


class ResponseOutput:
    """A response's output items, and the stream events that build them."""

    def __init__(self, response_id: str) -> None:
        self.tag = response_id.removeprefix("resp_")
        self.items: list[dict[str, Any]] = []
        self.open: str | None = None  # the kind of the last item, while it may still grow

    def add(self, kind: str, text: str) -> list[dict[str, Any]]:
        """Events for a piece of reasoning or text: it joins the last item, or starts one."""
        if not text:
            return []
        events = [] if self.open == kind else self.close() + self._start(kind)
        index, item = len(self.items) - 1, self.items[-1]
        item["content"][0]["text"] += text
        delta = {"type": f"{RESPONSE_PARTS[kind][3]}.delta", "item_id": item["id"], "output_index": index,
                 "content_index": 0, "delta": text}  # fmt: skip
        return events + [delta | ({"logprobs": []} if kind == "text" else {})]

    def _start(self, kind: str) -> list[dict[str, Any]]:
        item_type, prefix, part_type, _ = RESPONSE_PARTS[kind]
        index, self.open = len(self.items), kind
        item: dict[str, Any] = {"type": item_type, "id": f"{prefix}_{self.tag}_{index}", "status": "completed"}
        item |= {"role": "assistant"} if kind == "text" else {"summary": []}
        part = {"type": part_type, "text": ""} | ({"annotations": [], "logprobs": []} if kind == "text" else {})
        self.items.append(item | {"content": [part]})
        added = {"type": "response.output_item.added", "output_index": index,
                 "item": item | {"status": "in_progress", "content": []}}  # fmt: skip
        return [added, {"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                        "content_index": 0, "part": dict(part)}]  # fmt: skip

    def close(self, status: str = "completed") -> list[dict[str, Any]]:
        """Events ending the last item, if it may still grow."""
        if self.open is None:
            return []
        index, item, kind = len(self.items) - 1, self.items[-1], self.open
        self.open, item["status"], part = None, status, item["content"][0]
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        done = {"type": f"{RESPONSE_PARTS[kind][3]}.done", **where, "text": part["text"]}
        return [done | ({"logprobs": []} if kind == "text" else {}),
                {"type": "response.content_part.done", **where, "part": part},
                {"type": "response.output_item.done", "output_index": index, "item": item}]  # fmt: skip

    def call(self, call: ToolCall) -> list[dict[str, Any]]:
        """Events for a call of the client's function: the client runs it."""
        events, index = self.close(), len(self.items)
        item = {"type": "function_call", "id": f"fc_{self.tag}_{index}", "call_id": call.id, "name": call.name,
                "arguments": call.arguments, "status": "completed"}  # fmt: skip
        self.items.append(item)
        where = {"item_id": item["id"], "output_index": index}
        return events + [
            {"type": "response.output_item.added", "output_index": index,
             "item": item | {"arguments": "", "status": "in_progress"}},
            {"type": "response.function_call_arguments.delta", **where, "delta": call.arguments},
            {"type": "response.function_call_arguments.done", **where, "name": call.name, "arguments": call.arguments},
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]  # fmt: skip

    def finish(self, calls: Sequence[ToolCall], cut: bool) -> list[dict[str, Any]]:
        """The last events: the open item ends (incomplete, where the answer was cut), then the calls."""
        events = self.close("incomplete" if cut and not calls else "completed")
        return events + [event for call in calls for event in self.call(call)]


def response_pieces(reply: Reply) -> Iterator[tuple[str, str]]:
    """The pieces of a turn's output, from its records, in the order its events brought them."""
    for record in reply.records:
        if record["role"] == "assistant":
            yield "reasoning", record.get("thought") or ""
            yield "text", record.get("content") or ""
            for call in record.get("tool_calls") or ():
                if not call.get("client"):
                    yield "reasoning", tool_line(ToolCall(call["id"], call["name"], call["arguments"]))
        elif record["role"] == "tool" and not record.get("client"):
            result = ToolResult(record["call_id"], record["name"], record["content"], record["is_error"])
            yield "reasoning", tool_line(result)
    yield "reasoning", "".join(reply.thought)


def responses_usage(tokens: Tokens) -> dict[str, Any]:
    return {
        "input_tokens": tokens.prompt,
        "input_tokens_details": {"cached_tokens": tokens.cached},
        "output_tokens": tokens.completion,
        "output_tokens_details": {"reasoning_tokens": tokens.reasoning},
        "total_tokens": tokens.prompt + tokens.completion,
    }


class ResponseObject:
    """One Response: its id and time, what it echoes of the request, and its body at each point."""

    def __init__(self, asked: ResponsesRequest) -> None:
        self.asked = asked
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.completed_at: int | None = None
        self.conversation_id: str | None = None  # once stored

    def body(self, status: str, output: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        asked = self.asked
        if status != "in_progress" and self.completed_at is None:
            self.completed_at = int(time.time())  # once: the stored Response and the client's agree
        return {
            "id": self.id, "object": "response", "created_at": self.created_at,
            "completed_at": self.completed_at if status == "completed" else None, "status": status,
            "error": None, "incomplete_details": None, "model": asked.model,
            "previous_response_id": asked.previous_response_id, "instructions": asked.options.instructions,
            "conversation": {"id": self.conversation_id} if self.conversation_id else None,
            "output": output, "usage": None, **asked.echo, **fields,
        }  # fmt: skip

    def ended(self, output: list[dict[str, Any]], tokens: Tokens, cut: bool) -> dict[str, Any]:
        """The Response of a turn that ended: completed, or incomplete at the token limit."""
        incomplete = {"incomplete_details": {"reason": "max_output_tokens"}} if cut else {}
        usage = responses_usage(tokens)
        return self.body("incomplete" if cut else "completed", output, usage=usage, **incomplete)

    def reply(self, reply: Reply) -> dict[str, Any]:
        """The Response of a turn, from its records."""
        output = ResponseOutput(self.id)
        for kind, text in response_pieces(reply):
            output.add(kind, text)
        cut = reply.cut and not reply.handed_over
        output.finish(reply.handed_over, cut)
        return self.ended(output.items, reply.tokens, cut)

    def artifact(self, reply: Reply) -> tuple[str, dict[str, Any]]:
        return self.id, self.reply(reply)


class ResponsesStream:
    """A Response streamed as the Responses API's events, each with its `event:` line and its
    sequence_number; after the last (response.completed, .incomplete or .failed), data: [DONE],
    which Open Responses asks for and OpenAI's SDKs pass over."""

    name = "v1_responses"
    errors = OPENAI_ERRORS

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self.output = ResponseOutput(response.id)
        self.calls: list[ToolCall] = []  # the client's: they come last, as in a stored Response
        self.sequence = 0

    def render(self, event: TurnEvent) -> bytes:
        match event:
            case ReasoningDelta(text=text):
                return self._events(self.output.add("reasoning", text))
            case TextDelta(text=text, separator=False):
                return self._events(self.output.add("text", text))
            case ToolCall(client=True):
                self.calls.append(event)
            case ToolCall() | ToolResult():
                return self._events(self.output.add("reasoning", tool_line(event)))
            case Ping():
                return SSE_PING
            case Started():
                body = self.response.body("in_progress", [])
                return self._events([{"type": "response.created", "response": body},
                                     {"type": "response.in_progress", "response": body}])  # fmt: skip
            case Finished():
                return self._finished(event)
            case Failed(error=error):
                events = self.output.close("incomplete")
                failed = self.response.body("failed", self.output.items, error=responses_error(error))
                return self._events([*events, {"type": "response.failed", "response": failed}]) + V1_DONE
        return b""

    def _finished(self, done: Finished) -> bytes:
        cut = done.finish_reason == "length"
        events = self.output.finish(self.calls, cut)
        body = self.response.ended(self.output.items, done.tokens, cut)
        kind = "response.incomplete" if cut else "response.completed"
        return self._events([*events, {"type": kind, "response": body}]) + V1_DONE

    def _events(self, events: list[dict[str, Any]]) -> bytes:
        frames = []
        for event in events:
            frames.append(f"event: {event['type']}\ndata: {dumps(event | {'sequence_number': self.sequence})}\n\n")
            self.sequence += 1
        return "".join(frames).encode()


def responses_error(error: ApiError) -> dict[str, str]:
    return {"code": error.code, "message": error.message}


async def responses_job(ctx: AppContext, asked: ResponsesRequest, response: ResponseObject) -> TurnJob:
    """The turn: of a new conversation or, with previous_response_id, of that response's; or stateless."""
    artifact = response.artifact if asked.store else None
    if asked.previous_response_id is None:
        message, history = client_history(asked.said, param="input")
        check_message(message, ctx.settings, "input")
        conversation_id = f"conv_{response.id.removeprefix('resp_')}" if asked.store else response.id
        response.conversation_id = conversation_id if asked.store else None
        return TurnJob(conversation_id, message, history, asked.store, asked.options, artifact=artifact,
                       face=ResponsesStream.name)  # fmt: skip
    previous = await latest_response(ctx.store, asked.previous_response_id)
    awaited = {item["call_id"]: item["name"] for item in previous.body["output"] if item["type"] == "function_call"}
    message, results, system = continued_input(asked.said, awaited)
    check_message(message, ctx.settings, "input")
    instructions = "\n".join(text for text in [*system, asked.options.instructions or ""] if text) or None
    options = dataclasses.replace(asked.options, instructions=instructions)
    response.conversation_id = previous.conversation_id if asked.store else None
    # Another turn of the conversation may end while this one waits for the lease: check again under it.
    still = functools.partial(latest_response, ctx.store, asked.previous_response_id)
    return TurnJob(previous.conversation_id, message, None, asked.store, options, results=results,
                   artifact=artifact, face=ResponsesStream.name, precondition=still)  # fmt: skip


async def latest_response(store: Store, response_id: str) -> Artifact:
    """The stored response a request continues: it must be its conversation's latest (no branches)."""
    previous = await store.artifact(response_id)
    if previous is None:
        raise not_stored(response_id)
    if not previous.latest:
        raise ApiError("response_not_latest", param="previous_response_id")
    return previous


async def v1_responses(request: Request) -> Response:
    ctx = context(request)
    body = await turn_body(request, ctx.settings.v1_max_body_bytes, "V1_MAX_BODY_BYTES")
    data = await off_the_loop(len(body), parse_json, body)
    if isinstance(data, dict) and isinstance(data.get("input"), list):
        data["input"] = await referenced_items(ctx.store, data["input"])
    taken = [spec.schema["name"] for spec in ctx.tools.specs]
    asked = await off_the_loop(len(body), parse_responses_request, data, ctx.settings, taken)
    response = ResponseObject(asked)
    turn = await start_turn(ctx, await responses_job(ctx, asked, response))
    if asked.stream:
        return TurnStream(turn, ResponsesStream(response))
    return await json_reply(request, turn, response.reply)


async def v1_response(request: Request) -> JSONResponse:
    """A stored Response, as it was when its turn was saved."""
    response_id = request.path_params["response_id"]
    stored = await context(request).store.artifact(response_id) if RESPONSE_ID.fullmatch(response_id) else None
    if stored is None:
        raise ApiError("not_found", f"Response with id {response_id[:80]!r} not found.")
    return JSONResponse(stored.body)


# ---------------------------------------------------------------------------
# Face: the chat page, static files and the API documents
# ---------------------------------------------------------------------------

STATIC_DIR = HERE / "static"
OPENAPI_PATH = HERE / "openapi.json"
# Vendored packages sit in directories named with their version, so their URLs change with it.
IMMUTABLE = "public, max-age=31536000, immutable"
CONTENT_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",  # LICENSE, NOTICE
}
COMPRESSIBLE = {".css", ".html", ".js", ".json", ".svg", ".txt", ""}


@dataclass(frozen=True)
class Asset:
    """A static file as served: its bytes, gzipped once, and the validators derived from them."""

    body: bytes
    gzipped: bytes | None
    etag: str
    content_type: str
    cache_control: str


@functools.lru_cache(maxsize=64)
def load_asset(path: Path, mtime_ns: int, size: int) -> Asset:
    """Read and compress a file once per version of it (the stat arguments key the cache)."""
    body = path.read_bytes()
    gzipped = gzip.compress(body, 9, mtime=0) if path.suffix in COMPRESSIBLE else None
    versioned = path.is_relative_to(STATIC_DIR / "vendor")
    return Asset(
        body=body,
        gzipped=gzipped if gzipped is not None and len(gzipped) < len(body) else None,
        etag='"' + hashlib.sha256(body).hexdigest()[:32] + '"',
        content_type=CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
        cache_control=IMMUTABLE if versioned else "no-cache",
    )


def find_asset(relative: str) -> Asset | None:
    """The file at relative inside STATIC_DIR, or None; nothing outside it is ever read."""
    try:
        path = (STATIC_DIR / relative).resolve()
        stat = path.stat()
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None
    if not path.is_relative_to(STATIC_DIR) or not path.is_file() or path.name.startswith("."):
        return None
    return load_asset(path, stat.st_mtime_ns, stat.st_size)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether Accept-Encoding allows gzip, by name or by '*', with a q-value above zero."""
    weights: dict[str, float] = {}
    for item in accept_encoding.lower().split(","):
        coding, _, params = item.partition(";")
        try:
            weights[coding.strip()] = float(params.strip().removeprefix("q=") or 1)
        except ValueError:
            weights[coding.strip()] = 0.0
    return weights.get("gzip", weights.get("*", 0.0)) > 0


INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


@functools.lru_cache(maxsize=4)
def page_policy(html: bytes) -> str:
    """A Content-Security-Policy that runs only the page's own inline script and talks only
    to this server: should model text ever reach the DOM as HTML, it still cannot run."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Whether If-None-Match names this representation: '*', or its tag (weakly compared)."""
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags


async def static_response(request: Request, relative: str) -> Response:
    """A file under static/ with its content type, caching headers, and gzip where accepted."""
    asset = await anyio.to_thread.run_sync(find_asset, relative)
    if asset is None:
        raise ApiError("not_found", "No such static file.")
    body, headers = asset.body, {"Cache-Control": asset.cache_control, "X-Content-Type-Options": "nosniff"}
    etag = asset.etag
    if asset.gzipped is not None:
        headers["Vary"] = "Accept-Encoding"
        if accepts_gzip(request.headers.get("accept-encoding", "")):
            body, etag = asset.gzipped, etag[:-1] + '-gzip"'  # another representation, another tag
            headers["Content-Encoding"] = "gzip"
    headers["ETag"] = etag
    if asset.content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = page_policy(asset.body)
    if etag_matches(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, headers=headers, media_type=asset.content_type)


async def static_file(request: Request) -> Response:
    relative = request.path_params["path"]
    if relative.lower().endswith(".html"):  # the chat page's API paths are relative to /chat: served there only
        raise ApiError("not_found", "No such static file.")
    return await static_response(request, relative)


async def chat_page(request: Request) -> Response:
    return await static_response(request, "chat.html")


def vendored(pattern: str) -> str:
    """The URL of the one file under static/vendor matching pattern (whatever version is vendored)."""
    found = sorted(STATIC_DIR.glob(f"vendor/{pattern}"))
    if len(found) != 1:
        raise RuntimeError(f"expected one static/vendor/{pattern}, found {len(found)}: see README to vendor it")
    return "/static/" + found[0].relative_to(STATIC_DIR).as_posix()


# The pages load nothing from other hosts; the policy makes the browser hold them to it
# (ReDoc's sidebar would fetch its logo from a CDN). Both libraries inject inline styles.
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)


@functools.cache
def docs_pages() -> dict[str, str]:
    """Swagger UI's and ReDoc's pages, for the vendored versions (found once, when first served)."""
    icon = f'<link rel="icon" type="image/png" href="{vendored("swagger-ui-dist-*/favicon-32x32.png")}">'
    swagger = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>AutoGen chat backend - Swagger UI</title>
{icon}
<link rel="stylesheet" href="{vendored("swagger-ui-dist-*/swagger-ui.css")}">
</head><body><div id="swagger-ui"></div>
<script src="{vendored("swagger-ui-dist-*/swagger-ui-bundle.js")}"></script>
<script>SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui"}});</script>
</body></html>"""
    redoc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>AutoGen chat backend - ReDoc</title>
{icon}</head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="{vendored("redoc-*/bundles/redoc.standalone.js")}"></script>
</body></html>"""
    return {"/docs": swagger, "/redoc": redoc}


async def docs_page(request: Request) -> HTMLResponse:
    page = docs_pages()[request.url.path.removeprefix(request.scope.get("root_path", ""))]
    return HTMLResponse(page, headers={"Content-Security-Policy": DOCS_CSP})


SECURED_PREFIXES = ("/api/", "/v1/", "/metrics")  # where the routes are guarded (see Guard)


def openapi_document(settings: Settings) -> bytes:
    """openapi.json as served: the message limit of the settings, image parts only with MODEL_VISION
    and, with SERVER_API_KEY set, the bearer key on the guarded operations (/api, /v1 and /metrics)."""
    document = json.loads(OPENAPI_PATH.read_text(encoding="utf-8"))
    schemas = document["components"]["schemas"]
    schemas["ChatRequest"]["properties"]["message"]["maxLength"] = settings.max_message_chars
    if not settings.model_info["vision"]:
        schemas["V1UserPart"] = {"$ref": "#/components/schemas/V1TextPart"}
        schemas["V1ResponsesUserPart"] = {"$ref": "#/components/schemas/V1ResponsesTextPart"}
    taken = {"json_object": settings.model_info["json_output"], "json_schema": settings.model_info["structured_output"]}
    for name in ("V1ResponseFormat", "V1ResponsesTextFormat"):
        schemas[name]["oneOf"] = [f for f in schemas[name]["oneOf"] if taken.get(f.get("title", ""), True)]
    if settings.server_api_key:
        for path, item in document["paths"].items():
            if path.startswith(SECURED_PREFIXES):
                for operation in item.values():
                    operation["security"] = [{"bearer": []}]
    return dumps(document).encode()


async def openapi_json(request: Request) -> Response:
    return Response(context(request).openapi, media_type="application/json")


# ---------------------------------------------------------------------------
# Face: the service itself (/, /health and /metrics)
# ---------------------------------------------------------------------------


async def index(request: Request) -> JSONResponse:
    settings = context(request).settings
    return JSONResponse(
        {
            "name": "autogen-chat",
            "version": __version__,
            "model": model_shown(settings),
            "base_url_host": urlsplit(settings.base_url).hostname,
            "endpoints": {
                "chat": "POST /api/chat",
                "chat_stream": "POST /api/chat/stream",
                "conversations": "GET /api/conversations",
                "conversation": "GET|DELETE /api/conversations/{conversation_id}",
                "health": "GET /health",
                "ag_ui": "POST /api/ag-ui",
                "metrics": "GET /metrics",
                "openai_chat": "POST /v1/chat/completions",
                "openai_models": "GET /v1/models",
                "openai_responses": "POST /v1/responses",
                "openai_response": "GET /v1/responses/{response_id}",
            },
            "docs": {"openapi": "/openapi.json", "swagger_ui": "/docs", "redoc": "/redoc"},
            "chat_page": "/chat",
        }
    )


def model_shown(settings: Settings) -> str:
    """The model answering: MODEL_NAME, or "demo" while no API_KEY is set."""
    return settings.model_name if settings.api_key else "demo"


# Who serves the model, by BASE_URL's host, as OpenTelemetry's GenAI conventions name them (AG-UI's
# usage and the traces say it); any other host is named as it is.
PROVIDERS = {
    "api.deepseek.com": "deepseek", "api.openai.com": "openai", "api.anthropic.com": "anthropic",
    "api.groq.com": "groq", "api.mistral.ai": "mistral_ai", "api.x.ai": "x_ai", "api.moonshot.ai": "moonshot_ai",
    "generativelanguage.googleapis.com": "gcp.gemini",
}  # fmt: skip


def provider_name(settings: Settings) -> str:
    """The provider of the model answering: "demo" while no API_KEY is set."""
    host = urlsplit(settings.base_url).hostname or ""
    if settings.api_key is None:
        return "demo"
    return "azure.ai.openai" if host.endswith(".openai.azure.com") else PROVIDERS.get(host, host)


async def health(request: Request) -> JSONResponse:
    ctx = context(request)
    database = await ctx.store.health()
    reasons = [database] if database else []
    if ctx.settings.api_key is None:
        reasons.append("the demo model answers: set API_KEY in .env for a real model")
    if ctx.shutting_down:
        reasons.append("shutting down")
    mcp = ctx.tools.health()
    reasons += [f"MCP server {name} {status}" for name, status in mcp.items() if status != "ok"]
    if (check := request.query_params.get("check")) not in (None, "model"):
        raise invalid("'check' may only be 'model': ask the model API whether it answers.", "check")
    model_api = await ctx.model_api.check() if check else None
    reasons += [f"model API {model_api}"] if model_api and model_api.startswith("failed") else []
    body = {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "model": model_shown(ctx.settings),
        "agent_ready": not ctx.shutting_down,
        "database": database is None,
        "open_turns": len(ctx.turns),
        "mcp": mcp,
    } | ({"model_api": model_api} if model_api else {})
    return JSONResponse(body, status_code=200 if database is None else 503)


async def metrics(request: Request) -> Response:
    """The metrics of every worker, in Prometheus' text format (or OpenMetrics, if asked for)."""
    exposition = context(request).telemetry.metrics.exposition
    body, content_type = await anyio.to_thread.run_sync(exposition, request.headers.get("accept", ""))
    return Response(body, media_type=content_type)


# ---------------------------------------------------------------------------
# Metrics and traces: Prometheus
# ---------------------------------------------------------------------------
# Prometheus metrics at /metrics, from prometheus-client. With WORKERS > 1 it runs in its
# multiprocess mode: each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR, which
# serve() makes before the workers start (prometheus-client picks the mode as it is imported),
# and /metrics sums them. OpenTelemetry GenAI spans go out over OTLP/HTTP when an endpoint is set:
# one invoke_agent span a turn, and under it a chat span for each model call and an execute_tool
# span for each tool call. Their provider is this app's own, never the global one: AutoGen sends
# its own invoke_agent, execute_tool and create_agent spans to the global provider, which stays a
# no-op, so nothing is sent twice. Neither library is imported before the app starts, and nothing
# of OpenTelemetry's SDK without an endpoint. A turn reports to its TurnWatch: its events, its
# model and tool calls, its close. Labels take bounded values only: never an id or a user's text.

TURN_BUCKETS = (0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)  # seconds: with tools and reasoning, minutes
FIRST_TOKEN_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 15, 30, 60)  # a thinking model's first words
DATABASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TOKEN_TYPES = ("input", "output", "cached_input", "reasoning")  # input includes cached, output reasoning
STORE_CALLS = tuple(name for name, value in vars(Store).items() if inspect.iscoroutinefunction(value))


class Metrics:
    """The app's Prometheus metrics, on a registry of its own (tests run several apps in one
    process). In multiprocess mode /metrics reads every worker's files instead of the registry."""

    def __init__(self, settings: Settings) -> None:
        import prometheus_client as prom  # here, not at import: it reads /proc as it loads
        from prometheus_client import multiprocess

        self.multiprocess = prom.values.ValueClass is not prom.values.MutexValue  # picked at its import
        self.registry = prom.CollectorRegistry()
        self._define(prom, settings)
        self.token_counts = [self.tokens.labels(kind) for kind in TOKEN_TYPES]
        self.choose_encoder, self.mark_process_dead = prom.exposition.choose_encoder, multiprocess.mark_process_dead
        if "PROMETHEUS_DISABLE_CREATED_SERIES" not in os.environ:  # prometheus-client's own switch, if set
            prom.disable_created_metrics()
        self.exposed = self.registry
        if self.multiprocess:
            self.directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
            os.makedirs(self.directory, exist_ok=True)
            self.exposed = prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposed, self.directory)

    def _define(self, prom: Any, settings: Settings) -> None:
        registry = self.registry
        self.turns = prom.Counter("autogen_chat_turns", "Turns by face and outcome: done, or the error code the"
                                  " client got (client_closed: it left first)", ("face", "outcome"),
                                  registry=registry)  # fmt: skip
        self.turn_seconds = prom.Histogram("autogen_chat_turn_duration_seconds", "Completed turns, from their start"
                                           " to their last event", ("face",), buckets=TURN_BUCKETS,
                                           registry=registry)  # fmt: skip
        self.first_token_seconds = prom.Histogram("autogen_chat_time_to_first_token_seconds", "Completed turns, from"
                                                  " their start to their first reasoning or text", ("face",),
                                                  buckets=FIRST_TOKEN_BUCKETS, registry=registry)  # fmt: skip
        self.tokens = prom.Counter("autogen_chat_tokens", "Tokens as the model API reported them: input includes"
                                   " cached_input, output includes reasoning", ("type",),
                                   registry=registry)  # fmt: skip
        self.tool_calls = prom.Counter("autogen_chat_tool_calls", "Tool calls by the name the model calls them by,"
                                       " and outcome", ("tool", "outcome"), registry=registry)  # fmt: skip
        self.open_turns = prom.Gauge("autogen_chat_open_turns", "Turns running now", multiprocess_mode="livesum",
                                     registry=registry)  # fmt: skip
        self.errors = prom.Counter("autogen_chat_errors", "Errors clients got, by code", ("code",), registry=registry)
        self.database_seconds = prom.Histogram("autogen_chat_database_seconds", "Database calls, by the store's"
                                               " method", ("op",), buckets=DATABASE_BUCKETS,
                                               registry=registry)  # fmt: skip
        info = prom.Gauge("autogen_chat_info", "The server's version and model", ("version", "model"),
                          multiprocess_mode="max", registry=registry)  # fmt: skip
        info.labels(__version__, settings.model_name).set(1)

    def count_tokens(self, tokens: Tokens) -> None:
        values = (tokens.prompt, tokens.completion, tokens.cached, tokens.reasoning)
        for counter, value in zip(self.token_counts, values, strict=True):
            if value:
                counter.inc(value)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The metrics in the format the scraper asks for (Prometheus' text, or OpenMetrics). Run
        on a thread: in multiprocess mode this reads every worker's files."""
        encode, content_type = self.choose_encoder(accept)
        if self.multiprocess:
            self._forget_dead_workers()
        return encode(self.exposed), content_type

    def _forget_dead_workers(self) -> None:
        """A worker killed before its lifespan ended left its live gauges behind: open_turns would
        count its turns for ever. (Counters stay: totals never go back.)"""
        for path in Path(self.directory).glob("gauge_live*_*.db"):
            pid = whole_number(path.stem.rpartition("_")[2])
            if pid is not None and not process_alive(pid):
                with suppress(FileNotFoundError):  # another worker's scrape was first
                    self.mark_process_dead(pid, self.directory)

    def close(self) -> None:
        if self.multiprocess:
            self.mark_process_dead(os.getpid(), self.directory)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        pass
    return True


def metrics_directory(workers: int) -> str | None:
    """Before the workers start: the directory of prometheus-client's multiprocess mode, empty. A
    PROMETHEUS_MULTIPROC_DIR of the user's is emptied of its files (a past run's values would
    count again); with none and WORKERS > 1 one is made, and returned, to be removed at exit."""
    named = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if named:
        os.makedirs(named, exist_ok=True)
        for stale in Path(named).glob("*.db"):
            stale.unlink()
        return None
    if workers == 1:
        return None
    made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="autogen-chat-metrics-")
    return made


class TimedStore:
    """The store with each call timed in autogen_chat_database_seconds{op}, a failed one too (one
    that timed out shows as DATABASE_TIMEOUT). Anything else is the store's own."""

    def __init__(self, store: Store, seconds: Any) -> None:
        self.store = store
        for name in STORE_CALLS:
            setattr(self, name, timed(getattr(store, name), seconds, name))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def timed(call: Callable[P, Awaitable[T]], seconds: Any, op: str) -> Callable[P, Awaitable[T]]:
    @functools.wraps(call)
    async def timed_call(*args: P.args, **kwargs: P.kwargs) -> T:
        start = time.perf_counter()
        try:
            return await call(*args, **kwargs)
        finally:
            seconds.labels(op).observe(time.perf_counter() - start)  # a series once the store was called

    return timed_call


# ---------------------------------------------------------------------------
# Metrics and traces: OpenTelemetry, and a turn's watch
# ---------------------------------------------------------------------------

CLIENT_CLOSED = "client_closed"  # a turn's outcome when its client left before its last event
TRACES_FLUSH_SECONDS = 5.0  # shutdown waits this long for the last spans; a silent collector holds the SDK 30 s


def usage_attributes(tokens: Tokens) -> dict[str, int]:
    return {
        "gen_ai.usage.input_tokens": tokens.prompt,
        "gen_ai.usage.output_tokens": tokens.completion,
        "gen_ai.usage.cache_read.input_tokens": tokens.cached,
        "gen_ai.usage.reasoning.output_tokens": tokens.reasoning,
    }


def text_parts(content: Content) -> list[dict[str, str]]:
    """A message's text as the conventions' parts, for spans that hold content (images left out)."""
    parts = [content] if isinstance(content, str) else [part for part in content if isinstance(part, str)]
    return [{"type": "text", "content": part} for part in parts]


class Tracing:
    """Spans to OTLP/HTTP (protobuf) through a BatchSpanProcessor: ending a span only queues it,
    and a thread of the SDK's exports them. The SDK reads its own variables (OTEL_SERVICE_NAME,
    OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, OTEL_BSP_*, OTEL_TRACES_SAMPLER, ...) itself."""

    def __init__(self, settings: Settings) -> None:
        from opentelemetry import context, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.version": __version__})  # OTEL_SERVICE_NAME, if set, names it
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "autogen-chat"}))
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # the lifespan shuts it down
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.traces_endpoint)))
        self.tracer = self.provider.get_tracer("autogen-chat", __version__)
        self.kinds, self.in_context, self.attach = trace.SpanKind, trace.set_span_in_context, context.attach
        self.status = functools.partial(trace.Status, trace.StatusCode.ERROR)
        self.settings, self.capture = settings, settings.capture_content
        self.model = {"gen_ai.provider.name": provider_name(settings)}
        self.model["gen_ai.request.model"] = settings.model_name
        base = urlsplit(settings.base_url)
        port = base.port or (80 if base.scheme == "http" else 443)
        self.server = {"server.address": base.hostname or "", "server.port": port}

    def failed(self, span: Any, error_type: str) -> None:
        span.set_attribute("error.type", error_type)
        span.set_status(self.status(error_type))

    def error_type(self, exc: BaseException) -> str:
        """A failed call's error.type: the error code the turn gives for it."""
        return upstream_error(exc, self.settings).code if isinstance(exc, Exception) else "cancelled"

    async def close(self) -> None:
        """Send the spans still queued, from a thread of its own that exit does not wait for: the
        SDK's shutdown blocks, up to 30 s when the collector does not answer."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shut_down() -> None:
            try:
                self.provider.shutdown()
            finally:
                with suppress(RuntimeError):  # the loop has closed: nobody waits any more
                    loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        threading.Thread(target=shut_down, name="traces-shutdown", daemon=True).start()
        await asyncio.wait([done], timeout=TRACES_FLUSH_SECONDS)


def _ignore(*args: Any) -> None:
    pass


NO_SPAN = nullcontext()
NO_TOOL_SPAN = nullcontext(_ignore)


class TurnWatch:
    """One turn as the metrics and traces see it: every event it delivers (event), its model calls
    and tool calls (the adapter's model_call and tool_call), and its close. Open from the turn's
    start to its close (autogen_chat_open_turns); counted at its last event, or at its close when
    its client left first. An answer's tokens cost a type check each."""

    def __init__(self, telemetry: Telemetry, job: TurnJob) -> None:
        self.telemetry, self.metrics, self.tracing, self.job = telemetry, telemetry.metrics, telemetry.tracing, job
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.outcome: str | None = None
        self.tokens = Tokens()
        self.closed = False
        self.span: Any = None
        self.call: Any = None  # the model call's chat span, while it runs
        self.metrics.open_turns.inc()
        if self.tracing is not None:
            self._start_span()

    def _start_span(self) -> None:
        tracing, job = self.tracing, self.job
        assert tracing is not None
        self.conversation = {} if job.history is not None else {"gen_ai.conversation.id": job.conversation_id}
        attributes = {"gen_ai.operation.name": "invoke_agent", **tracing.model, "gen_ai.agent.name": AGENT_NAME}
        attributes |= self.conversation
        if tracing.capture and job.message is not None:
            attributes["gen_ai.input.messages"] = dumps([{"role": "user", "parts": text_parts(job.message)}])
        kind = tracing.kinds.INTERNAL
        self.span = tracing.tracer.start_span(f"invoke_agent {AGENT_NAME}", kind=kind, attributes=attributes)
        self.parent = tracing.in_context(self.span)

    def context(self) -> contextvars.Context | None:
        """The context the turn's task runs in: with its span current, for the trace ids of its
        log lines; None (a copy of the current one) without tracing."""
        if self.span is None:
            return None
        context = contextvars.copy_context()
        context.run(self.tracing.attach, self.parent)  # type: ignore[union-attr]
        return context

    def event(self, event: TurnEvent) -> None:
        if type(event) is TextDelta or type(event) is ReasoningDelta:  # each token of an answer: kept cheap
            if self.first_token is None:
                self.first_token = time.perf_counter()
            return
        match event:
            case Usage():
                self._usage(event)
            case ToolResult(outcome=outcome):
                self.metrics.tool_calls.labels(self._tool_label(event), outcome).inc()
            case Message(content=content) if self.span is not None and self.tracing.capture:  # type: ignore[union-attr]
                output = [{"role": "assistant", "parts": text_parts(content)}]
                self.span.set_attribute("gen_ai.output.messages", dumps(output))
            case Finished():
                self._finished()
            case Failed(error=error):
                self.telemetry.reported.add(error)
                self.metrics.errors.labels(error.code).inc()
                self._end(error.code)

    def _usage(self, usage: Usage) -> None:
        self.metrics.count_tokens(usage.tokens)
        if self.span is not None:  # the turn's sum, for its span (Tokens' sum costs 20 us)
            self.tokens += usage.tokens
        if self.call is not None:
            self.call.set_attributes(usage_attributes(usage.tokens))
            self.call.set_attribute("gen_ai.response.finish_reasons", [usage.finish_reason])

    def _tool_label(self, result: ToolResult) -> str:
        """The tool's name where it is one of the server's; else `client` for a client's tool, and
        `unknown` for a name the model made up: either could be anything."""
        if result.server is not None or result.name in BUILT_IN_TOOLS:
            return result.name
        return "client" if any(tool["name"] == result.name for tool in self.job.options.client_tools) else "unknown"

    def _finished(self) -> None:
        face, now = self.job.face, time.perf_counter()
        self.metrics.turn_seconds.labels(face).observe(now - self.started)
        if self.first_token is not None:
            self.metrics.first_token_seconds.labels(face).observe(self.first_token - self.started)
        self._end("done")

    def _end(self, outcome: str) -> None:
        self.outcome = outcome
        self.metrics.turns.labels(self.job.face, outcome).inc()
        if self.span is not None:
            self.span.set_attributes(usage_attributes(self.tokens))
            if outcome != "done":
                self.tracing.failed(self.span, outcome)  # type: ignore[union-attr]
            self.span.end()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.metrics.open_turns.dec()
        if self.outcome is None:
            self._end(CLIENT_CLOSED)

    def model_call(self) -> AbstractContextManager[Any]:
        """Around a model call: its chat span (its usage comes with the Usage event)."""
        return self._model_call() if self.span is not None else NO_SPAN

    @contextmanager
    def _model_call(self) -> Iterator[None]:
        tracing = self.tracing
        assert tracing is not None
        attributes = {"gen_ai.operation.name": "chat", **tracing.model, **tracing.server, **self.conversation}
        attributes["gen_ai.request.stream"] = True
        name = f"chat {tracing.settings.model_name}"
        self.call = span = tracing.tracer.start_span(name, self.parent, tracing.kinds.CLIENT, attributes)
        try:
            yield
        except BaseException as exc:
            tracing.failed(span, tracing.error_type(exc))
            raise
        finally:
            self.call = None
            span.end()

    def tool_call(self, call: FunctionCall) -> AbstractContextManager[Callable[[ToolOutcome, WorkbenchResult], None]]:
        """Around a tool call: its execute_tool span, which the call ends with its outcome."""
        return self._tool_call(call) if self.span is not None else NO_TOOL_SPAN

    @contextmanager
    def _tool_call(self, call: FunctionCall) -> Iterator[Callable[[ToolOutcome, WorkbenchResult], None]]:
        tracing = self.tracing
        assert tracing is not None
        attributes = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": call.name,
                      "gen_ai.tool.call.id": call.id, "gen_ai.tool.type": "function", **self.conversation}  # fmt: skip
        if tracing.capture:
            attributes["gen_ai.tool.call.arguments"] = call.arguments
        span = tracing.tracer.start_span(f"execute_tool {call.name}", self.parent, tracing.kinds.INTERNAL, attributes)

        def ended(outcome: ToolOutcome, result: WorkbenchResult) -> None:
            if tracing.capture:
                span.set_attribute("gen_ai.tool.call.result", result.to_text())
            if outcome is not ToolOutcome.OK:
                tracing.failed(span, str(outcome))

        try:
            yield ended
        except BaseException as exc:
            tracing.failed(span, tracing.error_type(exc))
            raise
        finally:
            span.end()


class Telemetry:
    """The app's metrics, and its traces when an endpoint is set, from the lifespan's start to its end."""

    def __init__(self, settings: Settings) -> None:
        self.metrics = Metrics(settings)
        self.tracing = Tracing(settings) if settings.traces_endpoint else None
        self.reported: weakref.WeakSet[ApiError] = weakref.WeakSet()  # turns' errors: counted with their turn

    def turn(self, job: TurnJob) -> TurnWatch:
        return TurnWatch(self, job)

    def timed(self, store: Store) -> Store:
        return TimedStore(store, self.metrics.database_seconds)  # type: ignore[return-value]

    def refused(self, route: Any, method: str, error: ApiError) -> None:
        """An error a request got. On a turn's route (its face named), a refused turn too, unless the
        error is one its turn ended with (a JSON reply raises it)."""
        if error in self.reported:
            return
        self.metrics.errors.labels(error.code).inc()
        face = getattr(route, "face", None)
        if face is not None and method in route.methods:
            self.metrics.turns.labels(face, error.code).inc()

    async def close(self) -> None:
        self.metrics.close()
        if self.tracing is not None:
            await self.tracing.close()


class JsonFormatter(logging.Formatter):
    """LOG_FORMAT=json: each line one JSON object, with the trace and span it was logged in when
    there is one (a turn's, with tracing on). Of the standard library only: serve() hands its
    source to the process that starts the workers, which does not import this module."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        trace = sys.modules.get("opentelemetry.trace")  # never imported for this (AutoGen imports it)
        span = trace.get_current_span().get_span_context() if trace is not None else None
        if span is not None and span.is_valid:
            line["trace_id"], line["span_id"] = format(span.trace_id, "032x"), format(span.span_id, "016x")
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


# ---------------------------------------------------------------------------
# Lifespan and shutdown
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class AppContext:
    """What the lifespan creates and the handlers share, kept on app.state.ctx: the long-lived
    things live from the lifespan's start to its end."""

    settings: Settings
    store: Store
    model_api: ModelAPI | DemoModelAPI
    tools: ToolSet
    telemetry: Telemetry
    openapi: bytes = b""
    turns: set[Turn] = field(default_factory=set)
    approvals: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)  # waiting here, to wake at once
    releases: set[asyncio.Task[None]] = field(default_factory=set)
    shutting_down: bool = False
    started: int = field(default_factory=lambda: int(time.time()))


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


TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_config(level: str, json_lines: type[logging.Formatter] | str | None = None) -> dict[str, Any]:
    """uvicorn's logging plus the app's lines on stderr; uvicorn applies it in every worker. With
    `json_lines` (LOG_FORMAT=json: JsonFormatter, or for the workers the path they import it by)
    each line is one JSON object, uvicorn's own too."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["app"] = {"format": TEXT_LOG_FORMAT}
    if json_lines is not None:
        config["formatters"] = {name: {"()": json_lines} for name in ("default", "access", "app")}
    config["handlers"]["app"] = {"class": "logging.StreamHandler", "formatter": "app", "stream": "ext://sys.stderr"}
    config["root"] = {"handlers": ["app"], "level": level}
    return config


def use_logging(settings: Settings) -> None:
    """The app's lines with their level and time also under `uvicorn server:app`, whose logging
    configures only its own loggers."""
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter() if settings.log_format == "json" else logging.Formatter(TEXT_LOG_FORMAT))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(settings.log_level)
    logging.getLogger("autogen_core").setLevel(logging.WARNING)  # its INFO events log whole prompts
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per model call


def log_start(settings: Settings) -> None:
    """One line of what the server runs with, and a warning for each thing to fix."""
    for note in settings.notes:
        logger.warning(note)
    if settings.api_key is None:
        logger.warning("API_KEY is not set: the built-in demo model answers; set API_KEY in .env for a real model")
    if retired_model_note(settings.model_name):
        logger.warning(retired_model_note(settings.model_name))
    if "*" in settings.cors_origins and not settings.server_api_key:
        logger.warning("CORS_ORIGINS=* and no SERVER_API_KEY: any web page can read and run conversations here")
    logger.info(
        "model %s at %s, database %s, settings from %s",
        model_shown(settings),
        urlsplit(settings.base_url).hostname if settings.api_key else "this server",
        database_name(settings),
        settings.env_file or "the environment (no .env beside server.py)",
    )


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    use_logging(settings)
    check_autogen()
    store = open_store(settings)
    await store.open()
    model_api = ModelAPI(settings) if settings.api_key else DemoModelAPI()
    tools = ToolSet(settings)
    await tools.start()
    telemetry = Telemetry(settings)
    store = telemetry.timed(store)
    ctx = app.state.ctx = AppContext(settings, store, model_api, tools, telemetry, openapi_document(settings))
    log_start(settings)
    restore_signals = watch_for_shutdown(ctx)
    # What start-up built lives as long as the process. Frozen, it is left out of the garbage
    # collector's full passes: about 1 ms instead of 70 ms, a pause every open stream would feel.
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        restore_signals()
        stop_turns(ctx)
        await asyncio.gather(*(turn.close() for turn in list(ctx.turns)))
        for task in list(ctx.releases):
            task.cancel()  # a lease left behind expires by itself
        await asyncio.gather(*ctx.releases, return_exceptions=True)
        await tools.stop()
        await model_api.close()
        await store.close()
        await telemetry.close()


# ---------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------


class Guard:
    """A route's guard, for every /api and /v1 route and /metrics: a page of an origin that may not call is
    refused (see origin_allowed), and with SERVER_API_KEY set the route needs
    'Authorization: Bearer <key>'. Applied per route (``middleware=GUARDED``), never by path
    prefix: behind ``--root-path`` uvicorn puts the prefix into ``scope["path"]``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings: Settings = scope["app"].state.settings
        headers = Headers(scope=scope)
        if not origin_allowed(headers, scope["method"], settings.cors_origins):
            raise ApiError("origin_not_allowed")
        key = settings.server_api_key
        if key and not bearer_matches(headers.get("authorization", ""), key):
            raise ApiError("unauthorized")
        await self.app(scope, receive, send)


def bearer_matches(header: str, key: str) -> bool:
    """Whether the header carries the key; the scheme is case-insensitive (RFC 7235)."""
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


GUARDED = [Middleware(Guard)]


def face_route(
    path: str, endpoint: Callable[..., Any], errors: ErrorShape, face: str | None = None, **options: Any
) -> Route:
    """A route whose errors come in `errors`' shape; a turn's route names its face (the metrics
    count the turns it refuses)."""
    route = Route(path, endpoint, **options)
    route.errors = errors  # type: ignore[attr-defined]
    route.face = face  # type: ignore[attr-defined]
    return route


routes = [
    face_route("/", index, API_ERRORS),
    face_route("/health", health, API_ERRORS),
    face_route("/metrics", metrics, API_ERRORS, middleware=GUARDED),
    face_route("/api/chat", chat, API_ERRORS, API_JSON.name, methods=["POST"], middleware=GUARDED),
    face_route("/api/chat/stream", chat_stream, API_ERRORS, API_STREAM.name, methods=["POST"], middleware=GUARDED),
    face_route("/api/conversations", list_conversations, API_ERRORS, middleware=GUARDED),
    face_route(
        "/api/conversations/{conversation_id}", conversation, API_ERRORS, methods=["GET", "DELETE"], middleware=GUARDED
    ),
    face_route(
        "/api/conversations/{conversation_id}/approvals/{call_id}",
        decide,
        API_ERRORS,
        methods=["POST"],
        middleware=GUARDED,
    ),
    face_route("/api/ag-ui", ag_ui, API_ERRORS, AgUiRun.name, methods=["POST"], middleware=GUARDED),
    face_route("/v1/models", v1_models, OPENAI_ERRORS, middleware=GUARDED),
    face_route(
        "/v1/chat/completions",
        v1_chat_completions,
        OPENAI_ERRORS,
        V1Completion.name,
        methods=["POST"],
        middleware=GUARDED,
    ),
    face_route(
        "/v1/responses", v1_responses, OPENAI_ERRORS, ResponsesStream.name, methods=["POST"], middleware=GUARDED
    ),
    face_route("/v1/responses/{response_id}", v1_response, OPENAI_ERRORS, middleware=GUARDED),
    face_route("/openapi.json", openapi_json, API_ERRORS),
    face_route("/docs", docs_page, API_ERRORS),
    face_route("/redoc", docs_page, API_ERRORS),
    face_route("/chat", chat_page, API_ERRORS),
    face_route("/static/{path:path}", static_file, API_ERRORS),
]


def error_shape(scope: Scope) -> ErrorShape:
    """The shape of the face a request came to: its route's, or for a path no route has, by
    its prefix (a client of /v1 reads OpenAI's shape even for a 404)."""
    route = scope.get("route")
    if route is not None and hasattr(route, "errors"):
        return route.errors
    path = scope["path"].removeprefix(scope.get("root_path", ""))
    return OPENAI_ERRORS if path == "/v1" or path.startswith("/v1/") else API_ERRORS


def refuse(request: Request, error: ApiError) -> Response:
    """The error's response, counted, and one log line for a refused request (a 5xx logs its own cause)."""
    shape = error_shape(request.scope)
    if error.status_code < 500:
        logger.info("%s %s -> %s %s", request.method, request.url.path, shape.status(error), error.code)
    if (ctx := getattr(request.app.state, "ctx", None)) is not None:
        ctx.telemetry.refused(request.scope.get("route"), request.method, error)
    return shape.response(error)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return refuse(request, exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "internal_error")
    response = refuse(request, ApiError(code))
    response.headers.update(exc.headers or {})
    return response


async def database_error(request: Request, exc: Exception) -> Response:
    logger.warning("%s %s -> 503 database_unavailable (%s)", request.method, request.url.path, exc)
    return refuse(request, ApiError("database_unavailable"))


async def server_error(request: Request, exc: Exception) -> Response:
    return refuse(request, ApiError("internal_error"))


# ---------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------


class StartupErrorInOneLine:
    """uvicorn logs a failed start-up with the traceback Starlette sends; a SettingsError
    (an unreachable DATABASE_URL, say) is the user's to fix, so it goes out as its one line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_one_line(message: ASGIMessage) -> None:
            error = sys.exc_info()[1]  # Starlette sends the failure while handling the error
            if message["type"] == "lifespan.startup.failed" and isinstance(error, SettingsError):
                message = {**message, "message": f"Configuration error: {error}"}
            await send(message)

        await self.app(scope, receive, send_one_line)


def create_app(settings: Settings | None = None) -> Starlette:
    """The app for these settings (else the environment's and .env's); nothing runs until its
    lifespan starts."""
    settings = settings or load_settings()
    wildcard = "*" in settings.cors_origins
    middleware = [
        Middleware(StartupErrorInOneLine),
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            # Any request header: the openai JS SDK of browser apps sends x-stainless-* headers,
            # and adds new ones between versions.
            allow_headers=["*"],
            allow_credentials=not wildcard,  # never credentials together with '*'
            expose_headers=["Retry-After", "X-Conversation-Id"],
        ),
    ]
    handlers = {
        ApiError: api_error,
        HTTPException: http_error,
        DatabaseUnavailable: database_error,
        Exception: server_error,
    }
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.settings = settings
    return app


class LazyApp:
    """`uvicorn server:app`'s app: built from the settings when the server first calls it (its
    lifespan's start), so that importing this module reads no file and starts nothing."""

    def __init__(self) -> None:
        self.app: Starlette | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is None:
            try:
                self.app = create_app()
            except SettingsError as exc:
                if scope["type"] != "lifespan":
                    raise
                await receive()
                await send({"type": "lifespan.startup.failed", "message": f"Configuration error: {exc}"})
                return
        await self.app(scope, receive, send)


app = LazyApp()


# ---------------------------------------------------------------------------
# python server.py
# ---------------------------------------------------------------------------


# The process that starts the workers, which import the app by its import string: a fresh
# interpreter with only uvicorn, about 85 MiB less than this one. It removes the metrics directory
# serve() made for the workers when it exits. Under LOG_FORMAT=json its own lines take JsonFormatter
# too, made from its source (the standard library's only) under the name the workers import it by.
SUPERVISOR = """\
import json, logging, shutil, sys, types
from datetime import UTC, datetime
options, formatter, made = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
if formatter:
    module = sys.modules["server"] = types.ModuleType("server")
    module.__dict__.update(json=json, logging=logging, sys=sys, UTC=UTC, datetime=datetime)
    exec(formatter, module.__dict__)
import uvicorn
try:
    uvicorn.run("server:app", **options)
finally:
    if made:
        shutil.rmtree(made, ignore_errors=True)
"""


def serve(settings: Settings) -> None:
    """Run uvicorn as `python server.py` does: WORKERS processes, the busy rule holding across
    them through the database's leases, the metrics summed over them."""
    json_lines = settings.log_format == "json"
    options: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": settings.log_level.lower()}
    options["log_config"] = log_config(settings.log_level, JsonFormatter if json_lines else None)
    if exposed := exposure_warning(settings):
        logging.config.dictConfig(options["log_config"])
        logger.warning(exposed)
    port_free(settings)
    made = metrics_directory(settings.workers)  # before the workers import prometheus-client
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    options |= {"workers": settings.workers, "app_dir": str(HERE)}
    options["log_config"] = log_config(settings.log_level, "server.JsonFormatter" if json_lines else None)
    formatter = inspect.getsource(JsonFormatter) if json_lines else ""
    os.execv(sys.executable, [sys.executable, "-c", SUPERVISOR, json.dumps(options), formatter, made or ""])


def port_free(settings: Settings) -> None:
    """SettingsError naming PORT (and HOST) when the server could not listen there."""
    try:
        with socket.create_server((settings.host, settings.port)):
            pass
    except OSError as exc:
        raise SettingsError(
            f"PORT={settings.port} on HOST={settings.host} cannot be listened on: {exc.strerror}"
        ) from None


def exposure_warning(settings: Settings) -> str | None:
    """What `python server.py` warns of when it listens beyond this machine with no key."""
    if settings.server_api_key or is_loopback(settings.host):
        return None
    return f"HOST={settings.host} is reachable from other machines and SERVER_API_KEY is not set"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main() -> None:
    try:
        settings = load_settings()
        check_autogen()
        asyncio.run(check_store(settings))  # one clear line before uvicorn, not a traceback
        serve(settings)
    except SettingsError as exc:
        raise SystemExit(f"Configuration error: {exc}") from None


if __name__ == "__main__":
    main()
