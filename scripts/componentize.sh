#!/usr/bin/env bash
# Builds a JavaScript or Python example guest with its pinned toolchain
# (scripts/guest-tools.sh) against examples/wit-guests/world.wit and the WIT
# packages the ignis binary in $IGNIS writes (`ignis wit`: WASI 0.2 as that
# binary links it, and Ignis's platform packages):
#   scripts/componentize.sh js APP.js OUT.wasm WORLD    (componentize-js)
#   scripts/componentize.sh py MODULE OUT.wasm WORLD    (componentize-py; app for app.py)
# Run in the guest's directory; WORLD is a world of
# examples/wit-guests/world.wit (http-hello, http-function). `ignis up`
# sets IGNIS for the build commands it runs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
[ $# -eq 4 ] || { echo "usage: scripts/componentize.sh js|py SOURCE OUT.wasm WORLD" >&2; exit 2; }
: "${IGNIS:?componentize.sh needs IGNIS, the ignis executable (ignis up sets it for build commands)}"
lang=$1 src=$2 out=$3 world="ignis:examples/$4@0.1.0"
bin=$("$root/scripts/guest-tools.sh" "$lang")
wit=$(mktemp -d)
trap 'rm -rf "$wit"' EXIT
cp "$root/examples/wit-guests/world.wit" "$wit/"
"$IGNIS" wit "$wit"
mkdir -p "$(dirname "$out")"
case "$lang" in
js) "$bin/componentize-js" "$src" --wit "$wit" --world-name "$world" -o "$out" ;;
py) PYTHONDONTWRITEBYTECODE=1 "$bin/componentize-py" -d "$wit" -w "$world" componentize "$src" -o "$out" ;;
esac
