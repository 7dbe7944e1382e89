# Sourced by the install scripts: `apt_pinned NAME "PKG=VER ..." "PKG ..."`
# installs the pinned packages, or, when the archive has moved on from that
# build, the second list (the distribution's current build), saying so.
# Packaged services are not started (a policy-rc.d refuses them while apt
# runs): the project starts its own servers.
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_pinned() {
    local name=$1 pinned=$2 current=$3
    local policy=/usr/sbin/policy-rc.d created=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | sudo_ tee "$policy" >/dev/null
        sudo_ chmod +x "$policy"
        created=1
    fi
    local status=0
    _apt_pinned_install "$name" "$pinned" "$current" || status=$?
    if [ -n "$created" ]; then sudo_ rm -f "$policy"; fi
    return "$status"
}
_apt_pinned_install() {
    sudo_ apt-get update -qq || return
    # shellcheck disable=SC2086 # the package lists are word lists
    if ! DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends \
            $2 >/dev/null 2>&1; then
        echo "$1: $2 is no longer in the archive; installing the current build" >&2
        DEBIAN_FRONTEND=noninteractive sudo_ apt-get install -y -qq --no-install-recommends \
            $3 >/dev/null
    fi
}
