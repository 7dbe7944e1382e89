# Sourced by the benchmark scripts: starts a private PostgreSQL server
# (Debian's package, scripts/postgres.sh; a fresh data directory, fsync on,
# synchronous_commit on, Unix socket only), creates the database `bench`,
# exports IGNIS_BENCH_DATABASE for it, and stops the server and removes
# its directory when the calling script exits.
bin="$(scripts/postgres.sh)"
pg_dir="$(mktemp -d /tmp/ignis-bench-pg.XXXXXX)"
run_pg=()
if [ "$(id -u)" = 0 ]; then
    chown postgres: "$pg_dir"
    run_pg=(setpriv --reuid=postgres --regid=postgres --init-groups)
fi
"${run_pg[@]}" "$bin/initdb" -D "$pg_dir/data" -U ignis -A trust -E UTF8 --locale=C --no-instructions >/dev/null
"${run_pg[@]}" "$bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w \
    -o "-k $pg_dir -c listen_addresses= -c fsync=on -c synchronous_commit=on -c max_connections=200" start >/dev/null
trap '"${run_pg[@]}" "$bin/pg_ctl" -D "$pg_dir/data" -m fast stop >/dev/null; rm -rf "$pg_dir"' EXIT
"$bin/psql" -h "$pg_dir" -U ignis -d postgres -Xq -c "CREATE DATABASE bench"
export IGNIS_BENCH_DATABASE="host=$pg_dir user=ignis dbname=bench"
