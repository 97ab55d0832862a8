#!/usr/bin/env bash
# Train on this machine with several processes:  launch/local.sh CONFIG NPROC [dotted.key=value ...]
# = dsv3 launch local CONFIG --nproc NPROC [...] (torchrun --standalone; OMP_NUM_THREADS=1 on CPU
# unless set). Relative paths in the config resolve against the directory you run this from.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NPROC [dotted.key=value ...]" >&2
    exit 2
fi
config=$1 nproc=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
if command -v dsv3 >/dev/null; then
    exec dsv3 launch local "$config" --nproc "$nproc" "$@"
elif [ -x "$here/.venv/bin/dsv3" ]; then
    exec "$here/.venv/bin/dsv3" launch local "$config" --nproc "$nproc" "$@"
fi
echo "launch/local.sh: dsv3 not found: run 'make setup' (or activate the environment that has it)" >&2
exit 2
