"""A chat request's `tools` and `tool_choice`: what the template is given, which grammar (if any)
forces a call, and which parser reads the calls back.

- `none` (the default without tools): no tools in the prompt, no parsing.
- `auto` (the default with tools): the tools go to the chat template; the model's own format is
  parsed (tool_parsers.py). A template that does not render tools at all gets them described in
  the system message in the Hermes format, and the Hermes parser reads the answer.
- `required`: a JSON schema grammar forces `[{"name": ..., "parameters": {...}}, ...]` (one item
  with parallel_tool_calls=false), each item matching one tool's parameters.
- a named function: the grammar forces that function's arguments (its `parameters` schema).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ondo.sample.structured import StructuredOutputError, StructuredOutputsParams
from ondo.server.errors import bad_request
from ondo.server.tool_parsers import PARSERS, ParsedTools, parse_named, parse_required

ToolParser = Callable[[str, bool], ParsedTools]

# The Hermes / Qwen 2.5 instructions, for templates that do not render tools themselves.
_HERMES_TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]] | None            # tools for the chat template (None = not shown)
    describe_in_system: bool                      # the template ignores tools: ondo describes them
    structured: StructuredOutputsParams | None    # the grammar forcing a call (required / named)
    parser: ToolParser | None                     # reads the calls out of the answer


def plan_tools(body: Any, chat_template: str | None, parser_name: str) -> ToolPlan:
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return ToolPlan(None, False, None, None)
    if not tools:
        raise bad_request(f"tool_choice {_choice_text(choice)} needs tools, and the request has none", "tool_choice")
    describe = "tools" not in (chat_template or "")
    if choice == "auto":
        return ToolPlan(tools, describe, None, PARSERS.get(parser_name))   # "none": no parsing
    functions = {tool["function"]["name"]: tool["function"] for tool in tools}
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                   "parameters": _parameters(function, index)},
                  "required": ["name", "parameters"]}
                 for index, (name, function) in enumerate(functions.items())]
        schema: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": items[0] if len(items) == 1 else {"anyOf": items}}
        if body.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan(tools, describe, _structured(schema, "tools"), parse_required)
    name = choice.function.name
    if name not in functions:
        raise bad_request(f"tool_choice names the function {name!r}, which is not among the tools "
                          f"({', '.join(functions)})", "tool_choice")
    index = list(functions).index(name)
    schema = _parameters(functions[name], index)
    return ToolPlan(tools, describe, _structured(schema, f"tools[{index}].function.parameters"), parse_named(name))


def _choice_text(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else f"{{function: {choice.function.name!r}}}"


def _parameters(function: dict, index: int) -> dict:
    parameters = function.get("parameters")
    if parameters is None:
        return {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise bad_request(f"tools[{index}].function.parameters must be a JSON schema object", "tools")
    return parameters


def _structured(schema: dict, field: str) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(json=schema)
    except StructuredOutputError as error:
        reason = str(error).split(": ", 1)[-1]
        raise bad_request(f"{field} is not a usable JSON schema: {reason}", "tools") from None


# ---- messages -------------------------------------------------------------------------------------


def template_messages(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """Messages for the template. With `describe_in_system`, the tools are described in the system
    message and past calls and results are written in the Hermes format, since such a template
    would drop them."""
    if plan is None or not plan.describe_in_system:
        return messages
    description = _HERMES_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools))
    converted = []
    for message in messages:
        message = dict(message)
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                             ensure_ascii=False) + "\n</tool_call>" for c in message.pop("tool_calls"))
            message["content"] = (message.get("content") or "") + calls
        elif message["role"] == "tool":
            message = {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
        converted.append(message)
    if converted and converted[0]["role"] == "system":
        converted[0] = {**converted[0], "content": f"{converted[0].get('content') or ''}\n\n{description}".lstrip()}
    else:
        converted.insert(0, {"role": "system", "content": description})
    return converted
