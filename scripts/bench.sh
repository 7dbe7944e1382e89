#!/usr/bin/env bash
# Runs one benchmark scenario of bench/ with `ignis bench`, release build:
#   scripts/bench.sh noisy-neighbour   # tenant L next to tenant H's CPU flood
#   scripts/bench.sh one-function      # a cheap route next to a heavy route of one function
#   scripts/bench.sh kv                # wasi:keyvalue get/set, Ignis vs wasmtime serve -Skeyvalue
#   scripts/bench.sh actors            # durable actor increments/s
# A scenario with a `kind = "wasmtime"` peer gets wasmtime-cli 48.0.8
# (installed once into target/bench-tools). Writes
# target/bench-results/NAME.{md,json,svg}. Extra arguments go to
# `ignis bench` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: scripts/bench.sh SCENARIO [ignis bench options]; scenarios: $(cd bench && ls *.toml | sed 's/\.toml$//' | tr '\n' ' ')}
shift
scenario=bench/$name.toml
[ -f "$scenario" ] || { echo "bench: no scenario $scenario" >&2; exit 2; }
scripts/setup.sh
peer=()
if grep -q '^kind = "wasmtime"' "$scenario"; then
    . scripts/wasmtime-cli.sh
    peer=(--wasmtime "$WASMTIME")
fi
cargo build --release -p ignis
exec target/release/ignis bench "$scenario" "${peer[@]}" "$@"
