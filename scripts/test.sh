#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test (unit, integration,
# end-to-end with real servers and real guests built from examples/).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/chromium.sh >/dev/null   # the dashboard test drives a headless browser
# The storage tests run every case on PostgreSQL too (private servers the
# tests start themselves). Skipped, loudly, only where it cannot be
# installed; never in CI.
if IGNIS_PG_BIN="$(scripts/postgres.sh)"; then
    export IGNIS_PG_BIN IGNIS_REQUIRE_POSTGRES=1
elif [ -n "${CI:-}" ]; then
    echo "test.sh: PostgreSQL could not be installed; CI does not skip its tests" >&2
    exit 1
else
    echo "test.sh: WARNING: PostgreSQL could not be installed: its tests will be SKIPPED" >&2
fi
scripts/check-tree.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
