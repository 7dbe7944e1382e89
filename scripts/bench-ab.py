#!/usr/bin/env python3
"""Two Ignis builds side by side, alternating A B B A: did a change cost
anything?

    scripts/bench-ab.py A_IGNIS B_IGNIS [--rounds 2] [--seconds 3]
                        [--a-tree DIR] [--b-tree DIR]
                        [--json bench/results/DATE-ab.json]

Both binaries serve the same manifest (written here, each with its own
storage and compile cache) at once, on two loopback ports; only one is
loaded at a time. The guests are built from this checkout, or from the
checkout each binary was built from (--a-tree, --b-tree: a git worktree of
the other commit), so that a change to a WIT package compares like with
like. Loads (all with `target/release/ignis-bench load`, 1 s of
warm-up each):

- hello: `/hello`, closed loop, 32 connections;
- kv-set / kv-get: `wasi:keyvalue` set and get of one key (`examples/kv-draft`),
  closed loop, 32 connections (every set fsynced);
- actor-one / actor-1000: `/counter/{id}/incr` on one actor and on 1,000,
  closed loop, 64 connections (every reply after its fsync);
- proxy: `/origin/hello` through an `[upstreams]` route to a bare hyper
  origin (`ignis-bench hyper-hello`, one for both builds), closed loop, 32
  connections;
- noisy: tenant L's `/light` at 200 req/s open loop (8 connections) while
  tenant H floods `/heavy?ms=20` (8 connections); L's p99 and H's rate.

Each load runs once per server per round, in the order A B B A, so drift
of the machine during a round hits both alike. The report gives, per load,
the median over rounds of each build and the ratio B / A. Ratios inside
this machine's run-to-run spread (about ±10% on two shared cores) are no
change. Raw runs go to --json.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOADGEN = ROOT / "target/release/ignis-bench"
GUESTS = ["hello", "noisy", "kv-draft", "counter"]


def build_guests(tree: Path):
    subprocess.run(
        ["cargo", "build", "--release", "--target", "wasm32-wasip2",
         "--manifest-path", str(tree / "examples/Cargo.toml")]
        + sum((["-p", g] for g in GUESTS), []),
        check=True,
    )
    out = tree / "examples/target/wasm32-wasip2/release"
    return {g: out / (g.replace("-", "_") + ".wasm") for g in GUESTS}


def manifest(wasm, work: Path, origin: str) -> str:
    return f"""
[server]
listen = "127.0.0.1:0"
cache_dir = "{work}/cache"
[storage]
path = "{work}/data.db"
[functions.hello]
component = "{wasm['hello']}"
memory = "16MiB"
cpu_time = "50ms"
wall_time = "5s"
[functions.light]
component = "{wasm['noisy']}"
tenant = "L"
[functions.heavy]
component = "{wasm['noisy']}"
tenant = "H"
cpu_time = "1s"
wall_time = "10s"
[functions.kv]
component = "{wasm['kv-draft']}"
key_value_stores = ["default"]
max_concurrency = 256
[actors.counter]
component = "{wasm['counter']}"
mailbox = 1024
[[routes]]
path = "/hello"
function = "hello"
[[routes]]
path = "/light"
function = "light"
[[routes]]
path = "/heavy"
function = "heavy"
[[routes]]
path = "/kv/..."
function = "kv"
[[routes]]
path = "/counter/{{id}}/..."
actor = "counter"
[upstreams.origin]
origins = ["http://{origin}"]
pool_size = 64
[[routes]]
path = "/origin/..."
upstream = "origin"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_origin():
    proc = subprocess.Popen(
        [str(LOADGEN), "hyper-hello", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = proc.stdout.readline()
    if "listening on http://" not in line:
        raise SystemExit(f"the origin did not start: {line!r}")
    return proc, line.strip().removeprefix("listening on http://")


def start(binary: str, wasm, work: Path, origin: str):
    work.mkdir(parents=True)
    path = work / "ignis.toml"
    path.write_text(manifest(wasm, work, origin))
    addr = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen(
        [binary, "serve", str(path), "--listen", addr],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={**os.environ, "IGNIS_LOG": "warn"}, text=True,
    )
    line = proc.stdout.readline()
    if "listening on" not in line:
        raise SystemExit(f"{binary} did not start: {line!r}")
    return proc, addr


def load(addr, path, connections, seconds, rate=None):
    cmd = [str(LOADGEN), "load", "--addr", addr, "--path", path,
           "--connections", str(connections), "--seconds", str(seconds)]
    if rate:
        cmd += ["--rate", str(rate)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def finish(p):
    out, _ = p.communicate()
    if p.returncode != 0:
        raise SystemExit("load generator failed")
    r = json.loads(out)
    ok = sum(n for s, n in r["statuses"].items() if s.startswith("2"))
    return {"throughput": r["throughput"], "p50_us": r["latency_us"]["p50"],
            "p99_us": r["latency_us"]["p99"], "p999_us": r["latency_us"]["p999"],
            "errors": r["completed"] - ok + r["io_errors"] + r["unfinished"]}


CLOSED = [
    ("hello", "/hello", 32),
    ("kv-set", "/kv/set?store=&key=k&value=v", 32),
    ("kv-get", "/kv/get?store=&key=k", 32),
    ("actor-one", "/counter/one/incr", 64),
    ("actor-1000", "/counter/{i:1000}/incr", 64),
    ("proxy", "/origin/hello", 32),
]


def measure(addr, seconds):
    results = {}
    for name, path, conns in CLOSED:
        results[name] = finish(load(addr, path, conns, seconds))
    light = load(addr, "/light", 8, seconds, rate=200)
    heavy = load(addr, "/heavy?ms=20", 8, seconds)
    l, h = finish(light), finish(heavy)
    results["noisy-L"] = l
    results["noisy-H"] = h
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--a-tree", type=Path, default=ROOT)
    ap.add_argument("--b-tree", type=Path, default=ROOT)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not LOADGEN.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "ignis-bench"],
                       cwd=ROOT, check=True)
    guests = {"A": build_guests(args.a_tree.resolve()), "B": build_guests(args.b_tree.resolve())}
    tmp = Path(tempfile.mkdtemp(prefix="ignis-ab-"))
    servers = {}
    origin = start_origin()
    servers["origin"] = origin
    try:
        for label, binary in (("A", args.a), ("B", args.b)):
            servers[label] = start(binary, guests[label], tmp / label, origin[1])
        runs = {"A": [], "B": []}
        for r in range(args.rounds):
            for label in ("A", "B", "B", "A"):
                print(f"round {r + 1}: {label}", file=sys.stderr, flush=True)
                runs[label].append(measure(servers[label][1], args.seconds))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    print("| load | metric | A (median) | B (median) | B / A |")
    print("| --- | --- | --- | --- | --- |")
    for load_name in runs["A"][0]:
        metrics = ["p99_us"] if load_name == "noisy-L" else ["throughput", "p99_us"]
        for m in metrics + ["errors"]:
            a = statistics.median(x[load_name][m] for x in runs["A"])
            b = statistics.median(x[load_name][m] for x in runs["B"])
            ratio = b / a if a else None
            rows.append((load_name, m, a, b, ratio))
            shown = f"{ratio:.2f}" if ratio is not None else "—"
            print(f"| {load_name} | {m} | {a:,.0f} | {b:,.0f} | {shown} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "a": args.a, "b": args.b, "rounds": args.rounds, "seconds": args.seconds,
            "order": "A B B A per round", "date": time.strftime("%Y-%m-%d %H:%M"),
            "runs": runs,
            "medians": [dict(zip(["load", "metric", "a", "b", "b_over_a"], r)) for r in rows],
        }, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
