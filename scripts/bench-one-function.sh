#!/usr/bin/env bash
# The one-function benchmark (bench/one-function.toml): a cheap route's
# latency alone and while another route of the same function floods the
# CPU, on Ignis and on `wasmtime serve` (wasmtime-cli 48.0.8, installed
# once), in one run. Writes target/bench-results/one-function.{md,json,svg}.
# Extra arguments go to `ignis bench` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/wasmtime-cli.sh
cargo build --release -p ignis
exec target/release/ignis bench bench/one-function.toml --wasmtime "$WASMTIME" "$@"
