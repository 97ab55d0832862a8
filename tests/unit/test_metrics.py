"""train.metrics: the FLOP convention against torch's FLOP counter, MaxVio, metrics.jsonl rows,
and W&B offline runs read back from their .wandb files."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import DeepSeekV3
from train.config import load_config
from train.metrics import (
    HEATMAP_KEY,
    MetricsLogger,
    expert_load_maxvio,
    expert_load_metrics,
    flops_breakdown,
    flops_per_token,
    gpu_table_peak,
    human,
    metric_keys,
    peak_flops,
    startup_summary,
)

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"
aten = torch.ops.aten


def smoke_config(tmp_path: Path, *overrides: str):
    return load_config(SMOKE, [f"train.run_dir={tmp_path}", *overrides])


# ---------------------------------------------------------------------------------------------
# FLOPs


def test_flops_per_token_matches_flop_counter():
    """flops_per_token against torch's FlopCounterMode on the smoke model, forward + backward.

    What the counter counts: only ops with a registered formula. Here that is aten.mm (every
    nn.Linear / F.linear, and each expert's matmuls, since moe_impl=loop runs one F.linear per
    expert over the tokens it received) and aten.bmm (attention). On CPU the fused SDPA kernel
    has no formula, so the MATH backend is forced: QKᵀ and PV become plain bmm's over the
    full (non-causal, masked) T×T matrix, and their backward is two bmm's each, so the counter
    sees 6·B·H·T²·(qk_head_dim + v_head_dim) per attention layer. Elementwise work (norms,
    RoPE, softmax, SwiGLU, cross-entropy) is counted by neither side.

    Aligning conventions:
    * matmul part: counter mm == 6·N·tokens, where the MTP depth k runs its block and the
      output head on T−k positions, not T (the convention rounds that to T). The residual is
      N's norm weights, which are parameters but not matmuls.
    * attention part: the convention keeps the causal half, 3·L·H·(dq+dv)·S per token, so it
      is compared with half of the counter's bmm FLOPs (exactly, again with T−k for MTP).
    * total: counter mm + bmm/2 against flops_per_token(cfg, T)·B·T, within 5%.
    """
    cfg = dataclasses.replace(load_config(SMOKE).model, moe_impl="loop")
    batch, seq = 2, 64
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    data = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(data[:, :-1], data[:, 1:])
        out.loss.backward()
    counted = counter.get_flop_counts()["Global"]
    assert set(counted) <= {aten.mm, aten.addmm, aten.bmm}, f"unexpected counted ops {set(counted)}"
    matmul = counted.get(aten.mm, 0) + counted.get(aten.addmm, 0)
    attention_full = counted[aten.bmm]

    parts = flops_breakdown(cfg, seq)
    depth = cfg.num_nextn_predict_layers
    mtp_params_per_depth = (parts["params_active_mtp"] + parts["params_mtp_head"]) / depth
    mtp_tokens = sum(batch * (seq - k) for k in range(1, depth + 1))
    expected_matmul = 6 * (parts["params_active_main"] * batch * seq + mtp_params_per_depth * mtp_tokens)
    norm_params = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    assert abs(matmul / expected_matmul - 1) < 1e-2, (matmul, expected_matmul)
    # The whole residual is the norm weights (6 FLOPs each per token in N, none in the counter).
    assert abs(expected_matmul - matmul) <= 6 * norm_params * batch * seq

    heads, width = cfg.num_attention_heads, cfg.qk_head_dim + cfg.v_head_dim
    seq_squares = cfg.num_hidden_layers * seq**2 + sum((seq - k) ** 2 for k in range(1, depth + 1))
    expected_attention_causal = 3 * heads * width * batch * seq_squares
    assert attention_full / 2 == expected_attention_causal
    assert parts["attention_flops"] * batch * seq == 3 * heads * width * batch * seq**2 * (cfg.num_hidden_layers + depth)

    aligned_counter = matmul + attention_full / 2
    convention = flops_per_token(cfg, seq) * batch * seq
    ratio = aligned_counter / convention
    print(f"counter (mm + causal half of bmm) / flops_per_token·tokens = {ratio:.4f}")
    assert abs(ratio - 1) < 0.05


def test_flops_breakdown_parts_and_671b():
    cfg = load_config(ROOT / "configs" / "671b.yaml").model
    parts = flops_breakdown(cfg, 4096)
    assert parts["n_active"] == parts["params_active_main"] + parts["params_active_mtp"] + parts["params_mtp_head"]
    assert parts["flops_per_token"] == parts["matmul_flops"] + parts["attention_flops"]
    assert parts["attention_layers"] == 62
    # 37B active in the main model (report), ~0.7B more in the MTP module, head 7168·129280.
    assert 36e9 < parts["params_active_main"] < 38e9
    assert parts["params_mtp_head"] == 7168 * 129280
    # DESIGN.md: ≈250 GFLOP/token at 4K (that figure matches the main model alone; MTP adds ~4%).
    assert 245e9 < flops_per_token(cfg, 4096) < 270e9
    no_mtp = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    assert abs(flops_per_token(no_mtp, 4096) / 250e9 - 1) < 0.01


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s


def test_peak_flops_override_table_and_cpu_measurement():
    assert peak_flops(torch.device("cpu"), torch.bfloat16, 989.0) == (989e12, "override")
    assert gpu_table_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == (989e12, "table H100 bf16")
    assert gpu_table_peak("NVIDIA H100 PCIe", torch.bfloat16)[0] == 756e12
    assert gpu_table_peak("NVIDIA H200", torch.bfloat16)[0] == 989e12
    assert gpu_table_peak("NVIDIA H800", torch.float8_e4m3fn)[0] == 1979e12
    assert gpu_table_peak("NVIDIA A100-SXM4-80GB", torch.float8_e4m3fn)[0] == 312e12  # no FP8 on Ampere
    assert gpu_table_peak("NVIDIA A100-SXM4-80GB", torch.float32)[0] == 156e12  # TF32
    assert gpu_table_peak("NVIDIA GeForce RTX 4090", torch.bfloat16) is None
    rate, source = peak_flops(torch.device("cpu"), torch.float32, None)
    assert source == "measured cpu matmul"
    assert 1e8 < rate < 1e14
    assert peak_flops(torch.device("cpu"), torch.float32, None) == (rate, source)  # cached


# ---------------------------------------------------------------------------------------------
# Expert load


def test_expert_load_maxvio():
    counts = torch.tensor([[4, 4, 4, 4], [8, 0, 4, 4], [0, 0, 0, 16]])
    mean, per_layer = expert_load_maxvio(counts)
    assert per_layer == [0.0, 1.0, 3.0]
    assert mean == pytest.approx(4 / 3)
    # A layer that saw no tokens has no MaxVio and stays out of the mean.
    mean, per_layer = expert_load_maxvio(torch.tensor([[2, 2], [0, 0]]))
    assert (mean, per_layer) == (0.0, [0.0, None])
    assert expert_load_maxvio(torch.zeros(0, 8, dtype=torch.long)) == (None, [])
    with pytest.raises(ValueError):
        expert_load_maxvio(torch.tensor([1, 2, 3]))

    row = expert_load_metrics(torch.tensor([[1, 3], [2, 2]]), [3, 61])
    assert row == {"expert_load_maxvio": 0.25, "expert_load_maxvio/layer_3": 0.5, "expert_load_maxvio/layer_61": 0.0}
    with pytest.raises(ValueError):
        expert_load_metrics(torch.ones(3, 2), [3, 61])


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def read_rows(path: Path) -> list[dict]:
    def reject(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    # parse_constant rejects NaN/Infinity, which Python's json would otherwise accept.
    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def test_metrics_rows_keys_nulls_nan_and_truncate(tmp_path):
    cfg = smoke_config(tmp_path, "logging.wandb=disabled")
    keys = metric_keys(cfg.model)
    assert cfg.model.moe_layer_ids == [1, 2, 3, 4]  # smoke: first layer dense, MTP block is layer 4
    n_moe, n_exp = len(cfg.model.moe_layer_ids), cfg.model.n_routed_experts

    logger = MetricsLogger(tmp_path, cfg, rank=0, resume=False)
    logger.log(0, val_loss=9.0)
    counts = torch.full((n_moe, n_exp), 8)
    counts[0, 0] = 16
    logger.log(1, loss=torch.tensor(5.5), lm_loss=5.0, mtp_loss=1.5, lr=3e-4, skipped_steps=0, expert_counts=counts)
    logger.log(2, loss=float("nan"), grad_norm=float("inf"))
    with pytest.raises(ValueError, match="lm_los"):
        logger.log(3, lm_los=1.0)
    with pytest.raises(ValueError, match="both"):
        logger.log(3, expert_load_maxvio=0.1, expert_counts=counts)
    logger.log(3, **{"loss": 4.0, "expert_load_maxvio/layer_2": 0.5})
    logger.close()

    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert tuple(r) == keys  # every documented key, in order, nothing else
    assert rows[0]["val_loss"] == 9.0 and rows[0]["loss"] is None
    assert rows[1]["loss"] == 5.5 and rows[1]["val_loss"] is None and rows[1]["bad_shards"] is None
    expected_first = (16 / ((16 + 15 * 8) / 16)) - 1
    assert rows[1]["expert_load_maxvio/layer_1"] == pytest.approx(expected_first)
    assert rows[1]["expert_load_maxvio/layer_4"] == 0.0
    assert rows[1]["expert_load_maxvio"] == pytest.approx(expected_first / 4)
    assert rows[2]["loss"] is None and rows[2]["grad_norm"] is None  # non-finite -> null
    assert rows[3]["expert_load_maxvio/layer_2"] == 0.5

    # Resume from a checkpoint at step 1: later rows and a torn last line go.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss"')
    resumed = MetricsLogger(tmp_path, cfg, rank=0, resume=True)
    assert resumed.truncate_after(1) == 3
    resumed.log(2, loss=3.0)
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_rows(tmp_path / "metrics.jsonl")] == [(0, None), (1, 5.5), (2, 3.0)]

    # A fresh (non-resumed) run in the same directory starts the file over.
    MetricsLogger(tmp_path, cfg, rank=0, resume=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_other_ranks_write_nothing_but_still_reject_typos(tmp_path):
    cfg = smoke_config(tmp_path, "logging.wandb=offline")
    logger = MetricsLogger(tmp_path / "r1", cfg, rank=1, resume=False)
    assert logger.log(1, loss=1.0) is None
    with pytest.raises(ValueError):
        logger.log(1, los=1.0)
    assert logger.truncate_after(0) == 0
    logger.close()
    assert not (tmp_path / "r1").exists()


def test_startup_summary(tmp_path):
    cfg = smoke_config(tmp_path, "train.micro_batch_size=4", "train.global_batch_size=16", "parallel.ep=2")
    line = startup_summary(cfg, 2)
    assert "\n" not in line
    # the whole model's counts (a rank's own model holds half the experts at ep 2)
    counts = DeepSeekV3(cfg.model).parameter_counts()
    for part in (f"{human(counts['total'])} total", f"{human(counts['active'])} active",
                 f"+{human(counts['mtp'])} MTP", "ep 2", "zero 0", "accum 2", "global 16", "fp32"):
        assert part in line, (part, line)
    assert f"{human(16 * cfg.data.seq_len)} tokens/step" in line
    fp8 = smoke_config(tmp_path, "model.precision=fp8", "fp8.weights=bf16", "parallel.zero_stage=2")
    assert startup_summary(fp8, 1).endswith("precision fp8 on bf16 weights")
    assert startup_summary(smoke_config(tmp_path, "model.precision=fp8"), 1).endswith("precision fp8")


# ---------------------------------------------------------------------------------------------
# W&B offline, read back from disk


def read_wandb_records(path: Path):
    """Parse a .wandb file: the format wandb-core writes (a LevelDB-style log of protobufs).

    File header: b":W&B", magic 0xBEE1 (uint16 LE), version 0 (uint8). Then 32 KiB blocks of
    records; each record header is CRC32 (uint32 LE; zlib crc32 of the payload seeded with the
    crc32 of the type byte), length (uint16 LE), type (1 full, 2 first, 3 middle, 4 last
    fragment). A block tail shorter than a header is zero padding. Each reassembled payload
    is a wandb.proto.wandb_internal_pb2.Record. The checksums are verified, so a reader that got
    the format wrong fails here rather than finding nothing.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes() if path.exists() else b""
    if len(data) < 7:
        return []
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    block = 32768
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        if pos + 7 + length > len(data):  # the writer is mid-record: stop before the torn tail
            break
        payload = data[pos + 7 : pos + 7 + length]
        assert crc == zlib.crc32(payload, zlib.crc32(bytes([kind]))), f"bad checksum at {pos}"
        pos += 7 + length
        if kind == 1:
            records.append(payload)
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            records.append(pending + payload)
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def read_finished_run(path: Path, timeout_s: float = 30.0) -> list:
    """The records of an offline run once wandb has written its exit record.

    run.finish() returns after telling wandb's service (wandb-core) the run is done; the service
    flushes and closes the .wandb file on its own schedule, so a file read right after finish()
    can still be missing its tail.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {timeout_s}s: {[r.WhichOneof('record_type') for r in records]}")
        time.sleep(0.05)


def wandb_history(records: list) -> tuple[str | None, dict[int, dict]]:
    """(run id, {step: {key: value}}) from the records of an offline run."""
    run_id, history = None, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(record.history.step.num, {}).update(items)
    return run_id, history


def offline_run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def test_wandb_offline_rows_heatmap_and_resume_same_run(tmp_path, capfd):
    cfg = smoke_config(tmp_path, "logging.wandb=offline", "logging.heatmap_interval=2")
    n_moe, n_exp = len(cfg.model.moe_layer_ids), cfg.model.n_routed_experts
    counts = torch.arange(n_moe * n_exp).view(n_moe, n_exp)

    first = MetricsLogger(tmp_path, cfg, rank=0, resume=False)
    first.log(1, loss=5.25, lr=1e-4, expert_counts=counts)
    first.log(2, loss=4.75, lr=2e-4, expert_counts=counts)
    first.close()
    second = MetricsLogger(tmp_path, cfg, rank=0, resume=True)
    second.truncate_after(2)
    second.log(3, loss=float("nan"), val_loss=4.5)
    second.close()

    captured = capfd.readouterr()
    assert captured.out == "", "W&B must keep stdout clean"
    assert "warning" not in captured.err

    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert first.wandb_id == second.wandb_id == run_id
    files = offline_run_files(tmp_path)
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)

    id_a, hist_a = wandb_history(read_finished_run(files[0]))
    id_b, hist_b = wandb_history(read_finished_run(files[1]))
    assert id_a == id_b == run_id
    assert {s: h["loss"] for s, h in hist_a.items()} == {1: 5.25, 2: 4.75}
    assert hist_a[2]["lr"] == 2e-4
    assert hist_a[1]["expert_load_maxvio/layer_1"] == pytest.approx(first_row_maxvio(counts[0]))
    assert "val_loss" not in hist_a[1]  # nulls are not sent to W&B
    # Heatmap every 2 steps: a table file at step 2 only.
    # (History items are flattened: a logged Table appears as KEY/_type, KEY/path, ...)
    assert not any(k.startswith(HEATMAP_KEY) for k in hist_a[1])
    assert hist_a[2][f"{HEATMAP_KEY}/_type"] == "table-file"
    assert hist_a[2][f"{HEATMAP_KEY}/nrows"] == n_moe * n_exp
    table = json.loads((files[0].parent / "files" / hist_a[2][f"{HEATMAP_KEY}/path"]).read_text())
    assert table["columns"] == ["layer", "expert", "tokens", "load"]
    assert table["data"][0][:3] == [1, 0, 0] and table["data"][-1][:3] == [4, n_exp - 1, n_moe * n_exp - 1]
    # NaN loss: null in metrics.jsonl, NaN in W&B.
    assert math.isnan(hist_b[3]["loss"]) and hist_b[3]["val_loss"] == 4.5
    assert [r["loss"] for r in read_rows(tmp_path / "metrics.jsonl")] == [5.25, 4.75, None]


def first_row_maxvio(row: torch.Tensor) -> float:
    return float(row.max()) / float(row.double().mean()) - 1


def test_wandb_init_failure_keeps_metrics_and_run_id_logic(tmp_path, monkeypatch, capfd):
    import wandb

    def outage(*args, **kwargs):  # simulates W&B being unreachable
        raise wandb.errors.CommError("simulated outage")

    monkeypatch.setattr(wandb, "init", outage)
    cfg = smoke_config(tmp_path, "logging.wandb=online")
    (tmp_path / "wandb_id.txt").write_text("oldrun\n")

    fresh = MetricsLogger(tmp_path, cfg, rank=0, resume=False)
    fresh.log(1, loss=2.0)
    fresh.log(2, loss=1.5)
    fresh.close()
    err = capfd.readouterr().err
    assert err.count("W&B init failed") == 1 and "simulated outage" in err
    assert fresh.wandb_id != "oldrun"  # a fresh run gets a new id...
    resumed = MetricsLogger(tmp_path, cfg, rank=0, resume=True)
    assert resumed.wandb_id == fresh.wandb_id  # ...which a resumed one reuses
    resumed.log(3, loss=1.25)
    resumed.close()
    assert [r["loss"] for r in read_rows(tmp_path / "metrics.jsonl")] == [2.0, 1.5, 1.25]


def test_wandb_log_failure_mid_run_keeps_metrics(tmp_path, capfd):
    cfg = smoke_config(tmp_path, "logging.wandb=offline")
    logger = MetricsLogger(tmp_path, cfg, rank=0, resume=False)
    logger.log(1, loss=2.0)
    # A real failure, no mock: finishing the run behind the logger's back makes run.log raise.
    logger._wandb_run.finish()
    logger.log(2, loss=1.5)
    logger.log(3, loss=1.0)
    logger.close()
    err = capfd.readouterr().err
    assert err.count("W&B log failed") == 1
    assert [r["loss"] for r in read_rows(tmp_path / "metrics.jsonl")] == [2.0, 1.5, 1.0]
