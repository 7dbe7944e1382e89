#!/usr/bin/env bash
# The durable-actor benchmark (bench/actors.toml): increments/s acknowledged
# after fsync, one actor and 1,000 actors, and p99 at a fixed rate. Writes
# target/bench-results/actors.{md,json,svg}. Extra arguments go to
# `ignis bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p ignis
exec target/release/ignis bench bench/actors.toml "$@"
