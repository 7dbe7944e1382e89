#!/usr/bin/env bash
# The storage engines side by side on one node (bench/storage.toml): starts
# a private PostgreSQL server (scripts/private-postgres.sh), points the
# scenario's `postgres` peer at it and runs `scripts/bench.sh storage`.
# Extra arguments go to `ignis bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/private-postgres.sh
scripts/bench.sh storage "$@"
