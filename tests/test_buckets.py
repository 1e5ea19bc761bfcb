"""Step-shape buckets: every schedulable step fits a compiled shape, and no shape has a single token row."""
import itertools

import pytest

from jaxserve.buckets import BucketSet, StepShape
from jaxserve.config import EngineConfig


@pytest.mark.parametrize("max_seqs,max_tokens", [(1, 1), (1, 16), (2, 2), (3, 100), (64, 512), (256, 2048)])
def test_every_schedulable_step_has_a_bucket(max_seqs, max_tokens):
    buckets = BucketSet.for_limits(max_seqs, max_tokens)
    shapes = set(buckets.all_shapes())
    for seqs, tokens in itertools.product(range(1, max_seqs + 1), range(1, max_tokens + 1)):
        if tokens < seqs:
            continue  # every scheduled sequence brings at least one token
        shape = buckets.bucket_for(tokens, seqs)
        assert shape in shapes
        assert shape.num_tokens >= tokens and shape.num_seqs >= seqs
        assert shape.num_tokens >= shape.num_seqs


@pytest.mark.parametrize("max_seqs", [1, 2, 5, 64])
def test_no_step_shape_has_one_token(max_seqs):
    # A one-row cache write made XLA copy the whole KV cache every layer: 2.25 s a step instead of 3 ms
    # on the CPU with `max_num_seqs=1` and a 2 GiB cache.
    buckets = BucketSet.for_limits(max_seqs, 512)
    assert all(shape.num_tokens >= 2 for shape in buckets.all_shapes())
    assert buckets.bucket_for(1, 1) == StepShape(2, 2)


def test_batch_limits_default_by_platform():
    cpu, gpu = EngineConfig().with_platform_defaults("cpu"), EngineConfig().with_platform_defaults("gpu")
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (64, 512)
    assert (gpu.max_num_seqs, gpu.max_num_batched_tokens) == (256, 2048)
    mine = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64).with_platform_defaults("tpu")
    assert (mine.max_num_seqs, mine.max_num_batched_tokens) == (8, 64)
    # A token budget left unset still admits one token of every sequence.
    assert EngineConfig(max_num_seqs=4096).with_platform_defaults("gpu").max_num_batched_tokens == 4096


def test_prompt_steps_pad_to_midpoint_buckets_from_64_tokens():
    # Padded prompt rows cost real compute: a 138-token prompt pays for 192 tokens, not 256.
    buckets = BucketSet.for_limits(64, 512)
    assert buckets.token_buckets == (16, 32, 64, 96, 128, 192, 256, 384, 512)
    assert buckets.bucket_for(138, 1) == StepShape(192, 1)
    assert buckets.bucket_for(200, 8) == StepShape(256, 8)
    assert buckets.bucket_for(40, 1) == StepShape(64, 1)  # below 64 the powers of two stay


def test_decode_steps_with_drafts_get_buckets_past_max_num_seqs():
    # A sequence's draft rows are rows of their own: a decode step with drafts may be wider than max_num_seqs,
    # but steps that carry prompt chunks never are, so only decode shapes are added.
    plain, drafting = BucketSet.for_limits(64, 512), BucketSet.for_limits(64, 512, max_decode_rows=128)
    assert plain.draft_buckets == () and drafting.draft_buckets == (128,)
    assert set(drafting.all_shapes()) - set(plain.all_shapes()) == {StepShape(128, 128)}
    for rows in range(65, 129):
        assert drafting.bucket_for(rows, rows) == StepShape(128, 128)
    assert drafting.bucket_for(64, 64) == StepShape(64, 64)
    assert BucketSet.for_limits(48, 512, 200).draft_buckets == (96, 192, 200)
    assert BucketSet.for_limits(64, 100, 128).draft_buckets == (100,)  # within the token budget
    assert BucketSet.for_limits(64, 512, 32).draft_buckets == ()
