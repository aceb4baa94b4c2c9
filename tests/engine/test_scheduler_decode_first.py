"""While requests decode, a long prompt prefills in chunks of `prefill_tokens_while_decoding` and
never takes the decoders' turn; alone, it gets the whole step budget (the CPU's rule)."""
from __future__ import annotations

from ondo.engine.block_manager import BlockManager
from ondo.engine.request import Request
from ondo.engine.scheduler import Scheduler
from ondo.sampling_params import SamplingParams


def request(rid: str, prompt_len: int) -> Request:
    return Request(request_id=rid, group_id=rid, index=0, prompt_token_ids=list(range(1, prompt_len + 1)),
                   sampling_params=SamplingParams(max_tokens=50), max_tokens=50, min_tokens=0,
                   eos_token_ids=frozenset(), stop_token_ids=frozenset(), bad_words_token_ids=[])


def run_step(scheduler: Scheduler) -> dict[str, int]:
    out = scheduler.schedule()
    scheduler.update_after_step(out)
    for item in out.scheduled:   # a step that reaches the end of the known tokens samples one
        if item.request.num_computed_tokens == item.request.num_tokens + item.request.num_output_placeholders:
            item.request.output_token_ids.append(7)   # the token lands
            item.request.num_output_placeholders -= 1
    return {item.request.request_id: item.num_new_tokens for item in out.scheduled}


def test_a_long_prompt_alone_gets_the_whole_budget():
    scheduler = Scheduler(BlockManager(256, 16), max_num_seqs=8, max_num_batched_tokens=2048,
                          prefill_tokens_while_decoding=256)
    scheduler.add(request("long", 2048))
    assert run_step(scheduler) == {"long": 2048}


def test_decoders_go_first_and_the_prompt_prefills_in_small_chunks():
    scheduler = Scheduler(BlockManager(256, 16), max_num_seqs=8, max_num_batched_tokens=2048,
                          prefill_tokens_while_decoding=256)
    for i in range(3):
        scheduler.add(request(f"d{i}", 4))
    assert run_step(scheduler) == {"d0": 4, "d1": 4, "d2": 4}
    scheduler.add(request("long", 2048))
    steps = [run_step(scheduler)]
    # As if the prompt had arrived first: without the rule it would take the whole budget.
    scheduler.running.insert(0, scheduler.running.pop())
    steps += [run_step(scheduler) for _ in range(7)]
    for step in steps:
        assert all(step[f"d{i}"] == 1 for i in range(3)), step   # every decoder, every step
        assert step["long"] == 256, step
    assert run_step(scheduler) == {"d0": 1, "d1": 1, "d2": 1, "long": 1}   # it decodes too now


def test_a_decoder_preempted_after_its_turn_leaves_the_step():
    """Decodes go first, so the newest request, the one preemption takes, may already be in the step:
    it leaves the step (its budget returned) instead of running with freed blocks."""
    scheduler = Scheduler(BlockManager(3, 16), max_num_seqs=8, max_num_batched_tokens=64,
                          prefill_tokens_while_decoding=16)
    decoder, prompt = request("decoder", 4), request("prompt", 40)
    scheduler.add(decoder)
    assert run_step(scheduler) == {"decoder": 4}
    scheduler.add(prompt)
    assert run_step(scheduler) == {"decoder": 1, "prompt": 16}
    scheduler.running.reverse()   # the prompt first, as if it had arrived first: the decoder is the newest
    assert run_step(scheduler) == {"decoder": 1, "prompt": 16}   # 3 blocks: the pool is full
    out = scheduler.schedule()   # the prompt's last 8 tokens need a 4th block: the decoder is preempted
    assert [(item.request.request_id, item.num_new_tokens) for item in out.scheduled] == [("prompt", 8)]
    assert out.preempted == [decoder] and decoder.num_computed_tokens == 0 and not decoder.block_table
    assert list(scheduler.waiting) == [decoder]


def test_without_the_rule_nothing_changes():
    scheduler = Scheduler(BlockManager(256, 16), max_num_seqs=8, max_num_batched_tokens=2048)
    scheduler.add(request("long", 2048))
    scheduler.add(request("short", 4))
    assert run_step(scheduler) == {"long": 2048}


def test_a_gpu_sizes_the_chunk_from_a_timed_prefill():
    from ondo.engine.engine import prefill_chunk_for

    # 8192 tokens in 200 ms (an 8B model on an H200): 30 ms prefill 1228 tokens, in whole blocks.
    assert prefill_chunk_for(8192, 0.2, 16) == 1216
    assert prefill_chunk_for(8192, 0.02, 16) is None   # the whole budget takes less than 30 ms: no cap
    assert prefill_chunk_for(8192, 10.0, 16) == 256    # never below 256 tokens a step


def test_the_option_sets_or_removes_the_cap(tiny_llama):
    import pytest

    from ondo import LLM
    from ondo.config import ConfigError, EngineConfig

    folder = tiny_llama[0]
    caps = {value: LLM(str(folder), dtype="float32", prefill_tokens_while_decoding=value).engine.scheduler
            .prefill_tokens_while_decoding for value in (None, "auto", 0, 512)}
    assert caps == {None: 256, "auto": 256, 0: None, 512: 512}   # on the CPU both defaults are 256
    for bad in (-1, "fast", 1.5):
        with pytest.raises(ConfigError, match=r"prefill_tokens_while_decoding must be an integer >= 0 \(0 = no "
                                              r"cap\), 'auto' or None, got"):
            EngineConfig(prefill_tokens_while_decoding=bad)


def test_a_request_that_cannot_be_admitted_holds_no_cached_blocks():
    """Its matched prefix is let go: waiting requests holding cached blocks could take the whole pool
    and nothing would ever run again."""
    blocks = BlockManager(4, 16)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=256)
    first = request("first", 33)
    scheduler.add(first)
    run_step(scheduler)
    scheduler.finish(first)                 # its full blocks stay in the prefix cache
    running = request("running", 20)
    scheduler.add(running)
    run_step(scheduler)                     # takes 2 of the 4 blocks
    late = request("late", 60)              # shares a prefix with `first`, needs 4 blocks
    scheduler.add(late)
    hits = blocks.prefix_hits
    assert run_step(scheduler) == {"running": 1}
    assert blocks.prefix_hits > hits        # the prefix matched...
    assert late.block_table == [] and late.num_computed_tokens == 0   # ...and was let go
    assert blocks.num_free_blocks == 4 - len(running.block_table)
