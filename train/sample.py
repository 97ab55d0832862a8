"""Text generation from a finished (or running) run, so a user can see what the model learned."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from model import ConfigError, DeepSeekV3

from . import checkpoint as ckpt_io
from .config import Config, load_config
from .data import EOD_CANDIDATES, eod_token


def resolve_run(run_dir: str | Path, checkpoint: str | None = None) -> tuple[Config, Path]:
    """A run directory -> (its resolved config, its newest complete checkpoint, checked to be of
    that config's model)."""
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: not found; is {run_dir} a dsv3 run directory?")
    cfg = load_config(cfg_file)
    # this process alone: `dsv3 train` samples on rank 0 once training is over, when the other
    # ranks may have exited. A damaged newest checkpoint is said, as training says it, and the
    # one before it used.
    try:
        ckpt = ckpt_io.resolve_resume(checkpoint or str(run_dir), run_dir, collective=False,
                                      log=lambda m: print(f"dsv3: {m}", file=sys.stderr))
    except ConfigError as err:  # named after train.resume, which the user of sample/export did not set
        raise FileNotFoundError(f"{run_dir}: {err.allowed}") from None
    ckpt_io.check_model_matches(ckpt_io.read_meta(ckpt), cfg.model, ckpt)
    return cfg, ckpt


def load_run(run_dir: str | Path, checkpoint: str | None = None) -> tuple[Config, DeepSeekV3, Path]:
    """A run directory -> (its resolved config, the model with its newest complete checkpoint's weights, that checkpoint)."""
    cfg, ckpt = resolve_run(run_dir, checkpoint)
    with torch.device("meta"):  # no initial values to compute and throw away
        model = DeepSeekV3(cfg.model)
    model.load_state_dict(ckpt_io.load_model_weights(ckpt), assign=True)
    return cfg, model.eval(), ckpt


@torch.no_grad()
def generate(model: DeepSeekV3, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop_id: int | None = None, seed: int = 0) -> list[int]:
    """Greedy (temperature 0) or nucleus sampling. Recomputes the whole window per token: no KV
    cache, which is fine at smoke scale and keeps this obviously correct."""
    if not prompt_ids:
        raise ConfigError("prompt", None, "has no tokens")
    if not temperature >= 0 or math.isinf(temperature):  # `not >=`: NaN fails too
        raise ConfigError("--temperature", temperature, "a finite number, at least 0 (0: greedy)")
    if not 0 <= top_p <= 1:
        raise ConfigError("--top-p", top_p, "a fraction in [0, 1] (0: greedy)")
    if max_new_tokens < 0:
        raise ConfigError("--tokens", max_new_tokens, "must be at least 0")
    g = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    window = model.cfg.max_position_embeddings
    for _ in range(max_new_tokens):
        x = torch.tensor([ids[-window:]])
        logits = model(x)[0, -1].float()  # (vocab,)
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            # shifted by the largest logit first, so a tiny temperature gives 0/-inf, never inf - inf
            probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest set whose mass reaches top_p
            keep[0] = True  # and never empty: top_p = 0 is greedy
            sorted_p = sorted_p * keep
            nxt = int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=g)])
        if stop_id is not None and nxt == stop_id:
            break
        ids.append(nxt)
    return ids


def sample_text(run_dir: str | Path, prompt: str, max_new_tokens: int = 80, temperature: float = 0.8,
                top_p: float = 0.95, seed: int = 0) -> str:
    from tokenizers import Tokenizer

    cfg, model, _ = load_run(run_dir)
    tok_file = Path(run_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{tok_file}: the run has no tokenizer (copied at the start of training from beside "
                                "the data's manifest or, for data.train_shards, the shards)")
    tok = Tokenizer.from_file(str(tok_file))
    eod = eod_token(tok)
    stop = eod[1] if eod is not None else None
    ids = tok.encode(prompt).ids
    if not ids:  # an empty prompt: start where every training document starts, after an end of document
        if stop is None:
            raise ConfigError("prompt", prompt, f"is empty, and {tok_file} has no end-of-document token "
                              f"({', '.join(EOD_CANDIDATES)}) to start a document after")
        ids = [stop]
    ids = generate(model, ids, max_new_tokens, temperature, top_p, stop, seed)
    return tok.decode(ids)  # (special tokens, the end of document among them, left out)
