"""What a model can read: the longest sequence its position table (or RoPE training length) covers."""


def max_positions(config) -> int | None:
    """Positions the model was built for (BERT/GPT-2/Llama name it differently), or None if unbounded."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None
