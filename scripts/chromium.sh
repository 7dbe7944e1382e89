#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium for the dashboard test,
# pinned: 156.0.8078.114-1~deb12u1 (bookworm-security), or the archive's
# current bookworm build when that one has been superseded (the script
# says which). Prints the browser's version. Idempotent.
set -euo pipefail
PIN="156.0.8078.114-1~deb12u1"
if command -v chromium >/dev/null; then
    chromium --version
    exit 0
fi
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
sudo_ apt-get update -qq
if ! DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends \
        "chromium=$PIN" "chromium-common=$PIN" >/dev/null 2>&1; then
    echo "chromium.sh: $PIN is no longer in the archive; installing bookworm's current build" >&2
    DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
chromium --version
