#!/usr/bin/env bash
# Sourced by the benchmark scripts: installs wasmtime-cli 48.0.8 (the peer
# the benchmarks compare against) into $TOOLS once, and sets $WASMTIME.
TOOLS=${IGNIS_TOOLS:-$PWD/target/bench-tools}
if ! "$TOOLS/bin/wasmtime" --version 2>/dev/null | grep -q "48.0.8"; then
    echo "bench: installing wasmtime-cli 48.0.8 into $TOOLS (takes a while, once)"
    cargo install wasmtime-cli@48.0.8 --locked --root "$TOOLS"
fi
WASMTIME="$TOOLS/bin/wasmtime"
export WASMTIME
