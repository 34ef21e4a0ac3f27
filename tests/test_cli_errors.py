"""Bad input at the command line: one `error:` line, exit 2, no traceback, nothing written."""

import os
import signal
import subprocess
import sys

import pytest
from cli_helpers import assert_refused, lighten
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random llama, gpt2 and bert model directories."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: save_tiny(family, root / family) for family in ("llama", "gpt2", "bert")}


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["quantize"], "Missing argument"),
        (["quantize", "minilm", "-o", "x", "--no-such-option"], "--no-such-option"),
        (["run", "minilm", "-p", "x", "--max-new-tokens", "many"], "--max-new-tokens"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_usage_errors_are_one_line_not_a_panel(args, phrase):
    assert_refused(lighten(*args), phrase, "--help")


def test_a_long_error_is_not_wrapped_at_80_columns(tmp_path):
    spec = "int4:" + "x" * 120
    result = lighten(
        "quantize", "minilm", "-f", spec, "-o", tmp_path / "q", env=os.environ | {"COLUMNS": "80"}
    )
    assert_refused(result, spec)


def test_no_arguments_prints_the_help():
    result = lighten()
    assert result.returncode == 0 and "quantize" in result.stdout


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_run_refuses_an_empty_prompt(tiny, family):
    assert_refused(lighten("run", tiny[family], "-p", "the model", "-p", "  "), "prompt 2 is empty")


@pytest.mark.parametrize("n", [0, -1])
def test_run_refuses_fewer_than_one_new_token(tiny, n):
    assert_refused(lighten("run", tiny["gpt2"], "-p", "the model", "--max-new-tokens", n), "at least 1")


@pytest.mark.parametrize("family,limit", [("gpt2", 1024), ("bert", 512)])
def test_run_refuses_a_prompt_beyond_the_position_table(tiny, family, limit):
    prompt = " ".join(["the model"] * limit)
    assert_refused(lighten("run", tiny[family], "-p", prompt), f"{limit} positions")


def test_export_type_is_only_for_gguf(tiny, tmp_path):
    assert lighten("quantize", tiny["llama"], "-f", "int8", "-o", tmp_path / "q").returncode == 0
    result = lighten(
        "export", tmp_path / "q", "--to", "compressed-tensors", "--type", "Q4_0", "-o", tmp_path / "ct"
    )
    assert_refused(result, "--type")
    assert not (tmp_path / "ct").exists()


def test_a_recipe_that_is_not_utf8(tiny, tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: caf\xe9\nformat: int8\n".encode("latin-1"))
    result = lighten("quantize", tiny["llama"], "--recipe", recipe, "-o", tmp_path / "q")
    assert_refused(result, "not UTF-8")
    assert not (tmp_path / "q").exists()


def test_ctrl_c_says_nothing_was_written(tiny, tmp_path):
    # The quantization is replaced by a wait, so the signal surely lands while the command works.
    script = (
        "import sys, time\n"
        "import lighten.pipeline\n"
        "def slow(*args, **kwargs):\n"
        "    print('working', flush=True)\n"
        "    time.sleep(120)\n"
        "lighten.pipeline.quantize_to_dir = slow\n"
        "from lighten.cli import main\n"
        f"sys.argv = ['lighten', 'quantize', {str(tiny['llama'])!r}, '-f', 'int4', '-o', "
        f"{str(tmp_path / 'q')!r}]\n"
        "main()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "working"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists()
