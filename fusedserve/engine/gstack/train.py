"""Causal-LM pre-training (or continued pre-training) of a Llama model folder on a byte-level token stream.

AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), gradient clipping at 1.0, linear warmup then cosine
decay to 0.1x the peak; each call starts a fresh optimizer (so training a grown folder restarts warmup, as
Gstack prescribes). Progress shows on tqdm; the run checkpoints to `out/train_state.pt` and, re-run with the
same config, resumes from it; `out/train_log.jsonl` records loss against tokens and FLOPs (6 x params x
tokens).
The trained model is written to `out` as a servable HF folder. This module never builds or grows models.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fusedserve.engine.gstack.corpus import TokenStream
from fusedserve.engine.gstack.manifest import manifest_after_training, read_manifest
from fusedserve.engine.gstack.model_folder import (
    copy_tokenizer_files,
    count_parameters,
    load_model,
    save_model,
)

STATE_NAME = "train_state.pt"
LOG_NAME = "train_log.jsonl"
CONFIG_NAME = "train_config.json"


@dataclass(frozen=True)
class TrainConfig:
    total_steps: int
    batch_size: int = 32
    seq_len: int = 128
    max_lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    log_every: int = 10
    checkpoint_every: int = 100
    offset_tokens: int = 0  # skip the stream's first tokens (a grown model skips what its base saw)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


@dataclass(frozen=True)
class TrainOutcome:
    finished: bool
    step: int
    tokens: int
    flops: float
    params: int
    final_heldout_loss: float | None


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to max_lr, then cosine from max_lr down to min_lr_ratio * max_lr at total_steps."""
    if step < config.warmup_steps:
        return config.max_lr * (step + 1) / config.warmup_steps
    span = max(1, config.total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.max_lr * config.min_lr_ratio
    return floor + 0.5 * (config.max_lr - floor) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.max_lr, betas=(config.beta1, config.beta2))


def next_token_loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=windows[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: torch.Tensor, chunk: int = 32) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(windows), chunk):
        part = windows[start : start + chunk]
        total += next_token_loss(model, part).item() * len(part)
    model.train(was_training)
    return total / len(windows)


def _read_log(path: Path, up_to_step: int) -> list[dict]:
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if e["step"] <= up_to_step]


def _save_state(out: Path, model, optimizer, step: int, config: TrainConfig, elapsed_s: float) -> None:
    tmp = out / (STATE_NAME + ".tmp")
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    payload["elapsed_s"] = elapsed_s
    torch.save(payload | {"config": asdict(config)}, tmp)
    tmp.replace(out / STATE_NAME)


def _check_same_config(out: Path, config: TrainConfig) -> None:
    path = out / CONFIG_NAME
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != asdict(config):
            raise ValueError(f"{out} holds a run with a different config; use a new --out or the same flags")
    path.write_text(json.dumps(asdict(config), indent=2) + "\n")


def train(
    init: Path,
    out: Path,
    config: TrainConfig,
    stream: TokenStream,
    heldout: torch.Tensor,
    max_seconds: float | None = None,
    progress: bool = True,
) -> TrainOutcome:
    """Train the folder `init` into `out`, resuming from `out`'s checkpoint; stop early after max_seconds."""
    from tqdm import tqdm

    init, out = Path(init), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_config(out, config)
    model = load_model(init, dtype=torch.float32)
    model.train()
    optimizer = build_optimizer(model, config)
    step, elapsed_before = 0, 0.0
    if (out / STATE_NAME).exists():
        state = torch.load(out / STATE_NAME, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
    params = count_parameters(model)
    log = _read_log(out / LOG_NAME, step)
    offset_windows = config.offset_tokens // config.seq_len
    started = time.monotonic()
    last_eval = log[-1].get("heldout_loss") if log else None

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - started

    def record(step_done: int, train_loss: float | None, with_eval: bool) -> None:
        nonlocal last_eval
        tokens = step_done * config.tokens_per_step
        entry = {
            "step": step_done,
            "tokens": tokens,
            "flops": 6.0 * params * tokens,
            "train_loss": train_loss,
        }
        entry["lr"] = learning_rate(min(step_done, config.total_steps - 1), config)
        entry["elapsed_s"] = round(elapsed(), 2)
        if with_eval:
            last_eval = entry["heldout_loss"] = heldout_loss(model, heldout)
        log.append(entry)
        with open(out / LOG_NAME, "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in log)

    if step == 0 and not log:
        record(0, None, with_eval=True)
    bar = tqdm(total=config.total_steps, initial=step, desc=out.name, disable=not progress, unit="step")
    running: list[float] = []
    while step < config.total_steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss = next_token_loss(model, stream.batch(step, config.batch_size, offset_windows))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        running.append(loss.item())
        bar.update(1)
        done = step == config.total_steps
        if step % config.log_every == 0 or done:
            with_eval = step % config.eval_every == 0 or done
            record(step, sum(running) / len(running), with_eval)
            running.clear()
            bar.set_postfix(loss=f"{log[-1]['train_loss']:.3f}", heldout=f"{last_eval or float('nan'):.3f}")
        if step % config.checkpoint_every == 0 or done:
            _save_state(out, model, optimizer, step, config, elapsed())
        if not done and max_seconds is not None and time.monotonic() - started > max_seconds:
            _save_state(out, model, optimizer, step, config, elapsed())
            log = [e for e in log if e["step"] <= step]
            break
    bar.close()
    finished = step >= config.total_steps
    tokens = step * config.tokens_per_step
    if finished:
        save_model(model, out, manifest_after_training(read_manifest(init), tokens))
        copy_tokenizer_files(init, out)
    return TrainOutcome(
        finished, step, tokens, 6.0 * params * tokens, params, last_eval if finished else None
    )
