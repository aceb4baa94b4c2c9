"""Prompt chaining: a task split into steps, each step's JSON output feeding the next prompt.

1. extract the facts of a support ticket (customer, product, problem)   -> JSON, schema-enforced
2. classify its urgency from those facts only                          -> JSON, schema-enforced
3. draft the reply from the facts and the urgency                      -> JSON, schema-enforced

Every step's output parses and matches its schema, so the chain never breaks on a malformed answer.
"""
import json

from common import Assistant, parse_args, show

TICKET = ("Hi, this is Mina Park. My Ondo X2 thermostat shows error E4 since this morning and the "
          "heating is off. It is -5 C outside and I have a baby at home. Please help!")
FACTS = {"type": "object", "properties": {
    "customer": {"type": "string", "maxLength": 30},
    "product": {"type": "string", "maxLength": 30},
    "problem": {"type": "string", "maxLength": 80}}, "required": ["customer", "product", "problem"]}
URGENCY = {"type": "object", "properties": {
    "urgency": {"enum": ["low", "medium", "high"]},
    "reason": {"type": "string", "maxLength": 80}}, "required": ["urgency", "reason"]}
REPLY = {"type": "object", "properties": {
    "subject": {"type": "string", "maxLength": 50},
    "body": {"type": "string", "maxLength": 200}}, "required": ["subject", "body"]}


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv)
    assistant = Assistant(args)
    facts = assistant.ask(f"Extract the customer, the product and the problem from this ticket:\n{TICKET}",
                          schema=FACTS)
    show("1. facts", facts)
    urgency = assistant.ask(f"How urgent is this support case?\n{json.dumps(facts, ensure_ascii=False)}",
                            schema=URGENCY)
    show("2. urgency", urgency)
    reply = assistant.ask(f"Write a short reply to the customer.\nCase: {json.dumps(facts, ensure_ascii=False)}\n"
                          f"Urgency: {urgency['urgency']} ({urgency['reason']})", schema=REPLY)
    show("3. reply", reply)
    return {"facts": facts, "urgency": urgency, "reply": reply}


if __name__ == "__main__":
    main()
