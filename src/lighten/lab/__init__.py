"""The normalization lab: small Llama-shaped models trained here with the seeds' norms and with
quantization-aware training (qat), to measure what they do to quantization."""
