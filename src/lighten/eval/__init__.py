"""How much a light model costs and what it loses, measured against the model it came from.

- corpora: the text (Wikipedia summaries with a fixed calibration/evaluation split, shipped sentences).
- perplexity: causal LMs, perplexity and per-token KL(reference || candidate); the same measures (and top-1
  agreement) of a GGUF file run by llama.cpp on the same token windows.
- embeddings: encoders, same-sentence cosine and Spearman of pairwise similarities.
- size: bytes on disk.
"""

from lighten.eval.corpora import eval_sentences, read_text_file, wiki_texts
from lighten.eval.embeddings import embed, embedding_fidelity
from lighten.eval.perplexity import (
    causal_fidelity,
    llamacpp_fidelity,
    llamacpp_log_probs,
    llamacpp_perplexity,
    token_windows,
)
from lighten.eval.size import size_report

__all__ = [
    "causal_fidelity",
    "embed",
    "embedding_fidelity",
    "eval_sentences",
    "llamacpp_fidelity",
    "llamacpp_log_probs",
    "llamacpp_perplexity",
    "read_text_file",
    "size_report",
    "token_windows",
    "wiki_texts",
]
