"""Share of step time spent in expert-parallel all-to-all, on the real training path.

    python -m torch.distributed.run --standalone --nproc_per_node 4 benchmarks/ep_alltoall_share.py \
        configs/ep_debug.yaml [overrides...]

Times every torch.distributed.all_to_all_single call (token dispatch and combine, forward and
backward, and the count exchange) by wrapping it, trains the config for its train.steps, and
prints one JSON line from rank 0: total all-to-all seconds, total step seconds, and their ratio
(both summed over steps; rank 0's view, which waits for the slowest peer inside each exchange).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.config import load_config  # noqa: E402
from train.loop import train  # noqa: E402

spent = {"all_to_all_s": 0.0, "calls": 0}
_original = dist.all_to_all_single


def timed_all_to_all_single(*args, **kwargs):
    t0 = time.perf_counter()
    try:
        return _original(*args, **kwargs)
    finally:
        spent["all_to_all_s"] += time.perf_counter() - t0
        spent["calls"] += 1


def main() -> None:
    dist.all_to_all_single = timed_all_to_all_single
    cfg = load_config(sys.argv[1], ["train.resume=never", "train.run_dir=runs/bench_ep_alltoall",
                                    "logging.wandb=disabled", "logging.progress=false", *sys.argv[2:]])
    t0 = time.perf_counter()
    result = train(cfg)
    total = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"config": sys.argv[1], "steps": result.step, "world_size": int(os.environ["WORLD_SIZE"]),
                          "ep": cfg.parallel.ep, "all_to_all_s": round(spent["all_to_all_s"], 3),
                          "all_to_all_calls": spent["calls"], "train_s": round(total, 3),
                          "share": round(spent["all_to_all_s"] / total, 4)}))


if __name__ == "__main__":
    main()
