"""Benchmark: what the service adds on top of the model API it relays.

Starts, each as its own process on loopback, a mock OpenAI-compatible API (streams a role
chunk, N deltas at a fixed pace, a usage chunk and [DONE]), the service (`uvicorn server:app`)
and a bare Starlette + httpx relay with no AutoGen, then drives the three paths interleaved
with a lean raw-socket client and prints one table (and writes bench-results.json).

    python bench.py            # full run, a few minutes
    python bench.py --quick    # smoke run, under 30 s
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
                elif path == b"/stats":
                    stats = json.dumps(self.request_bytes).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(stats), stats))
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
    body: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    total: float = 0.0
    tokens: int = 0
    error: str | None = None


async def run_stream(path: Path_, body: dict[str, Any] | None = None, started: list[None] | None = None) -> Result:
    payload = json.dumps(body or path.body).encode()
    request = (f"POST {path.target} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
               f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n").encode() + payload  # fmt: skip
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
                if b"event: error" in window:
                    result.error = "error event"
                break
            tail = window[-64:]
        writer.close()
    except OSError as exc:
        result.error = type(exc).__name__
    result.total = time.perf_counter() - start
    if times:
        result.ttft = times[0] - start
        result.gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        result.tokens = len(times)
    elif result.error is None:
        result.error = "no tokens"
    return result


# ---------------------------------------------------------------------------
# Processes and probes
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
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


@contextmanager
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
    """The process and its children (the workers of `uvicorn --workers N`)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return [pid, *children]


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for member in process_tree(pid):
        fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def rss_kib(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def client_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def http_json(port: int, path: str, body: dict[str, Any] | None = None) -> Any:
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
    return json.loads(data)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ms(value: float) -> float:
    return round(value * 1000, 3)


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


async def latency(paths: dict[str, Path_], mock_port: int, rounds: int, deltas: int) -> dict[str, Any]:
    """Concurrency 1 at the 20 ms pace, the paths interleaved round by round."""
    await http_json(mock_port, "/config", {"deltas": deltas, "pace_ms": 20})
    results: dict[str, list[Result]] = {name: [] for name in paths}
    for index in range(rounds):
        order = list(paths)[index % 3 :] + list(paths)[: index % 3]
        for name in order:
            results[name].append(await run_stream(paths[name]))
    summary: dict[str, Any] = {}
    direct = results["direct"]
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
            summary[name]["added_ttft_p50_ms"] = ms(percentile(added, 50))
            summary[name]["added_ttft_p99_ms"] = ms(percentile(added, 99))
            summary[name]["added_gap_p50_ms"] = ms(
                percentile(gaps, 50) - percentile([g for r in direct for g in r.gaps], 50)
            )
            summary[name]["added_gap_p99_ms"] = ms(
                percentile(gaps, 99) - percentile([g for r in direct for g in r.gaps], 99)
            )
            summary[name]["stream_ratio"] = round(summary[name]["stream_s"] / summary["direct"]["stream_s"], 4)
    return summary


async def cpu_per_token(path: Path_, pid: int, mock_port: int, streams: int, deltas: int) -> float:
    """Process CPU microseconds per relayed token at a 0 ms pace, 10 streams at a time."""
    await http_json(mock_port, "/config", {"deltas": deltas, "pace_ms": 0})
    before, tokens = cpu_seconds(pid), 0
    for _ in range(streams // 10):
        results = await asyncio.gather(*(run_stream(path) for _ in range(10)))
        tokens += sum(r.tokens for r in results)
    return round((cpu_seconds(pid) - before) / max(tokens, 1) * 1e6, 2)


async def sweep(
    paths: dict[str, Path_], service_pid: int, mock_port: int, levels: list[int], deltas: int
) -> list[dict[str, Any]]:
    """Concurrent streams at the 20 ms pace: errors, gaps, added first-token time, RSS."""
    await http_json(mock_port, "/config", {"deltas": deltas, "pace_ms": 20})
    rows = []
    for level in levels:
        direct = await asyncio.gather(*(run_stream(paths["direct"]) for _ in range(level)))
        rss_peak = 0

        async def sample() -> None:
            nonlocal rss_peak
            while True:
                rss_peak = max(rss_peak, rss_kib(service_pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        cpu_before = client_cpu_seconds()
        results = await asyncio.gather(*(run_stream(paths["service"]) for _ in range(level)))
        client_cpu = client_cpu_seconds() - cpu_before
        sampler.cancel()
        gaps = [g for r in results for g in r.gaps]
        direct_ttft = (
            statistics.median(r.ttft for r in direct if not r.error) if any(not r.error for r in direct) else 0
        )
        ok = [r for r in results if not r.error]
        rows.append({
            "streams": level,
            "errors": len(results) - len(ok),
            "gap_p99_ms": ms(percentile(gaps, 99)),
            "gap_max_ms": ms(max(gaps, default=float("nan"))),
            "added_ttft_p99_ms": ms(percentile([r.ttft - direct_ttft for r in ok], 99)),
            "rss_peak_kib": rss_peak,
            "client_cpu_s": round(client_cpu, 2),
        })  # fmt: skip
        print(f"  sweep {level:>5} streams: {rows[-1]}", flush=True)
    return rows


async def conversation_length(
    paths: dict[str, Path_], mock_port: int, turns: int, direct_ttft: float
) -> list[dict[str, Any]]:
    """Turns 1..N of one conversation: request bytes sent upstream and added first-token time."""
    await http_json(mock_port, "/config", {"deltas": 8, "pace_ms": 0})
    rows = []
    for turn in range(1, turns + 1):
        result = await run_stream(
            paths["service"], {"message": f"turn {turn}: tell me more", "conversation_id": "long"}
        )
        sent = await http_json(mock_port, "/stats")
        rows.append({"turn": turn, "request_bytes": sent[-1], "added_ttft_ms": ms(result.ttft - direct_ttft),
                     "error": result.error})  # fmt: skip
    return rows


async def memory_per_stream(path: Path_, pid: int, mock_port: int, levels: list[int], hold_ms: int) -> list[dict]:
    """RSS with N streams open, each waiting on a slow model after its first token."""
    await http_json(mock_port, "/config", {"deltas": 2, "pace_ms": hold_ms})
    rows = []
    for level in levels:
        started: list[None] = []
        streams = [asyncio.create_task(run_stream(path, started=started)) for _ in range(level)]
        while len(started) < level and not all(task.done() for task in streams):
            await asyncio.sleep(0.02)
        rows.append({"streams": level, "rss_kib": rss_kib(pid)})
        await asyncio.gather(*streams)
    return rows


def slope(points: list[tuple[float, float]]) -> float:
    xs, ys = zip(*points, strict=True)
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x in xs)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


async def measure(
    args: argparse.Namespace, ports: dict[str, int], pids: dict[str, int], database: Path
) -> dict[str, Any]:
    chat = {"message": "Say something long."}
    paths = {
        "direct": Path_("direct", ports["mock"], "/v1/chat/completions", b'"delta":{"content":', (b"[DONE]",),
                        {"model": "mock", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
        "relay": Path_("relay", ports["relay"], "/relay", b'"delta":{"content":', (b"[DONE]",),
                       {"model": "mock", "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
        "service": Path_("service", ports["service"], "/api/chat/stream", b"event: chunk\n",
                         (b"event: done", b"event: error"), chat),
    }  # fmt: skip
    for name in paths:  # warm up each path
        await run_stream(paths[name])
    idle_rss = rss_kib(pids["service"])
    report: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
                              "uvicorn_options": args.uvicorn, "quick": args.quick}  # fmt: skip
    print("latency at concurrency 1 ...", flush=True)
    report["latency"] = await latency(paths, ports["mock"], args.rounds, args.deltas)
    print("CPU per token ...", flush=True)
    report["cpu_us_per_token"] = {
        name: await cpu_per_token(paths[name], pids[name], ports["mock"], args.cpu_streams, args.deltas)
        for name in ("relay", "service")
    }
    print("memory per open stream ...", flush=True)
    held = await memory_per_stream(paths["service"], pids["service"], ports["mock"], *args.memory)
    points = [(row["streams"], row["rss_kib"]) for row in held]
    report["memory"] = {"rss_idle_kib": idle_rss, "held_streams": held, "rss_kib_per_stream": round(slope(points), 1)}
    print("conversation length ...", flush=True)
    direct_ttft = report["latency"]["direct"]["ttft_p50_ms"] / 1000
    report["conversation"] = await conversation_length(paths, ports["mock"], args.turns, direct_ttft)
    # Last: a thousand streams leave the process with a high RSS mark and a full connection pool.
    print("concurrency sweep ...", flush=True)
    report["sweep"] = await sweep(paths, pids["service"], ports["mock"], args.levels, args.deltas)
    sustained = [row["streams"] for row in report["sweep"] if row["errors"] == 0 and row["gap_max_ms"] <= 40]
    report["sustained_streams"] = max(sustained, default=0)
    with sqlite3.connect(database) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        turns = db.execute('SELECT count(*) FROM messages WHERE body LIKE \'{"role":"user"%\'').fetchone()[0]
    report["memory"]["db_bytes_per_turn"] = round(database.stat().st_size / max(turns, 1))
    return report


def _pair(row: dict[str, Any], first: str, second: str) -> str:
    return f"{row[first]} / {row[second]}"


def _pair_of(first: dict[str, Any], last: dict[str, Any], key: str) -> str:
    return f"{first[key]} / {last[key]}"


def print_table(report: dict[str, Any]) -> None:
    relay, service = report["latency"]["relay"], report["latency"]["service"]
    cpu, conversation, memory = report["cpu_us_per_token"], report["conversation"], report["memory"]
    first, last = conversation[0], conversation[-1]
    rows = [
        ("added first-token time p50 / p99 (ms)", _pair(relay, "added_ttft_p50_ms", "added_ttft_p99_ms"),
         _pair(service, "added_ttft_p50_ms", "added_ttft_p99_ms"), "<= 2 / 5"),
        ("added inter-chunk gap p50 / p99 (ms)", _pair(relay, "added_gap_p50_ms", "added_gap_p99_ms"),
         _pair(service, "added_gap_p50_ms", "added_gap_p99_ms"), "<= 0.1 / 1"),
        ("whole-stream time / direct", relay["stream_ratio"], service["stream_ratio"], "<= 1.02"),
        ("CPU per token (us)", cpu["relay"], cpu["service"], f"<= 2x relay: {cpu['service'] / cpu['relay']:.2f}x"),
        ("streams sustained at the 20 ms pace", "", report["sustained_streams"], ">= 500"),
        ("RSS idle (MiB)", "", round(memory["rss_idle_kib"] / 1024, 1), ""),
        ("RSS per open stream (KiB)", "", memory["rss_kib_per_stream"], "<= 50"),
        ("database bytes per turn", "", memory["db_bytes_per_turn"], ""),
        ("request bytes upstream, turn 1 / last", "", _pair_of(first, last, "request_bytes"), "levels off"),
        ("added first-token time, turn 1 / last (ms)", "", _pair_of(first, last, "added_ttft_ms"), "last <= 2x first"),
    ]  # fmt: skip
    print("\n| measure | bare relay | service | goal |\n|---|---|---|---|")
    for name, relay_value, service_value, goal in rows:
        print(f"| {name} | {relay_value} | {service_value} | {goal} |")
    columns = ("streams", "errors", "gap_p99_ms", "gap_max_ms", "added_ttft_p99_ms", "rss_peak_kib", "client_cpu_s")
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in report["sweep"]:
        print("| " + " | ".join(str(row[column]) for column in columns) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under 30 s")
    parser.add_argument("--role", choices=["mock", "relay"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench-results.json")
    parser.add_argument("--uvicorn", default="--loop asyncio --http h11", help="uvicorn options for both servers")
    args = parser.parse_args()
    if args.role == "mock":
        asyncio.run(serve_mock(args.port))
        return
    args.rounds, args.deltas, args.cpu_streams = (10, 16, 20) if args.quick else (50, 64, 300)
    args.levels = [1, 10] if args.quick else [1, 10, 50, 100, 200, 500, 1000]
    args.turns = 5 if args.quick else 100
    args.memory = ([10, 20], 500) if args.quick else ([100, 200, 400], 4000)
    ports = {name: free_port() for name in ("mock", "relay", "service")}
    uvicorn = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", *args.uvicorn.split(), *QUIET]
    with tempfile.TemporaryDirectory() as scratch:
        database = Path(scratch) / "bench.db"
        service_env = {
            "API_KEY": "bench", "BASE_URL": f"http://127.0.0.1:{ports['mock']}/v1", "MODEL_NAME": "mock",
            "DATABASE_PATH": str(database), "LOG_LEVEL": "WARNING", "MAX_RETRIES": "0", "HOST": "127.0.0.1",
        }  # fmt: skip
        relay_env = {"RELAY_UPSTREAM": f"http://127.0.0.1:{ports['mock']}/v1/chat/completions"}
        mock_command = [sys.executable, str(HERE / "bench.py"), "--role", "mock", "--port", str(ports["mock"])]
        with (
            started(mock_command, ports["mock"], {}, Path(scratch)),
            started([*uvicorn, "--port", str(ports["relay"]), "--factory", "bench:relay_app", "--app-dir", str(HERE)],
                    ports["relay"], relay_env, Path(scratch)) as relay,
            started([*uvicorn, "--port", str(ports["service"]), "server:app", "--app-dir", str(HERE)],
                    ports["service"], service_env, Path(scratch)) as service,
        ):  # fmt: skip
            pids = {"relay": relay.pid, "service": service.pid}
            report = asyncio.run(measure(args, ports, pids, database))
    print_table(report)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
