"""Benchmark this project against Flask-SocketIO and a naive flask-sock loop.

    .venv/bin/python bench/run.py            # full run (about 10 minutes)
    .venv/bin/python bench/run.py --quick    # under 2 minutes

Each server runs under ``gunicorn -k gevent -w 1`` pinned to core 0 (the
Redis variant: two workers and redis-server, all on core 0); this process is
the load generator, pinned to core 1. The table (medians, with
the spread of the runs) goes to stdout and, with every run's raw numbers,
to ``bench/results/<time>.json``.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import PROTOCOLS, BenchError, LoadGen, raise_fd_limit  # noqa: E402

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SERVERS = {
    "robe": "robe_app:app",
    "socketio": "socketio_app:app",
    "naive": "naive_sock_app:app",
    "robe-redis": "robe_app:app",
    "robe-metrics": "robe_app:app",
}
LABELS = {
    "robe": "flask-robe-sockets",
    "socketio": "Flask-SocketIO 5",
    "naive": "naive flask-sock",
    "robe-redis": "robe, 2 workers + Redis",
    "robe-metrics": "robe, metrics on",
}
#: Worker processes per server: the Redis variant shares core 0 between two
#: workers and redis-server, so it gets the same CPU as the others.
WORKERS = {"robe-redis": 2}
MODES = ("eager", "batched")
SIZE = 100  # bytes of padding in every message
MAX_BURST = 20_000  # messages per connection in one burst (3 MB: within the socket buffers)
SERVER_CORE, GEN_CORE = 0, 1

FULL = {
    "runs": 5,
    "fanout_n": [100, 1000, 4000],
    "burst_seconds": 1.0,
    "latency": {"subscribers": 1000, "rate": 50, "count": 200, "probes": 20},
    "capacity": {"connections": 5000, "runs": 3},
    "inbound": {"clients": 200, "per_client": 250, "window": 8},
}
QUICK = {
    "runs": 3,
    "fanout_n": [100, 1000],
    "burst_seconds": 0.3,
    "latency": {"subscribers": 1000, "rate": 50, "count": 60, "probes": 20},
    "capacity": {"connections": 2000, "runs": 1},
    "inbound": {"clients": 100, "per_client": 100, "window": 8},
}


# -- the machine -------------------------------------------------------------

def cpu_busy(seconds: float = 1.0) -> dict[str, float]:
    """Busy share of each core over ``seconds``, from /proc/stat."""

    def sample() -> dict[str, tuple[int, int]]:
        out = {}
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3] != " ":
                name, *fields = line.split()
                values = list(map(int, fields))
                idle = values[3] + values[4]
                out[name] = (sum(values) - idle, sum(values))
        return out

    before = sample()
    time.sleep(seconds)
    after = sample()
    return {
        name: round((after[name][0] - before[name][0]) / max(1, after[name][1] - before[name][1]), 3)
        for name in after
    }


def machine() -> dict:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )
    versions = {}
    for dist in ("flask", "gevent", "gunicorn", "simple-websocket", "wsproto", "flask-sock",
                 "flask-socketio", "python-socketio", "python-engineio", "flask-robe-sockets"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def load_now() -> dict:
    return {"loadavg": os.getloadavg(), "busy": cpu_busy()}


# -- servers -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """gunicorn with gevent workers (one, unless WORKERS says), pinned to the server core."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.workers = WORKERS.get(name, 1)
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)
        env = dict(os.environ)
        self.redis = None
        if name == "robe-redis":
            redis_port = free_port()
            self.redis = subprocess.Popen(
                ["taskset", "-c", str(SERVER_CORE), "redis-server", "--port", str(redis_port),
                 "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            env["BENCH_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        if name == "robe-metrics":
            env["BENCH_METRICS"] = "1"
        self.proc = subprocess.Popen(
            ["taskset", "-c", str(SERVER_CORE), str(BIN / "gunicorn"), "-k", "gevent", "-w", str(self.workers),
             "--worker-connections", "6000", "--backlog", "4096", "-b", f"127.0.0.1:{self.port}",
             "--chdir", str(HERE / "servers"), "--log-level", "warning", SERVERS[name]],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.stats()
                self.pids = [
                    int(pid) for pid in
                    Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                ]
                if len(self.pids) == self.workers:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"{name} did not start:\n{Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.1)

    def stats(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/bench/stats")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def wait_subscribers(self, count: int, timeout: float = 60) -> None:
        """Wait until the workers' subscribers add up to ``count``.

        Each stats request reaches one worker: with several, the last count
        seen from each is added up.
        """
        deadline = time.monotonic() + timeout
        seen: dict[int, int] = {}
        while True:
            stats = self.stats()
            seen[stats["pid"]] = stats["subscribers"]
            if len(seen) == self.workers and sum(seen.values()) == count:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: {seen} subscribers by worker, expected {count} in all")
            time.sleep(0.05 if len(seen) < self.workers else 0.1)

    def rss(self) -> int:
        """Resident memory of the workers (and Redis), in bytes."""
        pids = self.pids + ([self.redis.pid] if self.redis else [])
        total = 0
        for pid in pids:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total

    def cpu(self) -> float:
        """CPU seconds used by the workers (and Redis) so far."""
        pids = self.pids + ([self.redis.pid] if self.redis else [])
        total = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(10)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def measured(server: Server, run) -> dict:
    """Run ``run()`` and add the server worker's CPU share over it."""
    cpu, wall = server.cpu(), time.monotonic()
    result = run()
    result["server_cpu"] = (server.cpu() - cpu) / (time.monotonic() - wall)
    return result


def clients(server: Server) -> LoadGen:
    return LoadGen("127.0.0.1", server.port, PROTOCOLS[server.name.split("-")[0]])


def disconnect(gen: LoadGen, server: Server) -> None:
    gen.close()
    server.wait_subscribers(0)


# -- workloads ---------------------------------------------------------------

def fanout(server: Server, n: int, plan: dict, record, every: int = 50) -> None:
    """Bursts sized from a warm-up so that each lasts about ``burst_seconds``.

    A fixed size would take a second on one server and a tenth of one on
    another, too short to time or to read the CPU counters of (they tick
    every 10 ms). The server's loop yields every ``every`` messages; with 1,
    no server can batch several messages into one write.
    """
    gen = clients(server)
    gen.connect(n, probes=2)
    server.wait_subscribers(n)
    warm = gen.burst(max(10, 100_000 // n), SIZE, every)
    messages = int(min(MAX_BURST, max(10, plan["burst_seconds"] * warm["per_second"] / n)))
    name = f"fanout N={n}" + (f" yield/{every}" if every != 50 else "")
    for i in range(plan["runs"] * len(MODES)):
        gen.mode = MODES[i % len(MODES)]
        record(name, gen.mode, measured(server, lambda: gen.burst(messages, SIZE, every)))
    disconnect(gen, server)


def latency(server: Server, plan: dict, record) -> None:
    spec = plan["latency"]
    gen = clients(server)
    gen.connect(spec["subscribers"], probes=spec["probes"])
    server.wait_subscribers(spec["subscribers"])
    for i in range(plan["runs"] * len(MODES)):
        gen.mode = MODES[i % len(MODES)]
        record("latency 1000x50/s", gen.mode,
               measured(server, lambda: gen.paced(spec["rate"], spec["count"], SIZE)))
    disconnect(gen, server)


def inbound(server: Server, plan: dict, record) -> None:
    spec = plan["inbound"]
    gen = clients(server)
    gen.connect(spec["clients"], probes=0)
    server.wait_subscribers(spec["clients"])
    gen.inbound(20, spec["window"], SIZE)  # warm-up
    for i in range(plan["runs"] * len(MODES)):
        gen.mode = MODES[i % len(MODES)]
        record(f"inbound {spec['clients']} clients", gen.mode,
               measured(server, lambda: gen.inbound(spec["per_client"], spec["window"], SIZE)))
    disconnect(gen, server)


def capacity(name: str, plan: dict, record) -> None:
    """Idle connections on a fresh worker: memory per connection, handshakes/s."""
    count = plan["capacity"]["connections"]
    server = Server(name)
    try:
        gen = clients(server)
        gen.connect(50, probes=0)  # warm the code paths before the baseline
        disconnect(gen, server)
        before = server.rss()
        gen = clients(server)
        result = measured(server, lambda: gen.connect(count, probes=0))
        server.wait_subscribers(count)
        time.sleep(0.5)
        result["rss_before"] = before
        result["rss_after"] = server.rss()
        result["bytes_per_connection"] = (result["rss_after"] - before) / count
        record(f"capacity {count} idle", "eager", result)
        gen.close()
    finally:
        server.stop()


# -- the table ---------------------------------------------------------------

#: (metric key in a result, label, higher is better)
METRICS = {
    "fanout": ("per_second", "deliveries/s", True),
    "latency": [("p50_ms", "p50 ms", False), ("p99_ms", "p99 ms", False)],
    "inbound": ("per_second", "events/s", True),
    "capacity": [("bytes_per_connection", "KiB/conn", False), ("per_second", "handshakes/s", True)],
}


def rows(results: dict) -> list[dict]:
    """One row per (workload, metric, mode): medians, spreads and ratios."""
    out = []
    for workload, modes in results.items():
        kind = workload.split()[0]
        metrics = METRICS[kind] if isinstance(METRICS[kind], list) else [METRICS[kind]]
        for key, label, higher in metrics:
            for mode, by_server in modes.items():
                row = {"workload": workload, "metric": label, "mode": mode, "higher_is_better": higher}
                for name, runs in by_server.items():
                    values = [run[key] for run in runs]
                    if key == "bytes_per_connection":
                        values = [v / 1024 for v in values]
                    row[name] = {
                        "median": statistics.median(values),
                        "min": min(values),
                        "max": max(values),
                        "runs": len(values),
                        "gen_cpu": statistics.median(run["gen_cpu"] for run in runs),
                        "server_cpu": statistics.median(run["server_cpu"] for run in runs),
                    }
                for peer in ("socketio", "naive"):
                    if "robe" in row and peer in row:
                        ours, theirs = row["robe"]["median"], row[peer]["median"]
                        # Always "how many times better": > 1 means this project leads.
                        row[f"x_{peer}"] = (ours / theirs if higher else theirs / ours) if ours and theirs else None
                if "robe" in row and "robe-metrics" in row:
                    off, on = row["robe"]["median"], row["robe-metrics"]["median"]
                    # Metrics on as a share of off, "better" the same way: 0.97 costs 3%.
                    row["metrics_on_off"] = (on / off if higher else off / on) if on and off else None
                out.append(row)
    return out


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _header(servers: list[str]) -> list[str]:
    extra = ["metrics on/off"] if "robe-metrics" in servers else []
    return ["workload", "metric", "read", *(LABELS[s] for s in servers), "x SocketIO", "x naive", *extra]


def _cells(row: dict, servers: list[str], cell_text) -> list[str]:
    """One row's cells: its names, each server's figure as ``cell_text`` puts it, the ratios."""
    cells = [row["workload"], row["metric"], row["mode"]]
    for name in servers:
        cell = row.get(name)
        cells.append(cell_text(cell) if cell else "-")
    for peer in ("socketio", "naive"):
        ratio = row.get(f"x_{peer}")
        cells.append(f"{ratio:.2f}x" if ratio else "-")
    if "robe-metrics" in servers:
        ratio = row.get("metrics_on_off")
        cells.append(f"{ratio:.3f}" if ratio else "-")
    return cells


def table(rows_: list[dict], servers: list[str]) -> str:
    def cell_text(cell: dict) -> str:
        return (
            f"{fmt(cell['median'])} ({fmt(cell['min'])}-{fmt(cell['max'])})"
            f" gen {cell['gen_cpu']:.0%} srv {cell['server_cpu']:.0%}"
        )

    lines = [_header(servers), *(_cells(row, servers, cell_text) for row in rows_)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = [" | ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    text.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(text)


def short(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e4:
        return f"{value / 1e3:.0f}k"
    return fmt(value)


def markdown(rows_: list[dict], servers: list[str]) -> str:
    """The table for the README: median (range), generator CPU in brackets."""

    def cell_text(cell: dict) -> str:
        return f"{short(cell['median'])} ({short(cell['min'])}–{short(cell['max'])}) [{cell['gen_cpu']:.0%}]"

    head = _header(servers)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(row, servers, cell_text)) + " |" for row in rows_]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run, under 2 minutes")
    parser.add_argument("--runs", type=int, help="runs per figure (default 5, quick 3)")
    parser.add_argument(
        "--servers",
        help="comma-separated, from robe, socketio, naive, robe-redis, robe-metrics (default: the"
        " first four; --quick and machines without redis-server leave robe-redis out)",
    )
    parser.add_argument("--workloads", default="capacity,fanout,latency,inbound", help="comma-separated subset")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/<time>.json)")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    if args.runs:
        plan["runs"] = args.runs
    if args.servers:
        servers = [s for s in args.servers.split(",") if s]
    else:
        servers = ["robe", "socketio", "naive"]
        if not args.quick and shutil.which("redis-server"):
            servers.append("robe-redis")
    unknown = set(servers) - set(SERVERS)
    if unknown:
        parser.error(f"unknown servers: {', '.join(sorted(unknown))}")
    workloads = [w for w in args.workloads.split(",") if w]

    raise_fd_limit()
    os.sched_setaffinity(0, {GEN_CORE})
    started = time.time()
    info = {"machine": machine(), "load_before": load_now(), "plan": plan, "quick": args.quick}
    print(f"machine: {info['machine']['cpu']}, {info['machine']['cores']} cores; "
          f"load before: {info['load_before']['loadavg'][0]:.2f} (1 min), busy {info['load_before']['busy']}",
          flush=True)

    results: dict[str, dict[str, dict[str, list]]] = {}

    def record(workload: str, mode: str, result: dict) -> None:
        results.setdefault(workload, {}).setdefault(mode, {}).setdefault(current, []).append(result)
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
        print(f"  {current:8} {workload:22} {mode:7} {shown}", flush=True)

    failures = []
    if "capacity" in workloads:
        for _ in range(plan["capacity"]["runs"]):
            for current in servers:
                try:
                    capacity(current, plan, record)
                except BenchError as exc:
                    failures.append(str(exc))
                    print(f"  {current}: {exc}", flush=True)
    running = {}
    try:
        for current in servers:
            running[current] = Server(current)
        steps = []
        if "fanout" in workloads:
            steps += [lambda s, n=n: fanout(s, n, plan, record) for n in plan["fanout_n"]]
            steps.append(lambda s: fanout(s, 1000, plan, record, every=1))
        if "latency" in workloads:
            steps.append(lambda s: latency(s, plan, record))
        if "inbound" in workloads:
            steps.append(lambda s: inbound(s, plan, record))
        for step in steps:
            for current in servers:
                try:
                    step(running[current])
                except BenchError as exc:
                    failures.append(str(exc))
                    print(f"  {current}: {exc}", flush=True)
    finally:
        for server in running.values():
            server.stop()

    info["load_after"] = load_now()
    info["seconds"] = time.time() - started
    info["results"] = results
    info["rows"] = rows(results)
    info["failures"] = failures
    out = args.out or HERE / "results" / time.strftime("%Y%m%d-%H%M%S.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1))
    print()
    print(table(info["rows"], servers))
    print()
    print(markdown(info["rows"], servers))
    print("\nratios: > 1 means flask-robe-sockets leads (throughput ours/theirs, latency and memory theirs/ours)")
    print(f"load after: {info['load_after']['loadavg'][0]:.2f}; took {info['seconds']:.0f} s; results in {out}")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
