"""The model-family matrix: every command on a tiny random model of every family either works (exactly,
where it says so) or is refused with one `error:` line and exit 2: never a traceback, never a silently
wrong result.

FAMILY_MATRIX is what each cell must do; each cell is a test that runs the command as a user types it (in this
process, see cli_helpers) and checks what it claims. The README's "Model families" table is rendered from
FAMILY_MATRIX by matrix_markdown(), and test_readme_shows_the_matrix keeps the two the same."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from cli_helpers import assert_refused, lighten
from tiny_models import ARCHS, sample_text, tiny_bpe_tokenizer, tiny_model, tiny_tokenizer
from transformers import AutoModel, AutoModelForCausalLM, OPTConfig, OPTForCausalLM

from lighten.algorithms.activations import collect_input_stats
from lighten.checkpoint import load
from lighten.errors import LightenError
from lighten.eval.corpora import wiki_texts
from lighten.export.llamacpp import open_llama
from lighten.models.arch import model_view, norm_gain, norm_groups, set_norm_gain
from lighten.models.load import model_kind
from lighten.surgery import apply_surgery

# max |llama.cpp's logits - lighten's| / max |lighten's| for an F16 export of an int8 checkpoint
GGUF_TOLERANCE = 1e-2

STEPS = ["fold", "rmsnorm", "rotate", "rotate_fused", "smooth", "osplus"]
COMMANDS = [
    "inspect",
    "quantize",
    "gptq",
    "awq",
    *STEPS,
    "eval",
    "run",
    "export gguf",
    "export compressed-tensors",
]
# gptq / awq: `quantize -f int4:g32 --algorithm ...`, whose output error must stay within this many times
# round-to-nearest's on the same model (observe_algorithm): a rewrite gone wrong, e.g. AWQ's scales folded
# into the wrong norm, moves the outputs by about their own size
ALGORITHM_SLACK = 1.5


def family_dir(tmp_path_factory, arch):
    """A tiny `arch` model saved with a 300-token byte-level BPE (GGUF wants one), its norms given random
    gains and biases (at init they are 1 and 0, where any fold is trivially exact), a few gains 8x: outlier
    channels, which smoothing and AWQ scale down (without them their scales stay near 1)."""
    model = tiny_model(arch, vocab_size=320) if arch != "bert" else tiny_model(arch)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if (
                type(module).__name__.endswith(("Norm", "RMSNorm"))
                and getattr(module, "weight", None) is not None
            ):
                gain = 1 + 0.3 * torch.randn(module.weight.shape, generator=g)
                if not name.endswith(("q_norm", "k_norm")):  # outlier channels of the stream, to smooth
                    gain[torch.randperm(gain.numel(), generator=g)[:3]] *= 8
                set_norm_gain(module, gain)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=g))
    path = tmp_path_factory.mktemp(arch) / "src"
    model.save_pretrained(path)
    (tiny_tokenizer() if arch == "bert" else tiny_bpe_tokenizer()).save_pretrained(path)
    return path


def chain(step: str, model) -> list[str]:
    """The surgery steps a user gives to get `step`: rotations and rmsnorm need folded norms first, and
    rotations of a LayerNorm model need it turned into RMSNorm."""
    layer_norm = any(isinstance(g.norm, torch.nn.LayerNorm) for g in norm_groups(model_view(model)))
    if step in ("rotate", "rotate_fused"):
        return ["fold", "rmsnorm", step] if layer_norm else ["fold", step]
    return ["fold", step] if step == "rmsnorm" else [step]


IDS = torch.tensor([list(range(5, 25))])  # 20 tokens of the tiny vocabulary


def outputs(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    """Logits (an encoder's last hidden states) for `ids`, fp32."""
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state)[0].float()


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """arch -> (source directory, its int8 checkpoint, the quantize run that made it), once per arch."""
    made = {}

    def get(arch: str):
        if arch not in made:
            src = family_dir(tmp_path_factory, arch)
            checkpoint = src.parent / "int8"
            made[arch] = src, checkpoint, lighten("quantize", src, "-f", "int8", "-o", checkpoint)
        return made[arch]

    return get


def observe(command: str, arch: str, family, tmp_path) -> str:
    """Run `command` on the tiny `arch` model as a user would, check what it claims, and say what it did:
    "yes", "in memory" (a surgery step exact in lighten.surgery that quantize refuses to save: transformers
    could not load it back), the run's generator, or "refused" (one error line, exit 2, checked)."""
    src, checkpoint, quantized = family(arch)
    if command == "inspect":
        result = lighten("inspect", src, "--tokens", 256, "--json")
        return _said(result, lambda: _inspected(json.loads(result.stdout), src))
    if command in ("gptq", "awq"):
        return observe_algorithm(command, src, tmp_path)
    if command == "quantize":
        assert quantized.returncode == 0, quantized.stderr
        reference = outputs(load(src)[0])
        assert relative_error(outputs(load(checkpoint)[0]), reference) < 0.05  # int8 per channel: ~1 %
        return "yes"
    if command in STEPS:
        return observe_surgery(command, src, tmp_path)
    if quantized.returncode != 0:
        pytest.fail(f"quantize failed: {quantized.stderr}")
    if command == "eval":
        result = lighten("eval", checkpoint, "--tokens", 256, "--context", 64, "--json")
        return _said(result, lambda: json.loads(result.stdout) and "yes")
    if command == "run":
        result = lighten("run", checkpoint, "-p", "the model is", "--max-new-tokens", 3, "--json")
        return _said(result, lambda: json.loads(result.stdout).get("generator", "embeddings"))
    if command == "export gguf":
        path = tmp_path / "m.gguf"
        result = lighten(
            "export", checkpoint, "--to", "gguf", "-o", path, "--type", "F16", "--pre-tokenizer", "gpt-2"
        )
        return _said(result, lambda: _llama_cpp_matches(path, checkpoint))
    if command == "export compressed-tensors":
        out = tmp_path / "ct"
        result = lighten("export", checkpoint, "--to", "compressed-tensors", "-o", out)
        return _said(result, lambda: _transformers_loads(out, checkpoint))
    raise ValueError(command)


def observe_surgery(step: str, src, tmp_path) -> str:
    """`quantize --surgery CHAIN` from the command line, and the same chain in memory, checked exact here
    too (apply_surgery checks itself; this does not rely on it)."""
    model, tokenizer = load(src)
    steps = chain(step, model)
    result = lighten(
        "quantize",
        src,
        "-f",
        "int8",
        "--surgery",
        ",".join(steps),
        "-o",
        tmp_path / "q",
        "--calibration-tokens",
        256,
    )
    reference = outputs(model)
    try:
        apply_surgery(
            model, steps, stats=lambda m: collect_input_stats(m, tokenizer, [sample_text()], 256, 64)
        )
    except LightenError:
        exact = False
    else:
        assert relative_error(outputs(model), reference) < 1e-4
        exact = True
    if result.returncode == 0:
        assert exact, "quantize applied a surgery that is not exact in memory"
        return "yes"
    assert_refused(result, output=tmp_path / "q")
    return "in memory" if exact else "refused"


def observe_algorithm(algorithm: str, src, tmp_path) -> str:
    """int4:g32 by `algorithm` from the command line, its output error against round-to-nearest's on
    held-out Wikipedia text (the calibration text's kind: calibrated on it, GPTQ measures 0.6-0.9x RTN's
    error there, AWQ 0.8-1.25x; on other token ids either can lose to RTN on these random models)."""
    model, tokenizer = load(src)
    ids = torch.tensor([tokenizer(" ".join(wiki_texts("evaluation")[:5]))["input_ids"][:128]])
    reference = outputs(model, ids)
    errors = {}
    for name in ("rtn", algorithm):
        out = tmp_path / name
        result = lighten(
            "quantize", src, "-f", "int4:g32", "--algorithm", name, "-o", out, "--calibration-tokens", 512
        )
        if result.returncode != 0:
            assert_refused(result, output=out)
            return "refused"
        errors[name] = relative_error(outputs(load(out)[0], ids), reference)
    assert errors[algorithm] <= ALGORITHM_SLACK * errors["rtn"], errors
    return "yes"


def _inspected(report: dict, src) -> str:
    """Every block's sites are in the report, with the gains its norms really apply."""
    model = load(src)[0]
    view = model_view(model)
    assert {site["block"] for site in report["sites"] if site["kind"] != "final"} == set(
        range(len(view.blocks))
    )
    for site in report["sites"]:
        if "norm" in site:
            norm = model.get_submodule(site["name"])
            assert site["norm"]["max"] == pytest.approx(norm_gain(norm).abs().max().item(), rel=1e-4), site[
                "name"
            ]
    return "yes"


def _said(result, check) -> str:
    """check()'s verdict when the command succeeded, else "refused" (after checking how it refused)."""
    if result.returncode == 0:
        return check()
    assert_refused(result)
    return "refused"


def _llama_cpp_matches(path, checkpoint) -> str:
    """The F16 GGUF of the checkpoint, run by llama.cpp, gives lighten's logits (GGUF_TOLERANCE) within the
    context the file declares (a sliding window's, where llama.cpp attends to all tokens: Mistral)."""
    fields = gguf.GGUFReader(path).fields
    (context,) = [f.contents() for name, f in fields.items() if name.endswith(".context_length")]
    n = min(IDS.shape[1], context)
    llm = open_llama(path, n_ctx=64, n_threads=2, logits_all=True)
    llm.eval(IDS[0, :n].tolist())
    ours = torch.from_numpy(np.asarray(llm.scores[:n]))
    assert relative_error(ours, outputs(load(checkpoint)[0])[:n]) < GGUF_TOLERANCE
    return "yes"


def _transformers_loads(out, checkpoint) -> str:
    """transformers' compressed-tensors loader gives lighten's outputs."""
    ours = load(checkpoint)[0]
    auto = AutoModel if model_kind(ours) == "encoder" else AutoModelForCausalLM
    model = auto.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(outputs(model), outputs(ours))
    return "yes"


Y, MEM, NO = "yes", "in memory", "refused"
LEAN, GENERATE, EMBED = "lean decoder", "transformers generate", "embeddings"
# Per family, in COMMANDS order: inspect | quantize gptq awq | fold rmsnorm rotate rotate_fused smooth
# osplus | eval run | export gguf, export compressed-tensors. Why the refusals: in the README under the table.
FAMILY_MATRIX = {
    "bert": dict(zip(COMMANDS, [Y, Y, Y, Y, NO, NO, NO, NO, NO, NO, Y, EMBED, NO, Y], strict=True)),
    "gpt2": dict(zip(COMMANDS, [Y, Y, Y, Y, MEM, MEM, MEM, MEM, Y, Y, Y, GENERATE, Y, NO], strict=True)),
    "llama": dict(zip(COMMANDS, [Y, Y, Y, Y, Y, NO, Y, Y, Y, Y, Y, LEAN, Y, Y], strict=True)),
    "qwen2": dict(zip(COMMANDS, [Y, Y, Y, Y, Y, NO, Y, Y, Y, Y, Y, LEAN, Y, Y], strict=True)),
    "mistral": dict(zip(COMMANDS, [Y, Y, Y, Y, Y, NO, Y, Y, Y, Y, Y, GENERATE, Y, Y], strict=True)),
    "qwen3": dict(zip(COMMANDS, [Y, Y, Y, Y, Y, NO, Y, Y, Y, Y, Y, GENERATE, Y, Y], strict=True)),
    "phi3": dict(zip(COMMANDS, [Y, Y, Y, Y, Y, NO, Y, Y, Y, Y, Y, GENERATE, Y, Y], strict=True)),
    "granite": dict(zip(COMMANDS, [Y, Y, Y, Y, Y, NO, Y, Y, Y, Y, Y, GENERATE, Y, Y], strict=True)),
    "gemma2": dict(zip(COMMANDS, [Y, Y, Y, Y, Y, NO, NO, NO, Y, Y, Y, GENERATE, Y, Y], strict=True)),
    "gemma3": dict(zip(COMMANDS, [Y, Y, Y, Y, Y, NO, NO, NO, Y, Y, Y, GENERATE, Y, Y], strict=True)),
    "olmo2": dict(zip(COMMANDS, [Y, Y, Y, Y, NO, NO, NO, NO, NO, NO, Y, GENERATE, Y, Y], strict=True)),
    "stablelm": dict(zip(COMMANDS, [Y, Y, Y, Y, MEM, MEM, MEM, MEM, Y, Y, Y, GENERATE, Y, Y], strict=True)),
    "gpt_neox": dict(zip(COMMANDS, [Y, Y, Y, Y, MEM, MEM, MEM, MEM, Y, Y, Y, GENERATE, Y, Y], strict=True)),
}
NAMES = {
    "bert": "BERT (MiniLM)",
    "gpt2": "GPT-2",
    "llama": "Llama (SmolLM2)",
    "qwen2": "Qwen2",
    "mistral": "Mistral",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
    "granite": "Granite",
    "gemma2": "Gemma 2",
    "gemma3": "Gemma 3",
    "olmo2": "OLMo-2",
    "stablelm": "StableLM",
    "gpt_neox": "GPT-NeoX",
}
SHOWN = {Y: "✓", MEM: "in memory", NO: "refused", LEAN: "lean", GENERATE: "generate", EMBED: "embed"}


def test_every_tiny_family_is_in_the_matrix():
    assert FAMILY_MATRIX.keys() == ARCHS.keys() == NAMES.keys()


@pytest.mark.parametrize("arch,command", [(a, c) for a in FAMILY_MATRIX for c in COMMANDS])
def test_family_matrix(arch, command, family, tmp_path):
    assert observe(command, arch, family, tmp_path) == FAMILY_MATRIX[arch][command]


def matrix_markdown() -> str:
    """The README's table: a row per family, a column per command."""
    header = ["family", *(c.replace("export ", "") for c in COMMANDS)]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for arch, cells in FAMILY_MATRIX.items():
        lines.append("| " + " | ".join([NAMES[arch], *(SHOWN[cells[c]] for c in COMMANDS)]) + " |")
    return "\n".join(lines)


def test_readme_shows_the_matrix():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert matrix_markdown() in readme, "README's family table is stale: paste matrix_markdown()"


def test_a_family_lighten_does_not_know_is_refused_and_still_evaluated(tmp_path):
    """OPT (the issue's example: a 128-position table, eval at context 512 traced back): every command that
    needs the model view refuses it with one error line; eval of the original clamps its context and runs."""
    config = OPTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=128,
        vocab_size=320,
        max_position_embeddings=128,
    )
    src = tmp_path / "opt"
    OPTForCausalLM(config).save_pretrained(src)
    tiny_bpe_tokenizer().save_pretrained(src)
    for command in (["inspect", src], ["quantize", src, "-f", "int8"], ["quantize", src, "-f", "q4_0"]):
        out = tmp_path / "out"
        assert_refused(
            lighten(*command, *(["-o", out] if command[0] == "quantize" else [])),
            "OPTForCausalLM is not supported",
            output=out,
        )
    result = lighten("eval", src, "--tokens", 256, "--context", 512, "--json")
    assert result.returncode == 0, result.stderr
    assert "clamped to 128" in result.stderr
    assert json.loads(result.stdout)["reference"]["perplexity"] > 1
