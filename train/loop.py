"""The training loop: `train(cfg)` is what `dsv3 train` runs on every rank.

Per optimizer step: LR, λ and the global batch size from the schedules; the step's global batch
(the same samples whatever the world size) split into this rank's micro-batches; forward and
backward through the DeepSpeed engine, which reduces gradients, clips and steps at the
accumulation boundary; then the aux-loss-free bias update from expert counts summed over
micro-batches and all ranks; metrics, evaluation and checkpoints on their intervals.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from model import DeepSeekV3
from parallel import engine as pe
from parallel import fp8

from . import checkpoint as ckpt_io
from . import schedule
from .config import Config, save_config
from .data import BatchStream, TokenSamples, check_tokenizer_matches, eval_batches
from .metrics import MetricsLogger, flops_per_token, mfu, peak_memory, run_peak_flops, startup_summary


@dataclass
class TrainResult:
    step: int
    val_loss: float | None  # the latest evaluation's, at val_step: the last step unless a signal stopped it
    first_val_loss: float | None
    run_dir: Path
    stopped_by: str | None = None  # "SIGTERM/SIGINT" or "SIGUSR2" when a signal ended the run early
    val_step: int | None = None


def _log0(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


@torch.no_grad()
def evaluate(engine, batches, info: pe.DistInfo) -> float:
    """Mean main-head loss over this rank's val micro-batches, averaged over ranks."""
    module = engine.module
    was_training = module.training
    module.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for tokens, targets in batches:
        with fp8.autocast(module):  # a no-op context unless FP8 (and bf16 autocast) on GPU
            out = module(tokens.to(info.device), targets.to(info.device))
        total += torch.tensor([out.lm_loss.item(), 1.0], dtype=torch.float64)
    pe.all_reduce_(total)
    module.train(was_training)
    return (total[0] / total[1]).item()


class StopRequest:
    """Graceful stop on SIGTERM (scancel, kill) and SIGUSR2 (submitit: SLURM preemption or time limit).

    The handler only records the signal. The loop asks `agreed()` once per optimizer step: an
    all-reduce (MAX) over ranks, since a signal reaches ranks at slightly different moments, so
    every rank decides at the same step; they then save through the usual checkpoint path and
    return. What follows is the launcher's call: launch/slurm.py requeues on SIGUSR2 through
    submitit, and any other caller simply ends with status 0.
    """

    CODES = {signal.SIGTERM: 1, signal.SIGINT: 1, signal.SIGUSR2: 2}  # the higher wins: a requeue outranks a stop
    NAMES = {0: None, 1: "SIGTERM/SIGINT", 2: "SIGUSR2"}

    def __init__(self):
        self.code = 0
        self.agreed_reason: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in self.CODES:
            try:
                self._previous[sig] = signal.signal(sig, self._record)
            except ValueError:  # not the main thread: no handlers, the run never stops early
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():  # e.g. submitit's own handlers
            signal.signal(sig, previous)

    def _record(self, signum, frame) -> None:
        self.code = max(self.code, self.CODES[signum])

    def agreed(self, device: torch.device) -> str | None:
        """Collective (every rank, same step): the strongest signal any rank has received, or None."""
        flag = torch.tensor([self.code], device=device)
        pe.all_reduce_(flag, op=dist.ReduceOp.MAX)
        self.agreed_reason = self.NAMES[int(flag.item())]
        return self.agreed_reason


class TrainingError(RuntimeError):
    """A run that cannot go on: the message says why and what is left on disk (the CLI prints it)."""


def train(cfg: Config) -> TrainResult:
    """Train per cfg on this rank: joins the process group, and leaves it when the run returns (a
    failed run leaves it to process exit, so a rank whose peer is gone cannot hang in teardown)."""
    with StopRequest() as stop:
        try:
            result = _train(cfg, stop)
        except TrainingError:
            raise
        except Exception as err:
            if _is_communication_failure(err):
                raise TrainingError(_lost_rank_report(err)) from err
            raise
    pe.shutdown_distributed()
    return result


def _is_communication_failure(err: Exception) -> bool:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return False
    text = str(err)
    return isinstance(err, getattr(dist, "DistBackendError", ())) or any(
        s in text for s in ("Connection closed", "Connection reset", "timed out", "Timed out", "gloo", "NCCL"))


def _lost_rank_report(err: Exception, window_s: float = 5.0) -> str:
    """Which ranks are gone, found through the rendezvous store (which outlives the collectives):
    every surviving rank checks in, waits `window_s`, and lists who did not."""
    rank, world = dist.get_rank(), dist.get_world_size()
    first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"dsv3/alive/{rank}", "1")
        time.sleep(window_s)
        lost = [r for r in range(world) if not store.check([f"dsv3/alive/{r}"])]
        who = f"lost rank(s) {', '.join(map(str, lost))}" if lost else "a peer stopped answering"
    except Exception:  # the store lives in rank 0's process: unreachable means rank 0 is gone
        who = "lost rank 0 (it also hosts the rendezvous store, now unreachable)"
    return f"rank {rank}: {who}; a collective failed: {first_line}"


def _train(cfg: Config, stop: StopRequest) -> TrainResult:
    info = pe.init_distributed(cfg.train.device, cfg.parallel.timeout_s)
    rank, world = info.rank, info.world_size
    cfg.batch_layout(world)
    run_dir = Path(cfg.train.run_dir)
    resume_from = ckpt_io.resolve_resume(cfg.train.resume, run_dir, log=lambda m: _log0(rank, m))

    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):  # storage comes in build_engine, once EP has left this rank its experts only
        model = DeepSeekV3(cfg.model)
    meta = ckpt_io.read_meta(resume_from) if resume_from else None
    if meta:
        ckpt_io.check_model_matches(meta, cfg.model, resume_from)
    engine, layout = pe.build_engine(model, cfg, info)

    ranks = (rank, world, pe.all_reduce_)  # shards without a manifest: each rank counts a share
    train_samples = TokenSamples(cfg, "train", ranks=ranks)
    val_samples = TokenSamples(cfg, "val", ranks=ranks)
    stream = BatchStream(train_samples, cfg.train.seed, rank, world, cfg.train.micro_batch_size)
    # eval_batches global batches of val samples, the same set at any world size
    val = eval_batches(val_samples, cfg.train.eval_batches, cfg.train.global_batch_size, rank, world,
                       cfg.train.micro_batch_size)

    step = skipped = consecutive_bad = 0
    if meta and not meta.get("weights_only"):
        client = ckpt_io.load(engine, layout, resume_from)
        step = client["step"]
        # absent from checkpoints written before they were kept
        skipped, consecutive_bad = client.get("skipped_steps", 0), client.get("consecutive_bad_steps", 0)
        changed = stream.load_state_dict(client["data"])
        if changed:
            _log0(rank, f"warning: {changed}")
        ckpt_io.set_rng_state(client["rng"])
        read = f"read {_size(client['read_bytes_total'])} of weights and moments"
        if world > 1:
            read += f", at most {_size(client['read_bytes_max'])} by one rank"
        _log0(rank, f"resumed from {resume_from} at step {step} ({read})")
    elif meta:
        ckpt_io.load_weights(engine, layout, resume_from)
        _log0(rank, f"starting from the weights in {resume_from} (step 0, fresh optimizer)")

    if resume_from is not None:  # continuing a run on other data would be silently wrong
        check_tokenizer_matches(run_dir, train_samples.manifest, cfg.data.dir)
        if resume_from.parent.name == "checkpoints":  # and the run the checkpoint is from, when another
            check_tokenizer_matches(resume_from.parent.parent, train_samples.manifest, cfg.data.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        moved = ckpt_io.set_aside_later(run_dir, step)
        if moved:
            _log0(rank, f"moved {len(moved[1])} checkpoint(s) past step {step} that this run does not continue "
                        f"({', '.join(moved[1])}) and a copy of metrics.jsonl to {moved[0]}; delete that folder "
                        "when it is not needed")
        save_config(cfg, run_dir / "config.yaml")
        # beside the train manifest: data.dir's, or data.train_shards' folder for shards made elsewhere
        tok = train_samples.manifest_path.parent / "tokenizer.json"
        if tok.is_file():
            (run_dir / "tokenizer.json").write_bytes(tok.read_bytes())

    if step >= cfg.train.steps:
        _log0(rank, f"{run_dir}: already complete at step {step} (train.steps={cfg.train.steps}). Raise "
                    "train.steps to continue, or start fresh with train.resume=never or another train.run_dir.")
        train_samples.close()
        val_samples.close()
        return TrainResult(step, None, None, run_dir)

    logger = MetricsLogger(run_dir, cfg, rank, resume=step > 0)
    try:
        if step > 0:
            logger.truncate_after(step)
        _log0(rank, startup_summary(cfg, world))
        fpt = flops_per_token(cfg.model, cfg.data.seq_len)
        peak, peak_src = run_peak_flops(cfg, info.device)
        _log0(rank, f"MFU against {peak / 1e12:.3g} TFLOP/s per device ({peak_src}); {fpt / 1e6:.4g} MFLOP/token")

        first_val = None
        val_loss = val_step = None
        if step == 0:
            val_loss = first_val = evaluate(engine, val, info)
            val_step = 0
            logger.log(0, val_loss=val_loss)
            _log0(rank, f"step 0: val_loss {val_loss:.4f}")

        current_batch = cfg.train.global_batch_size
        bar = _progress(cfg, rank, step)
        nan_step = int(os.environ.get("DSV3_FAULT_NAN_STEP", "0"))  # fault injection for tests: NaN grads at this step
        engine.train()
        while step < cfg.train.steps:
            step += 1
            t0 = time.perf_counter()
            lr = schedule.learning_rate(cfg, step)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            batch = schedule.global_batch_size(cfg, step)
            if batch != current_batch:
                engine.set_train_batch_size(batch)
                current_batch = batch
            lam = schedule.mtp_weight(cfg, step)

            engine.dsv3_nonfinite = False  # set again by this step's norm, when DeepSpeed computes it
            expert_counts = None
            sums = torch.zeros(3, dtype=torch.float64)  # loss, lm_loss, mtp_loss over micro-batches
            micro = stream.next(batch)
            if info.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(info.device)
            for i, (tokens, targets) in enumerate(micro):
                # The optimizer steps after this step's last micro-batch, said outright: DeepSpeed's own
                # rule (a run-long micro-batch count modulo the current accumulation count) drifts off
                # the step's boundaries once a batch-size ramp changes that count.
                engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
                with fp8.autocast(engine.module, first_microbatch=i == 0):  # TE reuses FP8 weight casts after i = 0
                    out = engine(tokens.to(info.device), targets.to(info.device), mtp_weight=lam)
                loss = out.loss * float("nan") if step == nan_step else out.loss
                engine.backward(loss)
                engine.step()
                c = out.expert_counts.detach().to(torch.float64).cpu()
                expert_counts = c if expert_counts is None else expert_counts + c
                mtp = out.mtp_loss.item() if out.mtp_loss is not None else 0.0
                sums += torch.tensor([out.loss.item(), out.lm_loss.item(), mtp], dtype=torch.float64)
            # one collective for the step's scalars and the expert counts
            packed = torch.cat([sums / len(micro), expert_counts.flatten()])
            pe.all_reduce_(packed)
            means = packed[:3] / world
            step_counts = packed[3:].view_as(expert_counts)
            # A non-finite loss or gradient norm (agreed across ranks: both come from all-reduces)
            # skipped the optimizer step (parallel.engine); skip the bias update too, count it, and
            # stop after train.max_bad_steps in a row, leaving the last good checkpoint.
            bad = pe.step_skipped(engine) or not torch.isfinite(means).all().item()
            if bad:
                skipped += 1
                consecutive_bad += 1
                _log0(rank, f"step {step}: non-finite loss or gradient norm, optimizer step skipped "
                            f"({consecutive_bad} in a row, {skipped} in all)")
                if consecutive_bad >= cfg.train.max_bad_steps:
                    raise TrainingError(
                        f"halting at step {step}: {consecutive_bad} consecutive steps with non-finite loss or "
                        f"gradient norm (train.max_bad_steps={cfg.train.max_bad_steps}); last good checkpoint: "
                        f"{_last_checkpoint(run_dir)}")
            else:
                consecutive_bad = 0
            gamma = schedule.bias_update_rate(cfg, step)
            if gamma > 0 and step_counts.numel() and not bad:
                engine.module.update_routing_bias(step_counts.to(info.device), gamma)
            reported = engine.get_global_grad_norm()  # the true global norm (parallel.engine), before clipping
            grad_norm = float(reported) if reported is not None else None
            dt = time.perf_counter() - t0
            tokens_per_s = batch * cfg.data.seq_len / dt
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{means[0].item():.3f}", refresh=False)

            stop_signal = stop.agreed(info.device)  # a signal on any rank: all log, save now, then return
            do_eval = step % cfg.train.eval_interval == 0 or step == cfg.train.steps
            # the step a run stops at always gets a row: a watcher's curves end where the run did
            do_log = step % cfg.logging.interval == 0 or do_eval or bool(stop_signal)
            row_val = None
            if do_eval:
                val_loss = row_val = evaluate(engine, val, info)
                val_step = step
            if do_log:
                peak_mem = peak_memory(info.device)
                # a bad sample is found by the rank that reads it: count the shards every rank found
                bad_shards = pe.union_size(train_samples.bad_shard_ids | val_samples.bad_shard_ids)
                logger.log(
                    step, loss=means[0].item(), lm_loss=means[1].item(),
                    mtp_loss=means[2].item() if cfg.model.num_nextn_predict_layers else None,
                    lr=lr, batch_size=batch, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                    mfu=mfu(tokens_per_s, fpt, peak, world), peak_mem_bytes=peak_mem,
                    skipped_steps=skipped, bad_shards=bad_shards,
                    val_loss=row_val, expert_counts=step_counts,
                )
            if row_val is not None:
                _log0(rank, f"step {step}: loss {means[0].item():.4f} val_loss {row_val:.4f}")
            if step % cfg.checkpoint.interval == 0 or step == cfg.train.steps or stop_signal:
                for i, moe in enumerate(engine.module.moe_layers()):
                    pe.check_same_on_all_ranks(moe.gate.e_score_correction_bias, f"routing bias of MoE layer {i}")
                client = {"step": step, "data": stream.state_dict(), "rng": ckpt_io.rng_state(), "skipped_steps": skipped,
                          "consecutive_bad_steps": consecutive_bad}
                try:
                    ckpt_io.save(engine, layout, run_dir, step, client, cfg.model, cfg.checkpoint.keep, rank)
                except OSError as err:  # disk full, quota, file size limit: the previous checkpoint is untouched
                    raise TrainingError(
                        f"saving the step-{step} checkpoint failed ({err}); the previous checkpoint "
                        f"{_last_checkpoint(run_dir)} is intact and resumable") from err

            if stop_signal:
                _log0(rank, f"{stop_signal}: saved a checkpoint at step {step}, stopping")
                break

        if bar is not None:
            bar.close()
    except BaseException:  # W&B marks the run failed (exit code 1), not finished, and the file is closed
        logger.close(exit_code=1)
        raise
    logger.close()
    train_samples.close()
    val_samples.close()
    if dist.is_initialized():
        dist.barrier()
    return TrainResult(step, val_loss, first_val, run_dir, stopped_by=stop.agreed_reason, val_step=val_step)


def _last_checkpoint(run_dir: Path) -> str:
    """The newest complete checkpoint of a run, for messages."""
    found = ckpt_io.complete_checkpoints(run_dir / "checkpoints")
    return str(found[-1]) if found else "(none)"


def _progress(cfg: Config, rank: int, step: int):
    if rank != 0 or not cfg.logging.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=step, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=2.0)
