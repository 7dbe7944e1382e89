#!/usr/bin/env bash
# Build output stays out of git: no tracked compiled components (.wasm,
# .cwasm: native code), target/ or node_modules/ directories, and the paths the build and
# the compile cache write are ignored. Run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    echo "check-tree: not a git checkout; skipped"
    exit 0
fi
tracked=$(git ls-files | grep -E '\.(cwasm|wasm)$|(^|/)target/|(^|/)\.ignis/|(^|/)node_modules/' || true)
if [ -n "$tracked" ]; then
    echo "check-tree: build output is tracked in git (git rm --cached it):" >&2
    echo "$tracked" >&2
    exit 1
fi
for path in target/x examples/target/x examples/.ignis/cache/x.cwasm .ignis/cache/x.cwasm \
    examples/hello/.ignis/cache/x.cwasm node_modules/x; do
    if ! git check-ignore -q --no-index "$path"; then
        echo "check-tree: $path would not be ignored; fix .gitignore" >&2
        exit 1
    fi
done
echo "check-tree: no build output tracked; build paths ignored"
