"""Benchmark: what the service adds on top of the model API it relays.

Starts, each as its own process on loopback, a mock OpenAI-compatible API (streams a role
chunk, N deltas at a fixed pace, a usage chunk and [DONE]), the service as the README runs it
(`python server.py`) and a bare Starlette + httpx relay with no AutoGen (`uvicorn`, the same
number of workers), then drives the paths side by side with a lean raw-socket client: the
model API directly, the relay, the service's /api/chat/stream and, where the service has it,
its /v1/chat/completions, and the service again with tracing on (OTLP to the mock). Prints the
goal table, the sweep and what the metrics and traces cost (and writes bench-results.json).

    python bench.py              # full run, about 10 minutes
    python bench.py --quick      # smoke run, about a minute
    python bench.py --workers 2  # WORKERS for the service, --workers for the relay
    python bench.py --sweep-only --workers 2 --levels 100,200,500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
QUIET = ["--log-level", "warning", "--no-access-log"]

# ---------------------------------------------------------------------------
# The mock model API: raw asyncio HTTP/1.1, pre-encoded chunks, so its own cost stays small
# ---------------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _event(data: dict[str, Any]) -> bytes:
    return _frame(b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n")


class MockModelAPI:
    def __init__(self) -> None:
        self.deltas, self.pace = 64, 0.02
        self.request_bytes: list[int] = []
        self.trace_bytes: list[int] = []  # each OTLP export the traced service sent
        base = {"id": "b", "object": "chat.completion.chunk", "created": 0, "model": "mock"}
        self.role = _event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        self.delta = _event({**base, "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}]})
        self.stop = _event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        usage = {"prompt_tokens": 10, "completion_tokens": 64, "total_tokens": 74}
        self.usage = _event({**base, "choices": [], "usage": usage})
        self.done = _frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                body = await reader.readexactly(length)
                path = head.split(b" ")[1]
                if path == b"/config":
                    config = json.loads(body)
                    self.deltas, self.pace = config["deltas"], config["pace_ms"] / 1000
                    self.request_bytes.clear()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                elif path in (b"/stats", b"/trace-stats"):
                    stats = json.dumps(self.request_bytes if path == b"/stats" else self.trace_bytes).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(stats), stats))
                elif path == b"/v1/traces":
                    self.trace_bytes.append(len(body))
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")  # the exporter reads no body
                else:
                    self.request_bytes.append(len(body))
                    await self.stream(writer, b'"include_usage":true' in body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stream(self, writer: asyncio.StreamWriter, usage: bool) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(self.role)
        start = time.monotonic()
        for index in range(self.deltas):
            if self.pace:
                await asyncio.sleep(max(0.0, start + index * self.pace - time.monotonic()))
            writer.write(self.delta)
            await writer.drain()
        writer.write(self.stop + (self.usage if usage else b"") + self.done)
        await writer.drain()


async def serve_mock(port: int) -> None:
    mock = MockModelAPI()
    server = await asyncio.start_server(mock.handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------
# The bare relay: the smallest Starlette app that forwards the same stream with httpx
# ---------------------------------------------------------------------------


def relay_app() -> Any:
    import httpx
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    upstream = os.environ["RELAY_UPSTREAM"]
    client = httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=2000))

    async def relay(request: Request) -> StreamingResponse:
        body = await request.body()
        outgoing = client.build_request("POST", upstream, content=body, headers={"content-type": "application/json"})
        response = await client.send(outgoing, stream=True)
        return StreamingResponse(response.aiter_raw(), media_type="text/event-stream",
                                 background=BackgroundTask(response.aclose))  # fmt: skip

    return Starlette(routes=[Route("/relay", relay, methods=["POST"])])


# ---------------------------------------------------------------------------
# The load client: raw sockets, one timestamp per received token
# ---------------------------------------------------------------------------


@dataclass
class Path_:
    name: str
    port: int
    target: str
    token: bytes
    end: tuple[bytes, ...]
    error: bytes
    body: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    total: float = 0.0
    tokens: int = 0
    error: str | None = None


async def run_stream(
    path: Path_, body: dict[str, Any] | None = None, started: list[None] | None = None, delay: float = 0.0
) -> Result:
    """One stream, opened after `delay` seconds; times count from the moment it is opened."""
    payload = json.dumps(body or path.body).encode()
    request = (f"POST {path.target} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
               f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n").encode() + payload  # fmt: skip
    if delay:
        await asyncio.sleep(delay)  # the stagger of a sweep: when this client arrives
    result, times = Result(), []
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", path.port)
        writer.write(request)
        tail = b""
        while True:
            data = await reader.read(65536)
            now = time.perf_counter()
            if not data:
                result.error = "closed before the end"
                break
            window = tail + data
            fresh = window.count(path.token) - tail.count(path.token)
            if fresh and not times and started is not None:
                started.append(None)
            times += [now] * fresh
            if any(marker in window for marker in path.end):
                if path.error in window:
                    result.error = "error event"
                break
            tail = window[-64:]
        writer.close()
    except OSError as exc:
        result.error = type(exc).__name__
    result.total = time.perf_counter() - start
    if times:
        result.ttft = times[0] - start
        result.gaps = [b - a for a, b in itertools.pairwise(times)]
        result.tokens = len(times)
    elif result.error is None:
        result.error = "no tokens"
    return result


async def staggered(path: Path_, streams: int, ramp: float) -> list[Result]:
    """`streams` streams whose start-up is spread evenly over `ramp` seconds."""
    return await asyncio.gather(*(run_stream(path, delay=index * ramp / streams) for index in range(streams)))


# ---------------------------------------------------------------------------
# Processes and probes
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"process {process.args} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


@contextlib.contextmanager
def started(command: list[str], port: int, env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen]:
    process = subprocess.Popen(command, env={**os.environ, **env}, cwd=cwd)
    try:
        wait_for_port(port, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (the workers of WORKERS=N)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    tree = [pid]
    for member in tree:
        tree += [child for child, parent in parents.items() if parent == member]
    return tree


def cpu_seconds(pid: int) -> float:
    """CPU time of the process and its descendants: each thread's time on a CPU in nanoseconds
    (schedstat), where the kernel keeps it; else utime + stime, in ticks of 10 ms, which over a
    quick run's few hundred tokens would hide anything under 30 us a token. A thread that has
    exited is not counted: the service's threads (its event loop, the span exporter) live on."""
    total = 0.0
    for member in process_tree(pid):
        nanoseconds = [read_first(path) for path in Path(f"/proc/{member}/task").glob("*/schedstat")]
        if nanoseconds:
            total += sum(nanoseconds) / 1e9
            continue
        with suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def read_first(path: Path) -> int:
    """The first number of a /proc file; 0 once its thread is gone."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def rss_kib(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        with suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def http_json(port: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body or {}).encode()
    method = "POST" if body is not None else "GET"
    writer.write(f"{method} {path} HTTP/1.1\r\nhost: b\r\ncontent-length: {len(payload)}\r\n\r\n".encode() + payload)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    data = await reader.readexactly(length)
    writer.close()
    return int(head.split(b" ")[1]), json.loads(data)


async def configure(mock_port: int, deltas: int, pace_ms: float) -> None:
    await http_json(mock_port, "/config", {"deltas": deltas, "pace_ms": pace_ms})


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(value: float) -> float:
    return round(value * 1000, 2)


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


async def latency(paths: dict[str, Path_], mock_port: int, rounds: int, deltas: int) -> dict[str, Any]:
    """Concurrency 1 at the 20 ms pace, the paths interleaved round by round."""
    await configure(mock_port, deltas, 20)
    results: dict[str, list[Result]] = {name: [] for name in paths}
    names = list(paths)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(await run_stream(paths[name]))
    direct = results["direct"]
    direct_gaps = [g for r in direct for g in r.gaps]
    summary: dict[str, Any] = {}
    for name, runs in results.items():
        ttfts, gaps = [r.ttft for r in runs], [g for r in runs for g in r.gaps]
        summary[name] = {
            "errors": sum(r.error is not None for r in runs),
            "ttft_p50_ms": ms(percentile(ttfts, 50)), "ttft_p99_ms": ms(percentile(ttfts, 99)),
            "gap_p50_ms": ms(percentile(gaps, 50)), "gap_p99_ms": ms(percentile(gaps, 99)),
            "stream_s": round(statistics.median(r.total for r in runs), 4),
        }  # fmt: skip
        if name != "direct":
            added = [r.ttft - d.ttft for r, d in zip(runs, direct, strict=True)]
            summary[name] |= {
                "added_ttft_p50_ms": ms(percentile(added, 50)), "added_ttft_p99_ms": ms(percentile(added, 99)),
                "added_gap_p50_ms": ms(percentile(gaps, 50) - percentile(direct_gaps, 50)),
                "added_gap_p99_ms": ms(percentile(gaps, 99) - percentile(direct_gaps, 99)),
                "stream_ratio": round(summary[name]["stream_s"] / summary["direct"]["stream_s"], 4),
            }  # fmt: skip
    return summary


async def cpu_per_token(path: Path_, pid: int, mock_port: int, streams: int, deltas: int) -> float:
    """Process CPU microseconds per relayed token at a 0 ms pace, 10 streams at a time."""
    await configure(mock_port, deltas, 0)
    before, tokens = cpu_seconds(pid), 0
    for _ in range(streams // 10):
        results = await asyncio.gather(*(run_stream(path) for _ in range(10)))
        tokens += sum(r.tokens for r in results)
    return round((cpu_seconds(pid) - before) / max(tokens, 1) * 1e6, 1)


async def sweep_level(path: Path_, pid: int, streams: int, ramp: float, direct_ttft: float) -> dict[str, Any]:
    """One path at one level: errors, gaps, first-token time added to the direct median, CPU, RSS."""
    rss_peak = 0

    async def sample() -> None:
        nonlocal rss_peak
        while True:
            rss_peak = max(rss_peak, rss_kib(pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    cpu_before = cpu_seconds(pid)
    results = await staggered(path, streams, ramp)
    cpu = cpu_seconds(pid) - cpu_before
    sampler.cancel()
    ok = [r for r in results if not r.error]
    gaps, added = [g for r in ok for g in r.gaps], [r.ttft - direct_ttft for r in ok]
    return {
        "errors": len(results) - len(ok),
        "gap_p99_ms": ms(percentile(gaps, 99)), "gap_max_ms": ms(max(gaps, default=float("nan"))),
        "added_ttft_p50_ms": ms(percentile(added, 50)), "added_ttft_p99_ms": ms(percentile(added, 99)),
        "cpu_us_per_token": round(cpu / max(sum(r.tokens for r in ok), 1) * 1e6, 1),
        "rss_peak_kib": rss_peak,
    }  # fmt: skip


async def sweep(
    paths: dict[str, Path_], pids: dict[str, int], mock_port: int, levels: list[int], deltas: int, ramp: float
) -> list[dict[str, Any]]:
    """Concurrent streams at the 20 ms pace, every path at every level, start-up staggered alike."""
    await configure(mock_port, deltas, 20)
    rows = []
    for level in levels:
        ramp_here = ramp if level > 1 else 0.0
        direct = [r for r in await staggered(paths["direct"], level, ramp_here) if not r.error]
        direct_ttft = statistics.median(r.ttft for r in direct) if direct else 0.0
        row: dict[str, Any] = {"streams": level, "direct_ttft_ms": ms(direct_ttft)}
        for name, path in paths.items():
            if name != "direct":
                row[name] = await sweep_level(path, pids[name], level, ramp_here, direct_ttft)
        rows.append(row)
        print(f"  sweep {level:>5} streams: {row}", flush=True)
    return rows


async def conversation_length(path: Path_, mock_port: int, turns: int, direct_ttft: float) -> list[dict[str, Any]]:
    """Turns 1..N of one conversation: request bytes sent upstream and added first-token time."""
    await configure(mock_port, 8, 0)
    rows = []
    for turn in range(1, turns + 1):
        result = await run_stream(path, {"message": f"turn {turn}: tell me more", "conversation_id": "long"})
        _, sent = await http_json(mock_port, "/stats")
        rows.append({"turn": turn, "request_bytes": sent[-1], "added_ttft_ms": ms(result.ttft - direct_ttft),
                     "error": result.error})  # fmt: skip
    return rows


async def memory_per_stream(path: Path_, pid: int, mock_port: int, levels: list[int], hold_ms: int) -> list[dict]:
    """RSS with N streams open, each waiting on a slow model after its first token."""
    await configure(mock_port, 2, hold_ms)
    rows = []
    for level in levels:
        started: list[None] = []
        streams = [asyncio.create_task(run_stream(path, started=started)) for _ in range(level)]
        while len(started) < level and not all(task.done() for task in streams):
            await asyncio.sleep(0.02)
        rows.append({"streams": level, "rss_kib": rss_kib(pid)})
        await asyncio.gather(*streams)
    return rows


# What a turn's observation (server.TurnWatch) costs, timed in a process of its own with the
# metrics on and tracing off: each token's event, a whole turn (open, usage, end, close) and the
# adapter's hooks around a model call and a tool call, which without tracing are a shared no-op.
OBSERVATION = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import server
from autogen_core import FunctionCall

telemetry = server.Telemetry(server.Settings())
job = server.TurnJob("bench", "hi")
delta, usage = server.TextDelta(" tok"), server.Usage(server.Tokens(10, 64), "stop")
finished = server.Finished("bench", server.Tokens(10, 64), "stop")
call, result = FunctionCall(id="c", name="calculate", arguments="{}"), server.tool_result("calculate", "1")
watch = telemetry.turn(job)

def turn():
    each = telemetry.turn(job)
    each.event(usage)
    each.event(finished)
    each.close()

def hooks():
    with watch.model_call():
        pass
    with watch.tool_call(call) as ended:
        ended(server.ToolOutcome.OK, result)

def microseconds(work, count):
    start = time.perf_counter_ns()
    for _ in range(count):
        work()
    return round((time.perf_counter_ns() - start) / count / 1000, 3)

print(json.dumps({"token_us": microseconds(lambda: watch.event(delta), 500_000),
                  "turn_us": microseconds(turn, 20_000), "hooks_us": microseconds(hooks, 200_000)}))
"""


def observation_cost() -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", OBSERVATION, str(HERE)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def slope(points: list[tuple[float, float]]) -> float:
    xs, ys = zip(*points, strict=True)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

CHAT = {"message": "Say something long."}
COMPLETION = {"model": "mock", "stream": True, "messages": [{"role": "user", "content": "Say something long."}]}
SSE_TOKEN = b'"delta":{"content":'


@dataclass
class Run:
    """What a run starts: the ports, the service's settings, a place for scratch files."""

    args: argparse.Namespace
    scratch: Path
    ports: dict[str, int]
    database_url: str | None
    pids: dict[str, int] = field(default_factory=dict)

    def service_env(self, port: int, database_url: str | None = None, traced: bool = False) -> dict[str, str]:
        workers = {"WORKERS": str(self.args.workers)} if self.args.workers else {}
        database = {"DATABASE_URL": database_url} if database_url else {}
        mock = f"http://127.0.0.1:{self.ports['mock']}"
        tracing = {"OTEL_EXPORTER_OTLP_ENDPOINT": mock} if traced else {}  # the mock takes the spans
        return {
            "API_KEY": "bench", "BASE_URL": f"{mock}/v1", "MODEL_NAME": "mock",
            "DATABASE_PATH": str(self.scratch / f"bench-{port}.db"), "LOG_LEVEL": "WARNING", "MAX_RETRIES": "0",
            "HOST": "127.0.0.1", "PORT": str(port), **workers, **database, **tracing,
        }  # fmt: skip

    def service(
        self, port: int, database_url: str | None = None, traced: bool = False
    ) -> contextlib.AbstractContextManager:
        """The service as the README runs it: `python server.py`."""
        command = [sys.executable, str(HERE / "server.py")]
        return started(command, port, self.service_env(port, database_url, traced), self.scratch)


async def bench_paths(run: Run) -> dict[str, Path_]:
    """The model API, the relay and the service's streaming paths: /v1 where the service has
    it, /api/chat/stream on PostgreSQL where a cluster could be had, and /api/chat/stream of
    the service with tracing on."""
    ports = run.ports
    paths = {
        "direct": Path_("direct", ports["mock"], "/v1/chat/completions", SSE_TOKEN, (b"[DONE]",), b"\0", COMPLETION),
        "relay": Path_("relay", ports["relay"], "/relay", SSE_TOKEN, (b"[DONE]",), b"\0", COMPLETION),
        "service": Path_("service", ports["service"], "/api/chat/stream", b"event: chunk\n",
                         (b"event: done", b"event: error"), b"event: error", CHAT),
    }  # fmt: skip
    status, _ = await http_json(ports["service"], "/v1/models")
    if status == 200:
        paths["v1"] = Path_("v1", ports["service"], "/v1/chat/completions", SSE_TOKEN, (b"[DONE]",),
                            b'data: {"error"', COMPLETION)  # fmt: skip
    if "postgres" in ports:
        paths["postgres"] = dataclasses.replace(paths["service"], name="postgres", port=ports["postgres"])
    paths["traced"] = dataclasses.replace(paths["service"], name="traced", port=ports["traced"])
    return paths


async def measure(run: Run) -> dict[str, Any]:
    args, ports, pids = run.args, run.ports, run.pids
    paths = await bench_paths(run)
    services = [name for name in paths if name not in ("direct", "relay")]
    pids |= {name: pids["service"] for name in services if name not in pids}
    for name in paths:  # warm up each path
        await run_stream(paths[name])
    report: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
        "workers": args.workers, "quick": args.quick, "ramp_s": args.ramp, "paths": list(paths),
        "memory": {"rss_idle_kib": rss_kib(pids["service"])},
    }  # fmt: skip
    if not args.sweep_only:
        await single_stream_phases(run, paths, services, report)
    print(f"concurrency sweep (start-up spread over {args.ramp} s) ...", flush=True)
    report["sweep"] = await sweep(paths, pids, ports["mock"], args.levels, args.deltas, args.ramp)
    report["sustained_streams"] = {
        name: max((row["streams"] for row in report["sweep"] if sustained(row[name])), default=0)
        for name in ("relay", *services)
    }
    _, exports = await http_json(ports["mock"], "/trace-stats")
    report["traces"] = {"exports": len(exports), "bytes": sum(exports)}  # while the traced service still runs
    return report


async def single_stream_phases(run: Run, paths: dict[str, Path_], services: list[str], report: dict) -> None:
    """Everything but the sweep, which comes last: hundreds of streams leave the processes with
    a high RSS mark and full connection pools."""
    args, ports, pids = run.args, run.ports, run.pids
    print("latency at concurrency 1 ...", flush=True)
    report["latency"] = await latency(paths, ports["mock"], args.rounds, args.latency_deltas)
    print("CPU per token ...", flush=True)
    report["cpu_us_per_token"] = {
        name: await cpu_per_token(paths[name], pids[name], ports["mock"], args.cpu_streams, args.deltas)
        for name in ("relay", *services)
    }
    print("memory per open stream, each path in a fresh process ...", flush=True)
    for name in services:
        report["memory"][name] = await fresh_memory(run, paths[name])
    print("conversation length ...", flush=True)
    direct_ttft = report["latency"]["direct"]["ttft_p50_ms"] / 1000
    report["conversation"] = await conversation_length(paths["service"], ports["mock"], args.turns, direct_ttft)
    database = run.scratch / f"bench-{ports['service']}.db"
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        turns = db.execute('SELECT count(*) FROM messages WHERE body LIKE \'{"role":"user"%\'').fetchone()[0]
    report["memory"]["db_bytes_per_turn"] = round(database.stat().st_size / max(turns, 1))


async def fresh_memory(run: Run, path: Path_) -> dict[str, Any]:
    """RSS per held-open stream in a process of its own: memory a process once held and freed
    would hide the growth of the path measured after it."""
    port = free_port()
    database_url = run.database_url if path.name == "postgres" else None
    with run.service(port, database_url, traced=path.name == "traced") as process:
        fresh = dataclasses.replace(path, port=port)
        await configure(run.ports["mock"], 2, 0)
        await run_stream(fresh)
        held = await memory_per_stream(fresh, process.pid, run.ports["mock"], *run.args.memory)
    points = [(row["streams"], row["rss_kib"]) for row in held]
    return {"held_streams": held, "rss_kib_per_stream": round(slope(points), 1)}


def sustained(figures: dict[str, Any]) -> bool:
    """The issue's rule: no errors and the gap p99 within twice the 20 ms pace."""
    return figures["errors"] == 0 and figures["gap_p99_ms"] <= 40


# ---------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------


def goal_rows(report: dict[str, Any], name: str) -> list[tuple[str, Any, str, bool | None]]:
    """(figure, now, goal, met) for one service path."""
    at_one, cpu = report["latency"][name], report["cpu_us_per_token"]
    at_100 = next((row[name] for row in report["sweep"] if row["streams"] == 100), None)
    ratio = cpu[name] / cpu["relay"]
    per_stream = report["memory"][name]["rss_kib_per_stream"]
    p50, p99 = at_one["added_ttft_p50_ms"], at_one["added_ttft_p99_ms"]
    return [
        ("added first-token p99 at 100 concurrent streams (ms)", at_100 and at_100["added_ttft_p99_ms"], "<= 300",
         at_100 and at_100["errors"] == 0 and at_100["added_ttft_p99_ms"] <= 300),
        ("streams sustained at the 20 ms pace (0 errors, gap p99 <= 40 ms)", report["sustained_streams"][name],
         ">= 100", report["sustained_streams"][name] >= 100),
        ("CPU per token vs the bare relay", f"{ratio:.2f}x ({cpu[name]} vs {cpu['relay']} us)", "<= 1.5x",
         ratio <= 1.5),
        ("RSS per open stream (KiB)", per_stream, "<= 50", per_stream <= 50),
        ("added first-token p50 / p99 at concurrency 1 (ms)", f"{p50} / {p99}", "<= 2 / 5", p50 <= 2 and p99 <= 5),
    ]  # fmt: skip


def met(value: bool | None) -> str:
    return "n/a" if value is None else "yes" if value else "no"


def print_table(report: dict[str, Any]) -> None:
    services = [name for name in report["paths"] if name not in ("direct", "relay")]
    if "latency" not in report:  # --sweep-only
        print(f"\nRSS idle {round(report['memory']['rss_idle_kib'] / 1024, 1)} MiB, all processes; sustained:",
              {TITLES[name]: count for name, count in report["sustained_streams"].items()})  # fmt: skip
        print_sweep(report, ["relay", *services])
        return
    per_path = {name: goal_rows(report, name) for name in services}
    header = " | ".join(f"{TITLES[name]} | met" for name in services)
    print(f"\n| figure | goal | {header} |\n|---|---|" + "---|---|" * len(services))
    for index, (figure, _, goal, _) in enumerate(per_path["service"]):
        cells = " | ".join(f"{per_path[name][index][1]} | {met(per_path[name][index][3])}" for name in services)
        print(f"| {figure} | {goal} | {cells} |")
    relay, service, memory = report["latency"]["relay"], report["latency"]["service"], report["memory"]
    conversation = report["conversation"]
    print("\n| other measures | bare relay | service |\n|---|---|---|")
    for figure, relay_value, service_value in [
        ("added first-token p50 / p99 at concurrency 1 (ms)",
         f"{relay['added_ttft_p50_ms']} / {relay['added_ttft_p99_ms']}",
         f"{service['added_ttft_p50_ms']} / {service['added_ttft_p99_ms']}"),
        ("added gap p50 / p99 at concurrency 1 (ms)", f"{relay['added_gap_p50_ms']} / {relay['added_gap_p99_ms']}",
         f"{service['added_gap_p50_ms']} / {service['added_gap_p99_ms']}"),
        ("whole-stream time / direct", relay["stream_ratio"], service["stream_ratio"]),
        ("streams sustained at the 20 ms pace", report["sustained_streams"]["relay"], ""),
        ("RSS idle (MiB), all processes", "", round(memory["rss_idle_kib"] / 1024, 1)),
        ("database bytes per turn", "", memory["db_bytes_per_turn"]),
        ("request bytes upstream, turn 1 / last", "",
         f"{conversation[0]['request_bytes']} / {conversation[-1]['request_bytes']}"),
        ("added first-token time, turn 1 / last (ms)", "",
         f"{conversation[0]['added_ttft_ms']} / {conversation[-1]['added_ttft_ms']}"),
    ]:  # fmt: skip
        print(f"| {figure} | {relay_value} | {service_value} |")
    print_sweep(report, ["relay", *services])


def print_sweep(report: dict[str, Any], names: list[str]) -> None:
    """One row per level: each path's errors, gap p99, added first-token p50/p99, CPU per token."""
    columns = " | ".join(f"{TITLES[name]}: errors, gap p99, added TTFT p50 / p99, CPU/token" for name in names)
    print(f"\n| streams | {columns} | RSS peak (MiB) |\n|---|" + "---|" * (len(names) + 1))
    for row in report["sweep"]:
        cells = []
        for name in names:
            f = row[name]
            ratio = "" if name == "relay" else f" ({f['cpu_us_per_token'] / row['relay']['cpu_us_per_token']:.2f}x)"
            cells.append(f"{f['errors']}, {f['gap_p99_ms']}, {f['added_ttft_p50_ms']} / {f['added_ttft_p99_ms']}, "
                         f"{f['cpu_us_per_token']} us{ratio}")  # fmt: skip
        print(f"| {row['streams']} | {' | '.join(cells)} | {round(row['service']['rss_peak_kib'] / 1024, 1)} |")


def print_observation(report: dict[str, Any]) -> None:
    """What the metrics and traces cost: the hook alone, and the service with tracing on and off."""
    cost, traces = report["observation"], report["traces"]
    print(f"\nobservation, in-process (metrics on, tracing off): {cost['token_us']} us a token, "
          f"{cost['turn_us']} us a turn, {cost['hooks_us']} us for a model and a tool call's hooks")  # fmt: skip
    if "cpu_us_per_token" in report:
        cpu = report["cpu_us_per_token"]
        print(f"CPU per token: {cpu['service']} us, traced {cpu['traced']} us (the hook: "
              f"{cost['token_us'] / cpu['service']:.2%} of it)")  # fmt: skip
    print(f"traces: {traces['exports']} OTLP exports, {traces['bytes']} bytes, from the traced service")


TITLES = {
    "relay": "bare relay", "service": "/api/chat/stream", "v1": "/v1/chat/completions",
    "postgres": "/api/chat/stream on PostgreSQL", "traced": "/api/chat/stream, traced",
}  # fmt: skip


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str | None]:
    """A throwaway PostgreSQL cluster of Debian's binaries, run as the postgres user (initdb
    refuses root), with fsync off; None, and a note, where PostgreSQL is not installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        print("PostgreSQL is not installed (apt-get install postgresql): its path is not measured", flush=True)
        yield None
        return
    directory, port = Path(tempfile.mkdtemp(prefix="bench-pg-")), free_port()  # not under scratch: mode 700
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(directory, "postgres", "postgres")

    def pg(program: str, *options: str) -> None:
        command = [*as_postgres, str(found[-1].parent / program), *options]
        subprocess.run(command, cwd=directory, check=True, capture_output=True, timeout=60)

    pg("initdb", "-D", "data", "-U", "postgres", "--auth=trust", "--no-sync")
    settings = f"-c listen_addresses=127.0.0.1 -p {port} -c fsync=off -c unix_socket_directories={directory}"
    pg("pg_ctl", "-D", "data", "-l", "log", "-w", "-o", settings, "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        pg("pg_ctl", "-D", "data", "-w", "-m", "immediate", "stop")
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--role", choices=["mock"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench-results.json")
    parser.add_argument("--workers", type=int, help="WORKERS for the service and the relay (default: the server's)")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which a sweep level's streams start")
    parser.add_argument("--levels", help="the sweep's levels, comma-separated (default: 1,10 quick, else to 500)")
    parser.add_argument("--sweep-only", action="store_true", help="only the concurrency sweep (to compare --workers)")
    args = parser.parse_args()
    if args.role == "mock":
        asyncio.run(serve_mock(args.port))
        return
    args.rounds, args.latency_deltas, args.deltas, args.cpu_streams = (
        (6, 8, 16, 20) if args.quick else (100, 16, 64, 300)
    )
    default_levels = [1, 10] if args.quick else [1, 10, 50, 100, 200, 500]
    args.levels = [int(n) for n in args.levels.split(",")] if args.levels else default_levels
    args.turns = 3 if args.quick else 100
    args.memory = ([10, 20], 300) if args.quick else ([100, 200, 400], 4000)
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        database_url = stack.enter_context(postgres_cluster())
        names = ["mock", "relay", "service", "traced", *(["postgres"] if database_url else [])]
        run = Run(args, Path(scratch), {name: free_port() for name in names}, database_url)
        relay_workers = ["--workers", str(args.workers)] if args.workers and args.workers > 1 else []
        relay_env = {"RELAY_UPSTREAM": f"http://127.0.0.1:{run.ports['mock']}/v1/chat/completions"}
        mock_command = [sys.executable, str(HERE / "bench.py"), "--role", "mock", "--port", str(run.ports["mock"])]
        relay_command = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(run.ports["relay"]),
                         *QUIET, *relay_workers, "--factory", "bench:relay_app", "--app-dir", str(HERE)]  # fmt: skip
        stack.enter_context(started(mock_command, run.ports["mock"], {}, run.scratch))
        run.pids["relay"] = stack.enter_context(started(relay_command, run.ports["relay"], relay_env, run.scratch)).pid
        run.pids["service"] = stack.enter_context(run.service(run.ports["service"])).pid
        if database_url:
            run.pids["postgres"] = stack.enter_context(run.service(run.ports["postgres"], database_url)).pid
        run.pids["traced"] = stack.enter_context(run.service(run.ports["traced"], traced=True)).pid
        report = asyncio.run(measure(run))
        report["observation"] = observation_cost()
    print_table(report)
    print_observation(report)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
