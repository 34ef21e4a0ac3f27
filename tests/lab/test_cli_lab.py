"""`lighten lab train` as a user runs it: trains, refuses bad options with one error line, and a run killed
with SIGKILL mid-way resumes from its last checkpoint to the same weights as a run never stopped."""

import json
import struct
import subprocess
import sys
import time

from cli_helpers import assert_refused, lighten
from safetensors.torch import load_file

STEPS = 60
SMALL = ["--hidden", 32, "--layers", 2, "--heads", 2, "--batch", 2, "--context", 16]


def test_train_writes_a_run_and_a_second_call_finds_it_done(tmp_path):
    args = ["lab", "train", "-o", tmp_path / "run", "--steps", 3, *SMALL, "--norm", "powernorm"]
    result = lighten(*args)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert lighten(*args).returncode == 0
    assert_refused(lighten("lab", "train", "-o", tmp_path / "x", "--norm", "batchnorm"), "unknown norm")
    assert_refused(lighten("lab", "train", "-o", tmp_path / "y", "--placement", "middle"), "placement")


def test_a_killed_run_resumes_to_the_weights_of_an_unbroken_one(tmp_path):
    def command(out):
        args = ["lab", "train", "-o", out, "--steps", STEPS, "--checkpoint-every", 2, *SMALL]
        return [sys.executable, "-m", "lighten", *map(str, args)]

    unbroken = subprocess.run(command(tmp_path / "a"), capture_output=True, text=True)
    assert unbroken.returncode == 0, unbroken.stderr

    proc = subprocess.Popen(command(tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "b" / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while _step(checkpoint) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    stopped_at = _step(checkpoint)
    assert 4 <= stopped_at < STEPS, "the kill should land mid-run"
    assert not (tmp_path / "b" / "model.safetensors").exists()

    resumed = subprocess.run(command(tmp_path / "b"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def _step(checkpoint) -> int:
    """The step in the checkpoint's header, read through one open file, so a checkpoint the trainer
    replaces meanwhile cannot mix two (safe_open did in CI: "smaller than the required mapping size")."""
    try:
        with open(checkpoint, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    except FileNotFoundError:
        return 0
    return int(header["__metadata__"]["step"])
