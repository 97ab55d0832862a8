#!/usr/bin/env bash
# Submit training to SLURM:  launch/slurm.sh CONFIG [dotted.key=value ...]
# = dsv3 launch slurm CONFIG [...]: nodes, GPUs, partition, ... come from the config's launch:
# section. Relative paths in the config resolve against the directory you run this from.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
if command -v dsv3 >/dev/null; then
    exec dsv3 launch slurm "$@"
elif [ -x "$here/.venv/bin/dsv3" ]; then
    exec "$here/.venv/bin/dsv3" launch slurm "$@"
fi
echo "launch/slurm.sh: dsv3 not found: run 'make setup' (or activate the environment that has it)" >&2
exit 2
