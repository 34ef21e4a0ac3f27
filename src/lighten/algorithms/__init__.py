"""Algorithms that read calibration activations: statistics first (activations), rewrites built on them."""

from lighten.algorithms.activations import OUTLIER_THRESHOLD, InputStats, collect_input_stats, token_windows

__all__ = ["OUTLIER_THRESHOLD", "InputStats", "collect_input_stats", "token_windows"]
