#!/usr/bin/env bash
# Sourced by the benchmark scripts: installs workerd (pinned in
# tools/bench-js/package-lock.json, the peer of the JavaScript hello) once,
# with scripts/guest-tools.sh, and sets $WORKERD.
WORKERD="$("$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/guest-tools.sh" workerd)/workerd"
export WORKERD
