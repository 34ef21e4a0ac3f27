"""The lab's text: the Wikipedia calibration split to train on, its evaluation split held out, both in the
tokens of a byte-level BPE trained once on the calibration split (a small vocabulary: a 49k-token table
would be most of a lab model's parameters). Batches are a function of the step number alone, so a resumed
run sees exactly the batches an uninterrupted one would."""

import hashlib

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lighten.atomic import atomic_file
from lighten.eval.corpora import wiki_texts
from lighten.models.builtin import cache_dir

VOCAB_SIZE = 4096
END_OF_TEXT = "<|endoftext|>"  # between articles, so that no window reads one article into the next


def lab_tokenizer(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """The BPE of `vocab_size` tokens trained on the calibration split, cached in $LIGHTEN_CACHE/lab."""
    texts = wiki_texts("calibration")
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = cache_dir() / "lab" / f"bpe-{vocab_size}-{digest}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[END_OF_TEXT],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, force=True, is_ours=lambda p: True) as tmp:
        tmp.write_text(tokenizer.to_str())
    return tokenizer


def token_stream(split: str, tokenizer: Tokenizer, separator: str = END_OF_TEXT) -> torch.Tensor:
    """Every article of `split` in order, each followed by the token `separator`, as one int64 tensor of
    token ids (cached in $LIGHTEN_CACHE/lab beside the tokenizer it was made with). A Hugging Face
    tokenizer's is its backend_tokenizer, with its eos_token as the separator."""
    texts = wiki_texts(split)
    key = hashlib.sha256(("\n".join(texts) + tokenizer.to_str() + separator).encode()).hexdigest()[:16]
    path = cache_dir() / "lab" / f"tokens-{split}-{key}.safetensors"
    if path.is_file():
        return load_file(path)["ids"]
    eot = tokenizer.token_to_id(separator)
    ids = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += [*encoding.ids, eot]
    stream = torch.tensor(ids, dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, force=True, is_ours=lambda p: True) as tmp:
        save_file({"ids": stream}, tmp)
    return stream


def batch_at(stream: torch.Tensor, step: int, batch: int, context: int, seed: int) -> torch.Tensor:
    """[batch, context + 1] windows of `stream` at offsets drawn from (seed, step): inputs and, shifted by
    one, their next-token labels."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - context - 1, (batch,), generator=g)
    return torch.stack([stream[s : s + context + 1] for s in starts.tolist()])
