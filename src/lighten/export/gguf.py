"""Export a Llama-shaped causal LM to a GGUF file that llama.cpp runs.

    export_gguf(model, tokenizer, "model.gguf", "Q8_0")
    export_gguf_from("smollm2-135m", "model.gguf", "Q4_0")   # also a lighten checkpoint or a HF directory

Tensor names, metadata keys and the tokenizer fields follow llama.cpp's own converter (convert_hf_to_gguf).

Which type each tensor gets:
- A weight that a lighten checkpoint holds in one of GGUF's block types (formats q4_0 ... tq2_0) keeps that
  type and its blocks byte for byte; q/k rows are only re-ordered for llama.cpp's rope (a row permutation of
  the blocks). Mixed types per tensor stay mixed.
- 1-D tensors (norms, biases) stay F32, as in llama.cpp.
- Every other matrix (everything from a plain model; embeddings, a kept lm_head and weights in lighten's
  other formats from a checkpoint) gets `qtype`, by default Q8_0, except that with a 4-bit qtype the output
  matrix (the token embedding when it is tied) gets Q6_K, because llama-quantize does the same: the logits
  are the most sensitive product.
- A matrix whose rows are not a whole number of the type's blocks (32 weights for Q8_0 / Q5_0 / Q4_0, 256
  for k-quants) falls back as llama-quantize does until one fits: Q6_K → Q8_0, Q4_K → Q5_0, 32-blocks → F16.
  SmolLM2's hidden size 576 = 18·32 is no multiple of 256, so in its k-quant exports only ffn_down (rows of
  1536) is a k-quant.
"""

import functools
import json
import math
import re
from collections import Counter
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch
from transformers.pytorch_utils import Conv1D

from lighten import formats
from lighten.atomic import atomic_file, check_output
from lighten.errors import LightenError
from lighten.formats import QuantizedTensor
from lighten.formats.ggml import GGMLFormat
from lighten.models.arch import ModelView, gain_offset, model_view, norm_gain
from lighten.models.limits import sliding_window
from lighten.progress import note

# The gguf package is an optional extra (lighten[models]); importing it here keeps the error at one place.
try:
    import gguf
    from gguf import GGMLQuantizationType as T
except ImportError as e:  # pragma: no cover - depends on the environment
    raise LightenError("GGUF export needs the gguf package: pip install gguf") from e

ARCH_IDS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
QUANTIZED_BY = "lighten"  # general.quantized_by: how `--force` recognises a GGUF lighten wrote
QTYPES = {
    "F32": (T.F32, gguf.LlamaFileType.ALL_F32),  # the unquantized model as it is: llama-quantize's input
    "F16": (T.F16, gguf.LlamaFileType.MOSTLY_F16),
    "Q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (T.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "Q6_K": (T.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K),
    "Q4_K": (T.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_S),  # every matrix Q4_K: closest to llama.cpp's Q4_K_S
}
FALLBACK = {T.Q6_K: T.Q8_0, T.Q4_K: T.Q5_0, T.Q8_0: T.F16, T.Q5_0: T.F16, T.Q4_0: T.F16}
FOUR_BIT = {T.Q4_0, T.Q4_K}

# HF class → (GGUF architecture, whether q/k need the rotary permutation). Llama's rotate_half rope pairs
# dimension i with i + d/2; llama.cpp's "llama" rope pairs 2i with 2i+1, so q and k rows are re-ordered.
# Qwen2 and Qwen3 run with NEOX rope in llama.cpp, which is rotate_half already. Mistral is Llama to
# llama.cpp's converter (its sliding window, 4096 positions where a config has one, is not applied there:
# the same up to that context).
ARCHS = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
    "Phi3ForCausalLM": ("phi3", False),  # NEOX rope too; q/k/v and gate/up fused, as HF stores them
    "GraniteForCausalLM": ("granite", True),  # Llama's tensors, with its four multipliers as metadata
    "Gemma2ForCausalLM": ("gemma2", False),  # NEOX rope; norms on sub-layer outputs too
    "Gemma3ForCausalLM": ("gemma3", False),  # Gemma 2's tensors, q/k norms, two rope bases, no soft-capping
    "Olmo2ForCausalLM": ("olmo2", False),  # NEOX rope; norms on the sub-layer outputs only, q/k norms
    "StableLmForCausalLM": ("stablelm", False),  # NEOX rope on part of each head; LayerNorms with bias
    "GPTNeoXForCausalLM": ("gptneox", False),  # as StableLM, attention and MLP in parallel, fused qkv
    "GPT2LMHeadModel": ("gpt2", False),  # learned positions, no rope; Conv1D weights stored [in, out]
}
# Granite's multipliers: config attribute -> GGUFWriter method (convert_hf_to_gguf's GraniteModel)
GRANITE_SCALES = {
    "attention_multiplier": "add_attention_scale",
    "embedding_multiplier": "add_embedding_scale",
    "residual_multiplier": "add_residual_scale",
    "logits_scaling": "add_logit_scale",
}

# llama.cpp picks its BPE pre-tokenizer (the regex that splits text before merging) by the hash of the
# token ids of CHECK_TEXT; these hashes are the ones its converter knows for tokenizers lighten supports.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ "
    "(multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def export_gguf_from(
    name_or_path: str | Path,
    out_file: str | Path,
    qtype: str | None = None,
    pre_tokenizer: str | None = None,
    force: bool = False,
) -> Path:
    """export_gguf for a built-in name, a Hugging Face directory or a lighten checkpoint. A checkpoint's
    weights in GGUF block types are written as they are; the rest is dequantized and encoded as `qtype`."""
    from lighten.checkpoint import is_checkpoint, load
    from lighten.models import resolve

    checkpoint = is_checkpoint(name_or_path)
    source = name_or_path if checkpoint else resolve(name_or_path)
    check_output(out_file, force, inputs=[source], is_ours=is_lighten_gguf)  # before loading, not after
    blocks = checkpoint_blocks(Path(name_or_path)) if checkpoint else {}
    model, tokenizer = load(name_or_path)
    name = Path(str(name_or_path)).name
    return export_gguf(model, tokenizer, out_file, qtype, name, pre_tokenizer, force, blocks)


def checkpoint_blocks(path: Path) -> dict[str, QuantizedTensor]:
    """{weight name: QuantizedTensor} of the checkpoint's weights stored in GGUF block types, as stored."""
    from lighten.checkpoint import WEIGHTS, quantized_parts, read_manifest
    from lighten.models.load import open_safetensors

    manifest = read_manifest(path)
    ggml = {n: i for n, i in manifest["tensors"].items() if isinstance(formats.get(i["spec"]), GGMLFormat)}
    blocks = {}
    with open_safetensors(path / WEIGHTS) as f:
        quantized_parts(path, manifest, set(f.keys()))  # refuses a file that lacks one
        for name, info in ggml.items():
            parts = {key: f.get_tensor(f"{name}.{key}") for key in info["keys"]}
            blocks[name] = QuantizedTensor.from_tensors(info["spec"], tuple(info["shape"]), parts)
    return blocks


def export_gguf(
    model,
    tokenizer,
    out_file: str | Path,
    qtype: str | None = None,
    name: str | None = None,
    pre_tokenizer: str | None = None,
    force: bool = False,
    blocks: dict[str, QuantizedTensor] | None = None,
) -> Path:
    """Write `model` (LlamaForCausalLM or Qwen2ForCausalLM) with `tokenizer` as GGUF, atomically (an
    existing `out_file` only if `force`). A model with online rotations (surgery rotate) is refused:
    llama.cpp cannot run them; the fully fused rotation (surgery rotate_fused) exports like any model.

    `blocks` maps weight names to their codes in GGUF block types (checkpoint_blocks): those are written
    unchanged; every other matrix is encoded as `qtype` (default Q8_0), see the module docstring.
    `pre_tokenizer` names llama.cpp's pre-tokenizer for a tokenizer it does not recognise by hash (e.g.
    "gpt-2" for a plain GPT-2 style byte-level BPE); by default it is detected as llama.cpp's converter
    detects it."""
    check_output(out_file, force, is_ours=is_lighten_gguf)
    qtype = qtype or "Q8_0"
    if qtype not in QTYPES:
        raise LightenError(f"GGUF type {qtype!r} is not supported; choose one of {', '.join(QTYPES)}")
    cls = type(model).__name__
    if cls not in ARCHS:
        raise LightenError(
            f"GGUF export supports {', '.join(ARCHS)}; {cls} is not one of them "
            "(export a lighten checkpoint instead)"
        )
    from lighten.checkpoint import require_no_online_rotation

    require_no_online_rotation(model.state_dict(), "llama.cpp")
    arch, permute = ARCHS[cls]
    blocks = blocks or {}
    config = model.config
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if arch == "gemma2" and not tied:
        raise LightenError(
            "llama.cpp computes Gemma 2's logits with its token embedding; this model's lm_head is a matrix "
            "of its own (surgery fold unties it), so its export would compute another model"
        )
    # Tied models get no "output": llama.cpp then multiplies by token_embd, which so is the output matrix.
    output = "token_embd.weight" if tied else "output.weight"
    writer_name = name or Path(str(getattr(config, "name_or_path", "") or "model")).name
    with atomic_file(out_file, force, is_ours=is_lighten_gguf) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type("model")
        writer.add_name(writer_name)
        writer.add_quantized_by(QUANTIZED_BY)
        writer.add_file_type(_file_type(qtype, blocks))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        view = model_view(model)
        _add_hparams(writer, config, view.num_kv_heads)
        _add_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer)
        for gguf_name, data, data_type in _gguf_tensors(model, view, arch, permute, tied, blocks):
            if data_type is None:  # not carried over: encode it
                data_type = _tensor_type(gguf_name == output, data, QTYPES[qtype][0])
                data = _encode(data, data_type)
            writer.add_tensor(gguf_name, data, raw_dtype=data_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out_file)


def is_lighten_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file that lighten wrote, the only kind `--force` replaces."""
    try:
        field = gguf.GGUFReader(path).get_field(gguf.Keys.General.QUANTIZED_BY)
    except Exception:  # not a GGUF file (or a directory, or truncated): then it is not lighten's either
        return False
    return field is not None and field.contents() == QUANTIZED_BY


def _gguf_tensors(
    model, view: ModelView, arch: str, permute: bool, tied: bool, blocks: dict[str, QuantizedTensor]
):
    """(GGUF name, data, ggml type) for every weight: a weight in `blocks` as its blocks (uint8 rows) and
    their type, any other as float32 with type None (to be encoded); q/k rows re-ordered for llama.cpp's
    rope, which for blocks moves whole rows of bytes and so stays exact."""
    heads = {".attn_q.": view.num_heads, ".attn_k.": view.num_kv_heads}
    conv1d = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Conv1D)}
    gains = {
        f"{name}.weight": norm_gain(m)
        for name, m in model.named_modules()
        if type(m).__name__.endswith("RMSNorm") and gain_offset(m) != 0
    }
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        gguf_name = gguf_tensor_name(hf_name, arch)
        if hf_name in gains:  # llama.cpp multiplies by the stored gain: Gemma's 1 + w, not its w
            t = gains[hf_name]
        if hf_name in blocks:  # rows of [out, in], as GGUF stores every matrix
            q = blocks[hf_name]
            data, data_type = q.tensors["blocks"].numpy(), formats.get(q.spec).ggml_type
        else:
            data, data_type = t.detach().to(torch.float32).cpu().numpy(), None
            if hf_name in conv1d:
                data = np.ascontiguousarray(data.T)
        for part, n_heads in heads.items():
            if permute and part in gguf_name:
                data = permute_rope(data, n_heads)
        if arch == "gptneox" and ".attn_qkv." in gguf_name:
            data = _qkv_by_kind(data, view.num_heads)
        yield gguf_name, data, data_type


def _qkv_by_kind(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GPT-NeoX's fused rows, q k v of head 0, then of head 1, ... → all q rows, all k, all v (llama.cpp's
    layout; a row permutation, so blocks move whole)."""
    return w.reshape(n_heads, 3, w.shape[0] // n_heads // 3, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str:
    """llama.cpp's name of a Hugging Face tensor of a model of GGUF architecture `arch`, by gguf's own map
    (the one llama.cpp's converter uses: Gemma's post_attention_layernorm is post_attention_norm there,
    Llama's ffn_norm)."""
    block = re.search(r"\.(\d+)\.", hf_name)
    blocks = 1 + int(block.group(1)) if block else 1
    name = _tensor_names(arch, 128 * math.ceil(blocks / 128)).get_name(
        hf_name, try_suffixes=(".weight", ".bias")
    )
    if name is None:
        raise LightenError(f"GGUF export does not know where tensor {hf_name!r} goes in llama.cpp's {arch}")
    return name


@functools.cache
def _tensor_names(arch: str, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(ARCH_IDS[arch], n_blocks)


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half row order → llama.cpp's interleaved pairs, per head (convert_hf_to_gguf's permute).

    Within a head, HF rotates row i with row i + d/2; afterwards they sit at rows 2i and 2i + 1."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(is_output: bool, w: np.ndarray, qtype: T) -> T:
    """The module docstring's rule."""
    if w.ndim == 1:
        return T.F32
    if is_output and qtype in FOUR_BIT:
        qtype = T.Q6_K
    while w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = FALLBACK[qtype]
    return qtype


def _file_type(qtype: str, blocks: dict[str, QuantizedTensor]) -> gguf.LlamaFileType:
    """general.file_type (what llama.cpp reports as the model's type): that of `qtype`, or, when weights are
    carried over, of the block type that holds the most of them (the k-quants as their "_S" mixes)."""
    if not blocks:
        return QTYPES[qtype][1]
    counts = Counter()
    for q in blocks.values():
        counts[formats.get(q.spec).ggml_type.name] += math.prod(q.shape)
    name = counts.most_common(1)[0][0]
    members = gguf.LlamaFileType.__members__
    return members.get(f"MOSTLY_{name}") or members[f"MOSTLY_{name}_S"]


def _encode(w: np.ndarray, qtype: T) -> np.ndarray:
    """F32 / F16 by gguf; the block types by the zoo's GGUF formats: llama.cpp's reference quantizers."""
    if qtype in (T.F32, T.F16):
        return gguf.quants.quantize(w, qtype)
    return formats.get(qtype.name).quantize(torch.from_numpy(w)).tensors["blocks"].numpy()


def _add_hparams(writer, config, kv_heads: int) -> None:
    # Gemma 3 keeps one rope for its sliding-window layers and one for the full-attention layers.
    ropes = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}
    ropes = ropes if "full_attention" in ropes else {"full_attention": ropes}
    for rope in ropes.values():
        if rope.get("rope_type", "default") != "default":
            raise LightenError(
                f"GGUF export supports only plain RoPE; this model uses {rope['rope_type']!r} rope scaling"
            )
    rope = ropes["full_attention"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # A sliding-window model whose window llama.cpp does not apply is the same model only within the
    # window, which so becomes the context it declares (llama.cpp warns beyond it).
    context = min(config.max_position_embeddings, unapplied_window(config) or config.max_position_embeddings)
    ffn = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or 4 * config.hidden_size
    )
    if context < config.max_position_embeddings:
        note(
            f"llama.cpp runs {config.model_type} without its sliding window: the export declares a context "
            f"of {context} tokens (not {config.max_position_embeddings}), within which it computes the same"
        )
    writer.add_context_length(context)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_vocab_size(config.vocab_size)
    if getattr(config, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    else:  # LayerNorms
        writer.add_layer_norm_eps(getattr(config, "layer_norm_eps", None) or config.layer_norm_epsilon)
    if hasattr(config, "use_parallel_residual"):
        writer.add_parallel_residual(config.use_parallel_residual)
    if config.model_type != "gpt2":  # GPT-2 learns its positions
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    if config.model_type in ("gemma2", "gemma3_text"):
        _add_gemma_hparams(writer, config, head_dim, ropes)
    for key, add in GRANITE_SCALES.items():
        if hasattr(config, key):
            getattr(writer, add)(float(getattr(config, key)))
    if head_dim * config.num_attention_heads != config.hidden_size:
        # llama.cpp derives the head size from embedding_length / head_count unless told otherwise.
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def unapplied_window(config) -> int | None:
    """The sliding window of a model whose GGUF architecture llama.cpp runs with full attention (Mistral
    v0.1 as "llama"), or None; llama.cpp's gemma2 / gemma3 graphs apply theirs."""
    return None if config.model_type in ("gemma2", "gemma3_text") else sliding_window(config)


def _add_gemma_hparams(writer, config, head_dim: int, ropes: dict) -> None:
    """Attention scale, soft-capping and sliding windows as llama.cpp's gemma2 / gemma3 graphs read them."""
    name = {"gemma2": "Gemma 2", "gemma3_text": "Gemma 3"}[config.model_type]
    if config.query_pre_attn_scalar != head_dim:  # llama.cpp scales attention by 1/sqrt(head_dim)
        raise LightenError(
            f"llama.cpp scales {name}'s attention by 1/sqrt(head_dim = {head_dim}); this model's "
            f"query_pre_attn_scalar is {config.query_pre_attn_scalar}: its export would compute another"
        )
    writer.add_sliding_window(config.sliding_window)
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
        return
    if config.attn_logit_softcapping:
        raise LightenError("llama.cpp does not soft-cap Gemma 3's attention logits, which this model does")
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    # Which layers slide, and their rope base: without these llama.cpp assumes Gemma 3's own (every sixth
    # layer full, base 10000), and a model that differs would run with the wrong ones.
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
    writer.add_rope_freq_base_swa(float(ropes["sliding_attention"]["rope_theta"]))


def _add_tokenizer(writer, tokenizer, vocab_size: int, pre_tokenizer: str | None) -> None:
    """gpt2-style BPE fields, built the way llama.cpp's converter builds them (get_vocab_base)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if spec.get("model", {}).get("type") != "BPE":
        raise LightenError("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen2)")
    if pre_tokenizer is None:
        chk = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
        if chk not in PRE_TOKENIZERS:
            raise LightenError(
                f"llama.cpp would not recognise this tokenizer's pre-tokenizer (check hash {chk[:12]}…, "
                f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}); "
                "name it with --pre-tokenizer NAME"
            )
        pre_tokenizer = PRE_TOKENIZERS[chk]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    tokens, types = _tokens(tokenizer, vocab_size)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges are pairs in newer tokenizer.json files; GGUF wants "a b", so spaces inside a part are
    # written as U+0120, as gguf.SpecialVocab does.
    writer.add_token_merges(
        [
            m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m)
            for m in spec["model"]["merges"]
        ]
    )
    for key in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_space_prefix(False)  # byte-level BPE encodes the space itself (Ġ)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id with llama.cpp token types: added special tokens are CONTROL, other added tokens
    USER_DEFINED, ids the tokenizer lacks (embedding rows padded past the vocabulary) UNUSED."""
    by_id = {i: tok for tok, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise LightenError(
            f"the tokenizer has ids up to {max(by_id)} but the model only {vocab_size} embeddings: "
            "they do not belong together"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = by_id[i]
        tokens.append(tok)
        if i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or (tok.startswith("<|") and tok.endswith("|>")):
            types.append(gguf.TokenType.CONTROL)
        else:
            types.append(gguf.TokenType.USER_DEFINED)
    return tokens, types
