"""`lighten sweep` on a tiny random Llama: one row per job with its checkpoint's manifest, a failing job
recorded with its error while the others go on, a rerun that does nothing, a sweep killed mid-way that
restarts without losing or repeating a row, and the same rows from a local Ray cluster."""

import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from cli_helpers import assert_refused, lighten
from sweep_helpers import TOKENS, jobs_of

from lighten.checkpoint import read_manifest
from lighten.sweep.grid import Job
from lighten.sweep.run import STORE, checkpoint_dir, run_sweep


def test_rows_failures_and_a_rerun_that_does_nothing(swept, tiny_bpe_llama):
    results, jobs, rows = swept
    assert sorted(r["id"] for r in rows) == sorted(j.id for j in jobs)
    by_id = {r["id"]: r for r in rows}
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert failed["job"]["format"] == "q4_k" and "--fallback" in failed["error"]
    for job in jobs[:4]:
        row = by_id[job.id]
        assert row["status"] == "done" and row["result"]["kl"] > 0
        assert row["manifest"] == read_manifest(checkpoint_dir(results, job))
        assert row["speed"]["decode_tokens_per_s"] > 0
        assert row["command"].startswith(f"lighten quantize {tiny_bpe_llama} -f {job.format} --algorithm")
    gptq, rtn = (by_id[Job(str(tiny_bpe_llama), "int4:g32", a).id]["result"]["kl"] for a in ("gptq", "rtn"))
    assert gptq < rtn  # calibration helps: the rows are the jobs' own measurements
    budgeted = by_id[jobs[-1].id]["manifest"]
    assert {a["format"] for a in budgeted["allocation"]} <= {"int4:g32:sym", "int8:channel:sym"}

    again = run_sweep(jobs, results, workers=2, n_tokens=TOKENS)
    assert again == rows  # nothing ran: the same rows, the same finish times


def test_a_killed_sweep_restarts_without_losing_or_repeating_rows(tiny_bpe_llama, tmp_path):
    results = tmp_path / "results"
    command = [sys.executable, "-m", "lighten", "sweep", str(tiny_bpe_llama), "-o", str(results)]
    command += ["--formats", "int8,int4:g32,int3:g32,int2:g32", "--workers", "1", "--tokens", str(TOKENS)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _count(results / STORE) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {row[0]: row[1] for row in _rows(results / STORE)}
    assert 1 <= len(before) < 4, "the kill should land mid-sweep"

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    after = {row[0]: row[1] for row in _rows(results / STORE)}
    assert len(after) == 4 and all(after[i] == finished for i, finished in before.items())
    # stderr is no terminal here: a line per job this run finished, counted with those found done
    finished_lines = re.findall(r"^(\d)/4 done: ", resumed.stderr, flags=re.M)
    assert sorted(int(n) for n in finished_lines) == list(range(len(before) + 1, 5)), resumed.stderr


def test_ray_cluster_gives_the_same_rows(tiny_bpe_llama, tmp_path):
    ray = pytest.importorskip("ray")
    jobs = jobs_of(tiny_bpe_llama)[:2]
    local = run_sweep(jobs, tmp_path / "local", workers=2, n_tokens=TOKENS, speed=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(jobs, tmp_path / "ray", ray="auto", n_tokens=TOKENS, speed=False)
    finally:
        ray.shutdown()
    local, remote = (sorted(rows, key=lambda r: r["id"]) for rows in (local, remote))
    assert [(r["id"], r["status"]) for r in local] == [(r["id"], r["status"]) for r in remote]
    assert _measured(local) == pytest.approx(_measured(remote), rel=1e-6)


def _measured(rows: list[dict]) -> list[float]:
    return [r["result"][k] for r in rows for k in ("bits_per_weight", "perplexity", "kl")]


def test_bad_input_is_refused(tiny_bpe_llama, tmp_path):
    def sweep(*options):
        return lighten("sweep", tiny_bpe_llama, "-o", tmp_path / "out", *options)

    assert_refused(sweep("--formats", "int9"), "int9", output=tmp_path / "out")
    missing = lighten("sweep", tmp_path / "no-model", "-o", tmp_path / "out", "--formats", "int8")
    assert_refused(missing, "no-model", output=tmp_path / "out")
    assert_refused(sweep("--formats", "int4", "--algorithms", "magic"), "magic", output=tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert_refused(lighten("sweep", tiny_bpe_llama, "-o", tmp_path / "mine", "--formats", "int8"), "mine")


def _rows(store) -> list[tuple]:
    with sqlite3.connect(store) as db:
        return db.execute("SELECT id, finished FROM jobs").fetchall()


def _count(store) -> int:
    try:
        return len(_rows(store))
    except sqlite3.OperationalError:  # not created yet
        return 0
