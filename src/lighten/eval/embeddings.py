"""Fidelity of sentence encoders: how close each candidate's sentence embeddings stay to the reference's.

"cosine" is the mean cosine between the two embeddings of the same sentence (1: the vectors did not move).
"spearman" is the rank correlation of all pairwise sentence similarities: search and clustering use the
order of similarities, and a candidate may move every vector a little (cosine < 1) yet keep that order."""

import torch
import torch.nn.functional as F

from lighten.errors import DataError
from lighten.progress import track


@torch.inference_mode()
def embed(model, tokenizer, sentences: list[str], batch_size: int = 32) -> torch.Tensor:
    """[n, d] sentence embeddings as sentence-transformers computes them for MiniLM-style encoders: the mean
    of the last hidden states over the real (unpadded) tokens, L2-normalised so dot products are cosines."""
    model.eval()
    pooled = []
    for start in track(range(0, len(sentences), batch_size), "embedding"):
        batch = tokenizer(
            sentences[start : start + batch_size], padding=True, truncation=True, return_tensors="pt"
        )
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled.append((hidden * mask).sum(1) / mask.sum(1))
    return F.normalize(torch.cat(pooled), dim=-1)


def embedding_fidelity(reference, candidates: list, tokenizer, sentences: list[str]) -> dict:
    """Mean same-sentence cosine and pairwise-similarity Spearman of each candidate against `reference`."""
    if len(sentences) < 3:
        raise DataError(
            f"embedding fidelity needs at least 3 sentences to rank their similarities, "
            f"got {len(sentences)}: pass more sentences, one per line"
        )
    ref = embed(reference, tokenizer, sentences)  # once, for every candidate
    scores = []
    for candidate in candidates:
        emb = embed(candidate, tokenizer, sentences)
        scores.append(
            {"cosine": (ref * emb).sum(-1).mean().item(), "spearman": similarity_spearman(ref, emb)}
        )
    return {"candidates": scores, "n_sentences": len(sentences)}


def similarity_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation between the pairwise similarities (i < j) of two [n, d] sets of unit embeddings
    of the same n sentences."""
    import scipy.stats  # here: it adds ~25 MB to the RSS of every process that imports it

    i, j = torch.triu_indices(len(a), len(a), offset=1)
    return float(scipy.stats.spearmanr((a @ a.T)[i, j].numpy(), (b @ b.T)[i, j].numpy()).statistic)
