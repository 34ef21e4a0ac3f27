"""Sweeps: the cross product of formats, algorithms, surgery chains and budgets over models, run as jobs
(locally or as Ray tasks) into one resumable SQLite results store."""
