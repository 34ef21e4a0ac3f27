"""One progress bar style for every long loop (rich, on stderr so --json output stays clean)."""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.progress import track as _rich_track

T = TypeVar("T")
stderr = Console(stderr=True)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate `items` with a progress bar; `total` is needed when `items` has no len()."""
    # Off when stderr is not a terminal (CI, pipes): a log should not fill with redrawn bars.
    yield from _rich_track(
        items,
        description=description,
        total=total,
        console=stderr,
        transient=True,
        disable=not stderr.is_terminal,
    )


@contextmanager
def steps_bar(total: int, description: str, start: int = 0) -> Iterator[Callable[[str], None]]:
    """A progress bar over `total` steps, `start` of them done already; yields advance(text), which counts
    one step and shows `text` (a loss, a speed) beside the bar."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as progress:
        task = progress.add_task(description, total=total, completed=start)
        yield lambda text: progress.update(task, advance=1, description=text)


def note(message: str) -> None:
    """A one-line status message for the user (stderr), printed as written: brackets in it (an error's
    text, a path) are not rich markup."""
    stderr.print(f"[dim]{escape(message)}[/dim]")
