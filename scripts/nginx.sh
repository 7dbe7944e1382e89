#!/usr/bin/env bash
# Installs Debian's nginx for the proxy benchmark, pinned: 1.22.1-9+deb12u11
# (bookworm-security), or the newer bookworm update of the same upstream
# version when the archive has moved on (the script says which). The
# package's own service is not started. Idempotent.
set -euo pipefail
PIN="1.22.1-9+deb12u11"
if command -v /usr/sbin/nginx >/dev/null && /usr/sbin/nginx -v 2>&1 | grep -q "nginx/1.22.1"; then
    exit 0
fi
. "$(dirname "$0")/apt-pinned.sh"
apt_pinned nginx.sh "nginx-light=$PIN nginx=$PIN nginx-common=$PIN" "nginx-light"
/usr/sbin/nginx -v
