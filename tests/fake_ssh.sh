#!/usr/bin/env bash
# Stands in for ssh in tests/test_elastic.py (HYDRA_LAUNCHER_EXEC): Hydra calls it as
#   fake_ssh.sh [ssh options] HOST COMMAND
# and it runs COMMAND on this machine as emulated host HOST: in a new session (so a test can kill
# the host's every process), logging "launch HOST SESSION" to $FAKE_SSH_DIR/launches.log; while
# $FAKE_SSH_DIR/down-HOST exists the host is unreachable (status 255, as ssh).
set -euo pipefail
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do shift; done
host=${1:?}; shift
dir=${FAKE_SSH_DIR:?}
if [ -e "$dir/down-$host" ]; then echo "fake_ssh: connect to host $host: No route to host" >&2; exit 255; fi
# shellcheck disable=SC2016  # expanded by the inner bash, not here
exec setsid -w bash -c 'echo "launch $0 $$" >> "$1/launches.log"; exec sh -c "$2"' "$host" "$dir" "$*"
