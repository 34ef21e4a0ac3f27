"""Outputs never destroy user data: --force replaces only lighten's own outputs, never an input; swaps are
atomic, concurrent writers do not clash, dead writers' temps go, permissions follow the umask, and a bad
output path fails before the work."""

import os
import subprocess
import sys
import threading

import pytest
from tiny_models import save_tiny

from lighten import atomic, pipeline
from lighten.atomic import MARKER, atomic_dir, atomic_file, check_output
from lighten.errors import LightenError


def write_dir(target, text, force=False, inputs=()):
    with atomic_dir(target, force=force, inputs=inputs) as tmp:
        (tmp / "data.txt").write_text(text)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_force_replaces_a_lighten_dir_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    write_dir(out, "first")
    assert (out / MARKER).is_file()
    with pytest.raises(LightenError, match="--force"):
        write_dir(out, "second")
    write_dir(out, "second", force=True)
    assert (out / "data.txt").read_text() == "second"

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(LightenError, match="not written by lighten"):
        write_dir(mine, "oops", force=True)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
    # A checkpoint written before the marker existed still counts: it has lighten's manifest.
    (mine / "lighten.json").write_text("{}")
    write_dir(mine, "new", force=True)
    assert (mine / "data.txt").read_text() == "new"


def test_force_replaces_only_files_lighten_recognises(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(LightenError, match="not written by lighten"):
        with atomic_file(target, force=True) as tmp:  # by default no file is recognised as lighten's
            tmp.write_text("x")
    with atomic_file(target, force=True, is_ours=lambda p: p.read_text() == "mine") as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_symlink_is_never_replaced(tmp_path):
    write_dir(tmp_path / "real", "data")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(LightenError, match="not written by lighten"):
        write_dir(tmp_path / "link", "new", force=True)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "data.txt").read_text() == "data"


def test_the_input_or_a_folder_holding_it_is_refused(tmp_path, monkeypatch):
    model = tmp_path / "models" / "llama"
    write_dir(model, "weights")  # even an output lighten wrote, once it is the input
    monkeypatch.chdir(tmp_path / "models")
    (tmp_path / "alias").symlink_to(model)
    for target in (model, tmp_path / "models", tmp_path, "llama", ".", "llama/../llama", tmp_path / "alias"):
        with pytest.raises(LightenError, match="input"):
            write_dir(target, "oops", force=True, inputs=[model])
    assert (model / "data.txt").read_text() == "weights"
    check_output(model / "quantized", inputs=[model])  # inside it is fine: nothing of it is replaced


def test_exchange_leaves_old_or_new_never_neither(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_dir(out, "old")

    def killed(path):
        assert (out / "data.txt").read_text() == "new"  # already swapped in when the old one goes
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_remove", killed)
    with pytest.raises(KeyboardInterrupt):
        write_dir(out, "new", force=True)
    assert (out / "data.txt").read_text() == "new"


def test_fallback_interrupted_between_renames_is_restored_next_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_dir(out, "old")
    monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: False)  # no exchange here
    real_rename = os.rename

    def killed_after_first(src, dst):
        if str(dst) == str(out):
            raise KeyboardInterrupt  # between moving the old output aside and moving the new one in
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        write_dir(out, "new", force=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists() and len(list(tmp_path.glob(".out.*.old"))) == 1
    monkeypatch.setattr(atomic, "_dead_writer", lambda path, target: True)  # that process was killed
    with pytest.raises(LightenError, match="already exists"):  # the old output is back
        check_output(out)
    monkeypatch.undo()
    assert (out / "data.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    write_dir(out, "newer", force=True)  # and the fallback's two renames work when not interrupted
    assert (out / "data.txt").read_text() == "newer"


def test_concurrent_writers_one_wins_the_other_gets_an_error(tmp_path):
    out = tmp_path / "out"
    write_dir(out, "old")
    both_written = threading.Barrier(2)
    errors = []

    def writer(text):
        try:
            with atomic_dir(out, force=True) as tmp:
                (tmp / "data.txt").write_text(text)
                both_written.wait(timeout=30)
        except LightenError as e:
            errors.append((text, str(e)))

    threads = [threading.Thread(target=writer, args=(text,)) for text in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ((loser, message),) = errors
    assert "another process" in message
    assert (out / "data.txt").read_text() == {"a": "b", "b": "a"}[loser]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_temps_of_dead_writers_to_the_same_target_are_removed(tmp_path):
    stale = tmp_path / f".out.{dead_pid()}.0123456789abcdef.tmp"
    live = tmp_path / f".out.{os.getpid()}.0123456789abcdef.tmp"  # a writer still at work
    other = tmp_path / f".other.{dead_pid()}.0123456789abcdef.tmp"  # another target's: not ours to judge
    for path in (stale, live, other):
        path.mkdir()
    write_dir(tmp_path / "out", "data")
    assert not stale.exists() and live.exists() and other.exists()


def test_outputs_get_the_permissions_the_umask_allows(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            fd = os.open(tmp / "private", os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors writes
            os.close(fd)
        with atomic_file(tmp_path / "file.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "private").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "file.txt").stat().st_mode & 0o777 == 0o640


def test_an_output_under_a_file_fails_before_any_work(tmp_path, monkeypatch):
    src = save_tiny("llama", tmp_path / "src")
    (tmp_path / "file").write_text("x")

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(pipeline, "load_model", no_work)
    with pytest.raises(LightenError, match="not a directory"):
        pipeline.quantize_to_dir(str(src), "int8", tmp_path / "file" / "q")
    with pytest.raises(LightenError, match="input"):
        pipeline.quantize_to_dir(str(src), "int8", src, force=True)
    with pytest.raises(LightenError, match="not written by lighten"):
        pipeline.run_demo(tmp_path / "src", models=("minilm",))


def test_an_unwritable_folder_is_reported(tmp_path, monkeypatch):
    def denied(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)  # a read-only folder (root may write in one)
    with pytest.raises(LightenError, match="cannot write"):
        check_output(tmp_path / "new" / "q")
