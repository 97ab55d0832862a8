"""Training metrics: the FLOP convention, MFU inputs, expert-load balance, metrics.jsonl and W&B.

FLOP convention (DESIGN.md "Contracts"), training = forward + backward, per token:

    flops_per_token = 6·N + 3·L·H·(qk_head_dim + v_head_dim)·S

* N: activated parameters other than the input embedding (a lookup, not a matmul). Routed
  experts count top-k of n; the router, shared experts, norms and the output head count in
  full. The MTP modules are included: each one's eh_proj, norms and transformer block (its
  routed experts again top-k of n), plus one more output-head matmul per MTP depth, because
  every depth runs the shared head on its own hidden states (the head's weights exist once,
  its FLOPs happen 1 + D times).
* 6 = 2 (multiply-add) × 3 (forward, plus input and weight gradients in backward).
* L: attention layers, MTP blocks included; H: heads; S: sequence length. Scores (QKᵀ) and the
  weighted sum (PV) cost 2·S·(qk_head_dim + v_head_dim) per head and token in the forward for
  the full matrix; ×3 for backward and ×½ for the causal mask give the 3.
* Simplifications: MTP depth k sees S−k positions, not S (off by k/S); elementwise work
  (norms, RoPE, SwiGLU, softmax, loss) is not counted; FlashAttention's backward recompute of
  the scores is not counted (it is work the hardware does, not work the model needs).

MFU = tokens_per_s (global) · flops_per_token / (peak_flops per device · world size).

metrics.jsonl (one JSON object per line, rank 0 only) always carries every documented key;
a value that does not apply, and a non-finite float (NaN/inf loss), is written as null, so
each column is a number or null and the file is strict JSON. W&B receives the same row with
the raw floats (it shows NaN as NaN).
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from model import DeepSeekV3, ModelConfig
from train.config import Config

# Documented metrics.jsonl keys in file order; `expert_load_maxvio/layer_N` keys (one per MoE
# layer of the config) go between expert_load_maxvio and val_loss.
BASE_KEYS = (
    "step", "loss", "lm_loss", "mtp_loss", "lr", "batch_size", "grad_norm", "tokens_per_s", "mfu",
    "peak_mem_bytes", "skipped_steps", "bad_shards", "expert_load_maxvio",
)
EVAL_KEYS = ("val_loss",)
MAXVIO_KEY = "expert_load_maxvio"
HEATMAP_KEY = "expert_load/heatmap"
WANDB_ID_FILE = "wandb_id.txt"
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------------------------
# FLOPs


@functools.lru_cache(maxsize=None)
def _active_params(config_json: str) -> dict[str, int]:
    """Parameter counts of a meta-device model; keyed by the config's JSON (ModelConfig is unhashable)."""
    cfg = ModelConfig.from_dict(json.loads(config_json))
    # Meta tensors have shapes but no storage: the 671B model builds in about a second.
    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    counts = model.parameter_counts()
    mtp_active = 0
    for name, p in model.mtp.named_parameters():
        n = p.numel()
        if ".mlp.experts." in name:
            # Stacked expert weights hold all n experts; a token passes through top-k of them.
            n = n * cfg.num_experts_per_tok // cfg.n_routed_experts
        mtp_active += n
    return {
        "total": counts["total"],
        "active": counts["active"],
        "mtp_total": counts["mtp"],
        "mtp_active": mtp_active,
        "head": model.lm_head.weight.numel(),
    }


def flops_breakdown(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """The parts of `flops_per_token` (see the module docstring), per token, forward + backward.

    Keys: params_active_main (main model's N, head included), params_active_mtp (MTP modules'
    eh_proj, norms and blocks, routed experts top-k of n), params_mtp_head (the output head once
    per MTP depth), n_active (their sum: N), attention_layers (L), matmul_flops (6·N),
    attention_flops (3·L·H·(qk_head_dim + v_head_dim)·S), flops_per_token (the total).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len}: must be positive")
    p = _active_params(json.dumps(cfg.to_dict(), sort_keys=True))
    depth = cfg.num_nextn_predict_layers
    mtp_head = depth * p["head"]
    n_active = p["active"] + p["mtp_active"] + mtp_head
    layers = cfg.num_hidden_layers + depth
    attention = 3 * layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return {
        "params_active_main": float(p["active"]),
        "params_active_mtp": float(p["mtp_active"]),
        "params_mtp_head": float(mtp_head),
        "n_active": float(n_active),
        "attention_layers": float(layers),
        "matmul_flops": 6.0 * n_active,
        "attention_flops": float(attention),
        "flops_per_token": 6.0 * n_active + attention,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 3·L·H·(qk_head_dim + v_head_dim)·S (module docstring).

    N counts the activated parameters without the input embedding, with the output head and
    the MTP modules, and the output head once more per MTP depth (each depth computes its own
    logits with the shared head). L includes the MTP blocks; the 3 (not 6) takes the causal half
    of attention. Computed from a meta-device model, cached per config.
    """
    return flops_breakdown(cfg, seq_len)["flops_per_token"]


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops_per_device: float, world_size: int) -> float:
    """Model FLOPs utilisation, a fraction: achieved model FLOP/s over the peak of all devices."""
    return tokens_per_s * flops_per_tok / (peak_flops_per_device * world_size)


# ----------------------------------------------------------------------------------------------
# Device peak

# Dense (no sparsity) tensor-core peaks per GPU, bf16/fp16 and fp8, from the vendor data sheets.
# Matched by substring of torch.cuda.get_device_name, first match wins: specific names first.
_GPU_PEAKS: tuple[tuple[str, float, float | None], ...] = (
    ("H100 PCIe", 756e12, 1513e12),
    ("H100", 989e12, 1979e12),  # SXM
    ("H200", 989e12, 1979e12),
    ("H800", 989e12, 1979e12),
    ("A100", 312e12, None),  # Ampere has no FP8 tensor cores
    ("A800", 312e12, None),
)
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def gpu_table_peak(name: str, dtype: torch.dtype) -> tuple[float, str] | None:
    """Look a GPU name up in the peak table; None when it is not listed.

    bf16/fp16 use the dense bf16 peak, fp8 dtypes the fp8 peak (twice bf16; bf16 where the GPU
    has no fp8), float32 the TF32 tensor-core peak (half of bf16), the fastest fp32 matmul path.
    """
    for key, bf16, fp8 in _GPU_PEAKS:
        if key in name:
            if dtype in _FP8_DTYPES:
                if fp8 is None:
                    return bf16, f"table {key} bf16 (no fp8 on this GPU)"
                return fp8, f"table {key} fp8"
            if dtype == torch.float32:
                return bf16 / 2, f"table {key} tf32"
            return bf16, f"table {key} bf16"
    return None


@functools.lru_cache(maxsize=None)
def _measure_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of a square matmul on `device`, after warm-up (first calls allocate and pick kernels)."""
    size = 1536 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        a @ b
    sync()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_memory(device: torch.device) -> int:
    """Peak bytes: the CUDA allocator's peak since its last reset on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float | None) -> tuple[float, str]:
    """Per-device dense peak FLOP/s for MFU, and where the number came from.

    Order: `override_tflops` (logging.peak_tflops) when given; the GPU table by device name;
    otherwise a measurement, cached per device and dtype: on CPU the best of a few fp32
    1536×1536 matmuls (whatever dtype the model uses, as the CPU path trains in fp32), on an
    unlisted GPU the best bf16 (or float32) 8192² matmul. A measured peak is what the process
    can get from one large GEMM with its current thread count, so CPU MFU reads against that.
    """
    device = torch.device(device)
    if override_tflops is not None:
        if override_tflops <= 0:
            raise ValueError(f"override_tflops={override_tflops}: must be positive")
        return override_tflops * 1e12, "override"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        device = torch.device("cuda", index)
        name = torch.cuda.get_device_name(device)
        found = gpu_table_peak(name, dtype)
        if found is not None:
            return found
        measure_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
        return _measure_matmul_flops(device, measure_dtype), f"measured cuda matmul ({name})"
    if device.type == "cpu":
        return _measure_matmul_flops(torch.device("cpu"), torch.float32), "measured cpu matmul"
    return _measure_matmul_flops(device, dtype), f"measured {device.type} matmul"



def run_peak_flops(cfg: Config, device: torch.device) -> tuple[float, str]:
    """peak_flops for a run: at the dtype its GEMMs run in (fp8 runs read against the bf16 peak,
    the usual convention), or logging.peak_tflops when set."""
    compute_dtype = torch.float32 if cfg.model.precision == "fp32" else torch.bfloat16
    return peak_flops(device, compute_dtype, cfg.logging.peak_tflops)


# ----------------------------------------------------------------------------------------------
# Expert load


def expert_load_maxvio(counts: torch.Tensor) -> tuple[float | None, list[float | None]]:
    """MaxVio of the expert load (report §2.1.2 / Wang et al. 2024): per layer max_i c_i / mean(c) − 1.

    counts: (n_moe_layers, n_routed_experts) tokens routed per expert, summed over the step.
    Returns (mean over layers, per-layer values). 0 is a perfect balance; 1 means the busiest
    expert got twice the average. A layer that saw no tokens has no defined MaxVio: None,
    and it is left out of the mean. No MoE layers: (None, []).
    """
    if counts.dim() != 2:
        raise ValueError(f"counts must be (n_moe_layers, n_routed_experts), got shape {tuple(counts.shape)}")
    if counts.shape[0] == 0 or counts.shape[1] == 0:
        return None, []
    c = counts.detach().to("cpu", torch.float64)
    mean = c.mean(dim=1)
    per_layer: list[float | None] = []
    for layer_max, layer_mean in zip(c.max(dim=1).values.tolist(), mean.tolist()):
        per_layer.append(layer_max / layer_mean - 1.0 if layer_mean > 0 else None)
    defined = [v for v in per_layer if v is not None]
    return (sum(defined) / len(defined) if defined else None), per_layer


def layer_key(layer_id: int) -> str:
    return f"{MAXVIO_KEY}/layer_{layer_id}"


def expert_load_metrics(counts: torch.Tensor, layer_ids: list[int]) -> dict[str, float | None]:
    """The expert-load columns of a metrics row from a step's counts; layer_ids = ModelConfig.moe_layer_ids."""
    if counts.dim() != 2 or counts.shape[0] != len(layer_ids):
        raise ValueError(
            f"counts shape {tuple(counts.shape)} does not match {len(layer_ids)} MoE layers {layer_ids}"
        )
    mean, per_layer = expert_load_maxvio(counts)
    row: dict[str, float | None] = {MAXVIO_KEY: mean}
    row.update({layer_key(i): v for i, v in zip(layer_ids, per_layer)})
    return row


def metric_keys(cfg: ModelConfig) -> tuple[str, ...]:
    """Every key of a metrics.jsonl row for this model, in file order."""
    return BASE_KEYS + tuple(layer_key(i) for i in cfg.moe_layer_ids) + EVAL_KEYS


# ----------------------------------------------------------------------------------------------
# metrics.jsonl + W&B


def _scalar(key: str, value: Any) -> float | int | None:
    """A metric value as a Python number (tensors and numpy scalars included), None kept."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {key}: expected a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool):  # bool is an int subclass; a flag in a numeric column is a bug
        raise TypeError(f"metric {key}={value!r}: expected a number or None")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"metric {key}={value!r}: expected a number or None")


def _json_safe(value: float | int | None) -> float | int | None:
    """Non-finite floats become null: strict JSON has no NaN/Infinity, and a string would make
    the column mixed-type for readers such as pandas."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Writes metrics.jsonl and, when enabled, the same rows to Weights & Biases. Rank 0 only.

    `resume=False` starts metrics.jsonl empty and a new W&B run; `resume=True` appends and
    continues the W&B run whose id is in RUN_DIR/wandb_id.txt (a restarted or requeued job).
    After resuming from a checkpoint at step s, call `truncate_after(s)` before logging so rows
    the crashed run wrote after its last checkpoint do not appear twice. W&B keeps steps it
    already has (it drops re-logged, non-increasing steps with a warning).

    W&B is best effort: if wandb.init or run.log raises, one warning goes to stderr, W&B is
    switched off for this logger and metrics.jsonl goes on. W&B prints nothing on stdout
    (WANDB_SILENT, silent settings, console capture off), so stdout stays clean for --json.
    """

    def __init__(self, run_dir: Path, cfg: Config, rank: int, resume: bool):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.rank = rank
        self.enabled = rank == 0
        self.layer_ids = cfg.model.moe_layer_ids
        self.keys = metric_keys(cfg.model)
        self._key_set = frozenset(self.keys) - {"step"}
        self.path = self.run_dir / METRICS_FILE
        self._file = None
        self._wandb_run = None
        self._wandb_warned = False
        self.wandb_id: str | None = None
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            # A fresh run in a used directory: stale rows from the earlier run must not mix in.
            self.path.write_text("")
        self._file = self.path.open("a")
        if cfg.logging.wandb != "disabled":
            self._init_wandb(resume)

    # ---- W&B ------------------------------------------------------------------------------
    def _wandb_run_id(self, resume: bool) -> str:
        """The persisted run id when resuming, else a new one; written before init so a job that
        dies during init still continues the same run when it is requeued."""
        id_file = self.run_dir / WANDB_ID_FILE
        if resume and id_file.is_file():
            stored = id_file.read_text().strip()
            if stored:
                return stored
        run_id = uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n")
        return run_id

    def _init_wandb(self, resume: bool) -> None:
        # Set before wandb is imported and before its service starts: banners go nowhere.
        os.environ["WANDB_SILENT"] = "true"
        self.wandb_id = self._wandb_run_id(resume)
        try:
            import wandb

            self._wandb_run = wandb.init(
                project=self.cfg.logging.project,
                dir=str(self.run_dir),
                mode=self.cfg.logging.wandb,
                config=self.cfg.to_dict(),
                id=self.wandb_id,
                resume="allow",
                # console="off": wandb would otherwise patch sys.stdout/stderr of the process to
                # copy them into the run; SLURM and launcher logs already keep them.
                settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as err:  # any W&B failure (network, auth, service) must not stop training
            self._wandb_failed("init", err)

    def _wandb_failed(self, what: str, err: Exception) -> None:
        self._wandb_run = None
        if not self._wandb_warned:
            self._wandb_warned = True
            print(
                f"warning: W&B {what} failed ({type(err).__name__}: {err}); W&B logging is off for this run, "
                f"metrics still go to {self.path}",
                file=sys.stderr,
                flush=True,
            )

    def _heatmap(self, counts: torch.Tensor):
        """Layer × expert load as a long-format wandb.Table (layer, expert, tokens, load = c/mean(c)).

        A Table needs no extra package (wandb.Image would need pillow); W&B's table view and
        custom charts (e.g. a Vega-Lite heatmap over layer × expert) plot it.
        """
        import wandb

        c = counts.detach().to("cpu", torch.float64)
        mean = c.mean(dim=1, keepdim=True)
        ratio = torch.where(mean > 0, c / mean.clamp_min(1e-12), torch.zeros_like(c))
        rows = [
            [layer_id, expert, int(c[row, expert].item()), float(ratio[row, expert].item())]
            for row, layer_id in enumerate(self.layer_ids)
            for expert in range(c.shape[1])
        ]
        return wandb.Table(columns=["layer", "expert", "tokens", "load"], data=rows)

    def _wandb_log(self, step: int, row: dict[str, float | int | None], counts: torch.Tensor | None) -> None:
        if self._wandb_run is None:
            return
        try:
            data: dict[str, Any] = {k: v for k, v in row.items() if k != "step" and v is not None}
            interval = self.cfg.logging.heatmap_interval
            if counts is not None and counts.shape[0] > 0 and interval > 0 and step % interval == 0:
                data[HEATMAP_KEY] = self._heatmap(counts)
            self._wandb_run.log(data, step=step)
        except Exception as err:  # an outage mid-run must not stop training either
            self._wandb_failed("log", err)

    # ---- rows ------------------------------------------------------------------------------
    def log(self, step: int, *, expert_counts: torch.Tensor | None = None, **values: Any) -> dict[str, Any] | None:
        """Append one row: every documented key, null where not given. Returns the row as written
        (None on ranks other than 0).

        expert_counts: the step's (n_moe_layers, n_routed_experts) counts; fills the
        expert_load_maxvio keys and, every logging.heatmap_interval steps, the W&B heatmap.
        Keys outside the documented set raise ValueError (typos must not create columns),
        checked on every rank so a typo fails the same way everywhere.
        """
        unknown = sorted(set(values) - self._key_set)
        if unknown:
            raise ValueError(f"unknown metric key(s) {unknown}; allowed: {', '.join(self.keys)}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r}: must be a non-negative int (optimizer steps)")
        if not self.enabled:
            return None
        given = {k: _scalar(k, v) for k, v in values.items()}
        if expert_counts is not None:
            load = expert_load_metrics(expert_counts, self.layer_ids)
            clash = sorted(load.keys() & given.keys())
            if clash:
                raise ValueError(f"{clash} given both directly and through expert_counts")
            given.update(load)
        row: dict[str, float | int | None] = dict.fromkeys(self.keys)
        row["step"] = step
        row.update(given)
        json_row = {k: _json_safe(v) for k, v in row.items()}
        # allow_nan=False: anything non-finite that slipped past _json_safe fails loudly here
        # instead of writing NaN, which strict JSON readers reject.
        self._file.write(json.dumps(json_row, allow_nan=False) + "\n")
        self._file.flush()
        self._wandb_log(step, row, expert_counts)
        return json_row

    def truncate_after(self, step: int) -> int:
        """Drop metrics.jsonl rows with step > `step` (resuming from a checkpoint at `step`).

        A torn last line (the job died mid-write) is dropped too. Returns the rows removed.
        """
        if not self.enabled:
            return 0
        self._file.close()
        kept, removed = [], 0
        for line in self.path.read_text().splitlines():
            try:
                row_step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                removed += 1
                continue
            if row_step > step:
                removed += 1
            else:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)  # atomic: a crash here leaves the old or the new file, never half
        self._file = self.path.open("a")
        return removed

    def close(self, exit_code: int = 0) -> None:
        """Close metrics.jsonl and finish the W&B run with `exit_code` (non-zero: W&B shows it
        failed) (idempotent).

        finish() hands the run to wandb's service process, which completes the offline
        `wandb/offline-run-*/run-ID.wandb` file shortly after (at the latest at process exit).
        """
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            try:
                run.finish(exit_code=exit_code)
            except Exception as err:  # a failed upload at exit must not turn a finished run into a failure
                self._wandb_failed("finish", err)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Startup line


def human(n: float) -> str:
    """1234567 -> '1.23M' (three significant digits, K/M/B/T)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def startup_summary(cfg: Config, world_size: int) -> str:
    """One line for the start of a run. Parameter counts are the whole model's, from the config (a
    rank's own model holds only its expert shard under expert parallelism)."""
    p = _active_params(json.dumps(cfg.model.to_dict(), sort_keys=True))
    counts = {"total": p["total"], "active": p["active"], "mtp": p["mtp_total"]}
    t = cfg.train
    per_pass = t.micro_batch_size * world_size
    accum = t.global_batch_size // per_pass if per_pass else 0
    tokens = t.global_batch_size * cfg.data.seq_len
    fp8_weights = " on bf16 weights" if cfg.model.precision == "fp8" and cfg.bf16_weights else ""
    ramp = ""
    if cfg.schedule.batch_ramp_start is not None:
        ramp = f", ramp from {cfg.schedule.batch_ramp_start} seq over {cfg.schedule.batch_ramp_steps} steps"
    return (
        f"params {human(counts['total'])} total, {human(counts['active'])} active/token, "
        f"+{human(counts['mtp'])} MTP | "
        f"{human(tokens)} tokens/step ({t.global_batch_size} seq × {cfg.data.seq_len}{ramp}) | "
        f"world {world_size}, ep {cfg.parallel.ep}, zero {cfg.parallel.zero_stage}, "
        f"micro {t.micro_batch_size} × accum {accum} × world {world_size} = global {t.global_batch_size} | "
        f"precision {cfg.model.precision}{fp8_weights}"
    )


__all__ = [
    "flops_per_token", "flops_breakdown", "mfu", "peak_flops", "gpu_table_peak", "expert_load_maxvio",
    "expert_load_metrics", "metric_keys", "MetricsLogger", "startup_summary", "human",
]
