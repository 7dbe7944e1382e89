#!/usr/bin/env bash
# Concurrent reuse (`reuse = { max_concurrent = 16 }`) against one request
# at a time per instance (the default), on WASI 0.3 guests, in one run:
# the hello (CPU-light) and limits-p3 `/who?ms=10` (each request waits
# 10 ms on the host clock, like a guest awaiting I/O). Closed loop,
# keep-alive HTTP/1.1, CONNECTIONS (default 32) connections, ROUNDS rounds
# of A B B A, SECONDS per run; prints requests/s per run and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
connections=${CONNECTIONS:-32} seconds=${SECONDS_PER_RUN:-5} rounds=${ROUNDS:-2}
cargo build --release -p ignis -p ignis-bench
cargo build --release --target wasm32-wasip2 --manifest-path examples/Cargo.toml -p hello-p3 -p limits-p3
guests=$PWD/examples/target/wasm32-wasip2/release
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
cat > "$dir/ignis.toml" <<TOML
[server]
cache_dir = "$PWD/target/bench-cache"
$(for f in serial shared; do
    extra=$([ "$f" = shared ] && echo 'reuse = { max_concurrent = 16 }' || true)
    printf '[functions.hello-%s]\ncomponent = "%s/hello_p3.wasm"\nmax_concurrency = 64\n%s\n' "$f" "$guests" "$extra"
    printf '[functions.wait-%s]\ncomponent = "%s/limits_p3.wasm"\nmax_concurrency = 64\n%s\n' "$f" "$guests" "$extra"
    printf '[[routes]]\npath = "/hello-%s"\nfunction = "hello-%s"\n[[routes]]\npath = "/wait-%s/..."\nfunction = "wait-%s"\n' "$f" "$f" "$f" "$f"
done)
TOML
target/release/ignis serve "$dir/ignis.toml" --listen 127.0.0.1:0 > "$dir/out" 2> "$dir/err" &
pid=$!
for _ in $(seq 1 600); do grep -q "listening on" "$dir/out" && break; sleep 0.1; done
addr=$(sed -n 's|listening on http://||p' "$dir/out")
[ -n "$addr" ] || { cat "$dir/err"; exit 1; }
run() {
    target/release/ignis-bench load --addr "$addr" --path "$1" --connections "$connections" --seconds "$seconds" \
        | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["throughput"]))'
}
for kind in hello wait; do
    path() { if [ "$kind" = hello ]; then echo "/hello-$1"; else echo "/wait-$1/who?ms=10"; fi; }
    run "$(path serial)" > /dev/null; run "$(path shared)" > /dev/null   # warm-up
    a=0 b=0
    for _ in $(seq 1 "$rounds"); do
        for f in serial shared shared serial; do
            r=$(run "$(path "$f")")
            echo "$kind $f $r req/s"
            if [ "$f" = serial ]; then a=$((a + r)); else b=$((b + r)); fi
        done
    done
    python3 -c "print('$kind: shared / serial = %.2f' % ($b / $a))"
done
