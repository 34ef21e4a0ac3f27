"""The results store: one SQLite file (the standard library's sqlite3; no server, no dependency), one row
per finished or failed job. A row is written in one transaction, so a killed sweep leaves whole rows
only, and the job id as primary key keeps a job from being recorded twice.

SQLite rather than DuckDB: the store takes a few hundred small writes from one process and is read whole
by the report; DuckDB's columnar engine would be a dependency for nothing here."""

import datetime
import json
import sqlite3
from pathlib import Path

from lighten.sweep.grid import Job

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    job TEXT NOT NULL,              -- the Job's parameters (JSON)
    command TEXT NOT NULL,          -- the lighten quantize command line that makes its checkpoint
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    result TEXT,                    -- size and quality (JSON), when done
    manifest TEXT,                  -- the checkpoint's lighten.json, when done
    error TEXT,                     -- what went wrong, when failed
    speed TEXT,                     -- decode tokens/s or sentences/s (JSON), measured alone, later
    seconds REAL,
    finished TEXT
);
CREATE TABLE IF NOT EXISTS models (
    model TEXT PRIMARY KEY,
    inspect TEXT NOT NULL           -- lighten inspect's report of the model (JSON)
)
"""


def open_store(path: str | Path) -> sqlite3.Connection:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    return db


def finished(db: sqlite3.Connection, with_failed: bool = True) -> set[str]:
    """Ids of the jobs recorded: done, and failed too unless `with_failed` is False."""
    query = "SELECT id FROM jobs" + ("" if with_failed else " WHERE status = 'done'")
    return {row[0] for row in db.execute(query)}


def record(db: sqlite3.Connection, job: Job, command: str, outcome: dict) -> None:
    """Write one job's outcome: {"result", "manifest", "seconds"} or {"error", "seconds"}."""
    status = "failed" if "error" in outcome else "done"
    with db:
        db.execute(
            "INSERT OR REPLACE INTO jobs (id, job, command, status, result, manifest, error, seconds, "
            "finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                json.dumps(_job_dict(job)),
                command,
                status,
                _json_or_none(outcome.get("result")),
                _json_or_none(outcome.get("manifest")),
                outcome.get("error"),
                outcome.get("seconds"),
                datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            ),
        )


def record_speed(db: sqlite3.Connection, job_id: str, speed: dict) -> None:
    with db:
        db.execute("UPDATE jobs SET speed = ? WHERE id = ?", (json.dumps(speed), job_id))


def without_speed(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT id FROM jobs WHERE status = 'done' AND speed IS NULL")}


def record_profile(db: sqlite3.Connection, model: str, report: dict) -> None:
    with db:
        db.execute(
            "INSERT OR REPLACE INTO models (model, inspect) VALUES (?, ?)", (model, json.dumps(report))
        )


def model_profiles(db: sqlite3.Connection) -> dict[str, dict]:
    """{model: its inspect report} for the models profiled so far."""
    return {model: json.loads(report) for model, report in db.execute("SELECT model, inspect FROM models")}


def rows(db: sqlite3.Connection) -> list[dict]:
    """Every row, JSON columns decoded, in the order the jobs finished."""
    cursor = db.execute("SELECT * FROM jobs ORDER BY finished, id")
    names = [d[0] for d in cursor.description]
    decoded = []
    for values in cursor:
        row = dict(zip(names, values, strict=True))
        for key in ("job", "result", "manifest", "speed"):
            row[key] = json.loads(row[key]) if row[key] is not None else None
        decoded.append(row)
    return decoded


def speed_of(row: dict) -> float | None:
    """A row's measured speed: decode tokens/s (causal LMs) or sentences/s (encoders), or None."""
    speed = row["speed"] or {}
    return speed.get("decode_tokens_per_s") or speed.get("sentences_per_s")


def _job_dict(job: Job) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in job.__dict__.items()}


def _json_or_none(value) -> str | None:
    return None if value is None else json.dumps(value)
