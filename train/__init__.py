"""The training job: config, data, loop, checkpoints, metrics, sampling and the `dsv3` CLI."""
