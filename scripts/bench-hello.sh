#!/usr/bin/env bash
# Ignis vs `wasmtime serve` (wasmtime-cli 48.0.8) vs a bare hyper server, on
# the same hello component, in one run: throughput (closed loop, keep-alive
# HTTP/1.1, fixed connections) and open-loop latency. Extra arguments go to
# `ignis-bench hello-peers` (see its --help; `--fresh` adds Ignis with
# `reuse = false`). HELLO=hello_p3 runs the WASI 0.3 hello instead of 0.2.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/wasmtime-cli.sh
cargo build --release -p ignis -p ignis-bench
cargo build --release --target wasm32-wasip2 --manifest-path examples/Cargo.toml -p hello -p hello-p3
exec target/release/ignis-bench hello-peers \
    --ignis target/release/ignis \
    --wasmtime "$WASMTIME" \
    --component "examples/target/wasm32-wasip2/release/${HELLO:-hello}.wasm" \
    "$@"
