"""Training throughput of our DeepSeekV3 against HF transformers' DeepseekV3ForCausalLM on CPU.

Same model config, batch and sequence length; weights identical (model.hf.save_pretrained, then
transformers' from_pretrained); the same random token batches; torch's fused AdamW (what
`dsv3 train` uses, and HF Trainer's default `adamw_torch_fused` on torch >= 2.8) with the same
hyperparameters (smoke.yaml's optim: lr, betas, eps, weight decay on every parameter) and
gradient clipping at 1.0 for all. MTP is off for ours (num_nextn_predict_layers=0): HF has none,
so both compute the same thing. HF runs twice: with its default attention implementation
(reported) and with attn_implementation="sdpa". Steps alternate between the models inside each
round, so load from other processes on the machine hits all of them alike; the ratio is taken
per round and the median reported. First-step losses must agree within 1e-4 (asserted).

    python benchmarks/vs_hf.py [--rounds 5] [--warmup 2] [--threads 2] [--out runs/vs_hf.json]

MFU: train.metrics.flops_per_token · tokens/s over a fp32 matmul peak measured in this process
with the same thread count (train.metrics.peak_flops on CPU).

Page faults: each model's minor page faults per step (median) are reported too. glibc returns
large freed blocks to the OS, and a step that allocates fresh tensors pays a fault per 4 KiB page
touched; HF's step takes tens of thousands, ours next to none (it reuses its buffers).
--keep-freed-memory tells glibc to keep freed memory for reuse (mallopt: every block from the heap,
none from a fresh mmap, and no trimming) for the whole process, so that no model pays those
faults: the ratio is then of the computation alone.
"""

from __future__ import annotations

import argparse
import json
import ctypes
import logging
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import DeepSeekV3, hf  # noqa: E402
from train.config import load_config  # noqa: E402
from train.metrics import _measure_matmul_flops, flops_per_token  # noqa: E402

CONFIGS = {
    "smoke": [],
    "smoke-64e": ["model.n_routed_experts=64", "model.n_group=8", "model.topk_group=4",
                  "model.num_experts_per_tok=6", "model.moe_intermediate_size=64"],
}


def _optimizer(model, o):
    return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                             weight_decay=o.weight_decay, fused=True)


def _step(kind, model, opt, tokens, targets) -> float:
    opt.zero_grad(set_to_none=True)
    if kind == "ours":
        loss = model(tokens, targets).loss
    else:  # HF's own causal-LM loss; shift_labels: targets are already the next tokens
        loss = model(input_ids=tokens, labels=targets, shift_labels=targets).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def keep_freed_memory() -> None:
    """glibc: serve every block from the heap (never a fresh mmap) and never trim the heap."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    if not (libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_mmap_max, 0)):
        raise RuntimeError("mallopt refused the settings")


def compare(name: str, overrides: list[str], rounds: int, warmup: int, log) -> dict:
    import transformers

    cfg = load_config("configs/smoke.yaml", ["model.num_nextn_predict_layers=0", *overrides])
    mcfg, batch, seq = cfg.model, cfg.train.global_batch_size, cfg.data.seq_len
    torch.manual_seed(cfg.train.seed)
    ours = DeepSeekV3(mcfg).train()
    models = {"ours": ours}
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(ours, tmp)
        default = transformers.AutoModelForCausalLM.from_pretrained(tmp).train()
        sdpa = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa").train()
    default_attn = default.config._attn_implementation
    models["hf_default"], models["hf_sdpa"] = default, sdpa
    opts = {k: _optimizer(m, cfg.optim) for k, m in models.items()}

    gen = torch.Generator().manual_seed(0)
    n_batches = warmup + rounds
    data = [torch.randint(0, mcfg.vocab_size, (batch, seq + 1), generator=gen) for _ in range(n_batches)]

    first_loss, times, faults = {}, {k: [] for k in models}, {k: [] for k in models}
    for i, x in enumerate(data):
        tokens, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
        for k, m in models.items():
            f0 = _minor_faults()
            t0 = time.perf_counter()
            loss = _step("ours" if k == "ours" else "hf", m, opts[k], tokens, targets)
            dt = time.perf_counter() - t0
            if i == 0:
                first_loss[k] = loss
            if i >= warmup:
                times[k].append(dt)
                faults[k].append(_minor_faults() - f0)
        log(f"{name} step {i}: " + " ".join(f"{k} {times[k][-1] if i >= warmup else float('nan'):.3f}s"
                                             for k in models))
    for k in ("hf_default", "hf_sdpa"):
        assert abs(first_loss[k] - first_loss["ours"]) < 1e-4, (name, k, first_loss)

    tokens_per_step = batch * seq
    fpt = flops_per_token(mcfg, seq)
    out = {"config": name, "overrides": overrides, "batch": batch, "seq_len": seq,
           "hf_default_attn_implementation": default_attn, "flops_per_token": fpt,
           "first_step_loss": first_loss, "median_step_time_s": {}, "tokens_per_s": {}, "ratio_vs": {},
           "median_page_faults_per_step": {}}
    for k in models:
        out["median_step_time_s"][k] = statistics.median(times[k])
        out["median_page_faults_per_step"][k] = statistics.median(faults[k])
        out["tokens_per_s"][k] = tokens_per_step / out["median_step_time_s"][k]
    for k in ("hf_default", "hf_sdpa"):  # per-round ratios, median
        out["ratio_vs"][k] = statistics.median(h / o for h, o in zip(times[k], times["ours"]))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2: this machine's cores)")
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc keeps freed memory for reuse: no model pays page faults (computation only)")
    p.add_argument("--out", default="runs/vs_hf.json")
    args = p.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    def log(m):
        print(m, file=sys.stderr, flush=True)

    peak_before = _measure_matmul_flops.__wrapped__(torch.device("cpu"), torch.float32)
    results = [compare(n, CONFIGS[n], args.rounds, args.warmup, log) for n in args.configs]
    peak_after = _measure_matmul_flops.__wrapped__(torch.device("cpu"), torch.float32)
    peak = max(peak_before, peak_after)
    for r in results:
        r["mfu"] = {k: r["flops_per_token"] * v / peak for k, v in r["tokens_per_s"].items()}
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "keep_freed_memory": args.keep_freed_memory,
              "transformers": __import__("transformers").__version__,
              "cpu_matmul_peak_flops": peak, "cpu_matmul_peak_measurements": [peak_before, peak_after],
              "results": results}

    print(f"{torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(measured {peak_before / 1e9:.1f} before, {peak_after / 1e9:.1f} after)")
    print(f"{'config':<10} {'model':<24} {'tokens/s':>9} {'MFU':>7} {'ours/this':>9} {'first loss':>11} "
          f"{'faults/step':>11}")
    for r in results:
        for k in ("ours", "hf_default", "hf_sdpa"):
            label = {"ours": "ours", "hf_default": f"HF default ({r['hf_default_attn_implementation']})",
                     "hf_sdpa": "HF sdpa"}[k]
            ratio = f"{r['ratio_vs'][k]:.2f}x" if k != "ours" else ""
            print(f"{r['config']:<10} {label:<24} {r['tokens_per_s'][k]:9.0f} {r['mfu'][k] * 100:6.2f}% "
                  f"{ratio:>9} {r['first_step_loss'][k]:11.6f} {r['median_page_faults_per_step'][k]:11.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
