#!/usr/bin/env bash
# Builds a JavaScript or Python guest with its pinned toolchain
# (scripts/guest-tools.sh) against the examples' WIT (scripts/guest-wit.sh):
#   scripts/componentize.sh js APP.js OUT.wasm WORLD    (componentize-js)
#   scripts/componentize.sh py MODULE OUT.wasm WORLD    (componentize-py; app for app.py)
# Run in the guest's directory; WORLD is a world of
# examples/wit-guests/world.wit (http-hello, http-function).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[ $# -eq 4 ] || { echo "usage: scripts/componentize.sh js|py SOURCE OUT.wasm WORLD" >&2; exit 2; }
lang=$1 src=$2 out=$3 world="ignis:examples/$4@0.1.0"
bin=$("$root/scripts/guest-tools.sh" "$lang")
wit=$("$root/scripts/guest-wit.sh")
mkdir -p "$(dirname "$out")"
case "$lang" in
js) exec "$bin/componentize-js" "$src" --wit "$wit" --world-name "$world" -o "$out" ;;
py) PYTHONDONTWRITEBYTECODE=1 exec "$bin/componentize-py" -d "$wit" -w "$world" componentize "$src" -o "$out" ;;
esac
