#!/usr/bin/env bash
# Installs what building and testing Ignis needs beyond a Rust toolchain:
# the wasm32-wasip2 target for the example guests. Idempotent.
set -euo pipefail
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "setup: installing the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
fi
