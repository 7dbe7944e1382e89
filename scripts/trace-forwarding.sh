#!/usr/bin/env bash
# Where a forwarded actor message's time goes, hop by hop
# (docs/perf/2026-12-01-cluster-forwarding.md, "the forward hop by hop").
#
# Runs `ignis-bench cluster --only-forwarding` (as scripts/bench-cluster.sh
# does) under `perf record -a` on the scheduler and socket-call
# tracepoints, stops recording when the storage-free message's line is
# printed (its direct and forwarded open-loop runs are then recorded), and
# follows each message from the load generator's `writev` to its
# `recvfrom`, by process. Prints the median of every segment for direct
# and forwarded messages. Needs root (system-wide tracepoints).
# Extra arguments go to `ignis-bench cluster`, e.g. --forward-rate 2000.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p ignis -p ignis-bench
cargo build --release --target wasm32-wasip2 --manifest-path examples/Cargo.toml -p hello -p counter
out="$(mktemp -d /tmp/ignis-trace.XXXXXX)"
. scripts/private-postgres.sh
perf record -a -o "$out/perf.data" \
    -e sched:sched_switch,sched:sched_wakeup,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_exit_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_exit_epoll_wait,syscalls:sys_enter_futex \
    --exclude-perf 2>"$out/perf.log" >/dev/null &
perf_pid=$!
target/release/ignis-bench cluster \
    --ignis target/release/ignis \
    --counter examples/target/wasm32-wasip2/release/counter.wasm \
    --hello examples/target/wasm32-wasip2/release/hello.wasm \
    --only-forwarding --no-relay --rounds 1 --seconds 2 "$@" 2>&1 |
    while IFS= read -r line; do
        echo "$line"
        case "$line" in
        "forwarding \`whoami\` at"*) kill -INT "$perf_pid" ;;
        esac
    done
# Stopped above once the storage-free runs are done; here if the
# benchmark ended without printing that line.
kill -INT "$perf_pid" 2>/dev/null || true
wait "$perf_pid" || true
perf script -i "$out/perf.data" -F comm,pid,tid,time,event,trace >"$out/events.txt" 2>/dev/null
python3 - "$out/events.txt" <<'PY'
import re, statistics, sys

line = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):\s+(\S+):\s?(.*)")
events, bench, nodes = [], None, set()
for raw in open(sys.argv[1]):
    m = line.match(raw)
    if not m:
        continue
    comm, pid, time, name, args = m.group(1), int(m.group(2)), float(m.group(4)), m.group(5), m.group(6)
    if comm == "ignis-bench":
        bench = pid
    elif comm.startswith("ignis-conn"):
        nodes.add(pid)
    events.append((time, pid, name.split(":")[-1], args))
if bench is None:
    sys.exit("no ignis-bench process in the trace")

def first(chain, start, pid, name, other=False):
    """The first event `name` after index `start` by `pid` (or, with
    `other`, by any Ignis node but `pid`)."""
    for i in range(start + 1, len(chain)):
        _, p, n, _ = chain[i]
        if n == name and ((p != pid and p in nodes) if other else p == pid):
            return i
    return None

# One message: from the load generator's writev to its next recvfrom, with
# no other request sent in between (messages that overlap are skipped).
direct, forwarded = [], []
i = 0
while i < len(events):
    t, pid, name, _ = events[i]
    if not (pid == bench and name == "sys_enter_writev"):
        i += 1
        continue
    j = i + 1
    while j < len(events) and not (events[j][1] == bench and events[j][2] in ("sys_exit_recvfrom", "sys_enter_writev")):
        j += 1
    if j == len(events) or events[j][2] != "sys_exit_recvfrom":
        i = j
        continue
    chain = events[i : j + 1]
    read = first(chain, 0, None, "sys_exit_recvfrom", other=True)
    if read is not None:
        node = chain[read][1]
        out = first(chain, read, node, "sys_enter_writev")
        if out is not None:
            peer = first(chain, out, node, "sys_exit_recvfrom", other=True)
            if peer is None:
                direct.append([chain[k][0] for k in (0, read, out, -1)])
            else:
                owner = chain[peer][1]
                answer = first(chain, peer, owner, "sys_enter_writev")
                back = answer and first(chain, answer, node, "sys_exit_recvfrom")
                reply = back and first(chain, back, node, "sys_enter_writev")
                if reply:
                    forwarded.append([chain[k][0] for k in (0, read, out, peer, answer, back, reply, -1)])
    i = j + 1

def report(kind, chains, names):
    if not chains:
        print(f"{kind}: no messages found")
        return
    print(f"{kind} ({len(chains)} messages), median µs:")
    for k, name in enumerate(names):
        print(f"  {name:55} {statistics.median((c[k + 1] - c[k]) * 1e6 for c in chains):6.0f}")
    print(f"  {'whole message':55} {statistics.median((c[-1] - c[0]) * 1e6 for c in chains):6.0f}")

report("direct", direct, ["client writev -> the owner reads", "the owner: read -> answer written", "answer -> client reads"])
report("forwarded", forwarded, [
    "client writev -> the forwarding node reads",
    "forwarding node: request read -> forward written",
    "forward written -> the owner reads",
    "the owner: read -> answer written",
    "answer written -> the forwarding node reads",
    "forwarding node: answer read -> response written",
    "response written -> client reads",
])
PY
rm -rf "$out"
