"""The flows a user runs first, run as written: `lighten demo`, every ```python block of the README and every
line of its Examples block. A README example that breaks fails CI (make demo once stayed broken for 20
commits while every test passed)."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"

pytestmark = pytest.mark.real


def fenced_blocks(language: str, section: str | None = None) -> list[str]:
    """Bodies of the README's ```language blocks, only those under the `## section` heading if given."""
    text = README.read_text()
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def lighten(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lighten", *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )


def example_commands() -> list[list[str]]:
    (block,) = fenced_blocks("bash", "Examples")
    commands = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [c for c in commands if c]


def test_examples_cover_every_command_of_the_synopsis():
    (synopsis,) = fenced_blocks("bash", "Commands")
    documented = {line.split()[1] for line in synopsis.splitlines() if line.startswith("lighten ")}
    run = {c[1] for c in example_commands()} | {"demo"}  # the demo has its own test below
    assert all(c[0] == "lighten" for c in example_commands())
    assert documented <= run, f"README commands without an example: {sorted(documented - run)}"


def test_readme_examples_run_as_written(tmp_path):
    for command in example_commands():
        result = lighten(command[1:], tmp_path)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stderr}"
        assert "Traceback" not in result.stderr
    # A few facts the examples promise, checked on what they wrote.
    assert (tmp_path / "out/minilm-outliers.png").read_bytes().startswith(b"\x89PNG")
    mixed = json.loads((tmp_path / "out/minilm-mixed/lighten.json").read_text())
    assert {t["spec"] for t in mixed["tensors"].values()} == {"int4:g128:sym", "int8:channel:sym"}
    assert (tmp_path / "out/smollm2-q8_0.gguf").read_bytes()[:4] == b"GGUF"


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = fenced_blocks("python")
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})


def test_demo_end_to_end_matches_the_readme(tmp_path):
    result = lighten(["demo", "-o", "demo", "--tokens", "512"], tmp_path)
    assert result.returncode == 0, result.stderr
    reports = json.loads((tmp_path / "demo/results.json").read_text())
    assert [r["reference"]["name"] for r in reports] == ["minilm", "smollm2-135m"]
    assert all(len(r["candidates"]) == 6 for r in reports)
    md = (tmp_path / "demo/results.md").read_text()
    assert "smollm2-135m-nf4" in md and "minilm-ternary" in md
    # MiniLM's fidelity does not depend on --tokens: the README's table must be what the demo prints.
    minilm, smollm2 = reports
    for row in minilm["candidates"]:
        name = Path(row["model"]).name
        cells = rf"^\| {re.escape(name)} \| [^|]+ \| ([\d.]+) \|.*\| ([\d.]+) \| ([\d.]+) \|$"
        documented = re.search(cells, README.read_text(), flags=re.M)
        assert documented, f"no README demo row for {name}"
        bits, cosine, spearman = (float(v) for v in documented.groups())
        assert round(row["bits_per_weight"], 3) == bits, name
        assert (round(row["cosine"], 4), round(row["spearman"], 4)) == (cosine, spearman), name
    kl = {row["format"]: row["kl"] for row in smollm2["candidates"]}
    assert kl["int8:channel:sym"] < 0.01 < kl["int4:g128:sym"]
