#!/usr/bin/env bash
# Installs what building and testing Ignis needs beyond a Rust toolchain:
# the wasm32-wasip2 target for the example guests, and the JavaScript and
# Python guest toolchains. Idempotent.
set -euo pipefail
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "setup: installing the wasm32-wasip2 target"
    rustup target add wasm32-wasip2
fi
# The JavaScript and Python guest toolchains (pinned: tools/js, tools/py),
# into target/guest-tools; the examples and tests build guests with them.
"$(dirname "$0")/guest-tools.sh" js >/dev/null
"$(dirname "$0")/guest-tools.sh" py >/dev/null
# Every crate of Cargo.lock, for every target: the `ignis` build script
# reads package metadata offline, which needs them all on disk (a build
# alone fetches only this platform's).
cargo fetch --locked --manifest-path "$(dirname "$0")/../Cargo.toml" --quiet
