#!/usr/bin/env bash
# Builds a Python guest with the pinned componentize-py against the
# examples' WIT (scripts/guest-wit.sh):
#   scripts/componentize-py.sh MODULE OUT.wasm WORLD
# MODULE is the app module in the current directory (app for app.py);
# WORLD is a world of examples/wit-guests/world.wit (http-hello, http-function).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[ $# -eq 3 ] || { echo "usage: scripts/componentize-py.sh MODULE OUT.wasm WORLD" >&2; exit 2; }
bin=$("$root/scripts/guest-tools.sh" py)
wit=$("$root/scripts/guest-wit.sh")
mkdir -p "$(dirname "$2")"
export PYTHONDONTWRITEBYTECODE=1
exec "$bin/componentize-py" -d "$wit" -w "ignis:examples/$3@0.1.0" componentize "$1" -o "$2"
