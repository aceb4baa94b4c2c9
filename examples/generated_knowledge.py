"""Generated knowledge: first have the model write down what it knows about the topic, then answer
with that knowledge in the prompt.

Two calls: the first returns a list of facts (JSON), the second reads them and answers yes or no
(a choice), with the facts as context. Compare with the answer given without them.
"""
from common import Assistant, parse_args, show

QUESTION = "Part of golf is trying to get a higher point total than others. Yes or no?"
FACTS_SCHEMA = {"type": "object", "properties": {
    "facts": {"type": "array", "items": {"type": "string", "maxLength": 150}, "minItems": 2, "maxItems": 4}},
    "required": ["facts"]}


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv)
    assistant = Assistant(args)
    show("without knowledge", assistant.ask(QUESTION, choices=["Yes", "No"]))
    knowledge = assistant.ask("Write down facts about how golf is scored.", schema=FACTS_SCHEMA)
    show("generated knowledge", knowledge)
    context = "\n".join(f"- {fact}" for fact in knowledge["facts"])
    answer = assistant.ask(f"Knowledge:\n{context}\n\nQuestion: {QUESTION}", choices=["Yes", "No"])
    show("with knowledge (golf: the lowest score wins)", answer)
    return {"facts": knowledge["facts"], "answer": answer}


if __name__ == "__main__":
    main()
