#!/usr/bin/env bash
# The JavaScript and Python hello examples: Ignis with instance reuse, Ignis
# with a fresh instance per request, `wasmtime serve` (wasmtime-cli 48.0.8),
# bare hyper, and, for JavaScript, workerd running the same logic as a
# Worker (bench/workerd/hello.js); 8 connections, one run per language.
# Extra arguments go to `ignis-bench hello-peers`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/wasmtime-cli.sh
. scripts/workerd.sh
cargo build --release -p ignis -p ignis-bench
export IGNIS=$PWD/target/release/ignis
(cd examples/hello-js && ../../scripts/componentize.sh js app.js ../target/guests/hello-js.wasm http-hello)
(cd examples/hello-py && ../../scripts/componentize.sh py app ../target/guests/hello-py.wasm http-hello)
common=(--ignis target/release/ignis --wasmtime "$WASMTIME" --reuse --fresh --connections 8 --seconds 5 --rounds 3)
echo "## JavaScript"
target/release/ignis-bench hello-peers "${common[@]}" \
    --component examples/target/guests/hello-js.wasm \
    --workerd "$WORKERD" --worker bench/workerd/hello.js "$@"
echo "## Python"
target/release/ignis-bench hello-peers "${common[@]}" \
    --component examples/target/guests/hello-py.wasm "$@"
