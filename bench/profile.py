"""Profile this project's worker under one workload with py-spy.

    .venv/bin/python bench/profile.py fanout   # or: latency, inbound

Starts the bench app under gunicorn (core 0), drives it from this process
(core 1) and writes py-spy's collapsed stacks to ``bench/results/``, with
the top functions by own time printed to stdout.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import raise_fd_limit  # noqa: E402
from run import BIN, GEN_CORE, HERE, SIZE, Server, clients  # noqa: E402


def top(collapsed: Path, limit: int = 25) -> str:
    """Own time and total time per function, from collapsed stacks."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        samples += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            total[frame] += int(count)
    lines = [f"{samples} samples; own% total% function"]
    for frame, count in own.most_common(limit):
        lines.append(f"{count / samples:6.1%} {total[frame] / samples:6.1%} {frame}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["fanout", "latency", "inbound"])
    parser.add_argument("--server", default="robe")
    parser.add_argument("-n", type=int, default=1000, help="connections")
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    raise_fd_limit()
    os.sched_setaffinity(0, {GEN_CORE})
    server = Server(args.server)
    out = HERE / "results" / time.strftime(f"profile-{args.server}-{args.workload}-%H%M%S.txt")
    out.parent.mkdir(exist_ok=True)
    try:
        gen = clients(server)
        gen.connect(args.n, probes=20 if args.workload == "latency" else 2)
        server.wait_subscribers(args.n)
        spy = subprocess.Popen(
            [str(BIN / "py-spy"), "record", "--pid", str(server.pids[0]), "--format", "raw",
             "--rate", "250", "--nonblocking", "--function", "--output", str(out), "--duration", str(int(args.seconds))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        deadline = time.monotonic() + args.seconds - 1
        results = []
        while time.monotonic() < deadline:
            if args.workload == "fanout":
                results.append(gen.burst(max(10, 200_000 // args.n), SIZE))
            elif args.workload == "latency":
                results.append(gen.paced(50, int(50 * (args.seconds - 1.5)), SIZE))
            else:
                results.append(gen.inbound(200, 8, SIZE))
        spy.wait(args.seconds + 30)
        for result in results:
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})
        print(top(out))
        print(f"collapsed stacks: {out}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
