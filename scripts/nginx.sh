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
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# Keep apt from starting the packaged service (it would take port 80).
policy=/usr/sbin/policy-rc.d
created=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | sudo_ tee "$policy" >/dev/null
    sudo_ chmod +x "$policy"
    created=1
fi
trap '[ -n "$created" ] && sudo_ rm -f "$policy"' EXIT
sudo_ apt-get update -qq
if ! DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends \
        "nginx-light=$PIN" "nginx=$PIN" "nginx-common=$PIN" >/dev/null 2>&1; then
    echo "nginx.sh: $PIN is no longer in the archive; installing bookworm's current 1.22.1 build" >&2
    DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends nginx-light >/dev/null
fi
/usr/sbin/nginx -v
