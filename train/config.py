"""The run configuration: one typed dataclass per section, loaded from YAML with dotted overrides.

OmegaConf's structured configs do the type checking: an unknown key or a value of the wrong
type raises at load time, and `load_config` turns that into a ConfigError that names the key
and the file. Cross-field checks live in `Config.validate`.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from model import ConfigError, ModelConfig


@dataclass
class SourceConfig:
    """One text source for prepare-data."""

    kind: str = "shakespeare"  # shakespeare (embedded plays) | txt (folder of .txt) | jsonl
    path: str | None = None  # folder (txt) or file (jsonl); unused for shakespeare
    text_field: str = "text"  # jsonl: the field holding the document
    weight: float = 1.0  # mixing weight: documents are repeated/subsampled to this share


@dataclass
class DataConfig:
    dir: str = "data/shakespeare"  # prepared shards, tokenizer.json and manifest.json
    seq_len: int = 256  # tokens per training sequence (each sample holds seq_len + 1)
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    tokenizer: str | None = None  # an existing HF tokenizer.json; null trains a byte-level BPE
    val_documents: int = 2  # documents (plays) held out whole per source for validation
    samples_per_shard: int = 1024
    train_shards: str | None = None  # override: shard URLs/brace pattern (webdataset syntax)
    val_shards: str | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    min_lr: float = 3e-5  # floor of the decay
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norm weights
    grad_clip: float = 1.0  # global grad-norm clip; 0 = off


@dataclass
class ScheduleConfig:
    # Every schedule is a function of the step alone, never of train.steps.
    lr: str = "cosine"  # cosine | wsd | constant | deepseek
    warmup_steps: int = 100
    decay_steps: int = 1000  # cosine: steps from end of warmup to min_lr; wsd: length of the decay
    stable_steps: int = 0  # wsd: steps at peak before the decay
    # deepseek (report §4.2, in steps): warmup, constant to const_until, cosine to min_lr until
    # cosine_until, then min_lr; final_lr for steps >= final_from.
    const_until: int = 0
    cosine_until: int = 0
    final_from: int | None = None
    final_lr: float | None = None
    bias_update_rate: float = 1e-3  # γ of the aux-loss-free update
    bias_update_stop: int | None = None  # step from which γ = 0 (report: the last 500B tokens)
    mtp_weight: float = 0.3  # λ
    mtp_weight_late: float = 0.1  # λ from mtp_weight_switch on
    mtp_weight_switch: int | None = None
    batch_ramp_start: int | None = None  # sequences at step 1; null = no ramp
    batch_ramp_steps: int = 0  # steps over which the batch grows to train.global_batch_size
    # sequences: the ramp's sizes are multiples of it, not of the world size, so step s holds the
    # same samples on any layout whose micro_batch_size × world size divides it; required with a ramp
    batch_ramp_increment: int | None = None


@dataclass
class TrainConfig:
    steps: int = 200
    seed: int = 1234
    run_dir: str = "runs/smoke"
    resume: str = "auto"  # auto | never | PATH of a checkpoint or run directory
    micro_batch_size: int = 8  # sequences per rank per forward
    global_batch_size: int = 16  # sequences per optimizer step over all ranks
    eval_interval: int = 50
    max_bad_steps: int = 5  # consecutive steps with non-finite loss/grad norm (each skipped) before halting
    eval_batches: int = 4
    device: str = "auto"  # auto | cpu | cuda
    sample_prompt: str = "**ROMEO**"  # the plays are markdown: speakers in bold
    sample_tokens: int = 80
    # Recompute each decoder block (and MTP module) in backward, keeping only block inputs: about one
    # block's activations instead of all of them, for one more forward per step (`dsv3 plan` counts it).
    # Under fp8.backend=te the recompute re-enters TE's fp8_autocast; not with fp8.recipe=delayed.
    activation_checkpointing: bool = False


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel size
    # Node-limited routing (report §2.1.2): each token's experts on at most topk_group EP ranks.
    # It is the model's group-limited routing with groups aligned to ranks; true requires every
    # rank to hold whole groups (model.n_group divisible by ep), which makes the bound hold.
    node_limited_routing: bool = False
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1 or 2
    timeout_s: int = 600  # collective timeout; a lost rank surfaces within it


@dataclass
class FP8Config:
    backend: str = "emulated"  # te | emulated
    recipe: str = "blockwise"  # blockwise | current | delayed | mxfp8
    # The module weights the FP8 GEMMs quantise from. fp32: DeepSpeed runs in fp32 and the module
    # weights are the master (4 B/param on every rank). bf16: DeepSpeed's bf16 engine, as
    # model.precision=bf16 runs it: bf16 module weights (2 B), fp32 master weights, moments and
    # gradient accumulation in ZeRO-2's partitions (so it needs parallel.zero_stage=2).
    weights: str = "fp32"  # fp32 | bf16
    # fp8.backend=te: keep each weight's FP8 copies from an optimizer step's first micro-batch for
    # the others (TE's is_first_microbatch; saves a cast per micro-batch, costs ~2 B per GEMM
    # parameter for the whole run). false: cast afresh in every forward, so with activation
    # checkpointing the copies live one block at a time. The emulated backend always casts afresh.
    weight_cache: bool = True


@dataclass
class CheckpointConfig:
    interval: int = 100  # optimizer steps between checkpoints (the last step always saves)
    keep: int = 2  # newest checkpoints kept


@dataclass
class LoggingConfig:
    wandb: str = "offline"  # online | offline | disabled
    project: str = "dsv3"
    interval: int = 10  # steps between metrics.jsonl rows (eval steps and the last step always log)
    heatmap_interval: int = 100  # steps between expert-load heatmaps in W&B
    progress: bool = True  # tqdm bar on rank 0
    peak_tflops: float | None = None  # device peak for MFU; null = look up or measure


@dataclass
class LaunchConfig:
    """`dsv3 launch slurm` (submitit) and `dsv3 plan`. One task per GPU; rendezvous from SLURM's variables."""

    nodes: int = 1
    gpus_per_node: int = 1  # 0 = a CPU job (gloo); then tasks_per_node says how many ranks per node
    tasks_per_node: int | None = None  # default: gpus_per_node (one task per GPU)
    cpus_per_task: int = 8  # also OMP_NUM_THREADS in the job unless the environment sets it
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 60  # SLURM time limit; submitit checkpoints and requeues before it
    constraint: str | None = None
    mem_gb: int | None = None  # per node; null = the partition's default
    exclusive: bool = False
    extra_sbatch: list[str] = field(default_factory=list)  # more sbatch flags, e.g. ["--reservation=big"]
    log_dir: str | None = None  # submitit's logs and pickles; null = RUN_DIR/slurm (must be on a shared filesystem)
    job_name: str = "dsv3"
    setup: list[str] = field(default_factory=list)  # shell lines run before srun, e.g. ["module load cuda/12.4"]
    env: dict[str, str] = field(default_factory=dict)  # set in every task, e.g. {NCCL_SOCKET_IFNAME: ib0}
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit: must cover one step plus a checkpoint
    max_timeouts: int = 3  # requeues after hitting the time limit (preemptions are not counted)
    gpu_mem_gb: float = 80.0  # memory per GPU that `dsv3 plan` checks the layout against


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    @property
    def bf16_weights(self) -> bool:
        """Module weights in bf16 on DeepSpeed's bf16 engine (fp32 masters in the optimizer):
        model.precision=bf16, or fp8 with fp8.weights=bf16."""
        return self.model.precision == "bf16" or (self.model.precision == "fp8" and self.fp8.weights == "bf16")

    def validate(self) -> None:
        """Checks across fields and sections (ModelConfig checks itself)."""
        _check_finite(self)  # NaN passes every `< 0` test below, and inf trains to NaN weights
        self.model.validate()
        t, p = self.train, self.parallel
        for key in ("steps", "micro_batch_size", "global_batch_size", "eval_interval", "eval_batches", "max_bad_steps"):
            if getattr(t, key) <= 0:
                raise ConfigError(f"train.{key}", getattr(t, key), "must be a positive integer")
        if t.resume not in ("auto", "never") and not t.resume:
            raise ConfigError("train.resume", t.resume, "auto, never or a checkpoint path")
        _choice("train.device", t.device, ("auto", "cpu", "cuda"))
        if self.data.seq_len <= 1 or self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                "data.seq_len", self.data.seq_len,
                f"between 2 and model.max_position_embeddings={self.model.max_position_embeddings}",
            )
        if p.zero_stage not in (0, 1, 2):
            raise ConfigError("parallel.zero_stage", p.zero_stage, "0, 1 or 2 (ZeRO-3 does not combine with MoE)")
        if self.bf16_weights and p.zero_stage != 2:
            # DeepSpeed accumulates bf16 models' gradients in fp32 (data_types.grad_accum_dtype) with
            # the ZeRO-2 optimizer only: ZeRO-0 refuses the setting, ZeRO-1 switches to an optimizer
            # whose clipping norm (and skip-step check) parallel.engine does not correct for experts.
            what = "model.precision=bf16" if self.model.precision == "bf16" else "fp8.weights=bf16"
            raise ConfigError("parallel.zero_stage", p.zero_stage,
                              f"2 with {what}: only ZeRO-2 accumulates and reduces bf16 models' "
                              "gradients in fp32 (others would sum micro-batch gradients in bf16)")
        if p.ep <= 0 or self.model.n_routed_experts % p.ep:
            raise ConfigError("parallel.ep", p.ep, f"must divide model.n_routed_experts={self.model.n_routed_experts}")
        if p.node_limited_routing and self.model.n_group % p.ep:
            raise ConfigError(
                "parallel.node_limited_routing", True,
                f"needs model.n_group={self.model.n_group} divisible by parallel.ep={p.ep}, so each rank holds "
                "whole expert groups and a token reaches at most model.topk_group ranks",
            )
        _choice("schedule.lr", self.schedule.lr, ("cosine", "wsd", "constant", "deepseek"))
        _choice("logging.wandb", self.logging.wandb, ("online", "offline", "disabled"))
        _choice("fp8.backend", self.fp8.backend, ("te", "emulated"))
        _choice("fp8.recipe", self.fp8.recipe, ("blockwise", "current", "delayed", "mxfp8"))
        _choice("fp8.weights", self.fp8.weights, ("fp32", "bf16"))
        for s in self.data.sources:
            _choice("data.sources.kind", s.kind, ("shakespeare", "txt", "jsonl"))
            if s.kind != "shakespeare" and not s.path:
                raise ConfigError("data.sources.path", s.path, f"required for kind={s.kind}")
            if s.weight <= 0:
                raise ConfigError("data.sources.weight", s.weight, "must be positive")
        if self.optim.lr <= 0:
            raise ConfigError("optim.lr", self.optim.lr, "must be positive")
        for key in ("min_lr", "weight_decay", "grad_clip", "eps"):
            if getattr(self.optim, key) < 0:
                raise ConfigError(f"optim.{key}", getattr(self.optim, key), "must be >= 0")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self.optim, key) < 1:
                raise ConfigError(f"optim.{key}", getattr(self.optim, key), "must be in [0, 1)")
        for key in ("warmup_steps", "decay_steps", "stable_steps", "const_until", "cosine_until", "batch_ramp_steps",
                    "bias_update_rate", "mtp_weight", "mtp_weight_late", "final_from", "final_lr", "bias_update_stop",
                    "mtp_weight_switch"):
            if (getattr(self.schedule, key) or 0) < 0:  # (the optional ones: None is off)
                raise ConfigError(f"schedule.{key}", getattr(self.schedule, key), "must be >= 0")
        if self.schedule.batch_ramp_start is not None:
            start, inc = self.schedule.batch_ramp_start, self.schedule.batch_ramp_increment
            if not 0 < start <= self.train.global_batch_size:
                raise ConfigError("schedule.batch_ramp_start", start,
                                  f"must be in [1, train.global_batch_size = {self.train.global_batch_size}]")
            if inc is None or inc <= 0 or start % inc:
                raise ConfigError("schedule.batch_ramp_increment", inc,
                                  f"a positive number of sequences dividing schedule.batch_ramp_start = {start} "
                                  "(the ramp's sizes are its multiples); required with a ramp")
        sc = self.schedule
        if sc.lr == "deepseek" and not sc.warmup_steps <= sc.const_until <= sc.cosine_until:
            raise ConfigError("schedule.const_until", sc.const_until,
                              f"the deepseek schedule needs warmup_steps ({sc.warmup_steps}) <= const_until <= "
                              f"cosine_until ({sc.cosine_until}): warmup, then constant, then cosine")
        if self.data.seq_len <= self.model.num_nextn_predict_layers:
            raise ConfigError("data.seq_len", self.data.seq_len,
                              f"must exceed model.num_nextn_predict_layers={self.model.num_nextn_predict_layers} "
                              "(each MTP depth predicts one token further)")
        if self.data.samples_per_shard <= 0:
            raise ConfigError("data.samples_per_shard", self.data.samples_per_shard, "must be a positive integer")
        if self.data.val_documents < 0:
            raise ConfigError("data.val_documents", self.data.val_documents, "must be >= 0")
        if p.timeout_s <= 0:
            raise ConfigError("parallel.timeout_s", p.timeout_s, "must be a positive number of seconds")
        for key in ("interval", "keep"):
            if getattr(self.checkpoint, key) <= 0:
                raise ConfigError(f"checkpoint.{key}", getattr(self.checkpoint, key), "must be a positive integer")
        if self.logging.interval <= 0:
            raise ConfigError("logging.interval", self.logging.interval, "must be a positive integer")

    def batch_layout(self, world_size: int) -> None:
        """Check that `world_size` ranks can run this config: the global batch splits into their
        micro-batches, and the expert-parallel groups tile them."""
        if world_size % self.parallel.ep:
            raise ConfigError("parallel.ep", self.parallel.ep, f"must divide the world size {world_size} (ranks in the job)")
        t = self.train
        per_step = t.micro_batch_size * world_size
        sizes = {"train.global_batch_size": t.global_batch_size}
        if self.schedule.batch_ramp_start is not None:  # every ramp size is a multiple of the increment
            sizes["schedule.batch_ramp_increment"] = self.schedule.batch_ramp_increment
        for key, size in sizes.items():
            if size % per_step:
                raise ConfigError(
                    key, size,
                    f"must be a multiple of micro_batch_size × world size = {t.micro_batch_size} × {world_size}",
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_finite(obj, prefix: str = "") -> None:
    """Every float field of a config dataclass (sections and lists of them included) is finite."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, value, "must be a finite number")
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_finite(item, f"{key}[{i}].")


def _choice(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"one of {', '.join(map(str, allowed))}")


def _omegaconf_error(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    section = getattr(err, "object_type", None)
    if isinstance(err, ConfigKeyError) and dataclasses.is_dataclass(section):
        # an unknown key: say which keys its section has
        hint = msg[msg.find("Did you mean: ") + 14:] if "Did you mean: " in msg else ""
        hint = f" (did you mean {hint})" if hint else ""
        msg = f"unknown key{hint}; allowed: {', '.join(f.name for f in dataclasses.fields(section))}"
    return ConfigError(key, None, f"{msg} (in {source})")


def _precheck(tree, source: str) -> None:
    """Checks on a YAML file's or the overrides' tree before the merge, where OmegaConf's own
    errors would not name the key: each section is a mapping, and each data.sources entry is
    checked alone (see _check_sources)."""
    if not isinstance(tree, dict):
        raise ConfigError("config", source, f"a YAML mapping of sections (model:, data:, ...), not a {type(tree).__name__}")
    for f in dataclasses.fields(Config):
        section = tree.get(f.name)
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f.name, section, "a section of key: value pairs")
        if section:
            _check_yaml_booleans(f.name, f.default_factory, section)
    if isinstance(tree.get("data"), dict):
        _check_sources(tree["data"].get("sources"), source)


def _check_yaml_booleans(name: str, cls: type, section: dict) -> None:
    """YAML reads an unquoted off/no/false/on/yes/true as a boolean, which OmegaConf would store in
    a text field as the word 'False' or 'True'. Say so, naming the key, instead of failing later
    on that word; `logging.wandb: off` (or false, no) is taken to mean disabled. `cls`: the
    section's dataclass."""
    types = typing.get_type_hints(cls)
    for key, value in section.items():
        if not isinstance(value, bool) or key not in types:
            continue
        allowed = _member_types(types[key])
        if bool in allowed or str not in allowed:
            continue  # a flag, or a field OmegaConf type-checks itself
        if (name, key, value) == ("logging", "wandb", False):
            section[key] = "disabled"
            continue
        raise ConfigError(f"{name}.{key}", value,
                          "text, and YAML reads an unquoted yes/no/on/off/true/false as a boolean: quote it")


def _member_types(annotation) -> set:
    return set(typing.get_args(annotation)) or {annotation}


def _check_sources(items, source: str) -> None:
    """data.sources entries one by one, so an error names the entry: data.sources[1].pth, not pth
    (OmegaConf checks list items detached from their list and reports the bare key)."""
    if not isinstance(items, list):
        return  # not a list: the merge says so, naming data.sources
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            continue  # not a mapping: the merge says so, naming data.sources[i]
        try:
            OmegaConf.merge(OmegaConf.structured(SourceConfig), item)
        except OmegaConfBaseException as err:
            inner = _omegaconf_error(err, source)
            raise ConfigError(f"data.sources[{i}].{inner.key}", None, inner.allowed) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                layer: tuple[str, dict] | None = None) -> Config:
    """YAML file + dotted `key=value` overrides -> validated Config. Raises ConfigError.

    `layer`: (what it is, a partial config tree) merged over the file and under the overrides,
    e.g. the model an HF checkpoint's config.json describes (dsv3 import-hf)."""
    schema = OmegaConf.structured(Config)
    source = str(path) if path else "defaults"
    try:
        merged = schema
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError("config", str(p), "file not found")
            try:
                raw = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as err:
                # one line: the parser's complaint and where (its str() spans several lines)
                mark = getattr(err, "problem_mark", None)
                at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ConfigError("config", str(p), f"not valid YAML: {problem}{at}") from None
            _precheck(raw, source)
            merged = OmegaConf.merge(merged, OmegaConf.create(raw))
        if layer is not None:
            source = f"{source} + {layer[0]}"
            merged = OmegaConf.merge(merged, OmegaConf.create(layer[1]))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(item, None, "overrides are dotted.key=value")
        if overrides:
            source = f"{source} + overrides"
            dotted = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
            _precheck(dotted, source)
            merged = OmegaConf.merge(merged, OmegaConf.create(dotted))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, source) from None
    except ConfigError as err:
        if "(in " not in err.allowed:
            err.args = (f"{err.args[0]} (in {source})",)
        raise
    try:
        cfg.validate()
    except ConfigError as err:
        err.args = (f"{err.args[0]} (in {source})",)
        raise
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
