#!/usr/bin/env bash
# The storage engines side by side on one node (bench/storage.toml): starts
# a private PostgreSQL server (Debian's package, scripts/postgres.sh; a
# fresh data directory, fsync on, Unix socket only), points the scenario's
# `postgres` peer at it and runs `scripts/bench.sh storage`. The server and
# its directory are removed at the end. Extra arguments go to `ignis bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(scripts/postgres.sh)"
dir="$(mktemp -d /tmp/ignis-bench-pg.XXXXXX)"
run_pg=()
if [ "$(id -u)" = 0 ]; then
    chown postgres: "$dir"
    run_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
fi
"${run_pg[@]}" "$bin/initdb" -D "$dir/data" -U ignis -A trust -E UTF8 --locale=C --no-instructions >/dev/null
"${run_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-k $dir -c listen_addresses= -c fsync=on -c synchronous_commit=on -c max_connections=100" start >/dev/null
trap '"${run_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null; rm -rf "$dir"' EXIT
"$bin/psql" -h "$dir" -U ignis -d postgres -Xq -c "CREATE DATABASE bench"
export IGNIS_BENCH_DATABASE="host=$dir user=ignis dbname=bench"
scripts/bench.sh storage "$@"
