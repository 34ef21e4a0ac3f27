"""Outputs that never destroy user data: checked first, built beside the target, swapped in at the end.

check_output(target, force, inputs, is_ours) is every rule in one place, run at the start of each long job
and again just before the swap:
- an existing target is replaced only with `force`, and only if lighten wrote it (`is_ours`): a directory
  carrying MARKER (atomic_dir writes it into every directory output) or a checkpoint manifest, a file its
  writer can recognise (a GGUF's metadata, a PNG's text chunk);
- the target may not be one of the job's `inputs` or contain one;
- the place must be writable (probed with a temp file), so a bad path fails before the work, not after.

atomic_dir / atomic_file build into `.{name}.{pid}.{random}.tmp` beside the target and put it in place in
one step (Linux renameat2 RENAME_EXCHANGE), so a crash leaves either the old or the new output, never
neither. A later write to the same target removes temps whose process is gone, and where the exchange is
unavailable restores the `.old` that a crash between the fallback's two renames left behind."""

import contextlib
import ctypes
import errno
import fcntl
import functools
import glob
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lighten.errors import LightenError

MARKER = ".lighten-output"
MARKER_TEXT = "Written by lighten: `--force` may replace this directory.\n"
# lighten.checkpoint.MANIFEST (not imported: checkpoint imports this module); checkpoints written before
# MARKER existed carry only it.
CHECKPOINT_MANIFEST = "lighten.json"

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # renameat2(2) flags
_AT_FDCWD = -100


def is_lighten_dir(path: Path) -> bool:
    return (path / MARKER).is_file() or (path / CHECKPOINT_MANIFEST).is_file()


def in_lighten_dir(path: Path) -> bool:
    """A file in a directory lighten wrote (the demo's results) is lighten's too."""
    return path.is_file() and is_lighten_dir(path.parent)


def never_ours(path: Path) -> bool:
    """For files lighten cannot recognise: --force never replaces them."""
    return False


def check_output(
    target: str | Path,
    force: bool = False,
    inputs: Iterable[str | Path] = (),
    is_ours: Callable[[Path], bool] = is_lighten_dir,
) -> None:
    """Raise LightenError (saying what to do) unless `target` may be written now."""
    target = Path(target)
    _clean_up_after_crashes(target)
    where = target.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if where == source or where in source.parents:
            raise LightenError(
                f"{target} is the input {source} or contains it, and writing it would destroy the input; "
                "choose another output path"
            )
    if os.path.lexists(target):
        if not force:
            raise LightenError(
                f"{target} already exists; choose another output path or pass --force to replace it"
            )
        # A symlink is never lighten's: replacing it would swap out the link, not what lighten wrote.
        if target.is_symlink() or not is_ours(target):
            raise LightenError(
                f"{target} was not written by lighten, so even --force does not replace it; "
                "choose another output path or delete it yourself"
            )
    _check_writable(target)


def _check_writable(target: Path) -> None:
    """The nearest existing ancestor of the target's folder must be a directory we can create files in."""
    folder = target.absolute().parent
    while not os.path.lexists(folder):
        folder = folder.parent
    if not folder.is_dir():
        raise LightenError(f"{folder} is not a directory, so {target} cannot be created; choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lighten-probe.", dir=folder)
    except OSError as e:
        raise LightenError(
            f"cannot write in {folder} ({e.strerror}); choose an output path you can write to"
        ) from e
    os.close(fd)
    os.unlink(probe)


@contextmanager
def atomic_dir(target: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield an empty temp directory (with MARKER in it); on clean exit it replaces `target`."""
    with _atomic(Path(target), force, tuple(inputs), is_lighten_dir, _new_temp_dir) as tmp:
        (tmp / MARKER).write_text(MARKER_TEXT)
        yield tmp


@contextmanager
def atomic_file(
    target: str | Path,
    force: bool = False,
    inputs: Iterable[str | Path] = (),
    is_ours: Callable[[Path], bool] = never_ours,
) -> Iterator[Path]:
    """Yield an empty temp file; on clean exit it replaces `target`. `is_ours` recognises a file lighten
    wrote, the only kind --force replaces."""
    with _atomic(Path(target), force, tuple(inputs), is_ours, _new_temp_file) as tmp:
        yield tmp


def make_output_dir(target: str | Path, inputs: Iterable[str | Path] = ()) -> Path:
    """A folder that several outputs go into and that a rerun fills again (the demo's): kept if lighten
    made it, created empty with MARKER if missing, refused otherwise."""
    target, inputs = Path(target), tuple(inputs)
    check_output(target, force=True, inputs=inputs)
    if not target.exists():
        with atomic_dir(target, inputs=inputs):
            pass
    return target


@contextmanager
def _atomic(target: Path, force: bool, inputs: tuple, is_ours, new_temp) -> Iterator[Path]:
    check_output(target, force, inputs, is_ours)
    before = _identity(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp(target)
    file_mode = tmp.stat().st_mode & 0o666  # created under the umask: what it allows a new file
    try:
        yield tmp
        _set_file_modes(tmp, file_mode)
        with _locked(target.parent):
            # Another writer finished first: its output stays, this one gives way.
            if _identity(target) not in (before, None):
                raise LightenError(
                    f"{target} was written by another process while this one ran; it is kept as it is. "
                    "Choose another output path, or run again with --force to replace it"
                )
            check_output(target, force, inputs, is_ours)  # things may have changed during the job
            _put_in_place(tmp, target)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def _temp_name(target: Path) -> Path:
    # The pid tells a later run whether the writer is gone, and so whether the temp is stale.
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")


def _new_temp_dir(target: Path) -> Path:
    tmp = _temp_name(target)
    tmp.mkdir(mode=0o777)  # the umask applies, as for any directory the user creates
    return tmp


def _new_temp_file(target: Path) -> Path:
    tmp = _temp_name(target)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies
    return tmp


def _set_file_modes(tmp: Path, mode: int) -> None:
    """Give every file of the output the mode the umask allows, as to any file the user creates: some writers
    (safetensors) make theirs 0600 through a temp file of their own."""
    for path in [tmp, *tmp.rglob("*")]:
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder for the few renames of a swap (lighten writers only)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _put_in_place(tmp: Path, target: Path) -> None:
    if not os.path.lexists(target):
        if not _renameat2(tmp, target, RENAME_NOREPLACE):
            os.rename(tmp, target)
    elif _renameat2(tmp, target, RENAME_EXCHANGE):
        _remove(tmp)  # it now holds the old output
    else:
        # No exchange here: two renames, and a crash between them leaves the old output as `.old`, which
        # the next write to this target restores (_clean_up_after_crashes).
        old = tmp.with_suffix(".old")
        os.rename(target, old)
        os.rename(tmp, target)
        _remove(old)


@functools.cache
def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2); False where the C library, the kernel or the file system lacks it."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    if code == errno.EEXIST:
        raise LightenError(f"{dst} appeared while lighten was writing it; choose another output path")
    raise OSError(code, os.strerror(code), str(dst))


def _clean_up_after_crashes(target: Path) -> None:
    """Remove the temps of dead writers to `target`, after restoring an old output a crash left aside."""
    leftovers = [p for p in target.parent.glob(f".{glob.escape(target.name)}.*") if _dead_writer(p, target)]
    olds = [p for p in leftovers if p.suffix == ".old"]
    for old in sorted(olds, key=lambda p: p.stat().st_mtime_ns, reverse=True):  # the newest first
        if not os.path.lexists(target):
            os.rename(old, target)
    for path in leftovers:
        if os.path.lexists(path):
            _remove(path)


def _dead_writer(path: Path, target: Path) -> bool:
    """Whether `path` is a `.{name}.{pid}.{random}.tmp|.old` of `target` whose process has ended."""
    middle = path.name.removeprefix(f".{target.name}.")
    pid, _, rest = middle.partition(".")
    if not pid.isdigit() or path.suffix not in (".tmp", ".old") or rest.count(".") != 1:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's live process; not a pid at all
        return False
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
