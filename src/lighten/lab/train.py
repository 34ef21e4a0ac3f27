"""Train a lab model on the Wikipedia calibration split, resumably.

A run directory holds
    lab.json                the model config, the training settings and, when done, the loss log
    checkpoint.safetensors  model, optimizer state and step, every `checkpoint_every` steps (atomically:
                            a kill loses at most that interval; the run resumes from it); removed at the end
    model.safetensors       the trained weights (fp32; with QAT the full-precision weights it trained)

Batches depend on the step alone (lighten.lab.data.batch_at) and the model's initial weights on the seed,
so a resumed run computes what the uninterrupted one would have: the same weights, bit for bit (tested).
Schedule: AdamW (β = 0.9, 0.95; weight decay 0.1 on matrices), linear warmup over the first 10 % of the
steps, cosine decay to 10 % of the peak learning rate, gradients clipped at norm 1."""

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lighten.atomic import MARKER, atomic_file, make_output_dir
from lighten.errors import LightenError
from lighten.lab.data import batch_at, lab_tokenizer, token_stream
from lighten.lab.model import LabConfig, LabModel
from lighten.lab.qat import plain_linears, prepare_qat
from lighten.progress import steps_bar

SETTINGS = "lab.json"
CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"


@dataclass
class TrainSettings:
    steps: int
    batch: int = 16
    context: int = 128
    lr: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 50
    qat: str | None = None  # weight format trained against (straight-through)
    qat_activations: str | None = None  # activation format, e.g. int8:channel (BitNet b1.58)


def train_lab(config: LabConfig, settings: TrainSettings, out: str | Path, stream: torch.Tensor) -> Path:
    """Train LabModel(config) on token `stream` into run directory `out`, resuming a run of the same
    config and settings that was stopped there; a different run there is a LightenError."""
    out = Path(out)
    described = {"config": dataclasses.asdict(config), "settings": dataclasses.asdict(settings)}
    if (out / SETTINGS).is_file():
        saved = json.loads((out / SETTINGS).read_text())
        if {k: saved.get(k) for k in described} != described:
            raise LightenError(f"{out} holds another lab run: choose another directory, or remove it")
        if (out / WEIGHTS).is_file():
            return out  # done already
    else:
        if out.exists() and any(p.name != MARKER for p in out.iterdir()):
            raise LightenError(f"{out} is not empty and holds no lab run: choose another directory")
        make_output_dir(out)
        _write_json(out / SETTINGS, described)

    torch.manual_seed(settings.seed)
    model = LabModel(config)
    if settings.qat:
        prepare_qat(model, settings.qat, settings.qat_activations)
    optimizer = _optimizer(model, settings.lr)
    step, log = _resume(out, model, optimizer)
    model.train()
    with steps_bar(settings.steps, "training", start=step) as advance:
        while step < settings.steps:
            tokens = batch_at(stream, step, settings.batch, settings.context, settings.seed)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, settings)
            start = time.perf_counter()
            loss, _ = model(tokens, labels=tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            log.append(round(loss.item(), 5))
            speed = tokens.numel() / (time.perf_counter() - start)
            advance(f"training: loss {loss.item():.3f}, {speed:,.0f} tokens/s")
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                _save_checkpoint(out, model, optimizer, step, log)
    plain_linears(model)
    with atomic_file(out / WEIGHTS, force=True, is_ours=lambda p: True) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata={"format": "pt"})
    _write_json(out / SETTINGS, described | {"loss": log})
    (out / CHECKPOINT).unlink(missing_ok=True)  # done: model.safetensors and lab.json are the run
    return out


def train_on_wikipedia(out: str | Path, settings: TrainSettings, **model_options) -> Path:
    """train_lab on the calibration split in the lab's BPE (lighten.lab.data), with LabConfig(**options)."""
    tokenizer = lab_tokenizer()
    positions = {"max_position_embeddings": max(512, settings.context + 1)}
    config = LabConfig(tokenizer.get_vocab_size(), train_steps=settings.steps, **(positions | model_options))
    return train_lab(config, settings, out, token_stream("calibration", tokenizer))


def learning_rate(step: int, settings: TrainSettings) -> float:
    warmup = max(1, settings.steps // 10)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def load_lab_model(run: str | Path) -> LabModel:
    """The trained model of a finished run directory, in eval mode."""
    run = Path(run)
    if not (run / WEIGHTS).is_file():
        raise LightenError(f"{run} holds no trained lab model ({WEIGHTS}); train it with `lighten lab train`")
    config = LabConfig(**json.loads((run / SETTINGS).read_text())["config"])
    model = LabModel(config)
    with safe_open(run / WEIGHTS, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
    model.load_state_dict(state)
    return model.eval()


def _optimizer(model: LabModel, lr: float) -> torch.optim.AdamW:
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if p.ndim != 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def _save_checkpoint(out: Path, model, optimizer, step: int, log: list) -> None:
    """Model (parameters and norm statistics) and AdamW state in one safetensors file, atomically."""
    state = optimizer.state_dict()
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    for index, entries in state["state"].items():
        tensors |= {f"optimizer.{index}.{k}": v.contiguous() for k, v in entries.items()}
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    metadata = {"step": str(step), "log": json.dumps(log), "param_groups": json.dumps(groups)}
    with atomic_file(out / CHECKPOINT, force=True, is_ours=lambda p: True) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _resume(out: Path, model, optimizer) -> tuple[int, list]:
    """(the step to continue from, the loss log so far): 0 and [] without a checkpoint."""
    if not (out / CHECKPOINT).is_file():
        return 0, []
    with safe_open(out / CHECKPOINT, "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    return int(metadata["step"]), json.loads(metadata["log"])


def _write_json(path: Path, data: dict) -> None:
    with atomic_file(path, force=True, is_ours=lambda p: True) as tmp:
        tmp.write_text(json.dumps(data, indent=1))
