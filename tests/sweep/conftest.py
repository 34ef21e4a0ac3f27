"""A sweep run once per test session on a tiny random Llama, for the sweep's and the report's tests."""

import pytest
from sweep_helpers import TOKENS, jobs_of

from lighten.sweep.grid import Job
from lighten.sweep.run import run_sweep


@pytest.fixture(scope="session")
def swept(tiny_bpe_llama, tmp_path_factory):
    """(results folder, jobs, rows) of a sweep of jobs_of and a budgeted job, on two local workers."""
    jobs = [
        *jobs_of(tiny_bpe_llama),
        Job(str(tiny_bpe_llama), "int4:g32", None, (), "6bits", ("int4:g32", "int8")),
    ]
    results = tmp_path_factory.mktemp("sweep") / "results"
    return results, jobs, run_sweep(jobs, results, workers=2, n_tokens=TOKENS)
