"""Quantization algorithms (registry.py names them) and what they read from calibration text: activation
statistics (activations.py), sensitivity, the allocation ILP, simulated activation quantization."""
