"""`ondo generate`: complete prompts like /v1/completions.

One prompt with one sequence streams to stdout token by token. A file of prompts (or n > 1, best_of > 1,
--json) runs as one batch through the engine, and each result is printed once it and every result
before it are done, so the output keeps the order of the prompts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from ondo.cli.options import DEFAULT_GENERATE_MAX_TOKENS, CLIError, engine_config, load_engine, sampling_params

EXIT_FAILED = 1   # a request failed while generating


@dataclasses.dataclass
class Conversation:
    """A JSONL line's {"messages": [...]}: always rendered with the chat template."""
    messages: list


Prompt = str | list[int] | Conversation


def run_generate(args: argparse.Namespace) -> int:
    model, prompt = split_inputs(args.inputs, args.prompts_file)
    if args.system is not None and not args.chat:
        raise CLIError("--system needs --chat (a raw prompt has no system turn)")
    prompts = read_prompts(args.prompts_file) if args.prompts_file is not None else [prompt]
    params = sampling_params(args, max_tokens=DEFAULT_GENERATE_MAX_TOKENS)
    engine = load_engine(engine_config(args, model))
    if args.stats:
        print(f"[model {engine.model_name}, loaded in {engine.load_time_s:.1f} s]", file=sys.stderr)
    engine_prompts = []
    for index, item in enumerate(prompts):
        try:
            engine_prompts.append(to_engine_prompt(item, engine.tokenizer, args.chat, args.system))
        except ValueError as error:
            raise CLIError(_label(index, len(prompts)) + str(error)) from None
    if args.max_tokens is None:   # the default length must not overflow a short context
        params_list = [_fit_default_length(params, prompt, engine) for prompt in engine_prompts]
    else:
        params_list = [params] * len(engine_prompts)
    start = time.perf_counter()
    if not args.json and len(prompts) == 1 and params.n == 1 and params.best_of == 1:
        outputs = [_stream(engine, engine_prompts[0], params_list[0])]
    else:
        outputs = _run_batch(engine, engine_prompts, params_list, args.json)
    failed = False
    for index, out in enumerate(outputs):
        if out.error:
            failed = True
            print(f"error: {_label(index, len(outputs))}{out.error}", file=sys.stderr)
        if args.stats:
            print(_stats(out, _label(index, len(outputs))), file=sys.stderr)
    if args.stats:
        generated = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        elapsed = time.perf_counter() - start
        print(f"[{generated} generated tokens in {elapsed:.2f} s: {generated / elapsed:.1f} tokens/s]", file=sys.stderr)
    return EXIT_FAILED if failed else 0


# ---- inputs -----------------------------------------------------------------------------------------

def _looks_like_path(text: str) -> bool:
    if any(c.isspace() for c in text):
        return False
    return text.startswith(("./", "../", "/", "~")) or text.endswith((".gguf", ".json", ".safetensors"))


def split_inputs(inputs: list[str], prompts_file: str | None) -> tuple[str | None, str | None]:
    """(MODEL or None for the built-in model, PROMPT or None when the prompts come from a file)."""
    if len(inputs) > 2:
        raise CLIError(f"expected [MODEL] PROMPT, got {len(inputs)} arguments (quote a prompt that has spaces)")
    if prompts_file is not None:
        if len(inputs) == 2:
            raise CLIError("give a PROMPT or --prompts-file, not both")
        return (inputs[0] if inputs else None), None
    if not inputs:
        raise CLIError("no prompt given: ondo generate [MODEL] PROMPT, or --prompts-file FILE")
    if len(inputs) == 2:
        return inputs[0], inputs[1]
    text = inputs[0]
    if os.path.exists(os.path.expanduser(text)):
        raise CLIError(f"no prompt given: {text} is a path, so it is the MODEL; give the prompt after it")
    if _looks_like_path(text):
        # A mistyped model path would otherwise silently become a prompt for the built-in model.
        raise CLIError(f"model not found: {text} (a lone argument is taken as the prompt, but this looks like a path)")
    return None, text


def read_prompts(path: str) -> list[Prompt]:
    """One prompt per line, or JSONL when the file ends in .jsonl or its first line is a JSON object.
    Blank lines are skipped."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"prompts file not found: {path}") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise CLIError(f"prompts file {path} holds no prompts")
    if path.endswith(".jsonl") or lines[0][1].lstrip().startswith("{"):
        return [_jsonl_prompt(f"{path}:{number}", line) for number, line in lines]
    return [line for _, line in lines]


def _jsonl_prompt(where: str, line: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise CLIError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or not ({"prompt", "prompt_token_ids", "messages"} & record.keys()):
        raise CLIError(f'{where}: expected an object with "prompt" or "messages", got {line.strip()[:60]}')
    if "messages" in record:
        if not isinstance(record["messages"], list) or not record["messages"]:
            raise CLIError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects')
        return Conversation(record["messages"])
    prompt = record.get("prompt", record.get("prompt_token_ids"))
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt
                                   and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        return prompt
    raise CLIError(f'{where}: "prompt" must be a string or a list of token ids, got {json.dumps(prompt)[:60]}')


def to_engine_prompt(item: Prompt, tokenizer, chat: bool, system: str | None) -> str | list[int]:
    """Text or token ids for Engine.add_request; conversations go through the chat template."""
    if isinstance(item, Conversation):
        messages = list(item.messages)
    elif chat:
        if not isinstance(item, str):
            raise CLIError("--chat needs text prompts, got token ids")
        messages = [{"role": "user", "content": item}]
    else:
        return item
    if system is not None and not (isinstance(messages[0], dict) and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    if tokenizer is None:
        raise CLIError("this model has no tokenizer, so it cannot apply a chat template")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


# ---- running ---------------------------------------------------------------------------------------

def _stream(engine, prompt, params):
    engine.add_request("0", prompt, params)
    last, text = None, ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            delta = out.outputs[0].text_delta
            if delta:
                sys.stdout.write(delta)
                sys.stdout.flush()
                text += delta
            last = out
    if not text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    return last


def _fit_default_length(params, prompt, engine):
    ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) and engine.tokenizer is not None else prompt
    room = engine.max_model_len - len(ids)
    if 1 <= room < params.max_tokens:
        return dataclasses.replace(params, max_tokens=room)
    return params   # a prompt without room is reported by the engine


def _run_batch(engine, prompts: list, params_list: list, as_json: bool) -> list:
    added = []
    for index, (prompt, params) in enumerate(zip(prompts, params_list)):
        try:
            engine.add_request(str(index), prompt, params)
        except ValueError as error:
            for request_id in added:   # nothing runs unless every prompt is good
                engine.abort_request(request_id)
            raise CLIError(_label(index, len(prompts)) + str(error)) from None
        added.append(str(index))
    finished: dict[int, object] = {}
    printed = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[int(out.request_id)] = out
        while printed in finished:
            _print_result(finished[printed], printed, len(prompts), as_json)
            printed += 1
    return [finished[i] for i in range(len(prompts))]


def _print_result(out, index: int, total: int, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(dataclasses.asdict(out), ensure_ascii=False) + "\n")
    else:
        for completion in out.outputs:
            where = [f"prompt {index + 1}/{total}"] if total > 1 else []
            if len(out.outputs) > 1:
                where.append(f"sequence {completion.index + 1}/{len(out.outputs)}")
            if where:
                sys.stdout.write(f"=== {', '.join(where)} ===\n")
            sys.stdout.write(completion.text if completion.text.endswith("\n") else completion.text + "\n")
    sys.stdout.flush()


def _label(index: int, total: int) -> str:
    return f"prompt {index + 1}: " if total > 1 else ""


def _stats(out, label: str) -> str:
    generated = sum(len(c.token_ids) for c in out.outputs)
    reasons = ", ".join(sorted({str(c.finish_reason) for c in out.outputs}))
    return f"[{label}{len(out.prompt_token_ids)} prompt tokens, {generated} generated tokens, finish: {reasons}]"
