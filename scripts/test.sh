#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test (unit, integration,
# end-to-end with real servers and real guests built from examples/).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/chromium.sh >/dev/null   # the dashboard test drives a headless browser
scripts/check-tree.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
