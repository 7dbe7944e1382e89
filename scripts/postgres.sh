#!/usr/bin/env bash
# Installs Debian's PostgreSQL server for the storage tests and benchmarks,
# pinned: postgresql-15 15.20-0+deb12u1 (bookworm-security), or bookworm's
# current 15.x build when the archive has moved on (the script says which;
# an installed 15.x is kept). The package's own cluster is not started: the
# tests start private servers (ignis_store::testing). Idempotent; prints
# the server's bin directory.
set -euo pipefail
PIN="15.20-0+deb12u1"
BIN=/usr/lib/postgresql/15/bin
if [ -x "$BIN/postgres" ] && [ -x "$BIN/initdb" ] && [ -x "$BIN/psql" ]; then
    echo "$BIN"
    exit 0
fi
. "$(dirname "$0")/apt-pinned.sh"
apt_pinned postgres.sh "postgresql-15=$PIN postgresql-client-15=$PIN" "postgresql-15 postgresql-client-15"
"$BIN/postgres" --version >&2
echo "$BIN"
