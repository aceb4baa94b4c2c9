"""The recipes in examples/ run; the prompt-chaining one offline on the built-in model, each step's
JSON valid against its schema and fed into the next step's prompt."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import common  # noqa: E402
import prompt_chaining  # noqa: E402

pytestmark = pytest.mark.slow


def test_prompt_chaining_offline_on_the_builtin_model(monkeypatch):
    prompts = []
    ask = common.Assistant.ask

    def recording_ask(self, messages, **options):
        prompts.append(messages if isinstance(messages, str) else messages[-1]["content"])
        return ask(self, messages, **options)

    monkeypatch.setattr(common.Assistant, "ask", recording_ask)
    result = prompt_chaining.main(["--max-tokens", "160"])
    jsonschema.validate(result["facts"], prompt_chaining.FACTS)
    jsonschema.validate(result["urgency"], prompt_chaining.URGENCY)
    jsonschema.validate(result["reply"], prompt_chaining.REPLY)
    assert json.dumps(result["facts"], ensure_ascii=False) in prompts[1]   # step 1 feeds step 2
    assert result["urgency"]["reason"] in prompts[2]                       # step 2 feeds step 3


RECIPES = ["chain_of_thought", "few_shot", "generated_knowledge", "prompt_chaining", "self_ask"]


def test_recipes_are_all_here():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py") if p.stem != "common") == RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_runs_on_any_model(name, tiny_llama_with_tokenizer):
    # A tiny random model writes noise; the schemas and choices still make every step parse.
    module = __import__(name)
    result = module.main(["--model", str(tiny_llama_with_tokenizer[0]), "--max-tokens", "300"])
    assert result
