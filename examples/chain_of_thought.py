"""Chain-of-thought: ask the model to reason step by step before it answers.

The schema puts the `steps` field before `answer`, and fields are generated in schema order: the
model writes its reasoning first and answers with it in view. The answer field is an integer, so
it can be checked by code.
"""
from common import Assistant, parse_args, show

QUESTION = "A baker has 23 apples. She uses 20 for pies and buys 6 more. How many apples does she have?"
SCHEMA = {"type": "object", "properties": {
    "steps": {"type": "array", "items": {"type": "string", "maxLength": 100}, "minItems": 1, "maxItems": 3},
    "answer": {"type": "integer", "minimum": 0, "maximum": 1000}}, "required": ["steps", "answer"]}


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv)
    assistant = Assistant(args)
    direct = assistant.ask(f"{QUESTION} Reply with the number only.", max_tokens=8)
    show("answer without reasoning", direct)
    result = assistant.ask([{"role": "system", "content": "Think step by step, then give the answer."},
                            {"role": "user", "content": QUESTION}], schema=SCHEMA)
    show("step by step (the expected answer is 9)", result)
    return result


if __name__ == "__main__":
    main()
