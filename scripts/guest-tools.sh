#!/usr/bin/env bash
# Installs pinned JavaScript and Python tools into target/, once (again only
# when the pins change), and prints the directory of their executables:
#   scripts/guest-tools.sh js       componentize-js (tools/js/package-lock.json, npm ci)
#   scripts/guest-tools.sh py       componentize-py (tools/py/requirements.txt, pip in a venv)
#   scripts/guest-tools.sh workerd  workerd, the JavaScript benchmark peer
#                                   (tools/bench-js/package-lock.json, npm ci)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root/target"
exec 9>"$root/target/guest-tools.lock"
flock 9

# npm_ci NAME PINS DIR: `npm ci` of PINS/package{,-lock}.json into DIR,
# unless DIR was installed from the same lock file.
npm_ci() {
    local name=$1 pins=$2 dir=$3 stamp
    stamp=$(sha256sum "$pins/package-lock.json" | cut -d' ' -f1)
    if [ "$(cat "$dir/.installed" 2>/dev/null)" != "$stamp" ]; then
        command -v npm >/dev/null || { echo "guest-tools: npm (Node.js 18+) is needed for $name" >&2; exit 1; }
        echo "guest-tools: installing $name into $dir (once)" >&2
        rm -rf "$dir"
        mkdir -p "$dir"
        cp "$pins/package.json" "$pins/package-lock.json" "$dir/"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >&2)
        echo "$stamp" > "$dir/.installed"
    fi
    echo "$dir/node_modules/.bin"
}

case "${1:-}" in
js)
    npm_ci componentize-js "$root/tools/js" "$root/target/guest-tools/js"
    ;;
workerd)
    npm_ci workerd "$root/tools/bench-js" "$root/target/bench-tools/workerd"
    ;;
py)
    dir="$root/target/guest-tools/py"
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
    echo "usage: scripts/guest-tools.sh js|py|workerd" >&2
    exit 2
    ;;
esac
