"""Expert parallelism against one process: forward, gradients, clipping norm, 5 AdamW steps and
routing biases at EP=2 and EP=4 (with ZeRO-0 and ZeRO-2, and EP=2 inside a 4-rank world with
expert-data-parallel replicas). The reference is a plain single-process model trained with
torch's AdamW and clip_grad_norm_ on the whole global batch (tests/distributed/ep_worker.py).

Tolerances (fp32): 1e-5 absolute on logits, loss, gradients and parameters; 1e-5 relative on
the grad norm; routing biases and per-expert token counts exactly equal. Seen: logits equal
bit for bit at step 0, gradients within 6e-7, parameters within 1.2e-6 after 5 steps. With
activation checkpointing the differences are exactly those of the same run without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.distributed

TOL = 1e-5


def run_worker(tmp_path, nproc: int, ep: int, zero: int, *flags: str) -> list[dict]:
    """flags: skew, checkpointing (see ep_worker.py)."""
    out = tmp_path / "_".join([f"w{nproc}_ep{ep}_z{zero}", *flags])
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tests.distributed.ep_worker", str(out), str(ep), str(zero), *flags]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.parametrize("nproc,ep,zero", [(2, 2, 0), (2, 2, 2), (4, 4, 0), (4, 2, 2)])
def test_expert_parallel_equals_one_process(tmp_path, nproc, ep, zero):
    ranks = run_worker(tmp_path, nproc, ep, zero)
    ranges = sorted({tuple(r["expert_range"]) for r in ranks})
    per = 8 // ep
    assert ranges == [(i * per, (i + 1) * per) for i in range(ep)], "every expert held by one shard"
    for r in ranks:
        assert r["logits_step0"] <= TOL
        for key in ("logits", "loss", "params"):
            assert r[key] <= TOL, (key, r)
        assert r["grad_norm"] <= TOL, r  # relative: the norm counts each expert and dense param once
        assert r["bias"] == 0.0, r
        if zero == 0:
            assert r["grad"] <= TOL, r


def test_all_tokens_to_one_ranks_experts(tmp_path):
    """Skew: every token routes to experts 0 and 1 (both on rank 0). No deadlock, nothing dropped
    (the worker asserts per-expert counts equal the reference's), results still equal."""
    ranks = run_worker(tmp_path, 2, 2, 0, "skew")
    for r in ranks:
        assert r["routed_to_experts_0_1"] == 1.0
        for key in ("logits", "loss", "params", "grad"):
            assert r[key] <= TOL, (key, r)


@pytest.mark.parametrize("zero", [0, 2])
def test_expert_parallel_with_activation_checkpointing(tmp_path, zero):
    """EP=2 with every block recomputed in backward, which repeats its all-to-alls there (under
    ZeRO-2 between the gradient reductions): every difference from the single-process reference
    is the one the same run without checkpointing has, to the last bit."""
    plain = run_worker(tmp_path, 2, 2, zero)
    ranks = run_worker(tmp_path, 2, 2, zero, "checkpointing")
    for r, p in zip(ranks, plain):
        assert r.pop("checkpointed") == {"DecoderLayer": 2 * 5, "MTPModule": 5}  # 2 layers + 1 MTP depth, 5 steps
        assert p.pop("checkpointed") == {}
        assert r == p


@pytest.mark.parametrize("nproc,ep,zero", [(2, 2, 0), (4, 2, 2)])
def test_te_experts_under_expert_parallelism(tmp_path, nproc, ep, zero):
    """fp8.backend=te with expert parallelism: each shard's local experts run in TE's
    GroupedLinear behind the shard's all-to-all. TE is played by fp32 stand-ins
    (tests/fake_te.py), so the single-process reference's tolerances hold; the checkpoint holds
    the stacked expert tensors a plain model has (so it resumes at any precision and exports),
    equal to the reference's, and loads back into the TE modules exactly."""
    ranks = run_worker(tmp_path, nproc, ep, zero, "fake_te")
    for r in ranks:
        assert r["te_modules"] == ["GroupedLinearExpertParallelExperts", "RowAlignedFakeTELinear"], r
        assert r["te_forwards_outside_fp8_autocast"] == 0, r
        for key in ("logits", "loss", "params", "saved"):
            assert r[key] <= TOL, (key, r)
        assert r["grad_norm"] <= TOL, r
        assert r["saved_keys_match"], r
        assert r["loaded"] == r["params"], r  # back to exactly the trained values
        if zero == 0:
            assert r["grad"] <= TOL, r


def test_te_with_activation_checkpointing_recomputes_inside_fp8_autocast(tmp_path):
    """Under TE each checkpointed block's recompute in backward runs inside fp8_autocast again
    (parallel/fp8.py _checkpoint_contexts); with TE's stand-ins every difference from the
    single-process reference is the one the same run without checkpointing has."""
    plain = run_worker(tmp_path, 2, 2, 2, "fake_te")
    ranks = run_worker(tmp_path, 2, 2, 2, "fake_te", "checkpointing")
    for r, p in zip(ranks, plain):
        assert r.pop("checkpointed") == {"DecoderLayer": 2 * 5, "MTPModule": 5}
        assert p.pop("checkpointed") == {}
        assert r["te_forwards_outside_fp8_autocast"] == 0, r
        assert r == p
