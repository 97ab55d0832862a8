"""One rank of an expert-parallel equivalence check (run under torchrun by test_expert_parallel.py).

Every rank builds the same seeded model twice: a plain single-process reference, trained with
torch's AdamW and clip_grad_norm_ on the whole global batch, and the real thing — built on the
meta device, experts sharded by parallel/ so the rank materialises only its own, wrapped by the
DeepSpeed engine — fed this rank's share of the batch.
It writes the largest differences it sees (logits, loss, gradients, grad norm, parameters and
routing biases after 5 optimizer steps) to OUT/rank{r}.json for the test to judge. With
`checkpointing` the real thing runs with train.activation_checkpointing (the reference without).
With `fake_te` it runs with fp8.backend=te, TE played by tests/fake_te.py's fp32 stand-ins (so the
reference's numbers still hold): the TE modules' wiring under expert parallelism and ZeRO. It then
also saves a checkpoint, compares it with the reference, overwrites every parameter and loads
the checkpoint back.

    python -m torch.distributed.run --nproc_per_node 4 tests/distributed/ep_worker.py OUT EP ZERO [skew] [checkpointing] [fake_te]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import model.transformer as transformer
from model import DeepSeekV3
from parallel import engine as pe
from parallel import fp8 as pf8
from tests.support import TINY
from train import checkpoint as ckpt_io
from train.checkpoint import _stacked, _zero_partitioned, checkpoint_tensors
from train.config import load_config

STEPS = 5
LR = 1e-3


def _full_master(engine, p: torch.nn.Parameter) -> torch.Tensor:
    """p's fp32 master, whole, as DeepSpeed itself reads it (an all-reduce under ZeRO)."""
    if _zero_partitioned(engine):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p).detach().float()
    return p.detach().float()


def main(out: Path, ep: int, zero: int, skew: bool, checkpointing: bool, fake_te: bool) -> None:
    info = pe.init_distributed("cpu", 120)
    rank, world = info.rank, info.world_size
    global_batch = 8
    te_overrides = ["model.precision=fp8", "fp8.backend=te", "fp8.recipe=current"] if fake_te else []
    if fake_te:
        from tests import fake_te as fake

        fake.install()
    cfg = load_config("configs/smoke.yaml", TINY + [
        f"parallel.ep={ep}", f"parallel.zero_stage={zero}", f"train.global_batch_size={global_batch}",
        f"train.micro_batch_size={global_batch // world}", f"optim.lr={LR}", "optim.weight_decay=0.1",
        "optim.grad_clip=0.05",  # small enough that clipping is active, so the norm matters
        f"train.activation_checkpointing={checkpointing}", *te_overrides,
    ])
    checkpointed = []  # the blocks the engine's forwards ran under torch's checkpoint, by class name
    real_checkpoint = transformer.checkpoint

    def counting_checkpoint(fn, *args, **kwargs):
        checkpointed.append(type(fn).__name__)
        return real_checkpoint(fn, *args, **kwargs)

    transformer.checkpoint = counting_checkpoint
    torch.manual_seed(0)
    ref = DeepSeekV3(cfg.model)
    ref_opt = torch.optim.AdamW(pe.param_groups(ref, 0.1), lr=LR, betas=(0.9, 0.95), eps=1e-8, fused=True)
    # the real thing is built as training builds it: on the meta device, each rank then
    # materialising only its experts; the same seed must give the reference's values
    torch.manual_seed(0)
    with torch.device("meta"):
        model = DeepSeekV3(cfg.model)
    engine, layout = pe.build_engine(model, cfg, info)
    if skew:  # every token picks experts 0 and 1, which live on rank 0 of each EP group
        for moe in [*ref.moe_layers(), *engine.module.moe_layers()]:
            moe.gate.e_score_correction_bias[:2] = 10.0
    for group in engine.optimizer.param_groups:
        group["lr"] = LR
    first, last = layout.expert_range
    per_rank = global_batch // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)

    def expert_slice(name: str, t: torch.Tensor) -> torch.Tensor:
        return t[first:last] if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else t

    diffs: dict[str, float] = {}

    def note(key: str, value: float) -> None:
        diffs[key] = max(diffs.get(key, 0.0), float(value))

    gen = torch.Generator().manual_seed(1)
    routed_to_rank0 = 0.0
    for step in range(STEPS):
        seq = torch.randint(0, cfg.model.vocab_size, (global_batch, cfg.data.seq_len + 1), generator=gen)
        tokens, targets = seq[:, :-1], seq[:, 1:]
        # reference: whole batch, one process
        ref_out = ref(tokens, targets, return_logits=True)
        ref_opt.zero_grad()
        ref_out.loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}  # before clipping
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.optim.grad_clip).item()
        ref_opt.step()
        ref.update_routing_bias(ref_out.expert_counts, 1e-3)

        # expert-parallel: this rank's share
        with pf8.autocast(engine.module, first_microbatch=True):  # as train/loop.py runs a forward
            res = engine(tokens[mine], targets[mine], return_logits=True)
        note("logits", (res.logits - ref_out.logits[mine]).abs().max())
        if step == 0:
            note("logits_step0", (res.logits - ref_out.logits[mine]).abs().max())
        loss = res.loss.detach().clone()
        dist.all_reduce(loss)
        note("loss", abs(loss.item() / world - ref_out.loss.item()))
        engine.backward(res.loss)
        if zero == 0:  # unpartitioned: the reduced gradients sit in .grad before the step
            for name, params, stacked in checkpoint_tensors(engine.module):
                grad = _stacked([p.grad for p in params], stacked)
                note("grad", (grad - expert_slice(name, ref_grads[name])).abs().max())
        engine.step()
        note("grad_norm", abs(engine.get_global_grad_norm() - ref_norm) / ref_norm)
        counts = res.expert_counts.detach().clone()
        dist.all_reduce(counts)
        torch.testing.assert_close(counts, ref_out.expert_counts, rtol=0, atol=0)  # no token dropped
        engine.module.update_routing_bias(counts, 1e-3)
        routed_to_rank0 = counts[:, :2].sum().item() / counts.sum().item()

    def compare_params(key: str) -> None:
        for name, params, stacked in checkpoint_tensors(engine.module):
            expected = expert_slice(name, dict(ref.named_parameters())[name].detach())
            note(key, (_stacked([_full_master(engine, p).cpu() for p in params], stacked) - expected).abs().max())

    compare_params("params")
    if fake_te:
        diffs["te_forwards_outside_fp8_autocast"] = fake.AUTOCAST["outside"]
        diffs["te_modules"] = sorted({type(m).__name__ for m in engine.module.modules()
                                      if type(m).__name__.startswith(("GroupedLinear", "RowAligned"))})
        ckpt = ckpt_io.save(engine, layout, out / "run", STEPS, {"step": STEPS}, cfg.model, keep=1, rank=rank)
        saved = ckpt_io.load_model_weights(ckpt)
        diffs["saved_keys_match"] = sorted(saved) == sorted(ref.state_dict())
        for name, value in ref.named_parameters():
            note("saved", (saved[name] - value.detach()).abs().max())
        with torch.no_grad():  # overwrite every weight and fp32 master, then load them back
            for _, params, _ in checkpoint_tensors(engine.module):
                for p in params:
                    p.fill_(7.0)
                    if _zero_partitioned(engine):
                        from deepspeed.utils import safe_set_full_fp32_param

                        safe_set_full_fp32_param(p, torch.full_like(p, 7.0))
        ckpt_io.load_weights(engine, layout, ckpt)
        compare_params("loaded")
    for name, b in engine.module.named_buffers():
        if name.endswith("e_score_correction_bias"):
            note("bias", (b - dict(ref.named_buffers())[name]).abs().max())
    diffs["routed_to_experts_0_1"] = routed_to_rank0
    diffs["checkpointed"] = {name: checkpointed.count(name) for name in set(checkpointed)}
    diffs["expert_range"] = [first, last]
    (out / f"rank{rank}.json").write_text(json.dumps(diffs))
    dist.barrier()
    pe.shutdown_distributed()


if __name__ == "__main__":
    flags = sys.argv[4:]
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), "skew" in flags, "checkpointing" in flags,
         "fake_te" in flags)
