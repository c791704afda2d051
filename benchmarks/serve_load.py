"""Load test of `dmqn serve` (issue 21): concurrent HTTP clients, 100 candidates per request, SQLite and Redis.

Trains a DMQN run with the default model settings (quickstart's) on the synthetic `tiny` log, or takes
--workspace/--run, exports every user's state to the embedded SQLite store and to a private
redis-server, and for each store starts `dmqn serve` in its own process. Then, for 1, 16 and 64
concurrent clients (one keep-alive connection each, in this process: a lean asyncio HTTP/1.1 client by
default, httpx.AsyncClient with --client httpx), every client
posts /v1/score for a random user and 100 random items for --seconds, and the script reports:

  req/s               answered requests per second of wall time
  p50 / p95 / p99     client-side latency, ms
  errors              non-200 answers and transport errors
  server CPU/req      the server process's user+system CPU seconds (and its workers') per request
  client CPU/req      this process's CPU seconds per request: the load generator shares the cores

The stores and client counts take turns in one run, so that load from elsewhere on the machine (the
load average before and after is printed) falls on every row alike. A profile of one request inside
the server's process (body parsing, store read, state decoding, CTAM + MLP, JSON encoding) shows where
the server's time goes. Nothing here runs in CI.

    python benchmarks/serve_load.py                       # about 2 minutes on 2 cores
    python benchmarks/serve_load.py --seconds 10 --workers 2 --out serve_load.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import torch

from dmqn_core.data.prep import prepare
from dmqn_core.data.synth import write_log
from dmqn_core.runs.run import Run
from dmqn_core.serving.cache import export_states
from dmqn_core.serving.http_service import ScoreRequest
from dmqn_core.serving.service import ScoringService
from dmqn_core.training.train import train
from dmqn_core.workspace import Workspace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import private_redis  # noqa: E402  (benchmarks/serving.py: a throwaway redis-server)

CLIENTS = (1, 16, 64)
CANDIDATES = 100
TICKS = os.sysconf("SC_CLK_TCK")


def build_run(root: Path) -> tuple[Workspace, str]:
    """A DMQN run with the default model settings on the synthetic tiny log (200 users)."""
    ws = Workspace(root).ensure()
    log = ws.root / "tiny.csv"
    write_log(log, "tiny", 0)
    prepare(log, "taobao", "tiny", workspace=ws, seed=0, train_targets=10)
    return ws, train(ws, "tiny", "dmqn", train_settings={"seed": 0, "epochs": 1}).run_id


def family(pid: int) -> list[int]:
    """pid and its children (the processes of --workers W)."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            pids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    return pids


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of pid and of its children that are alive."""
    total = 0.0
    for p in family(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return total


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of pid and its children, summed (MB)."""
    total = 0.0
    for p in family(pid):
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) / 1024
    return total


@contextmanager
def server(ws: Workspace, run_id: str, source: str | None, workers: int) -> Iterator[tuple[str, int]]:
    """`dmqn serve` on a free port until the block ends; yields (url, pid)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "dmqn_cli", "serve", run_id, "-w", str(ws.root), "--port", str(port)]
    args += ["--workers", str(workers)] + (["--from", source] if source else [])
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dmqn serve did not start ({' '.join(args)})")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)


class RawConnection:
    """One keep-alive HTTP/1.1 connection on asyncio streams, for the load: it reads the status line and
    the body by its Content-Length and nothing else, a few times cheaper per request than httpx, whose
    CPU would otherwise be taken from the server's two cores."""

    def __init__(self, url: str) -> None:
        self.host, port = url.split("://", 1)[1].rsplit(":", 1)
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        lines = header.split(b"\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:"))
        await self.reader.readexactly(length)
        return int(lines[0].split()[1])

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()
            self.writer = None


async def drive(url: str, clients: int, seconds: float, bodies: list[bytes], kind: str = "raw") -> dict:
    """``clients`` concurrent clients posting bodies round-robin for ``seconds``; latencies in ms."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(n: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        headers = {"content-type": "application/json"}
        raw = RawConnection(url) if kind == "raw" else None
        i = n * 7919
        while time.perf_counter() < stop:
            body = bodies[i % len(bodies)]
            i += 1
            started = time.perf_counter()
            try:
                if raw is not None:
                    ok = await raw.post("/v1/score", body) == 200
                else:
                    ok = (await http.post("/v1/score", content=body, headers=headers)).status_code == 200
            except (httpx.TransportError, OSError, asyncio.IncompleteReadError):
                ok = False
                if raw is not None:  # a fresh connection for the next request
                    await raw.close()
            latencies.append((time.perf_counter() - started) * 1e3)
            errors += not ok
        if raw is not None:
            await raw.close()

    # One client object, a pool of one keep-alive connection per concurrent client: building an
    # AsyncClient costs tens of ms (its TLS context), which 64 of them would spend inside the timed row.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(n, http) for n in range(clients)))
        wall = time.perf_counter() - started
    return {"requests": len(latencies), "errors": errors, "wall_s": wall, "latencies": np.array(latencies)}


def profile(ws: Workspace, run_id: str, source: str | None, bodies: list[bytes], calls: int = 300) -> dict[str, float]:
    """Milliseconds per request of each step the server takes, in this process, on the same requests."""
    torch.set_num_threads(1)  # as dmqn serve's default --threads
    service = ScoringService(ws, run_id, source)
    served = service.current
    scoring = served.scoring
    steps = {"parse": 0.0, "store": 0.0, "decode + candidates": 0.0, "CTAM + MLP": 0.0, "encode": 0.0, "total": 0.0}
    for i in range(-20, calls):
        body = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        request = ScoreRequest.model_validate_json(body)
        t1 = time.perf_counter()
        user = request.user_id
        value = service.read(lambda store, user=user: store.get(served.version, [user]))[user]
        t2 = time.perf_counter()
        state = scoring.decode(request.user_id, value)
        index, category = scoring.candidates(request.items, strict=False)
        t3 = time.perf_counter()
        p = scoring.probabilities([state], index, category, np.zeros(len(index), dtype=np.int64)).tolist()
        t4 = time.perf_counter()
        json.dumps(
            {"user_id": request.user_id, "scores": [{"item_id": a, "probability": b} for a, b in zip(request.items, p)]}
        )
        t5 = time.perf_counter()
        if i >= 0:
            for name, (a, b) in zip(steps, [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t0, t5)]):
                steps[name] += (b - a) * 1e3 / calls
    service.close()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, help="with --run: serve this run (default: train one)")
    parser.add_argument("--run", help="a DMQN run of --workspace")
    parser.add_argument("--seconds", type=float, default=6.0, help="load per row")
    parser.add_argument("--workers", type=int, default=1, help="dmqn serve --workers")
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: raw keep-alive HTTP/1.1 on asyncio (cheap) or httpx.AsyncClient",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, private_redis() as redis_url:
        ws, run_id = (Workspace(args.workspace), args.run) if args.run else build_run(Path(tmp) / "ws")
        stores = {"sqlite": None, **({"redis": redis_url} if redis_url else {})}
        for source in stores.values():
            export_states(ws, run_id, to=source)
        run = Run.open(ws, run_id)
        vocabulary = run.vocabulary
        rng = np.random.default_rng(args.seed)
        users = run.data.raw_user(np.arange(1, run.data.n_users + 1))
        items = vocabulary.raw_item(np.arange(1, vocabulary.n_items + 1))
        bodies = [
            json.dumps(
                {"user_id": int(rng.choice(users)), "items": rng.choice(items, CANDIDATES, replace=False).tolist()}
            ).encode()
            for _ in range(1000)
        ]
        c = run.model().config
        model = f"N = {c.n_codebooks} codebooks of {c.codebook_size}, D = {c.embed_dim}"

        rows, peaks = [], {}
        with ExitStack() as running:
            opened = {
                name: running.enter_context(server(ws, run_id, source, args.workers)) for name, source in stores.items()
            }
            for url, _ in opened.values():  # warm-up: first requests load lazily built pieces
                asyncio.run(drive(url, 4, 1.0, bodies, args.client))
            for clients in CLIENTS:
                for name, (url, pid) in opened.items():
                    cpu0, client0 = cpu_seconds(pid), time.process_time()
                    result = asyncio.run(drive(url, clients, args.seconds, bodies, args.client))
                    cpu, client_cpu = cpu_seconds(pid) - cpu0, time.process_time() - client0
                    lat, n = result["latencies"], max(result["requests"], 1)
                    rows.append(
                        {
                            "store": name,
                            "clients": clients,
                            "requests": result["requests"],
                            "req_per_s": result["requests"] / result["wall_s"],
                            "p50_ms": float(np.percentile(lat, 50)),
                            "p95_ms": float(np.percentile(lat, 95)),
                            "p99_ms": float(np.percentile(lat, 99)),
                            "errors": result["errors"],
                            "server_cpu_ms_per_req": cpu * 1e3 / n,
                            "client_cpu_ms_per_req": client_cpu * 1e3 / n,
                        }
                    )
            for name, (_, pid) in opened.items():
                peaks[name] = peak_rss_mb(pid)
        profiles = {name: profile(ws, run_id, source, bodies) for name, source in stores.items()}
    load_after = os.getloadavg()
    report(rows, profiles, peaks, model, load_before, load_after, args)


def report(rows, profiles, peaks, model, load_before, load_after, args) -> None:
    lines = [
        "| store | clients | req/s | p50 ms | p95 ms | p99 ms | errors | server CPU ms/req | client CPU ms/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['store']} | {r['clients']} | {r['req_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} | {r['server_cpu_ms_per_req']:.2f} | {r['client_cpu_ms_per_req']:.2f} |"
        )
    names = list(next(iter(profiles.values())))
    lines += ["", "| one request in the server's process (ms) | " + " | ".join(profiles) + " |"]
    lines += ["|---|" + "---:|" * len(profiles)]
    for step in names:
        lines.append(f"| {step} | " + " | ".join(f"{p[step]:.3f}" for p in profiles.values()) + " |")
    client_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines += [
        "",
        f"model: {model}; {CANDIDATES} candidates per request; {args.seconds:g} s per row; "
        f"dmqn serve --workers {args.workers}; {args.client} client; {os.cpu_count()} CPUs",
        "peak resident memory (all processes of a server, summed): server "
        + ", ".join(f"{k} {v:,.0f} MB" for k, v in peaks.items())
        + f"; load generator {client_peak:,.0f} MB",
        "load average (1/5/15 min) before: "
        + " / ".join(f"{x:.2f}" for x in load_before)
        + ", after: "
        + " / ".join(f"{x:.2f}" for x in load_after),
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text(
            json.dumps(
                {"rows": rows, "profile": profiles, "peak_mb": peaks, "model": model, "client": args.client}, indent=2
            )
        )


if __name__ == "__main__":
    main()
