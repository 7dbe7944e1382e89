#!/usr/bin/env bash
# Installs the pinned guest toolchains into target/guest-tools, once (again
# only when the pins change):
#   scripts/guest-tools.sh js   componentize-js, from tools/js/package-lock.json (npm ci)
#   scripts/guest-tools.sh py   componentize-py, from tools/py/requirements.txt (pip, in a venv)
# Prints the directory of the toolchain's executables.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/target/guest-tools"
mkdir -p "$tools"
exec 9>"$tools/.lock"
flock 9
case "${1:-}" in
js)
    dir="$tools/js"
    stamp=$(sha256sum "$root/tools/js/package-lock.json" | cut -d' ' -f1)
    if [ "$(cat "$dir/.installed" 2>/dev/null)" != "$stamp" ]; then
        command -v npm >/dev/null || { echo "guest-tools: npm (Node.js 18+) is needed for JavaScript guests" >&2; exit 1; }
        echo "guest-tools: installing componentize-js into $dir (once)" >&2
        rm -rf "$dir"
        mkdir -p "$dir"
        cp "$root/tools/js/package.json" "$root/tools/js/package-lock.json" "$dir/"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
        echo "$stamp" > "$dir/.installed"
    fi
    echo "$dir/node_modules/.bin"
    ;;
py)
    dir="$tools/py"
    stamp=$(sha256sum "$root/tools/py/requirements.txt" | cut -d' ' -f1)
    if [ "$(cat "$dir/.installed" 2>/dev/null)" != "$stamp" ]; then
        echo "guest-tools: installing componentize-py into $dir (once)" >&2
        rm -rf "$dir"
        python3 -m venv "$dir"
        "$dir/bin/pip" install --quiet --disable-pip-version-check -r "$root/tools/py/requirements.txt" >&2
        echo "$stamp" > "$dir/.installed"
    fi
    echo "$dir/bin"
    ;;
*)
    echo "usage: scripts/guest-tools.sh js|py" >&2
    exit 2
    ;;
esac
