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
. "$(dirname "$0")/apt-pinned.sh"
apt_pinned chromium.sh "chromium=$PIN chromium-common=$PIN" "chromium"
chromium --version
