"""lighten lab report: perplexity by its definition, and the report of a (barely) trained run."""

import json
import math

import torch
from cli_helpers import assert_refused, lighten
from torch import nn

from lighten.inspect import is_lighten_png
from lighten.lab.data import lab_tokenizer, token_stream
from lighten.lab.qat import prepare_qat
from lighten.lab.report import perplexity, windows_of
from lighten.lab.train import load_lab_model

SMALL = ["--hidden", 32, "--layers", 2, "--heads", 2, "--batch", 2, "--context", 16]


class Uniform(nn.Module):
    """Logits all equal: every next token has probability 1 / vocab, so the perplexity is the vocab size."""

    def forward(self, ids):
        return torch.zeros(*ids.shape, 50)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    windows = [torch.randint(0, 50, (16,)) for _ in range(3)]
    assert math.isclose(perplexity(Uniform(), windows), 50.0, rel_tol=1e-6)


def test_report_of_a_run(tmp_path):
    run = tmp_path / "run"
    assert lighten("lab", "train", "-o", run, "--steps", 2, *SMALL).returncode == 0
    (report,) = lab_reports(run)
    assert list(report["perplexity"]) == ["fp32", "W8A8", "W4 RTN", "W4 GPTQ", "ternary RTN"]
    assert all(math.isfinite(p) and p > 1 for p in report["perplexity"].values())
    assert report["perplexity"]["W4 RTN"] != report["perplexity"]["fp32"]  # the weights did change
    assert [layer["block"] for layer in report["layers"]] == [0, 1]
    assert report["config"]["hidden_size"] == 32 and report["summary"]["residual_absmax"] > 0
    png = tmp_path / "lab.png"
    table = lighten("lab", "report", run, "--eval-tokens", 512, "--calibration-tokens", 256, "--plot", png)
    assert table.returncode == 0 and "W4 GPTQ" in table.stdout
    assert is_lighten_png(png)
    assert_refused(lighten("lab", "report", tmp_path), "no trained lab model")


def test_ternary_column_is_what_a_ternary_qat_model_computes(tmp_path):
    run = tmp_path / "run"
    assert lighten("lab", "train", "-o", run, "--steps", 2, "--qat", "ternary", *SMALL).returncode == 0
    (report,) = lab_reports(run)
    model = load_lab_model(run)
    prepare_qat(model, "ternary")
    held_out = windows_of(token_stream("evaluation", lab_tokenizer(model.config.vocab_size))[:512], 16)
    assert report["perplexity"]["ternary RTN"] == perplexity(model.eval(), held_out)


def lab_reports(*runs):
    result = lighten("lab", "report", *runs, "--json", "--eval-tokens", 512, "--calibration-tokens", 256)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
