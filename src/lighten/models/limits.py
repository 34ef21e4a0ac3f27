"""What a model can read: the longest sequence its position table (or RoPE training length) covers, and how
far back its attention looks."""


def max_positions(config) -> int | None:
    """Positions the model was built for (BERT/GPT-2/Llama name it differently), or None if unbounded."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def sliding_window(config) -> int | None:
    """The number of past tokens each one attends to, if the model slides a window (Mistral v0.1, Gemma);
    None if it attends to all of them (Qwen2 keeps a window in its config but switches it off)."""
    if not getattr(config, "use_sliding_window", True):
        return None
    return getattr(config, "sliding_window", None)
