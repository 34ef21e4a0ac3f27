"""Lab training: a run stopped part-way resumes from its last checkpoint to the very weights of an
uninterrupted run; the schedule by hand; a directory holding another run is refused."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from step_helpers import record_steps, stop_at

from lighten.errors import LightenError
from lighten.lab import train as train_module
from lighten.lab.model import LabConfig
from lighten.lab.train import TrainSettings, learning_rate, load_lab_model, train_lab

CONFIG = LabConfig(64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
STREAM = torch.randint(0, 64, (4096,), generator=torch.Generator().manual_seed(0))


def settings(**overrides) -> TrainSettings:
    return TrainSettings(**(dict(steps=6, batch=4, context=16, checkpoint_every=2) | overrides))


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = train_lab(CONFIG, settings(), tmp_path / "straight", STREAM)

    stop_at(monkeypatch, train_module, 5)  # the last checkpoint is step 4's
    with pytest.raises(KeyboardInterrupt):
        train_lab(CONFIG, settings(), tmp_path / "resumed", STREAM)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    seen = record_steps(monkeypatch, train_module)
    resumed = train_lab(CONFIG, settings(), tmp_path / "resumed", STREAM)
    assert seen == [4, 5]  # from the checkpoint of step 4 on, not from the start

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((resumed / "lab.json").read_text())["loss"]
    assert log == json.loads((straight / "lab.json").read_text())["loss"] and len(log) == 6


def test_qat_run_saves_plain_weights_that_load(tmp_path):
    run = train_lab(CONFIG, settings(qat="ternary", qat_activations="int8:channel"), tmp_path / "q", STREAM)
    model = load_lab_model(run)
    assert model(STREAM[None, :16]).shape == (1, 16, 64)


def test_another_run_in_the_same_directory_is_refused(tmp_path):
    train_lab(CONFIG, settings(steps=2), tmp_path / "run", STREAM)
    with pytest.raises(LightenError, match="holds another lab run"):
        train_lab(CONFIG, settings(steps=3), tmp_path / "run", STREAM)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(LightenError, match="not empty and holds no lab run"):
        train_lab(CONFIG, settings(), tmp_path / "mine", STREAM)
    with pytest.raises(LightenError, match="no trained lab model"):
        load_lab_model(tmp_path / "mine")


def test_learning_rate_schedule_by_hand():
    steps, peak = 100, 1.0  # warmup: the first 10 steps
    assert learning_rate(0, steps, peak) == pytest.approx(0.1)
    assert learning_rate(9, steps, peak) == pytest.approx(1.0)
    assert learning_rate(10, steps, peak) == pytest.approx(1.0)  # cosine from the peak ...
    assert learning_rate(55, steps, peak) == pytest.approx(0.55)  # ... halfway: 0.1 + 0.9 / 2
    assert learning_rate(100, steps, peak) == pytest.approx(0.1)  # ... to a tenth of it


def test_a_diverging_run_stops_with_the_step_and_keeps_its_last_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    losses = [torch.tensor(1.0), torch.tensor(2.0), torch.tensor(float("nan"))]

    def loss_at(step):
        return model.weight.sum() * losses[step], 1

    with pytest.raises(LightenError, match="diverged at step 2"):
        train_module.train_steps(model, tmp_path, 3, 0.1, 1, loss_at)
    with safe_open(tmp_path / train_module.CHECKPOINT, "pt") as f:
        assert f.metadata()["step"] == "2"
