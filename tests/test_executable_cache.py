"""Serialized step/sampler executables: a warm start loads them instead of tracing and compiling."""
import numpy as np

from jaxserve import LLM, SamplingParams
from jaxserve.executable_cache import ExecutableCache

ARGS = dict(dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16, block_size=4,
            checkpoint_cache_dir=None)


def _greedy(llm):
    prompts = [[412, 9051, 77, 3020, 15], [28000, 611, 4242, 90, 1234, 31000, 5]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def test_warm_start_loads_executables_without_compiling(random_llama_dir, tmp_path):
    cache = str(tmp_path / "xla")
    cold = LLM(model=str(random_llama_dir), compilation_cache_dir=cache, **ARGS)
    saved = list((tmp_path / "xla" / "jaxserve-executables").glob("*/*.bin"))
    shapes = cold.engine.runner.config.buckets.all_shapes()
    assert len([p for p in saved if p.name.startswith("step-")]) == len(shapes)
    expected = _greedy(cold)
    del cold

    warm = LLM(model=str(random_llama_dir), compilation_cache_dir=cache, **ARGS)
    counter = warm.engine.loaded.compilation_counter
    assert counter.count == 0  # every step shape and warm-up sampler came from disk
    assert _greedy(warm) == expected
    assert counter.count == 0


def test_unreadable_entries_are_ignored(tmp_path):
    cache = ExecutableCache(str(tmp_path), {"model": "m"})
    cache.directory.mkdir(parents=True)
    (cache.directory / "step-4x4.bin").write_bytes(b"not a pickle")
    assert cache.load("step-4x4") is None
    assert cache.load("missing") is None


def test_key_separates_configs(tmp_path):
    a = ExecutableCache(str(tmp_path), {"runner": "num_pages=10"})
    b = ExecutableCache(str(tmp_path), {"runner": "num_pages=11"})
    assert a.directory != b.directory
    assert ExecutableCache(str(tmp_path), {"runner": "num_pages=10"}).directory == a.directory
    assert np.all([a.directory.parent == tmp_path])
