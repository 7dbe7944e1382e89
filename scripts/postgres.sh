#!/usr/bin/env bash
# Installs Debian's PostgreSQL server for the storage and cluster tests,
# pinned: postgresql-15 15.20-0+deb12u1 (bookworm-security), or bookworm's
# current 15.x build when the archive has moved on (the script says which).
# The package's own cluster service is not started: the tests start private
# servers of their own (ignis_store::testing). Idempotent; prints the
# server's bin directory.
set -euo pipefail
PIN="15.20-0+deb12u1"
BIN=/usr/lib/postgresql/15/bin
if [ -x "$BIN/postgres" ] && [ -x "$BIN/initdb" ] && [ -x "$BIN/psql" ]; then
    echo "$BIN"
    exit 0
fi
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# Keep apt from starting the packaged cluster (it would take port 5432).
policy=/usr/sbin/policy-rc.d
created=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | sudo_ tee "$policy" >/dev/null
    sudo_ chmod +x "$policy"
    created=1
fi
trap '[ -n "$created" ] && sudo_ rm -f "$policy"' EXIT
sudo_ apt-get update -qq
if ! DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends \
        "postgresql-15=$PIN" "postgresql-client-15=$PIN" >/dev/null 2>&1; then
    echo "postgres.sh: $PIN is no longer in the archive; installing bookworm's current postgresql-15" >&2
    DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends \
        postgresql-15 postgresql-client-15 >/dev/null
fi
"$BIN/postgres" --version >&2
echo "$BIN"
