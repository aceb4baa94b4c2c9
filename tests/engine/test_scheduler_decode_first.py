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
        if item.request.num_computed_tokens == item.request.num_tokens:
            item.request.output_token_ids.append(7)
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


def test_without_the_rule_nothing_changes():
    scheduler = Scheduler(BlockManager(256, 16), max_num_seqs=8, max_num_batched_tokens=2048)
    scheduler.add(request("long", 2048))
    scheduler.add(request("short", 4))
    assert run_step(scheduler) == {"long": 2048}
