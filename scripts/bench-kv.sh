#!/usr/bin/env bash
# The key-value benchmark (bench/kv.toml): wasi:keyvalue get/set from a
# guest on Ignis (durable) and on `wasmtime serve -Skeyvalue` (in memory,
# wasmtime-cli 48.0.8, installed once), in one run. Writes
# target/bench-results/kv.{md,json,svg}. Extra arguments go to `ignis bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/wasmtime-cli.sh
cargo build --release -p ignis
exec target/release/ignis bench bench/kv.toml --wasmtime "$WASMTIME" "$@"
