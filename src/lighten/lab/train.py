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
from collections.abc import Callable
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
    start_run(out / SETTINGS, described, "lab run")
    if (out / WEIGHTS).is_file():
        return out  # done already

    torch.manual_seed(settings.seed)
    model = LabModel(config)
    if settings.qat:
        prepare_qat(model, settings.qat, settings.qat_activations)

    def loss_at(step: int) -> tuple[torch.Tensor, int]:
        tokens = batch_at(stream, step, settings.batch, settings.context, settings.seed)
        return model(tokens, labels=tokens)[0], tokens.numel()

    log = train_steps(model, out, settings.steps, settings.lr, settings.checkpoint_every, loss_at)
    plain_linears(model)
    with atomic_file(out / WEIGHTS, force=True, is_ours=lambda p: True) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata={"format": "pt"})
    _write_json(out / SETTINGS, described | {"loss": log})
    (out / CHECKPOINT).unlink(missing_ok=True)  # done: model.safetensors and lab.json are the run
    return out


def start_run(settings_file: Path, described: dict, what: str) -> None:
    """Make settings_file's folder a run directory of the run `described` (JSON-able), or check that it
    is one already (to resume it); a LightenError if it holds another run or files of something else."""
    out = settings_file.parent
    if settings_file.is_file():
        saved = json.loads(settings_file.read_text())
        if {k: saved.get(k) for k in described} != described:
            raise LightenError(f"{out} holds another {what}: choose another directory, or remove it")
        return
    if out.exists() and any(p.name != MARKER for p in out.iterdir()):
        raise LightenError(f"{out} is not empty and holds no {what}: choose another directory")
    make_output_dir(out)
    _write_json(settings_file, described)


def train_steps(
    model: torch.nn.Module,
    out: Path,
    steps: int,
    lr: float,
    checkpoint_every: int,
    loss_at: Callable[[int], tuple[torch.Tensor, int]],
) -> list[float]:
    """AdamW on `model`'s trainable parameters for `steps` steps of loss_at(step) -> (loss, tokens), with
    the warmup + cosine schedule peaking at `lr` and gradients clipped at norm 1, resumed from out's
    checkpoint if there is one and checkpointed there every `checkpoint_every` steps and at the end.
    Returns the loss of every step."""
    optimizer = _optimizer(model, lr)
    step, log = _resume(out, model, optimizer)
    model.train()
    with steps_bar(steps, "training", start=step) as advance:
        while step < steps:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, lr)
            start = time.perf_counter()
            loss, tokens = loss_at(step)
            if not math.isfinite(loss.item()):
                raise LightenError(
                    f"training diverged at step {step} (loss {loss.item()}); the checkpoint before it is "
                    f"kept in {out}: try a lower learning rate"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            log.append(round(loss.item(), 5))
            speed = tokens / (time.perf_counter() - start)
            advance(f"training: loss {loss.item():.3f}, {speed:,.0f} tokens/s")
            if step % checkpoint_every == 0 or step == steps:
                _save_checkpoint(out, model, optimizer, step, log)
    return log


def train_on_wikipedia(out: str | Path, settings: TrainSettings, **model_options) -> Path:
    """train_lab on the calibration split in the lab's BPE (lighten.lab.data), with LabConfig(**options)."""
    tokenizer = lab_tokenizer()
    positions = {"max_position_embeddings": max(512, settings.context + 1)}
    config = LabConfig(tokenizer.get_vocab_size(), train_steps=settings.steps, **(positions | model_options))
    return train_lab(config, settings, out, token_stream("calibration", tokenizer))


def learning_rate(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


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


def _optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    trained = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in trained if p.ndim == 2]
    rest = [p for p in trained if p.ndim != 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def _save_checkpoint(out: Path, model, optimizer, step: int, log: list) -> None:
    """What training changes (trained parameters, norm statistics) and the AdamW state in one safetensors
    file, atomically."""
    state = optimizer.state_dict()
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in _trained_state(model).items()}
    for index, entries in state["state"].items():
        tensors |= {f"optimizer.{index}.{k}": v.contiguous() for k, v in entries.items()}
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    metadata = {"step": str(step), "log": json.dumps(log), "param_groups": json.dumps(groups)}
    with atomic_file(out / CHECKPOINT, force=True, is_ours=lambda p: True) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict without frozen parameters (a fine-tuning's embedding tables, tied or not)."""
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) not in frozen}


def _resume(out: Path, model, optimizer) -> tuple[int, list]:
    """(the step to continue from, the loss log so far): 0 and [] without a checkpoint."""
    if not (out / CHECKPOINT).is_file():
        return 0, []
    with safe_open(out / CHECKPOINT, "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    saved = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    if saved.keys() != _trained_state(model).keys():
        raise LightenError(f"{out / CHECKPOINT} is not a checkpoint of this run: remove it to start again")
    model.load_state_dict(saved, strict=False)  # the frozen parameters are the model's own
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
