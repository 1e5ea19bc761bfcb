"""Serialized step/sampler executables: a warm start loads them instead of tracing and compiling."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxserve import LLM, SamplingParams
from jaxserve.executable_cache import ExecutableCache

ARGS = dict(dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
            checkpoint_cache_dir=None)


def _greedy(llm):
    prompts = [[412, 9051, 77, 3020, 15], [28000, 611, 4242, 90, 1234, 31000, 5]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


WARM_START = """
import json, sys
from jaxserve import LLM
from tests.test_executable_cache import ARGS, _greedy
llm = LLM(model=sys.argv[1], compilation_cache_dir=sys.argv[2], **ARGS)
counter = llm.engine.loaded.compilation_counter
at_start = counter.count
tokens = _greedy(llm)
print(json.dumps({"compiled_ahead": llm.engine.runner.num_compiled_ahead, "tokens": tokens,
                  "compiled_while_serving": counter.count - at_start}))
"""


def test_warm_start_loads_executables_without_compiling(random_llama_dir, tmp_path):
    cache = str(tmp_path / "xla")
    cold = LLM(model=str(random_llama_dir), compilation_cache_dir=cache, **ARGS)
    saved = list((tmp_path / "xla" / "jaxserve-executables").glob("*/*.bin"))
    shapes = cold.engine.runner.config.buckets.all_shapes()
    assert len([p for p in saved if p.name.startswith("step_")]) == len(shapes)
    expected = _greedy(cold)
    # A fresh process, as a restarted server: every step shape and warm-up sampler comes from disk.
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", WARM_START, str(random_llama_dir), cache], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    warm = json.loads(run.stdout.strip().splitlines()[-1])
    assert warm["compiled_ahead"] == 0, run.stderr[-3000:]
    assert warm["compiled_while_serving"] == 0
    assert warm["tokens"] == expected


def test_unreadable_entries_are_ignored(tmp_path):
    cache = ExecutableCache(str(tmp_path), {"model": "m"})
    cache.directory.mkdir(parents=True)
    (cache.directory / "step_4x4.bin").write_bytes(b"not a pickle")
    assert cache.load("step_4x4") is None
    assert cache.load("missing") is None


def test_key_separates_configs(tmp_path):
    a = ExecutableCache(str(tmp_path), {"runner": "num_pages=10"})
    b = ExecutableCache(str(tmp_path), {"runner": "num_pages=11"})
    assert a.directory != b.directory
    assert ExecutableCache(str(tmp_path), {"runner": "num_pages=10"}).directory == a.directory
    assert np.all([a.directory.parent == tmp_path])


def test_config_directories_share_a_budget(tmp_path):
    cache = ExecutableCache(str(tmp_path), {"runner": "num_pages=10"}, max_bytes=3000)
    stale = []
    (tmp_path / "not-an-entry").mkdir()  # left alone whatever its age
    os.utime(tmp_path / "not-an-entry", (time.time() - 99999,) * 2)
    for i, age in enumerate([9000, 8000, 7000]):
        other = tmp_path / f"{i:024x}"
        other.mkdir()
        (other / "step_4x4.bin").write_bytes(b"x" * 1000)
        os.utime(other, (time.time() - age,) * 2)
        stale.append(other)
    cache.directory.mkdir()
    (cache.directory / "step_4x4.bin").write_bytes(b"x" * 1500)
    os.utime(cache.directory, (time.time() - 10000,) * 2)  # oldest, but the one in use
    assert sorted(cache.prune()) == [str(stale[0]), str(stale[1])]
    assert cache.directory.exists() and stale[2].exists() and (tmp_path / "not-an-entry").exists()
    assert ExecutableCache(str(tmp_path), {"runner": "r"}).prune() == []  # no budget, or nothing written


def test_compilation_cache_budget(tmp_path):
    from jaxserve.engine_setup import budget_bytes, enable_compilation_cache
    names = ("jax_enable_compilation_cache", "jax_compilation_cache_dir")
    before = {name: getattr(jax.config, name) for name in names}
    try:
        assert budget_bytes(-1) is None and budget_bytes(0) == 0 and budget_bytes(1.5) == 3 * 2**29
        for i, age in enumerate([9000, 8000, 7000]):  # XLA's files, oldest first
            (tmp_path / f"jit_f{i}-cache").write_bytes(b"x" * 1000)
            os.utime(tmp_path / f"jit_f{i}-cache", (time.time() - age,) * 2)
        (tmp_path / "jaxserve-executables").mkdir()  # pruned by ExecutableCache, not here
        (tmp_path / "README").write_bytes(b"x" * 9000)  # not XLA's: neither counted nor removed
        os.utime(tmp_path / "README", (time.time() - 99999,) * 2)
        assert enable_compilation_cache(str(tmp_path), 2500) == str(tmp_path)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path) and jax.config.jax_enable_compilation_cache
        assert sorted(p.name for p in tmp_path.iterdir()) == ["README", "jaxserve-executables", "jit_f1-cache",
                                                              "jit_f2-cache"]
        assert enable_compilation_cache(str(tmp_path), None) == str(tmp_path)  # no budget: nothing goes
        assert len(list(tmp_path.iterdir())) == 4
        assert enable_compilation_cache(str(tmp_path), 0) is None  # 0: no compiled cache at all
        assert not jax.config.jax_enable_compilation_cache
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
