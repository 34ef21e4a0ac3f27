"""Quantization-aware fine-tuning of a real model, distilled from itself: where rounding after training is
unusable (ternary, int2: perplexity 10^6-10^8 on smollm2-135m), a short QAT run teaches the weights to
survive it.

The student is the model with each weight that `lighten quantize --format FORMAT` would quantize computed
through FORMAT's fake quantizer, straight-through (lighten.lab.qat); the teacher is the model as it was.
The loss is the KL divergence from the teacher's next-token distribution to the student's, per token, on
windows of the Wikipedia calibration split. Embedding tables and the output head stay as they were (the
checkpoint keeps them in full precision, and the head's weight gradient would be a fifth of each step's
work). Training state lives in OUT.training beside the output (resumed when the same command runs
again, removed when done); the result is a lighten checkpoint in which RTN to FORMAT of the trained weights,
the quantizer the student trained through, gives exactly the weights it was trained to compute with."""

import copy
import dataclasses
import shutil
from pathlib import Path

import torch

from lighten import formats
from lighten.atomic import MARKER, check_output
from lighten.checkpoint import save_checkpoint
from lighten.errors import LightenError
from lighten.lab.data import batch_at, token_stream
from lighten.lab.qat import plain_linears, prepare_qat
from lighten.lab.train import TrainSettings, start_run, train_steps
from lighten.models import load_model, model_kind, resolve
from lighten.models.limits import max_positions
from lighten.plan import make_plan
from lighten.progress import note
from lighten.quantize import quantize_weights
from lighten.recipes import recipe_from_options

SETTINGS = "finetune.json"


def finetune_settings(qat: str, steps: int, **options) -> TrainSettings:
    """The training settings of a fine-tuning through weight format `qat`: the lab's schedule, with
    defaults for a pretrained model (4 x 128 tokens a step, peak learning rate 3e-4, a checkpoint every
    10 steps) that `options` override."""
    defaults = dict(batch=4, context=128, lr=3e-4, checkpoint_every=10)
    return TrainSettings(steps, **(defaults | options), qat=qat)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions (logits over the last axis), in nats per
    token."""
    vocabulary = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocabulary).log_softmax(-1)
    teacher = teacher_logits.reshape(-1, vocabulary).log_softmax(-1)
    return torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")


def training_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".training")


def finetune_to_dir(model_name: str, settings: TrainSettings, out: str | Path, force: bool = False) -> Path:
    """QAT-distil `model_name` to settings.qat for settings.steps steps and save the quantized checkpoint
    in `out` (resumed from out.training when stopped). Returns `out`."""
    source = resolve(model_name)
    check_output(out, force, inputs=[source])  # fail now, not after the training
    if settings.qat is None or settings.qat_activations is not None:
        raise LightenError(
            "fine-tuning trains through a weight format (settings.qat) and no activation format"
        )
    formats.get(settings.qat)  # an unknown format fails before the model loads
    work = training_dir(out)
    model, tokenizer = load_model(model_name)
    if model_kind(model) != "causal":
        raise LightenError(
            f"{model_name} is an encoder: fine-tuning distils next-token predictions of causal LMs"
        )
    limit = max_positions(model.config)
    if limit is not None and settings.context > limit:
        raise LightenError(f"--context {settings.context} is beyond the {limit} positions {model_name} reads")
    if getattr(tokenizer, "backend_tokenizer", None) is None or tokenizer.eos_token is None:
        raise LightenError(f"{model_name}'s tokenizer is not a fast tokenizer with an end-of-text token")
    plan = make_plan(model, settings.qat)
    described = {"model": str(source), "settings": dataclasses.asdict(settings)}
    start_run(work / SETTINGS, described, "fine-tuning run")

    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    for table in (model.get_input_embeddings(), model.get_output_embeddings()):
        if table is not None:
            table.requires_grad_(False)
    prepare_qat(model, settings.qat, names=[name.removesuffix(".weight") for name in plan])
    stream = token_stream("calibration", tokenizer.backend_tokenizer, tokenizer.eos_token)

    def loss_at(step: int) -> tuple[torch.Tensor, int]:
        tokens = batch_at(stream, step, settings.batch, settings.context - 1, settings.seed)
        with torch.no_grad():
            target = teacher(tokens).logits
        return distillation_loss(model(tokens).logits, target), tokens.numel()

    note(f"fine-tuning {model_name} through {settings.qat}; training state in {work}")
    log = train_steps(model, work, settings.steps, settings.lr, settings.checkpoint_every, loss_at)
    plain_linears(model)
    quantized = quantize_weights(model.eval(), plan)  # round to nearest: the quantizer trained through
    recipe = recipe_from_options(settings.qat, algorithm="rtn")
    finetune = {"teacher": model_name, "settings": dataclasses.asdict(settings), "loss": log}
    saved = save_checkpoint(model, quantized, source, model_name, out, force, recipe, finetune=finetune)
    if (work / MARKER).is_file():  # lighten's own folder: the run is in the checkpoint now
        shutil.rmtree(work)
    return saved
