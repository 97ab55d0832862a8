"""Training checkpoints in a per-parameter format of our own, reshardable across EP and world size.

Layout of RUN_DIR/checkpoints/step_00000120/:

    model-dense-part{i}-of-{n}.safetensors  non-expert parameters and buffers (fp32 master values)
    optim-dense-part{i}-of-{n}.safetensors  AdamW exp_avg / exp_avg_sq of those parameters
    model-experts-ep{r}-of-{ep}-part{j}-of-{m}.safetensors
                                            expert shard r: layer tensors holding experts
                                            [r·E/ep, (r+1)·E/ep), split by tensor into m files
    optim-experts-ep{r}-of-{ep}-part{j}-of-{m}.safetensors   their AdamW moments
    state.pt                                step, optimizer step count, data position, RNG states
    dsv3_meta.json                          written last, by rank 0, once every rank has saved

Writing is spread over the ranks: the dense tensors over all of them (n = min(world size,
number of dense parameters)), each expert shard's tensors over the ranks holding a replica of
that shard (m = min(world/ep, its tensor count)), whole tensors balanced by size. At 671B on
1536 ranks with EP=64 (fp32 values and both moments): the 810 dense tensors go to 810 ranks, at
most 11 GB to one (the embedding or the head), and each shard's 125 GB of experts to its 24
replicas, 5.6 GB each; with one writer of each kind, rank 0 held all 210 GB of dense tensors
and the first replica of each shard its whole 125 GB.
Readers take any number of parts, and the single-file names of earlier checkpoints
(model-dense.safetensors, model-experts-ep{r}-of-{ep}.safetensors) too.

Why not DeepSpeed's save_checkpoint: its MoE path assumes DeepSpeed's own expert module names,
and its ZeRO files are tied to the world size. Here every tensor is stored whole (experts split
only by shard), keyed by the model's parameter names, so a checkpoint saved at EP=2 on 4 ranks
loads at EP=1 on 1 rank or EP=4 on 8: each rank reads what it needs and slices its experts.

A directory without `dsv3_meta.json` is incomplete and never resumed from; the meta file holds a
manifest (size and sha256 of every file), checked before a resume uses the checkpoint. A weights-only
checkpoint (`dsv3 import-hf`) has only the model files and `"weights_only": true`.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from model import ConfigError, ModelConfig, block_of, is_stacked_expert_weight
from model.hf import save_safetensors

META = "dsv3_meta.json"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def checkpoint_tensors(module: torch.nn.Module) -> list[tuple[str, list[torch.nn.Parameter], bool]]:
    """The module's parameters as a checkpoint names them, in parameter order: (name, [p], False)
    for a parameter stored as itself, (name, [p_0, ..., p_{E-1}], True) for per-expert weights
    stored stacked along a new dim 0 (TE's grouped experts, parallel/fp8.py: the checkpoint
    holds the `gate_up_proj` / `down_proj` a RoutedExperts has, so it loads at any precision
    and into `dsv3 sample` / `export-hf`)."""
    grouped: dict[int, tuple[str, list]] = {}  # id(first weight) -> (stacked name, weights)
    members: set[int] = set()
    for prefix, m in module.named_modules():
        stacked = getattr(m, "stacked_parameters", None)
        if stacked is not None:
            for key, params in stacked().items():
                grouped[id(params[0])] = (f"{prefix}.{key}" if prefix else key, params)
                members.update(id(q) for q in params)
    out = []
    for name, p in module.named_parameters():
        if id(p) in grouped:
            out.append((*grouped[id(p)], True))
        elif id(p) not in members:
            out.append((name, [p], False))
    return out


def _stacked(values: list[torch.Tensor], stacked: bool) -> torch.Tensor:
    """One checkpoint tensor from the values of its parameters (see checkpoint_tensors)."""
    return torch.stack(values) if stacked else values[0]


def _unstacked(saved: torch.Tensor, stacked: bool) -> list[torch.Tensor]:
    """A checkpoint tensor -> the values of its parameters, in order."""
    return list(saved.unbind(0)) if stacked else [saved]


def _stored_shape(params: list[torch.nn.Parameter], stacked: bool) -> tuple[int, ...]:
    return (len(params), *params[0].shape) if stacked else tuple(params[0].shape)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _step_dirs(root: Path) -> list[Path]:
    """The step_* checkpoint directories under root (not a save's *.partial), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.suffix != ".partial"]
    return sorted(found, key=lambda p: p.name)


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under root that finished saving, oldest first."""
    return [p for p in _step_dirs(root) if (p / META).is_file()]


def incomplete_checkpoints(root: Path) -> list[Path]:
    """step_* directories under root without their meta file, oldest first: a save interrupted
    between the rename and the meta file (a moment), or a checkpoint damaged since. Never resumed
    from, and never deleted: a save at the same step moves one aside first (set_aside_later)."""
    return [p for p in _step_dirs(root) if not (p / META).is_file()]


def set_aside_later(run_dir: Path, step: int) -> tuple[Path, list[str]] | None:
    """Move the run's checkpoints past `step`, the step training starts from, complete or not, out
    of checkpoints/ into run_dir/checkpoints-superseded-<UTC time>/, with a copy of metrics.jsonl
    as it was; returns (that folder, their names).

    They belong to a run this one does not continue: an earlier run in the same directory (a
    start over with train.resume=never), or steps after a checkpoint resumed explicitly or past a
    damaged newest one. Left in place, auto-resume would later pick them over this run's own
    checkpoints, retention (newest step numbers kept) would delete this run's saves instead, and
    a save at the same step would replace one. Moved, never deleted."""
    root = run_dir / "checkpoints"
    later = [c for c in _step_dirs(root) if int(c.name.split("_")[1]) > step]  # complete or not
    if not later:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = run_dir / f"checkpoints-superseded-{stamp}"
    n = 1
    while dest.exists():  # a second start over within the same second
        n += 1
        dest = run_dir / f"checkpoints-superseded-{stamp}-{n}"
    dest.mkdir(parents=True)
    for c in later:
        c.rename(dest / c.name)
    metrics = run_dir / "metrics.jsonl"  # this run truncates it to its starting step, or empties it
    if metrics.is_file():
        shutil.copy2(metrics, dest / metrics.name)
    _point_latest(root)
    return dest, [c.name for c in later]


def _point_latest(root: Path) -> None:
    """root/latest names the newest complete checkpoint (a pointer for people and tools; resume
    scans the directories); removed when there is none."""
    found = complete_checkpoints(root)
    if not found:
        (root / "latest").unlink(missing_ok=True)
        return
    tmp = root / "latest.tmp"
    tmp.write_text(found[-1].name + "\n")
    tmp.rename(root / "latest")


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / META).read_text())


def resolve_resume(resume: str, run_dir: Path, log=None, collective: bool = True) -> Path | None:
    """train.resume -> the checkpoint directory to start from, or None for a fresh start.

    Only checkpoints that pass `verify` are used: with `auto` (or a run directory) a damaged
    newest checkpoint is skipped, said so, and the previous good one taken; a damaged checkpoint
    named explicitly is an error. `collective`: as for `verify`."""
    say = log or (lambda msg: None)
    if resume == "never":
        return None
    path = Path(resume)
    if resume != "auto" and (path / META).is_file():
        problem = verify(path, collective)
        if problem:
            raise ConfigError("train.resume", resume, f"checkpoint fails verification: {problem}")
        return path
    roots = [run_dir / "checkpoints"] if resume == "auto" else [path / "checkpoints", path]
    for root in roots:
        for ckpt in incomplete_checkpoints(root):
            say(f"checkpoint {ckpt} has no {META} (a save that did not finish, or damage): not resumed from")
        found = complete_checkpoints(root)
        for ckpt in reversed(found):
            problem = verify(ckpt, collective)
            if problem is None:
                return ckpt
            say(f"checkpoint {ckpt} fails verification ({problem}); falling back to an older one")
        if found:
            raise ConfigError("train.resume", resume, f"no checkpoint under {root} passes verification")
    if resume == "auto":
        return None
    raise ConfigError("train.resume", resume, "no complete checkpoint there (expected a step_* directory with "
                      f"{META}, or a run directory holding checkpoints/)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(ckpt: Path, collective: bool = True) -> str | None:
    """None if every file listed in the checkpoint's manifest is present with its size and
    sha256; else what is wrong. (Weights-only checkpoints from import-hf carry a manifest too.)

    Under torch.distributed, unless `collective` is False, this is a collective: each rank
    checks its share of the files (the i-th file by name on rank i mod world: present, of its
    size, then its sha256), and all ranks return the same answer, so a checkpoint is read and
    even stat'ed once in all, not once per rank. collective=False: this process alone checks
    everything (a sample taken by rank 0 after training, when the other ranks may have exited).
    The answer is the first problem in this order: the meta file, then a missing or wrongly sized
    file, then a wrong hash (files by name)."""
    problems = {}  # sort key -> what is wrong
    try:
        files = read_meta(ckpt).get("files")
        if not files:
            problems[""] = f"{META} has no file manifest"
    except (OSError, ValueError) as err:
        files, problems[""] = None, f"unreadable {META}: {err}"
    collective = collective and _multi_rank()
    rank, world = (dist.get_rank(), dist.get_world_size()) if collective else (0, 1)
    mine = sorted(files or {})[rank::world]
    for name in mine:
        f, want = ckpt / name, files[name]
        if not f.is_file():
            problems[f"1 {name}"] = f"{name} is missing"
        elif f.stat().st_size != want["size"]:
            problems[f"1 {name}"] = f"{name} has {f.stat().st_size} bytes, the manifest says {want['size']}"
    if not problems:  # hashing is the slow part: not when something is already known wrong here
        for name in mine:
            if _sha256(ckpt / name) != files[name]["sha256"]:
                problems[f"2 {name}"] = f"{name} does not match its sha256"
    if collective:
        problems = _merged_over_ranks(problems)  # every rank calls it exactly once
    return problems[min(problems)] if problems else None


def _manifest_entries(folder: Path, names: list[str]) -> dict[str, dict]:
    """Size and sha256 of each named file in `folder`, synced to disk first; for a safetensors
    file also its tensors and their shapes (so a reader opens only the files it reads from)."""
    entries = {}
    for name in names:
        f = folder / name
        _fsync(f)
        entries[name] = {"size": f.stat().st_size, "sha256": _sha256(f)}
        if name.endswith(".safetensors"):
            with safe_open(str(f), framework="pt") as fh:
                entries[name]["tensors"] = {k: list(fh.get_slice(k).get_shape()) for k in sorted(fh.keys())}
    return entries


def _merged_over_ranks(part: dict) -> dict:
    """The union of every rank's dict (a collective: every rank calls it)."""
    if not _multi_rank():
        return part
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def _write_meta(ckpt: Path, meta: dict, files: dict[str, dict]) -> None:
    """The meta file with the manifest `files` (_manifest_entries of every file), written last
    and atomically."""
    tmp = ckpt / (META + ".tmp")
    tmp.write_text(json.dumps({**meta, "files": dict(sorted(files.items()))}, indent=1))
    _fsync(tmp)
    tmp.rename(ckpt / META)
    _fsync(ckpt)


def check_model_matches(meta: dict, cfg: ModelConfig, where: Path) -> None:
    """Refuse a checkpoint of another architecture, naming the first differing field."""
    saved = meta.get("model", {})
    ours = cfg.to_dict()
    # fields that do not change the weights may differ
    free = {"moe_impl", "loss_chunk_size", "precision", "mtp_loss_weight", "seq_aux_loss_alpha", "initializer_range"}
    for key in sorted(set(saved) | set(ours)):
        if key in free:
            continue
        if saved.get(key) != ours.get(key):
            raise ConfigError(
                f"model.{key}", ours.get(key),
                f"checkpoint {where} was trained with model.{key}={saved.get(key)!r}",
            )


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ reading and writing tensors
def _zero_partitioned(engine) -> bool:
    return hasattr(next(iter(engine.module.parameters())), "_hp_mapping")


def _link_optimizer_state(engine) -> None:
    """Point DeepSpeed's per-parameter views at the optimizer moments of every param group.

    DeepSpeed links them once, right after the first param group's first step, when the other
    groups' states do not exist yet, so moments of groups 2.. stay unreachable through
    safe_get/set_full_optimizer_state. Re-linking once the states exist fixes that."""
    opt = engine.optimizer
    if not hasattr(opt, "_hp_optimizer_states_linked"):
        return
    # Before the first step (a resume) the moments do not exist yet: create them as AdamW would.
    # ZeRO-1/2 keep the fp32 partitions in single_partition_of_fp32_groups, the bf16 optimizer
    # in fp32_groups_flat_partition.
    flats = opt.single_partition_of_fp32_groups if hasattr(opt, "single_partition_of_fp32_groups") \
        else opt.fp32_groups_flat_partition
    for flat in flats:
        state = opt.optimizer.state[flat]
        if "exp_avg" not in state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat), exp_avg_sq=torch.zeros_like(flat))
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()


def _gather_to(engine, p: torch.nn.Parameter, key: str | None, dst: int) -> torch.Tensor | None:
    """p's fp32 master (key None) or AdamW moment `key`, whole, on rank `dst`; None on the other
    ranks. Under ZeRO a collective over p's data-parallel group: each rank puts its fragment
    into a reduce to dst (DeepSpeed's safe_get_full_* all-reduce it, twice the traffic, and
    leave a full copy on every rank)."""
    if not _zero_partitioned(engine):
        if key is None:
            return p.detach().float()
        state = engine.optimizer.state.get(p, {})  # no moments before the first step
        return state[key].detach().float() if key in state else torch.zeros_like(p, dtype=torch.float32)
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    fragment = p._hp_mapping  # None: no part of p in this rank's partition
    if fragment is not None:
        at = fragment.lp_fragment_address
        buf.narrow(0, at.start, at.numel).copy_(fragment.get_hp_fragment(key).reshape(-1))
    dist.reduce(buf, dst=dst, group=p._dp_group)
    return buf.view(p.shape) if dist.get_rank() == dst else None


def _optimizer_step_count(engine) -> int:
    opt = engine.optimizer.optimizer if _zero_partitioned(engine) else engine.optimizer
    for state in opt.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _assign(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Each name -> one of n writers, balanced by size: largest first, each to the writer with
    the fewest elements so far (lowest index on ties). Same on every rank for the same sizes."""
    heap = [(0, i) for i in range(n)]
    owner = {}
    for name in sorted(sizes, key=lambda k: (-sizes[k], k)):
        load, i = heapq.heappop(heap)
        owner[name] = i
        heapq.heappush(heap, (load + sizes[name], i))
    return owner


def _dense_files(part: int, parts: int) -> tuple[str, str]:
    return (f"model-dense-part{part}-of-{parts}.safetensors", f"optim-dense-part{part}-of-{parts}.safetensors")


def _expert_files_for(ep: int, ep_rank: int, part: int, parts: int) -> tuple[str, str]:
    stem = f"experts-ep{ep_rank}-of-{ep}-part{part}-of-{parts}.safetensors"
    return f"model-{stem}", f"optim-{stem}"


def _parts(dense: dict[str, int], experts: dict[str, int], world: int, ep: int):
    """How a save splits the tensors, from their sizes (dense: name -> elements; experts: one
    shard's name -> elements): (dense name -> part, dense parts, expert name -> part, expert parts
    per shard). Dense part i is written by rank i; part j of every expert shard by the shard's
    replica j, ranks j·ep .. j·ep + ep - 1."""
    n_dense, n_expert = max(1, min(world, len(dense))), max(1, min(world // ep, len(experts)))
    return _assign(dense, n_dense), n_dense, _assign(experts, n_expert), n_expert


def _writing_plan(tensors: list, layout) -> tuple[dict[str, int], int, dict[str, int], int]:
    """(dense name -> writing rank, dense parts, expert name -> writing rank, expert parts per
    shard) for this rank's `tensors` (checkpoint_tensors of its module)."""
    dense, experts = {}, {}
    for name, params, _ in tensors:
        (experts if is_stacked_expert_weight(name) else dense)[name] = sum(p.numel() for p in params)
    dense_rank, n_dense, expert_part, n_expert = _parts(dense, experts, layout.world_size, layout.ep)
    expert_rank = {k: j * layout.ep + layout.ep_rank for k, j in expert_part.items()}
    return dense_rank, n_dense, expert_rank, n_expert


def largest_write_elements(dense: dict[str, int], experts: dict[str, int], world: int, ep: int) -> int:
    """The most parameters any one rank writes in a save (x12 for bytes: fp32 value and two
    moments), from the sizes `_parts` takes."""
    dense_part, n_dense, expert_part, n_expert = _parts(dense, experts, world, ep)
    dense_load, expert_load = [0] * n_dense, [0] * n_expert
    for name, i in dense_part.items():
        dense_load[i] += dense[name]
    for name, j in expert_part.items():
        expert_load[j] += experts[name]
    return max((dense_load[r] if r < n_dense else 0) + (expert_load[r // ep] if r // ep < n_expert else 0)
               for r in range(min(world, max(n_dense, n_expert * ep))))


def save(engine, layout, run_dir: Path, step: int, client_state: dict, model_cfg: ModelConfig, keep: int,
         rank: int) -> Path:
    """Every rank calls this (the gathers are collective); each tensor is written by the one rank
    `_writing_plan` names, so the ranks write in parallel and none holds more than its share."""
    root = run_dir / "checkpoints"
    ckpt = root / tag_for(step)
    partial = root / (tag_for(step) + ".partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    _link_optimizer_state(engine)
    tensors = checkpoint_tensors(engine.module)
    dense_rank, n_dense, expert_rank, n_expert = _writing_plan(tensors, layout)
    partitioned = _zero_partitioned(engine)
    dense, dense_opt, experts, experts_opt = {}, {}, {}, {}
    for name, params, stacked in tensors:
        expert = is_stacked_expert_weight(name)
        writer = (expert_rank if expert else dense_rank)[name]
        if not (writer == rank or partitioned):
            continue  # unpartitioned: no gather to take part in
        # Under ZeRO every rank sends its fragments; only the writer receives the tensor
        values = {k: [_gather_to(engine, p, k, writer) for p in params] for k in (None, *ADAM_KEYS)}
        if writer != rank:
            continue
        value = _stacked(values[None], stacked)
        moments = {k: _stacked(values[k], stacked) for k in ADAM_KEYS}
        target, target_opt = (experts, experts_opt) if expert else (dense, dense_opt)
        target[name] = value.cpu()
        for k, v in moments.items():
            target_opt[f"{k}.{name}"] = v.cpu()
    if rank == 0:  # the routing biases (replicated buffers, tiny) go with dense part 0
        for name, b in engine.module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                dense[name] = b.detach().float().cpu()
    written = []
    try:
        for tensors, tensors_opt, files in (
                (dense, dense_opt, _dense_files(rank, n_dense)),
                (experts, experts_opt, _expert_files_for(layout.ep, layout.ep_rank, rank // layout.ep, n_expert))):
            if tensors_opt:  # this rank writes a part of this kind (every part has a parameter)
                save_safetensors(tensors, partial / files[0])
                save_safetensors(tensors_opt, partial / files[1])
                written += files
        if rank == 0:
            torch.save({**client_state, "optimizer_step": _optimizer_step_count(engine)}, partial / "state.pt")
            written.append("state.pt")
    except SafetensorError as err:  # its I/O failures (disk full, size limit) are OSErrors to callers
        raise OSError(str(err)) from err
    # each writer syncs and hashes its own files, so no rank reads the whole checkpoint back
    manifest = _merged_over_ranks(_manifest_entries(partial, written))
    if rank == 0:
        # Everything is on disk in *.partial and hashed; the directory is renamed and the meta
        # file written last: a crash at any point leaves either no complete checkpoint for this
        # step or a verified one, never a half one.
        shutil.rmtree(ckpt, ignore_errors=True)
        partial.rename(ckpt)
        _fsync(root)
        _write_meta(ckpt, {"step": step, "model": model_cfg.to_dict(), "weights_only": False, "ep": layout.ep,
                           "world_size": layout.world_size}, manifest)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        _point_latest(root)
        for stale in root.glob("step_*.partial"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    _barrier()
    return ckpt


def _multi_rank() -> bool:
    """Whether this process has peers (a collective would talk to someone)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _multi_rank():
        dist.barrier()


_EXPERT_FILE = re.compile(r"-experts-ep(\d+)-of-(\d+)(?:-part\d+-of-\d+)?\.safetensors$")
_DENSE_FILE = re.compile(r"-dense(?:-part\d+-of-\d+)?\.safetensors$")


class TensorReader:
    """The tensors of one kind ("model" or "optim") of a checkpoint, each read from disk when it
    is asked for, so a rank holds one at a time: dense tensors whole, stacked expert tensors
    only experts [first, last) of `experts` (all of them for None), read as row slices of
    however many shard files the checkpoint was saved with, in however many parts. A rank never
    reads another rank's experts. Use as a context manager: the files stay open inside it.

    Which file holds which tensor, and its shape, come from the manifest (each file's entry
    lists its tensors), so a file is opened only when a tensor in it is read: at 671B on 1536
    ranks a resume opens a few of the checkpoint's ~4,700 files per rank, not all of them (7.2M
    opens of the filesystem's metadata server). Checkpoints whose manifest has no lists (older
    ones, or files written without a manifest) are indexed by opening every file's header."""

    def __init__(self, ckpt: Path, prefix: str, experts: tuple[int, int] | None = None):
        self.ckpt, self.experts = ckpt, experts
        self._dense: dict[str, Path] = {}  # key -> file
        self._shards: dict[int, dict[str, Path]] = {}  # shard -> key -> file
        self._shapes: dict[tuple[Path, str], tuple[int, ...]] = {}
        self._handles: dict[Path, object] = {}
        self._files = contextlib.ExitStack()
        self.bytes_read = 0  # tensor bytes read from the files so far
        listed = _listed_tensors(ckpt, prefix)
        names = sorted(listed) if listed is not None else sorted(f.name for f in ckpt.glob(f"{prefix}-*.safetensors"))
        dense_files = {n for n in names if n.startswith(f"{prefix}-dense") and _DENSE_FILE.search(n)}
        if not dense_files:
            raise FileNotFoundError(f"{ckpt}: no {prefix}-dense-part*.safetensors "
                                    "(not a dsv3 checkpoint, or an incomplete one)")
        try:
            for name in names:
                match = _EXPERT_FILE.search(name) if name.startswith(f"{prefix}-experts-") else None
                if name in dense_files:
                    self._add(self._dense, ckpt / name, listed and listed[name])
                elif match:
                    self._add(self._shards.setdefault(int(match.group(1)), {}), ckpt / name, listed and listed[name])
        except BaseException:
            self._files.close()
            raise
        self._expert_keys = {k for keys in self._shards.values() for k in keys}

    def _open(self, path: Path):
        if path not in self._handles:
            self._handles[path] = self._files.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[path]

    @property
    def files_opened(self) -> int:
        return len(self._handles)

    def _add(self, index: dict, path: Path, shapes: dict[str, tuple[int, ...]] | None) -> None:
        """Index the tensors of one file: from the manifest's list, else from its header."""
        if shapes is None:
            fh = self._open(path)
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        for key, shape in shapes.items():
            if key in index:
                raise ValueError(f"{self.ckpt}: {key} is in two files of one kind ({path.name} and another)")
            index[key] = path
            self._shapes[(path, key)] = tuple(shape)

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self._files.close()

    def keys(self) -> set[str]:
        return set(self._dense) | self._expert_keys

    def __contains__(self, key: str) -> bool:
        return key in self._dense or key in self._expert_keys

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._dense:
            value = self._open(self._dense[key]).get_tensor(key)
        else:
            value = self._expert_rows(key, self.experts)
        self.bytes_read += value.nbytes
        return value

    def shape(self, key: str) -> tuple[int, ...]:
        """self[key].shape, from the manifest or the file headers."""
        if key in self._dense:
            return self._shapes[(self._dense[key], key)]
        if key not in self._expert_keys:
            raise KeyError(f"{self.ckpt}: no tensor {key}")
        shapes = [self._shapes[(keys[key], key)] for keys in self._shards.values() if key in keys]
        first, last = self.experts or (0, sum(s[0] for s in shapes))
        return (last - first, *shapes[0][1:])

    def flat_range(self, key: str, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start + numel) of self[key].flatten(), reading only the rows that hold
        them (a ZeRO partition's fragment of a tensor: a resume reads its own share of the
        optimizer moments, not every rank all of them)."""
        shape = self.shape(key)
        if start < 0 or start + numel > math.prod(shape):
            raise ValueError(f"{self.ckpt}: elements [{start}, {start + numel}) of {key}, which has shape {shape}")
        row = math.prod(shape[1:])  # elements per row (1 for a vector)
        r0, r1 = start // row, -(-(start + numel) // row)
        if key in self._dense:
            rows = self._open(self._dense[key]).get_slice(key)[r0:r1]
        else:
            first = self.experts[0] if self.experts else 0
            rows = self._expert_rows(key, (first + r0, first + r1))
        self.bytes_read += rows.nbytes
        return rows.reshape(-1)[start - r0 * row:start - r0 * row + numel]

    def _expert_rows(self, key: str, experts: tuple[int, int] | None) -> torch.Tensor:
        """Experts [first, last) of a stacked expert tensor (all of them for None), from however
        many shard files hold them (opening only those)."""
        if key not in self._expert_keys:
            raise KeyError(f"{self.ckpt}: no tensor {key}")
        parts, start = [], 0  # start: global id of the current shard's first expert
        for shard in sorted(self._shards):
            if key not in self._shards[shard]:
                raise KeyError(f"{self.ckpt}: expert shard {shard} has no {key}")
            path = self._shards[shard][key]
            end = start + self._shapes[(path, key)][0]
            lo, hi = (start, end) if experts is None else (max(experts[0], start), min(experts[1], end))
            if lo < hi:
                parts.append(self._open(path).get_slice(key)[lo - start:hi - start])
            start = end
        first, last = experts or (0, start)
        if sum(t.shape[0] for t in parts) != last - first:
            raise ValueError(f"{self.ckpt}: {key} holds {start} experts; experts [{first}, {last}) were asked for")
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _listed_tensors(ckpt: Path, prefix: str) -> dict[str, dict[str, list[int]]] | None:
    """{file: {tensor: shape}} for the checkpoint's `prefix` files, from its manifest; None when
    there is no manifest or it does not list every such file's tensors."""
    try:
        files = read_meta(ckpt).get("files") or {}
    except (OSError, ValueError):
        return None
    mine = {name: entry.get("tensors") for name, entry in files.items()
            if name.startswith(f"{prefix}-") and name.endswith(".safetensors")}
    if not mine or any(t is None for t in mine.values()):
        return None
    return mine


def read_tensors(ckpt: Path, prefix: str, experts: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor TensorReader gives, in memory at once."""
    with TensorReader(ckpt, prefix, experts) as reader:
        return {k: reader[k] for k in sorted(reader.keys())}


def load_model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model's full state dict from a checkpoint directory (sample, export, weights-only start)."""
    return read_tensors(ckpt, "model")


def load(engine, layout, ckpt: Path) -> dict:
    """Restore model and optimizer state into this rank's (possibly resharded) engine; returns
    the client state (step, data position, RNG), with `read_bytes`: the tensor bytes this rank
    read, `read_bytes_total` and `read_bytes_max`: their sum over the ranks and the most any one
    read."""
    client = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    read_bytes = load_weights(engine, layout, ckpt)
    partitioned = _zero_partitioned(engine)
    _link_optimizer_state(engine)
    with TensorReader(ckpt, "optim", layout.expert_range) as moments:
        tensors = checkpoint_tensors(engine.module)
        _check_shapes(moments, [(f"{key}.{name}", _stored_shape(params, stacked))
                                for name, params, stacked in tensors for key in ADAM_KEYS])
        replicas = _Replicas(tensors, layout)
        for name, params, stacked in tensors:
            for key in ADAM_KEYS:
                saved_key = f"{key}.{name}"
                if partitioned:  # each rank reads only the fragments its ZeRO partition holds
                    for i, p in enumerate(params):
                        fragment = p._hp_mapping  # None: no part of p in this rank's partition
                        if fragment is not None:
                            at = fragment.lp_fragment_address
                            value = moments.flat_range(saved_key, i * p.numel() * stacked + at.start, at.numel)
                            fragment.get_hp_fragment(key).data.copy_(value)
                    continue
                # unpartitioned (ZeRO-0): every rank holds all moments; one reads, the rest receive
                saved = replicas.read(moments, saved_key, name, params[0].device)
                for p, value in zip(params, _unstacked(saved, stacked)):
                    engine.optimizer.state[p][key] = value.clone()
        read_bytes += moments.bytes_read
    step_count = client["optimizer_step"]
    inner = engine.optimizer.optimizer if partitioned else engine.optimizer
    # Each tensor the torch optimizer steps: the parameters at ZeRO-0, the flat fp32 partitions
    # under ZeRO-1/2. Its step count goes where torch's own load_state_dict puts it: beside the
    # tensor for the fused and capturable kernels (fused AdamW on CUDA wants it there), on the
    # host otherwise; fp32 either way.
    for group in inner.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = inner.state[p]
            old = state.get("step")
            if old is not None and not torch.is_tensor(old):
                state["step"] = step_count
            else:
                state["step"] = torch.tensor(float(step_count), dtype=torch.float32,
                                             device=p.device if on_device else "cpu")
    return {**client, **_read_totals(read_bytes)}


def _read_totals(read_bytes: int) -> dict[str, int]:
    """This rank's tensor bytes read, the sum over the ranks, and the most any one rank read."""
    from parallel.engine import all_reduce_  # (imports DeepSpeed: not at module level, for sample/export)

    total = all_reduce_(torch.tensor([read_bytes], dtype=torch.float64))
    most = all_reduce_(torch.tensor([read_bytes], dtype=torch.float64), op=dist.ReduceOp.MAX)
    return {"read_bytes": read_bytes, "read_bytes_total": int(total.item()), "read_bytes_max": int(most.item())}


def load_weights(engine, layout, ckpt: Path) -> int:
    """Set module parameters (and ZeRO's fp32 masters) and routing biases from a checkpoint's
    model tensors, reading only this rank's experts (resume and weights-only start); returns the
    tensor bytes this rank read. Each tensor is read by one rank and broadcast to the others
    that hold it (`_Replicas`)."""
    partitioned = _zero_partitioned(engine)
    with TensorReader(ckpt, "model", layout.expert_range) as weights, torch.no_grad():
        tensors = checkpoint_tensors(engine.module)
        missing = [n for n, _, _ in tensors if n not in weights]
        if missing:
            raise KeyError(f"checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")
        _check_shapes(weights, [(name, _stored_shape(params, stacked)) for name, params, stacked in tensors])
        replicas = _Replicas(tensors, layout)
        for name, params, stacked in tensors:
            saved = replicas.read(weights, name, name, params[0].device)
            for p, value in zip(params, _unstacked(saved, stacked)):
                p.copy_(value)
                if partitioned:
                    from deepspeed.utils import safe_set_full_fp32_param

                    safe_set_full_fp32_param(p, value)
            del saved
        for name, b in engine.module.named_buffers():
            if name in weights:  # the routing biases: a few floats per layer, read by every rank
                b.copy_(weights[name].to(b.dtype))
        return weights.bytes_read


def _check_shapes(reader: TensorReader, wanted: list[tuple[str, tuple[int, ...]]]) -> None:
    """Every saved shape against the model's, before any tensor is read (from the manifest, or
    the file headers): every rank sees the same shapes, so all of them stop on the same error
    (none waits in a broadcast for a rank that has already raised)."""
    for key, want in wanted:
        if reader.shape(key) != want:
            raise ValueError(f"checkpoint tensor {key} has shape {reader.shape(key)}, model {want}")


class _Replicas:
    """Reads a tensor that several ranks hold identically (a dense tensor: every rank; an expert
    shard's tensor: the shard's replicas, its EDP group) on one of them and broadcasts it to the
    rest, so a resume reads each tensor from the files once, not once per rank. At 671B on 1536
    ranks with EP=64 a rank holds 70 GB of dense weights and 42 GB of experts (fp32): read by
    every rank that came to 171 TB (the page cache shares only the dense files, and only among
    a node's ranks); read once, 2.7 TB. The reader of each tensor is the rank a save at this
    layout would have it write (`_writing_plan`): whole tensors balanced by size."""

    def __init__(self, tensors: list, layout):
        self.distributed = _multi_rank()
        if self.distributed:
            dense_rank, _, expert_rank, _ = _writing_plan(tensors, layout)
            self.reader = {**dense_rank, **expert_rank}
            self.expert_group = layout.edp_group if layout.ep > 1 else None  # None: the world

    def read(self, reader: TensorReader, key: str, name: str, device: torch.device) -> torch.Tensor:
        """reader[key] (of parameter `name`) as fp32 on `device`, on every rank that calls this
        (collective: all ranks that hold `name`, in the same order)."""
        if not self.distributed:
            return reader[key].to(device=device, dtype=torch.float32)
        src = self.reader[name]
        if dist.get_rank() == src:
            value = reader[key].to(device=device, dtype=torch.float32)
        else:
            value = torch.empty(reader.shape(key), dtype=torch.float32, device=device)
        dist.broadcast(value, src=src, group=self.expert_group if is_stacked_expert_weight(name) else None)
        return value


def save_weights_only(tensors, run_dir: Path, model_cfg: ModelConfig) -> Path:
    """A step-0 checkpoint holding only weights (from `dsv3 import-hf`, or tests). `tensors`: our
    names -> tensors (a state dict, or a lazy source such as model.hf.HFReader), read and written
    one layer at a time: a part file of dense tensors per layer, one of experts per MoE layer."""
    ckpt = run_dir / "checkpoints" / tag_for(0)
    ckpt.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[int, int], list[str]] = {}  # model.block_of -> keys
    for key in tensors.keys():
        groups.setdefault(block_of(key), []).append(key)
    order = sorted(groups)
    with_experts = [g for g in order if any(is_stacked_expert_weight(k) for k in groups[g])]
    files = []
    for i, group in enumerate(order):
        dense = [k for k in groups[group] if not is_stacked_expert_weight(k)]
        experts = [k for k in groups[group] if is_stacked_expert_weight(k)]
        parts = [(dense, _dense_files(i, len(order))[0])] if dense else []
        if experts:
            parts.append((experts, _expert_files_for(1, 0, with_experts.index(group), len(with_experts))[0]))
        for keys, name in parts:
            save_safetensors({k: tensors[k].contiguous().float() for k in keys}, ckpt / name)
            files.append(name)
    manifest = _manifest_entries(ckpt, files)
    _write_meta(ckpt, {"step": 0, "model": model_cfg.to_dict(), "weights_only": True}, manifest)
    return ckpt
