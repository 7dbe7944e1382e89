#!/usr/bin/env bash
# Sourced by the benchmark scripts: installs workerd (pinned in
# tools/bench-js/package-lock.json, the peer of the JavaScript hello) into
# target/bench-tools/workerd once, and sets $WORKERD.
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir="$root/target/bench-tools/workerd"
stamp=$(sha256sum "$root/tools/bench-js/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$dir/.installed" 2>/dev/null)" != "$stamp" ]; then
    echo "bench: installing workerd into $dir (once)"
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$root/tools/bench-js/package.json" "$root/tools/bench-js/package-lock.json" "$dir/"
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$stamp" > "$dir/.installed"
fi
WORKERD="$dir/node_modules/.bin/workerd"
export WORKERD
