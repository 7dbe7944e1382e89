#!/usr/bin/env bash
# Builds a JavaScript guest with the pinned componentize-js against the
# examples' WIT (scripts/guest-wit.sh):
#   scripts/componentize-js.sh APP.js OUT.wasm WORLD
# WORLD is a world of examples/wit-guests/world.wit (http-hello, http-function).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[ $# -eq 3 ] || { echo "usage: scripts/componentize-js.sh APP.js OUT.wasm WORLD" >&2; exit 2; }
bin=$("$root/scripts/guest-tools.sh" js)
wit=$("$root/scripts/guest-wit.sh")
mkdir -p "$(dirname "$2")"
exec "$bin/componentize-js" "$1" --wit "$wit" --world-name "ignis:examples/$3@0.1.0" -o "$2"
