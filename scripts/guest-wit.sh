#!/usr/bin/env bash
# Assembles the WIT that JavaScript and Python guests are built against into
# target/guest-wit and prints its path: examples/wit-guests/world.wit, with
# deps/ holding WASI 0.2.12 (the WIT files of the wasmtime-wasi-http crate
# this workspace links, so guests and host agree on every signature) and
# the Ignis platform package with its key-value and config dependencies
# (wit/).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/guest-wit"
mkdir -p "$root/target"
# One assembly at a time (builds may run side by side).
exec 9>"$root/target/guest-wit.lock"
flock 9
http=$(cd "$root" && cargo metadata --format-version 1 --locked 2>/dev/null | python3 -c '
import json, sys
m = json.load(sys.stdin)
print(next(p["manifest_path"] for p in m["packages"] if p["name"] == "wasmtime-wasi-http"))')
wasi="$(dirname "$http")/wit/deps"
[ -d "$wasi" ] || { echo "guest-wit: no WASI WIT at $wasi" >&2; exit 1; }
rm -rf "$out.tmp"
mkdir -p "$out.tmp/deps/ignis-platform"
cp "$root/examples/wit-guests/world.wit" "$out.tmp/"
for f in "$wasi"/*.wit; do
    d="$out.tmp/deps/wasi-$(basename "$f" .wit)"
    mkdir -p "$d"
    cp "$f" "$d/"
done
# Worlds there import feature-gated (`@unstable`) interfaces; the WIT
# parsers inside the guest toolchains drop the gated interface but not the
# import that names it ("interface not found"). Nothing a guest here needs
# is gated: drop those imports.
python3 - "$out.tmp/deps" <<'PY'
import pathlib, re, sys
for f in pathlib.Path(sys.argv[1]).glob("wasi-*/*.wit"):
    lines = f.read_text().split("\n")
    keep, i = [], 0
    while i < len(lines):
        if re.match(r"\s*@unstable\(", lines[i]) and i + 1 < len(lines) and re.match(r"\s*import [^{]*;\s*$", lines[i + 1]):
            i += 2
            continue
        keep.append(lines[i])
        i += 1
    f.write_text("\n".join(keep))
PY
cp "$root/wit/ignis.wit" "$out.tmp/deps/ignis-platform/"
for d in "$root"/wit/deps/keyvalue-0.2.0-draft2 "$root"/wit/deps/config-0.2.0-rc.1; do
    cp -r "$d" "$out.tmp/deps/"
done
# The platform package's other worlds name the 0.2.0-draft key-value package.
cp -r "$root/wit/deps/keyvalue-0.2.0-draft" "$out.tmp/deps/"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "$out"
