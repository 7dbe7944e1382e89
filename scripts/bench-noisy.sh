#!/usr/bin/env bash
# The noisy-neighbour benchmark (bench/noisy-neighbour.toml): tenant L's
# latency alone and next to tenant H's CPU flood, on Ignis and on
# `wasmtime serve` (wasmtime-cli 48.0.8, installed once), in one run.
# Writes target/bench-results/noisy-neighbour.{md,json,svg}. Extra arguments
# go to `ignis bench` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/wasmtime-cli.sh
cargo build --release -p ignis
exec target/release/ignis bench bench/noisy-neighbour.toml --wasmtime "$WASMTIME" "$@"
