#!/usr/bin/env bash
# Cluster mode on this machine: three `ignis serve` nodes on a private
# PostgreSQL server (scripts/private-postgres.sh): forwarding overhead,
# 1 vs 3 nodes, deploy propagation and failover (`ignis-bench cluster`);
# beside the forwarding overhead, the relay floor (a bare hyper hello
# directly, through nginx and through Ignis's reverse proxy), so Debian's
# nginx (pinned) is installed first.
# Extra arguments go to `ignis-bench cluster` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/nginx.sh
cargo build --release -p ignis -p ignis-bench
cargo build --release --target wasm32-wasip2 --manifest-path examples/Cargo.toml -p hello -p counter
. scripts/private-postgres.sh
target/release/ignis-bench cluster \
    --ignis target/release/ignis \
    --counter examples/target/wasm32-wasip2/release/counter.wasm \
    --hello examples/target/wasm32-wasip2/release/hello.wasm \
    --nginx /usr/sbin/nginx \
    "$@"
