"""`dsv3`: the one entry point. Each subcommand parses its arguments and calls a function that
tests call too. A bad config or argument exits with status 2 and a one-line message naming the
key and the file; no traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from model import ConfigError
from model.hf import HFCheckpointError

EPILOG = "Overrides use the YAML's dotted keys, e.g. optim.lr=1e-3 train.steps=50."


def _config(args):
    from .config import load_config

    return load_config(args.config, args.overrides)


def cmd_prepare_data(args) -> int:
    from .data import prepare_data

    manifest = prepare_data(_config(args), log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({k: manifest[k] for k in ("seq_len", "vocab_size") if k in manifest}))
    return 0


def cmd_train(args) -> int:
    cfg = _config(args)  # before the trainer's imports (DeepSpeed): a bad key fails in a second
    from .loop import train

    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.stopped_by:  # no sample: whoever stopped the run wants it to end
        print(f"stopped at step {result.step} of {cfg.train.steps} ({result.stopped_by})"
              + (f"; the latest val_loss {result.val_loss:.4f} is from step {result.val_step}"
                 if result.val_loss is not None else ""))
    elif result.val_loss is not None:
        print(f"final step {result.step}: val_loss {result.val_loss:.4f}"
              + (f" (first {result.first_val_loss:.4f})" if result.first_val_loss is not None else ""))
        if cfg.train.sample_tokens > 0 and not (result.run_dir / "tokenizer.json").is_file():
            print(f"no sample: {result.run_dir} has no tokenizer.json to decode with (shards from elsewhere: put "
                  "their tokenizer.json beside them)")
        elif cfg.train.sample_tokens > 0:
            from .sample import sample_text

            text = sample_text(result.run_dir, cfg.train.sample_prompt, cfg.train.sample_tokens)
            print(f"--- sample ({cfg.train.sample_prompt!r}) ---\n{text}\n---")
    return 0


def cmd_sample(args) -> int:
    from .sample import sample_text

    print(sample_text(args.run_dir, args.prompt, args.tokens, args.temperature, args.top_p, args.seed))
    return 0


def cmd_export_hf(args) -> int:
    import torch

    from model import hf

    from . import checkpoint as ckpt_io
    from .sample import resolve_run

    cfg, ckpt = resolve_run(args.run_dir)
    tok = Path(args.run_dir) / "tokenizer.json"
    eod = None
    if tok.is_file():
        from tokenizers import Tokenizer

        from .data import eod_token

        eod = eod_token(Tokenizer.from_file(str(tok)))  # (name, id) or None
    with ckpt_io.TensorReader(ckpt, "model") as weights:  # one tensor at a time, never the whole model
        hf.write_hf(weights, cfg.model, args.out_dir, dtype=getattr(torch, args.dtype),
                    eod_token_id=eod[1] if eod else None)
    if tok.is_file():
        hf.write_tokenizer(tok, args.out_dir, eod[0] if eod else None, cfg.model.max_position_embeddings)
    print(f"exported {ckpt} to {args.out_dir}" + ("" if tok.is_file() else f" (no tokenizer: {tok} is missing)"),
          file=sys.stderr)
    return 0


def cmd_import_hf(args) -> int:
    from model import hf

    from . import checkpoint as ckpt_io
    from .config import load_config, save_config

    out = Path(args.out_run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        # a run there would resume its own checkpoints, not these weights, and its config would be lost
        raise FileExistsError(f"{out}: exists and is not an empty directory; import-hf makes a new run directory "
                              "(nothing was written)")
    # the model: what config.json says, the YAML's model fields it does not describe (precision,
    # MTP loss weight, ...), and model.* overrides over both (their shapes are checked below)
    arch = hf.read_hf_config(args.hf_dir).to_dict()
    cfg = load_config(args.config, args.overrides,
                      layer=(f"{Path(args.hf_dir) / 'config.json'}", {"model": {k: arch[k] for k in hf.HF_FIELDS}}))
    cfg.train.run_dir = str(out)
    cfg.validate()
    with hf.read_hf(args.hf_dir, cfg.model) as reader:  # names and shapes checked first; tensors read as written
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        tok = Path(args.hf_dir) / "tokenizer.json"
        if tok.is_file():
            (out / "tokenizer.json").write_bytes(tok.read_bytes())
        # a layer at a time: its tensors are read, converted, written and dropped
        ckpt = ckpt_io.save_weights_only(reader, out, cfg.model)
    print(f"wrote {ckpt}; start training from it with train.resume={out}", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    from .plan import format_plan, plan

    result = plan(_config(args), mfu=args.mfu, peak_tflops=args.peak_tflops)
    print(json.dumps(result) if args.json else format_plan(result))
    return 0


def cmd_bench(args) -> int:
    from .bench import bench, format_bench

    if args.json:  # library banners (DeepSpeed) print to stdout; keep stdout for the one object
        real_stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        result = bench(_config(args), steps=args.steps, warmup=args.warmup, profile=not args.no_profile)
    finally:
        if args.json:
            sys.stdout = real_stdout
    result["config"] = str(args.config)
    if int(os.environ.get("RANK", "0")) == 0:  # one report per job: the ranks' figures are combined in bench
        print(json.dumps(result) if args.json else format_bench(result))
    return 0


def cmd_launch_slurm(args) -> int:
    from launch.slurm import LaunchError, require_slurm, submit, wait, wandb_line

    try:
        require_slurm()  # before the config: without SLURM nothing else matters
        cfg = _config(args)
        job = submit(cfg)
    except LaunchError as err:
        print(f"dsv3 launch slurm: error: {err}", file=sys.stderr)
        return 2
    out = job.to_dict()
    if not args.json:
        print("\n".join(job.lines()), flush=True)
    if not args.wait:
        if args.json:
            print(json.dumps(out))
        return 0
    final = wait(job.job_id)
    out.update(state=final.get("JobState"), exit_code=final.get("ExitCode"), restarts=final.get("Restarts"),
               wandb=wandb_line(cfg, job.run_dir))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"job {job.job_id}: {out['state']} (exit code {out['exit_code']}, restarts {out['restarts']})")
        if cfg.logging.wandb == "online":
            print(f"  W&B: {out['wandb']}")
    return 0 if out["state"] == "COMPLETED" else 1


def cmd_launch_local(args) -> int:
    from launch.local import launch_local

    return launch_local(args.config, args.nproc, args.overrides, log=lambda m: print(m, file=sys.stderr))


def _options_anywhere(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let options stand between CONFIG and the overrides (`dsv3 plan CONFIG --json k=v`): argparse
    otherwise binds every positional before the first option and rejects the overrides after it."""
    plain = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        parser.parse_known_args = plain  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            parser.parse_known_args = parse_known_args

    parser.parse_known_args = parse_known_args
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 reference training system.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name, help_, fn):
        sp = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG)
        sp.add_argument("config", help="run config YAML (configs/*.yaml)")
        sp.add_argument("overrides", nargs="*", help="dotted.key=value")
        sp.set_defaults(fn=fn)
        return sp

    with_config("prepare-data", "tokenise the configured corpus into webdataset shards", cmd_prepare_data)
    with_config("train", "train (resumes per train.resume; torchrun/launch start several ranks)", cmd_train)

    sp = sub.add_parser("sample", help="generate text from a run's newest checkpoint")
    sp.add_argument("run_dir")
    sp.add_argument("prompt")
    sp.add_argument("--tokens", type=int, default=80)
    sp.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    sp.add_argument("--top-p", type=float, default=0.95, help="nucleus mass in [0, 1] (0 = greedy)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_sample)

    sp = sub.add_parser("export-hf", help="write a run's newest checkpoint as an HF DeepseekV3 directory")
    sp.add_argument("run_dir")
    sp.add_argument("out_dir")
    sp.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the written weights (the checkpoint's are fp32)")
    sp.set_defaults(fn=cmd_export_hf)

    sp = sub.add_parser(
        "import-hf", help="make a run directory from an HF DeepseekV3 checkpoint (weights only)",
        epilog="Options go before the positional arguments: dsv3 import-hf --config configs/smoke.yaml HF_DIR "
               "OUT_RUN_DIR train.steps=100",
    )
    sp.add_argument("--config", default=None,
                    help="YAML for the other sections (data, optim, ...) and the model fields config.json does "
                         "not describe (precision, ...); model.* overrides apply over config.json")
    sp.add_argument("hf_dir")
    sp.add_argument("out_run_dir")
    sp.add_argument("overrides", nargs="*", help="dotted.key=value")
    sp.set_defaults(fn=cmd_import_hf)

    sp = _options_anywhere(with_config(
        "plan", "parameters, FLOPs/token, per-GPU memory, fit and GPU-hours of a config's layout", cmd_plan))
    sp.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    sp.add_argument("--peak-tflops", type=float, default=989.0,
                    help="dense peak per GPU in TFLOP/s (default 989: H100/H800 BF16)")
    sp.add_argument("--json", action="store_true", help="one JSON object on stdout")

    sp = _options_anywhere(with_config(
        "bench", "training throughput, MFU, peak memory and a step-time breakdown on synthetic tokens", cmd_bench))
    sp.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    sp.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    sp.add_argument("--no-profile", action="store_true", help="skip the profiled breakdown step")
    sp.add_argument("--json", action="store_true", help="one JSON object on stdout")

    launch = sub.add_parser("launch", help="start training on several processes: SLURM (submitit) or torchrun")
    where = launch.add_subparsers(dest="where", required=True)
    sp = _options_anywhere(where.add_parser(
        "slurm", help="submit to SLURM via submitit (nodes, GPUs, partition, ... from the launch: section)",
        description="Submit `dsv3 train CONFIG` to SLURM: one task per GPU, rendezvous from SLURM's "
                    "variables; SIGUSR2 (time limit, preemption) checkpoints and requeues, scancel "
                    "checkpoints and stops.", epilog=EPILOG))
    sp.add_argument("config", help="run config YAML (configs/*.yaml)")
    sp.add_argument("overrides", nargs="*", help="dotted.key=value")
    sp.add_argument("--wait", action="store_true", help="block until the job ends; exit 0 if it COMPLETED")
    sp.add_argument("--json", action="store_true", help="one JSON object on stdout (job id, logs, run dir, W&B)")
    sp.set_defaults(fn=cmd_launch_slurm)
    sp = _options_anywhere(where.add_parser(
        "local", help="torchrun on this machine", epilog=EPILOG,
        description="Run `dsv3 train CONFIG` under torchrun --standalone with N processes (OMP_NUM_THREADS=1 "
                    "on CPU unless set)."))
    sp.add_argument("config", help="run config YAML (configs/*.yaml)")
    sp.add_argument("--nproc", type=int, required=True, help="processes (one per GPU)")
    sp.add_argument("overrides", nargs="*", help="dotted.key=value")
    sp.set_defaults(fn=cmd_launch_local)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("WANDB_SILENT", "true")
    args = build_parser().parse_args(argv)
    args.command = " ".join(filter(None, (args.command, getattr(args, "where", None))))  # "launch local"
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"dsv3 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, HFCheckpointError) as err:
        print(f"dsv3 {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from .loop import TrainingError

        if not isinstance(err, TrainingError):
            raise
        print(f"dsv3 {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
