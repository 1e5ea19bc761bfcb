"""Scheduler and page allocator as plain Python (no JAX)."""
from jaxserve.kv_cache_manager import KVCacheManager, page_hashes
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import Scheduler, SchedulerConfig
from jaxserve.sequence import Sequence, SequenceStatus


def seq(i, n_prompt, start=0):
    return Sequence(i, f"r{i}", 0, list(range(start, start + n_prompt)), SamplingParams(), 0.0, 0)


def run_step(sched, sample_token=7):
    out = sched.schedule()
    sampled = [item.seq for item in out.scheduled if item.samples]
    sched.after_step(out.scheduled)
    for s in sampled:
        s.output_token_ids.append(sample_token)
    return out


def test_page_hashes_chain_the_whole_prefix():
    a, b = page_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4), page_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[1] != b[1]  # same second page, different prefix


def test_prefix_pages_are_shared_refcounted_and_evicted_lru():
    kv = KVCacheManager(num_pages=6, page_size=4)
    tokens = list(range(12))
    pages, hashes = kv.lookup_prefix(tokens)
    assert pages == []
    fresh = kv.allocate(3)
    for page, h in zip(fresh, hashes):
        kv.register_full_page(page, h)
    kv.free(fresh)
    hit, _ = kv.lookup_prefix(tokens)  # last token always recomputed: 2 of 3 pages hit
    assert hit == fresh[:2] and kv.ref_counts[hit[0]] == 1
    kv.free(hit)
    # Allocating everything evicts the cached pages; they are no longer found.
    taken = kv.allocate(5)
    assert taken is not None and kv.allocate(1) is None
    kv.free(taken)
    assert kv.lookup_prefix(tokens)[0] == []


def test_fresh_pages_come_in_ascending_order_after_frees():
    """A sequence's pages go back tail first (its shared prefix is evicted last), and the next request's pages
    are the least recently freed ones; handed out in ascending order, they run forwards through memory."""
    kv = KVCacheManager(num_pages=16, page_size=4)
    first = kv.allocate(6)
    assert first == [1, 2, 3, 4, 5, 6]
    kv.free(first)
    rest = kv.allocate(9)  # the never-used pages 7-15 first
    assert rest == list(range(7, 16))
    again = kv.allocate(4)  # then the freed ones, least recently freed first: 6, 5, 4, 3
    assert again == [3, 4, 5, 6]


def test_chunked_prefill_under_the_token_budget():
    kv = KVCacheManager(num_pages=64, page_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=128), kv)
    long, short = seq(0, 20), seq(1, 3, start=100)
    sched.add(long)
    sched.add(short)
    first = run_step(sched)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in first.scheduled] == [(0, 8)]
    second = run_step(sched)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in second.scheduled] == [(0, 8)]
    third = run_step(sched)  # 4 prompt tokens left for seq 0, then seq 1 joins with 3 (budget 8)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in third.scheduled] == [(0, 4), (1, 3)]
    assert long.output_token_ids == [7] and short.output_token_ids == [7]
    fourth = run_step(sched)
    assert [(s.seq.seq_id, s.num_new_tokens) for s in fourth.scheduled] == [(0, 1), (1, 1)]


def test_out_of_pages_preempts_the_newest_and_recomputes_it():
    kv = KVCacheManager(num_pages=7, page_size=4)  # 6 usable pages
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64), kv)
    old, new = seq(0, 11), seq(1, 11, start=50)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # both admitted: 3 pages each
    assert kv.num_free_pages == 0
    assert run_step(sched).preempted == []  # 12th tokens still fit in 3 pages each
    out = run_step(sched)  # old needs a 4th page for its 13th token: new is preempted
    assert out.preempted == [new] and new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0
    assert [s.seq for s in out.scheduled] == [old]
    assert sched.waiting[0] is new and new.output_token_ids == [7, 7]  # its sampled tokens are kept


def test_priority_policy_orders_the_queue_and_preempts_the_lowest_priority():
    kv = KVCacheManager(num_pages=7, page_size=4)  # 6 usable pages
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=64,
                                      policy="priority"), kv)
    background, urgent, normal = seq(0, 11), seq(1, 11, start=50), seq(2, 3, start=90)
    background.priority, urgent.priority = 5, -1
    for s in (background, normal, urgent):  # arrival order; all arrive at time 0, ties go by seq_id
        sched.add(s)
    assert list(sched.waiting) == [urgent, normal, background]
    first = run_step(sched)
    assert [s.seq for s in first.scheduled] == [urgent, normal]  # two slots: the lowest priorities first
    assert list(sched.waiting) == [background]
    kv_full = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64,
                                        policy="priority"), KVCacheManager(num_pages=7, page_size=4))
    low, high = seq(3, 11), seq(4, 11, start=50)
    low.priority, high.priority = 2, 1
    kv_full.add(low)
    run_step(kv_full)  # low admitted first
    kv_full.add(high)
    run_step(kv_full)  # high admitted: all 6 pages taken
    out = run_step(kv_full)  # low needs a 4th page: the newest (high) would give way first come first served
    assert out.preempted == [low] and [s.seq for s in out.scheduled] == [high]
    assert list(kv_full.waiting) == [low]


def test_fcfs_policy_keeps_arrival_order_whatever_the_priority():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                      KVCacheManager(num_pages=16, page_size=4))
    first, second = seq(0, 3), seq(1, 3, start=10)
    second.priority = -5
    sched.add(first)
    sched.add(second)
    assert list(sched.waiting) == [first, second]
