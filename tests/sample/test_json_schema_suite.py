"""Forty JSON schemas on the built-in model (SmolLM2-135M), greedy and sampled, in ONE generate
call (continuous batching): every output must validate with `jsonschema`."""
from __future__ import annotations

import json

import jsonschema
import pytest
from json_schemas import SCHEMAS, prompt_for

from ondo import LLM, SamplingParams
from ondo.sampling_params import StructuredOutputsParams

pytestmark = pytest.mark.slow

MAX_TOKENS = 96   # the longest shortest-valid output of the suite is ~45 tokens


def test_forty_schemas_greedy_and_sampled_all_validate():
    llm = LLM(device="cpu", max_model_len=256, max_num_seqs=2 * len(SCHEMAS))
    # Short raw prompts keep the prefill small; the grammar, not the prompt, makes the JSON valid.
    prompts = [prompt_for(name) for name, _ in SCHEMAS] * 2
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(json=s))
              for _, s in SCHEMAS]
    params += [SamplingParams(temperature=0.8, seed=i, max_tokens=MAX_TOKENS,
                              structured_outputs=StructuredOutputsParams(json=s)) for i, (_, s) in enumerate(SCHEMAS)]
    outputs = llm.generate(prompts, params)
    failures = []
    for (name, schema), output in zip(SCHEMAS * 2, outputs):
        completion = output.outputs[0]
        try:
            jsonschema.validate(json.loads(completion.text), schema)
        except (json.JSONDecodeError, jsonschema.ValidationError) as error:
            failures.append(f"{name} ({completion.finish_reason}, {len(completion.token_ids)} tokens): "
                            f"{completion.text!r}: {error}")
    assert not failures, f"{len(failures)} of {len(outputs)} outputs invalid:\n" + "\n".join(failures)
    # 40 schemas, each compiled once: the sampled half hit the cache.
    assert llm.engine.grammars.misses == len(SCHEMAS)
