"""Starting `dsv3 train` on several processes: `local` wraps torchrun on one machine, `slurm`
submits through submitit to a SLURM cluster (one task per GPU, rendezvous from SLURM's
variables, checkpoint-and-requeue on preemption). `launch/local.sh` and `launch/slurm.sh` are
thin shell wrappers around `dsv3 launch local|slurm`."""
