"""What every recipe shares: one `ask()` that runs a chat turn on ondo, offline (`ondo.LLM`) or through
a running `ondo serve` with the official `openai` client, optionally constrained by a JSON schema
or a list of choices.

    python examples/few_shot.py                               # built-in model, in this process
    python examples/few_shot.py --model path/to/model.gguf    # any model ondo loads
    python examples/few_shot.py --server http://127.0.0.1:8000/v1
"""
from __future__ import annotations

import argparse
import json
from typing import Any


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", help="model folder or .gguf for offline runs (default: the built-in SmolLM2-135M)")
    parser.add_argument("--server", metavar="URL", help="use a running server instead, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens per answer at most (default 200)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    return parser.parse_args(argv)


class Assistant:
    """`ask(messages, schema=None, choices=None) -> str | dict`: a JSON schema returns the parsed object."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        if args.server:
            import openai

            self.client = openai.OpenAI(base_url=args.server, api_key="unused")
            self.model = self.client.models.list().data[0].id
        else:
            from ondo import LLM

            self.llm = LLM(args.model)

    def ask(self, messages: list[dict[str, str]] | str, *, schema: dict | None = None,
            choices: list[str] | None = None, max_tokens: int | None = None) -> Any:
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        max_tokens = max_tokens or self.args.max_tokens
        text, finish_reason = self._server(messages, schema, choices, max_tokens) if self.args.server else \
            self._offline(messages, schema, choices, max_tokens)
        if schema is None:
            return text.strip()
        if finish_reason == "length":   # the grammar guarantees valid JSON only if it may finish
            raise SystemExit(f"the answer was cut at {max_tokens} tokens before its JSON was complete: "
                             f"raise --max-tokens\n{text}")
        return json.loads(text)

    def _offline(self, messages, schema, choices, max_tokens) -> str:
        from ondo import SamplingParams
        from ondo.sampling_params import StructuredOutputsParams

        shape = None
        if schema is not None:
            shape = StructuredOutputsParams(json=schema)
        elif choices is not None:
            shape = StructuredOutputsParams(choice=choices)
        params = SamplingParams(temperature=self.args.temperature, max_tokens=max_tokens, structured_outputs=shape)
        output = self.llm.chat(messages, params)[0].outputs[0]
        return output.text, output.finish_reason

    def _server(self, messages, schema, choices, max_tokens) -> str:
        extra: dict[str, Any] = {}
        if schema is not None:   # OpenAI's own way of asking for a schema
            extra["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
        elif choices is not None:   # vLLM's extra field, which ondo speaks too
            extra["extra_body"] = {"guided_choice": choices}
        response = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                       temperature=self.args.temperature, **extra)
        return response.choices[0].message.content, response.choices[0].finish_reason


def show(title: str, value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False, indent=2) if isinstance(value, (dict, list)) else value
    print(f"--- {title}\n{text}\n")
