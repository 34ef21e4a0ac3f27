"""Running a sweep: each job quantizes its model into RESULTS/checkpoints/ID and evaluates it against the
source; its row goes into RESULTS/results.sqlite as soon as it finishes. Quality jobs run side by side
(local worker processes, or Ray tasks on a cluster); speed is measured afterwards, one checkpoint at a
time in this process, with nothing else of the sweep running, since two timings at once slow each other.

A rerun skips every job already recorded and measures only the speeds still missing: a killed sweep
restarts where it stopped, and the same grid twice costs nothing the second time. A failing job is recorded
with its error and the sweep goes on (run_sweep(retry_failed=True) tries it again)."""

import os
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from lighten.atomic import make_output_dir
from lighten.errors import LightenError
from lighten.memory import available_bytes
from lighten.sweep.grid import Job
from lighten.sweep.store import (
    finished,
    model_profiles,
    open_store,
    record,
    record_profile,
    record_speed,
    rows,
    without_speed,
)

STORE = "results.sqlite"
PROMPTS = {  # what the speed measurement runs
    "causal": ["The capital of France is"],
    "encoder": ["A man is eating food.", "Someone is having a meal.", "The stock market crashed."] * 8,
}
SPEED_TOKENS = 32


def checkpoint_dir(results: Path, job: Job) -> Path:
    return results / "checkpoints" / job.id


def quality_job(job: Job, results: Path, n_tokens: int, threads: int | None = None) -> dict:
    """Quantize and evaluate one job: {"result", "manifest", "seconds"}, or {"error", "seconds"} if it
    failed (a LightenError's message, or the traceback of anything else)."""
    import torch

    from lighten.checkpoint import read_manifest
    from lighten.eval.compare import evaluate
    from lighten.pipeline import quantize_to_dir

    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        path = quantize_to_dir(job.model, job.recipe(), checkpoint_dir(results, job), force=True)
        report = evaluate([path], n_tokens=n_tokens)
    except LightenError as e:
        return {"error": str(e), "seconds": time.perf_counter() - start}
    except Exception:  # a bug, but one job's: the sweep records it and goes on
        return {"error": traceback.format_exc(limit=-3), "seconds": time.perf_counter() - start}
    (row,) = report["candidates"]
    row["kind"], row["reference"] = report["kind"], report["reference"]
    return {"result": row, "manifest": read_manifest(path), "seconds": time.perf_counter() - start}


def speed_job(checkpoint: Path, kind: str) -> dict:
    """Decode tokens/s (causal) or sentences/s (encoder) of a checkpoint on lighten's packed runtime."""
    from lighten.pipeline import run_model

    run = run_model(checkpoint, PROMPTS[kind], max_new_tokens=SPEED_TOKENS)
    if kind == "encoder":
        return {"sentences_per_s": run["sentences_per_s"], "engine": run["engine"]}
    (generation,) = run["generations"]
    return {"decode_tokens_per_s": generation["decode_tokens_per_s"], "engine": run["engine"]}


def local_workers(jobs: list[Job]) -> int:
    """As many worker processes as there are cores, and no more than the memory holds, counting each job
    at four times its model's files (the model, its copy for calibration, activations)."""
    from lighten.models import resolve

    largest = max(_model_bytes(resolve(job.model)) for job in jobs)
    by_memory = available_bytes() // max(4 * largest, 1)
    return max(1, min(os.cpu_count() or 1, by_memory, len(jobs)))


def run_sweep(
    jobs: list[Job],
    results: str | Path,
    workers: int | None = None,
    ray: str | None = None,
    n_tokens: int = 4096,
    speed: bool = True,
    retry_failed: bool = False,
    on_row=None,
) -> list[dict]:
    """Run the jobs not yet in RESULTS's store (see the module docstring) and return every row of it.
    `ray`: "auto" or a cluster address to run the quality jobs as Ray tasks there; else `workers` local
    processes (default local_workers). Jobs that failed before run again only with `retry_failed`.
    `on_row(job, outcome, counts)` is told of each finished job (and once at the start, with job None)."""
    from lighten.models import resolve

    for model in dict.fromkeys(job.model for job in jobs):
        resolve(model)  # a missing model is one error now, not a failed row per job
    results = make_output_dir(results)  # a folder lighten made (resumed), or a new one
    db = open_store(results / STORE)
    jobs = list(dict.fromkeys(jobs))
    recorded = finished(db, with_failed=not retry_failed)
    todo = [job for job in jobs if job.id not in recorded]
    counts = {"done": len(jobs) - len(todo), "failed": 0, "running": 0, "total": len(jobs)}
    if on_row:
        on_row(None, {}, counts)
    if todo:
        outcomes = (
            _ray_outcomes(todo, results, n_tokens, ray, counts)
            if ray
            else _local_outcomes(todo, results, n_tokens, workers or local_workers(todo), counts)
        )
        for job, outcome in outcomes:
            record(db, job, job.command(str(checkpoint_dir(results, job))), outcome)
            counts["failed" if "error" in outcome else "done"] += 1
            if on_row:
                on_row(job, outcome, counts)
    profiled = model_profiles(db)
    for model in dict.fromkeys(job.model for job in jobs):
        if model not in profiled:
            record_profile(db, model, _profile(model))
    if speed:
        missing = without_speed(db)
        kinds = {row["id"]: row["result"]["kind"] for row in rows(db) if row["id"] in missing}
        for job in jobs:
            if job.id in kinds:
                try:
                    measured = speed_job(checkpoint_dir(results, job), kinds[job.id])
                except LightenError as e:  # e.g. a checkpoint the packed runtime refuses
                    measured = {"error": str(e)}
                record_speed(db, job.id, measured)
    return rows(db)


def _local_outcomes(todo, results, n_tokens, workers, counts) -> Iterator[tuple[Job, dict]]:
    if workers == 1:  # in this process: no worker to start
        for job in todo:
            counts["running"] = 1
            yield job, quality_job(job, results, n_tokens)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: a forked torch with its thread pools already started can hang
    with ProcessPoolExecutor(workers, get_context("spawn"), initializer=_quiet) as pool:
        pending = {pool.submit(quality_job, job, results, n_tokens, threads): job for job in todo}
        counts["running"] = min(workers, len(pending))
        while pending:
            ready, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in ready:
                job = pending.pop(future)
                counts["running"] = min(workers, len(pending))
                yield job, future.result()


def _ray_outcomes(todo, results, n_tokens, address, counts) -> Iterator[tuple[Job, dict]]:
    """The quality jobs as Ray tasks, each declaring one CPU and four times its model's bytes of memory
    (Ray schedules them on the nodes that have both); outcomes stream back as tasks finish. RESULTS must
    be a folder that every node writes to (a shared filesystem), as the checkpoints land there."""
    import ray

    from lighten.models import resolve

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    futures = {}
    for job in todo:
        task = ray.remote(num_cpus=1, memory=4 * _model_bytes(resolve(job.model)))(quality_job)
        futures[task.remote(job, results, n_tokens, 1)] = job
    counts["running"] = len(futures)
    while futures:
        ready, _ = ray.wait(list(futures), num_returns=1)
        for ref in ready:
            job = futures.pop(ref)
            counts["running"] = len(futures)
            yield job, ray.get(ref)


def _profile(model: str) -> dict:
    """lighten inspect's report of a model on 2,048 calibration tokens (sites: empty where inspect cannot
    read the model's structure)."""
    from lighten.inspect import inspect_model
    from lighten.models import load_model

    try:
        return inspect_model(*load_model(model))
    except LightenError as e:
        return {"sites": [], "error": str(e)}


def _quiet() -> None:
    """A worker's progress bars and notes would garble the sweep's display."""
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the worker's lifetime


def _model_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
