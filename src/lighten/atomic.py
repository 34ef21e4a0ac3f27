"""Atomic outputs: build in a temp dir/file beside the target, rename into place only on success.

A crash, a Ctrl-C or a bad input therefore never leaves a half-written model behind."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lighten.errors import LightenError


@contextmanager
def atomic_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory; on clean exit it replaces `target`.

    An existing `target` is refused unless `force`, so a typo never overwrites a model."""
    target = Path(target)
    _refuse_existing(target, force)
    if target.exists() and not target.is_dir():
        raise LightenError(f"{target} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            # Move the old one aside first so the new one lands with a single rename.
            old = tmp.with_suffix(".old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on clean exit it is renamed onto `target`. An existing
    `target` is refused unless `force`."""
    target = Path(target)
    _refuse_existing(target, force)
    if target.is_dir():
        raise LightenError(f"{target} is a directory; give a file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_existing(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise LightenError(
            f"{target} already exists; choose another output path or pass --force to replace it"
        )
