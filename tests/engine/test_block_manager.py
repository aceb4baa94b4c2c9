from ondo.engine.block_manager import BlockManager
from ondo.engine.request import Request
from ondo.sampling_params import SamplingParams


def make_request(tokens, request_id="r"):
    return Request(request_id=request_id, group_id=request_id, index=0, prompt_token_ids=list(tokens),
                   sampling_params=SamplingParams(), max_tokens=16, min_tokens=0,
                   eos_token_ids=frozenset(), stop_token_ids=frozenset(), bad_words_token_ids=[])


def test_allocate_and_free_return_every_block():
    manager = BlockManager(num_blocks=8, block_size=4)
    a, b = make_request(range(10), "a"), make_request(range(5), "b")
    assert manager.allocate(a, 10) and len(a.block_table) == 3
    assert manager.allocate(b, 5) and len(b.block_table) == 2
    assert manager.num_free_blocks == 3
    assert not manager.allocate(b, 5 + 16)          # needs 4 more, only 3 free: nothing changes
    assert len(b.block_table) == 2 and manager.num_free_blocks == 3
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 8 and all(c == 0 for c in manager.ref_counts)


def test_prefix_hit_shares_full_blocks_and_leaves_last_token_to_compute():
    manager = BlockManager(num_blocks=16, block_size=4)
    first = make_request(range(12), "first")
    manager.allocate(first, 12)
    first.num_computed_tokens = 12
    manager.cache_full_blocks(first)
    assert len(first.block_hashes) == 3

    # Same 12-token prompt: only 2 blocks may be reused, the last token must be computed again.
    same = make_request(range(12), "same")
    assert manager.match_prefix(same) == 8
    assert same.block_table == first.block_table[:2]
    assert manager.ref_counts[first.block_table[0]] == 2

    # A prompt that differs inside the second block shares only the first.
    other = make_request([0, 1, 2, 3, 4, 99, 6, 7, 8], "other")
    assert manager.match_prefix(other) == 4
    for request in (first, same, other):
        manager.free(request)
    assert manager.num_free_blocks == 16


def test_freed_cached_blocks_are_reused_until_evicted():
    manager = BlockManager(num_blocks=4, block_size=4)
    first = make_request(range(9), "first")
    manager.allocate(first, 9)
    first.num_computed_tokens = 9
    manager.cache_full_blocks(first)
    manager.free(first)
    again = make_request(range(9), "again")
    assert manager.match_prefix(again) == 8               # found after the owner finished
    manager.free(again)
    # Fill the whole pool with unrelated tokens: the cached blocks are evicted and forgotten.
    filler = make_request(range(100, 116), "filler")
    assert manager.allocate(filler, 16)
    assert manager.cached == {}
    manager.free(filler)
    assert manager.match_prefix(make_request(range(9), "late")) == 0


def test_prefix_caching_off_never_matches():
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    first = make_request(range(12))
    manager.allocate(first, 12)
    first.num_computed_tokens = 12
    manager.cache_full_blocks(first)
    assert manager.match_prefix(make_request(range(12), "b")) == 0


def test_grow_lazily_reuses_freed_blocks_before_unused_ones():
    manager = BlockManager(num_blocks=8, block_size=4, grow_lazily=True)
    first = make_request(list(range(8)))
    assert manager.allocate(first, 8) and first.block_table == [0, 1]
    manager.free(first)
    second = make_request(list(range(100, 112)))
    assert manager.allocate(second, 12)
    # the two blocks already written are handed out again before block 2 is touched
    assert sorted(second.block_table) == [0, 1, 2] and manager.num_free_blocks == 5
    manager.free(second)
    assert manager.num_free_blocks == 8


def test_contiguous_hands_a_request_the_block_after_its_last_one():
    manager = BlockManager(num_blocks=16, block_size=4, grow_lazily=True, contiguous=True)
    first = make_request(list(range(12)))
    assert manager.allocate(first, 12) and first.block_table == [0, 1, 2]
    manager.free(first)   # freed tail first: 2, 1, 0 is the reuse order
    second = make_request(list(range(100, 112)))
    assert manager.allocate(second, 8) and second.block_table == [2, 3]   # 2, then the block after it
    assert manager.allocate(second, 16) and second.block_table == [2, 3, 4, 5]   # growing keeps following
    third = make_request(list(range(200, 204)))
    assert manager.allocate(third, 8) and third.block_table == [1, 0]   # 2 is taken: the least recently freed
    for request in (second, third):
        manager.free(request)
    assert manager.num_free_blocks == 16

    # without it, the least recently freed block comes first
    plain = BlockManager(num_blocks=16, block_size=4, grow_lazily=True)
    first = make_request(list(range(12)))
    plain.allocate(first, 12)
    plain.free(first)
    second = make_request(list(range(100, 112)))
    assert plain.allocate(second, 8) and second.block_table == [2, 1]


def test_cpu_kv_cache_commits_memory_only_when_written():
    import torch

    from ondo.engine.model_runner import KVCacheSpec, _allocate_kv_caches

    spec = KVCacheSpec(num_layers=4, num_kv_heads=4, head_dim=64, dtype=torch.float32)
    before = _resident_kib()
    caches = _allocate_kv_caches((2, 4096, 16, 4, 64), spec, torch.device("cpu"))  # 256 MiB per layer
    assert int(torch.count_nonzero(caches[3][1, -64:])) == 0                         # reads as zeros
    grown = _resident_kib() - before
    assert grown < 64 * 1024, f"{grown} KiB resident after allocating 1 GiB of cache"
    caches[1][0, :64].fill_(1.0)                                                     # 64 blocks written
    assert _resident_kib() - before >= grown + 500


def _resident_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
