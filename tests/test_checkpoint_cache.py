"""The converted-checkpoint cache: build once, restore later, never read a broken entry."""
from __future__ import annotations

import logging
import os
import time

import ml_dtypes
import numpy as np
import pytest

from jaxserve.models.checkpoint_cache import (
    ENTRY_NAME, STALE_TMP_SECONDS, cache_entry_dir, default_cache_dir, load_or_build, prune_lru, source_identity)
from jaxserve.models.weights import ModelSource


def make_state(seed=0):
    rng = np.random.default_rng(seed)
    return {"model.embed_tokens.weight": rng.normal(size=(16, 8)).astype(ml_dtypes.bfloat16),
            "model.layers.0.self_attn.q_proj.weight": rng.normal(size=(8, 8)).astype(np.float32),
            "model.norm.weight": rng.normal(size=(8,)).astype(np.float16),
            "positions": np.arange(5, dtype=np.int32)}


class CountingBuild:
    def __init__(self, state):
        self.state, self.calls = state, 0

    def __call__(self):
        self.calls += 1
        return self.state


def assert_same_state(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert isinstance(got[name], np.ndarray) and got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name])


KEY = {"kind": "gguf", "files": [["/m.gguf", 10, 1]], "dtype": "bfloat16"}


def test_build_then_restore_without_calling_build(tmp_path, caplog):
    state = make_state()
    build = CountingBuild(state)
    with caplog.at_level(logging.INFO, logger="jaxserve.models.checkpoint_cache"):
        first = load_or_build(str(tmp_path), KEY, build)
        second = load_or_build(str(tmp_path), KEY, build)
    assert build.calls == 1
    assert_same_state(first, state)
    assert_same_state(second, state)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("Built converted checkpoint") for m in messages)
    assert any(m.startswith("Restored converted checkpoint") for m in messages)


def test_different_key_builds_again(tmp_path):
    build = CountingBuild(make_state())
    load_or_build(str(tmp_path), KEY, build)
    load_or_build(str(tmp_path), {**KEY, "dtype": "float32"}, build)
    assert build.calls == 2
    assert cache_entry_dir(str(tmp_path), KEY) != cache_entry_dir(str(tmp_path), {**KEY, "dtype": "float32"})


def test_failed_build_leaves_no_entry(tmp_path):
    def broken():
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        load_or_build(str(tmp_path), KEY, broken)
    assert not os.path.exists(cache_entry_dir(str(tmp_path), KEY))
    build = CountingBuild(make_state())
    load_or_build(str(tmp_path), KEY, build)
    assert build.calls == 1


def test_half_written_entry_is_never_read(tmp_path):
    # An interrupted writer leaves only its temporary directory behind; it must be ignored.
    entry = cache_entry_dir(str(tmp_path), KEY)
    os.makedirs(os.path.join(os.path.dirname(entry), f".{os.path.basename(entry)}.tmp-1-dead/state"))
    build = CountingBuild(make_state())
    assert_same_state(load_or_build(str(tmp_path), KEY, build), make_state())
    assert build.calls == 1


@pytest.mark.parametrize("damage", ["truncate_files", "delete_state", "wrong_key"])
def test_corrupt_entry_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    load_or_build(str(tmp_path), KEY, CountingBuild(make_state()))
    entry = cache_entry_dir(str(tmp_path), KEY)
    if damage == "truncate_files":
        for root, _, files in os.walk(os.path.join(entry, "state")):
            for f in files:
                open(os.path.join(root, f), "wb").close()
    elif damage == "delete_state":
        import shutil
        shutil.rmtree(os.path.join(entry, "state"))
    else:
        with open(os.path.join(entry, "key.json"), "w") as f:
            f.write("{}")
    fresh = make_state(seed=1)
    build = CountingBuild(fresh)
    with caplog.at_level(logging.WARNING, logger="jaxserve.models.checkpoint_cache"):
        got = load_or_build(str(tmp_path), KEY, build)
    assert build.calls == 1 and any("rebuilding" in r.getMessage() for r in caplog.records)
    assert_same_state(got, fresh)
    # The rebuilt entry is good again.
    again = CountingBuild(make_state(seed=2))
    assert_same_state(load_or_build(str(tmp_path), KEY, again), fresh)
    assert again.calls == 0


def test_unwritable_cache_still_returns_the_state(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    build = CountingBuild(make_state())
    with caplog.at_level(logging.WARNING, logger="jaxserve.models.checkpoint_cache"):
        assert_same_state(load_or_build(str(blocker / "cache"), KEY, build), make_state())
    assert any("Could not write checkpoint cache" in r.getMessage() for r in caplog.records)


def test_default_cache_dir_is_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / ".cache" / "jaxserve" / "checkpoints")
    build = CountingBuild(make_state())
    load_or_build(None, KEY, build)
    assert os.path.isdir(cache_entry_dir(None, KEY))
    assert cache_entry_dir(None, KEY).startswith(default_cache_dir())


def test_source_identity_changes_when_the_file_changes(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(10))
    source = ModelSource(kind="gguf", path=str(path), files=(str(path),), name="m")
    before = source_identity(source)
    assert before == {"kind": "gguf", "files": [[str(path), 14, os.stat(path).st_mtime_ns]]}
    path.write_bytes(b"GGUF" + bytes(20))
    after = source_identity(source)
    assert after != before
    assert cache_entry_dir(str(tmp_path), {**before, "dtype": "f32"}) != cache_entry_dir(
        str(tmp_path), {**after, "dtype": "f32"})


# ---- the size budget ----------------------------------------------------------------------------------------

def make_entry(root, name, size, age_seconds):
    """An entry directory holding `size` bytes, last used `age_seconds` ago."""
    entry = root / name
    (entry / "state").mkdir(parents=True)
    (entry / "state" / "data").write_bytes(b"x" * size)
    when = time.time() - age_seconds
    os.utime(entry, (when, when))
    return entry


def hex_name(i):
    return f"{i:032x}"


def test_prune_drops_the_least_recently_used_entries_first(tmp_path):
    entries = [make_entry(tmp_path, hex_name(i), 1000, age) for i, age in enumerate([4000, 3000, 2000, 1000])]
    removed = prune_lru(str(tmp_path), 2500, ENTRY_NAME)
    assert sorted(removed) == [str(entries[0]), str(entries[1])]
    assert sorted(p.name for p in tmp_path.iterdir()) == [hex_name(2), hex_name(3)]
    # Within budget: nothing goes.
    assert prune_lru(str(tmp_path), 2000, ENTRY_NAME) == []


def test_prune_spares_the_kept_entry_recent_ones_and_live_writers(tmp_path):
    oldest = make_entry(tmp_path, hex_name(1), 1000, 5000)
    older = make_entry(tmp_path, hex_name(2), 1000, 4000)
    recent = make_entry(tmp_path, hex_name(3), 1000, 60)  # another process may be using it
    writing = make_entry(tmp_path, f".{hex_name(4)}.tmp-1-a", 1000, 60)
    abandoned = make_entry(tmp_path, f".{hex_name(5)}.tmp-2-b", 1000, STALE_TMP_SECONDS + 60)
    removed = prune_lru(str(tmp_path), 0, ENTRY_NAME, keep=str(oldest))
    assert sorted(removed) == sorted([str(older), str(abandoned)])
    assert oldest.exists() and recent.exists() and writing.exists()


def test_prune_touches_only_the_caches_own_entries(tmp_path):
    """A cache directory pointed at a folder that holds other things (say, the user's models) keeps them."""
    models = make_entry(tmp_path, "llama-3-8b", 5000, 90000)
    hidden = make_entry(tmp_path, ".git", 5000, STALE_TMP_SECONDS + 60)
    (tmp_path / "notes.txt").write_bytes(b"x" * 5000)
    os.utime(tmp_path / "notes.txt", (time.time() - 90000,) * 2)
    old = make_entry(tmp_path, hex_name(1), 1000, 9000)
    new = make_entry(tmp_path, hex_name(2), 1000, 8000)
    assert prune_lru(str(tmp_path), 1000, ENTRY_NAME) == [str(old)]  # the others are not counted either
    assert models.exists() and hidden.exists() and (tmp_path / "notes.txt").exists() and new.exists()
    assert prune_lru(str(tmp_path), 0, r".+\.txt", files=True) == [str(tmp_path / "notes.txt")]  # files mode
    assert models.exists() and new.exists()


def test_a_state_over_the_budget_is_not_cached(tmp_path, caplog):
    state = make_state()
    size = sum(a.nbytes for a in state.values())
    build = CountingBuild(state)
    with caplog.at_level(logging.INFO, logger="jaxserve.models.checkpoint_cache"):
        assert_same_state(load_or_build(str(tmp_path), KEY, build, max_bytes=size - 1), state)
    assert "over the cache's" in caplog.text
    assert not os.path.isdir(cache_entry_dir(str(tmp_path), KEY))
    load_or_build(str(tmp_path), KEY, build, max_bytes=size - 1)
    assert build.calls == 2
    load_or_build(str(tmp_path), KEY, build, max_bytes=0)  # 0: nothing is cached
    assert build.calls == 3 and not os.listdir(tmp_path)


def test_a_new_entry_pushes_out_old_ones_and_a_restore_counts_as_use(tmp_path):
    old = make_entry(tmp_path, hex_name(0), 4000, 7200)
    build = CountingBuild(make_state())
    load_or_build(str(tmp_path), KEY, build, max_bytes=6000)
    entry = cache_entry_dir(str(tmp_path), KEY)
    assert not old.exists() and os.path.isdir(entry)
    when = time.time() - 7200
    os.utime(entry, (when, when))
    left_over = make_entry(tmp_path, hex_name(1), 4000, 3600)  # say, by an older version without a budget
    load_or_build(str(tmp_path), KEY, build, max_bytes=6000)
    assert build.calls == 1
    assert time.time() - os.stat(entry).st_mtime < 60  # marked used: the next prune spares it longest
    assert not left_over.exists()  # a restore prunes too
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(entry)]
