#!/usr/bin/env bash
# Ignis vs nginx as reverse proxies in front of the same origin, in one run
# (`ignis-bench proxy-peers`: HTTP/1.1, HTTP/1.1 over TLS, HTTP/2 over TLS;
# throughput, CPU per request, open-loop latency at a rate both sustain,
# new TLS connections per second). Installs Debian's nginx (pinned) first.
# Extra arguments go to `ignis-bench proxy-peers` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/nginx.sh
cargo build --release -p ignis -p ignis-bench
exec target/release/ignis-bench proxy-peers \
    --ignis target/release/ignis \
    --nginx /usr/sbin/nginx \
    "$@"
