"""Self-ask: the model breaks a question into follow-up questions, answers each, then answers the
original with those answers in view.

Step 1 returns the follow-up questions as JSON; step 2 answers each one on its own; step 3 gets the
question plus the question-answer pairs and returns the final answer.
"""
from common import Assistant, parse_args, show

QUESTION = "Was the inventor of the telephone born in the same country as the inventor of the light bulb?"
QUESTIONS_SCHEMA = {"type": "object", "properties": {
    "follow_up_questions": {"type": "array", "items": {"type": "string", "maxLength": 100}, "minItems": 1,
                            "maxItems": 3}}, "required": ["follow_up_questions"]}
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 200}},
                 "required": ["answer"]}


def main(argv=None) -> dict:
    args = parse_args(__doc__, argv)
    assistant = Assistant(args)
    plan = assistant.ask(f"To answer this question, which simpler questions must be answered first?\n{QUESTION}",
                         schema=QUESTIONS_SCHEMA)
    show("follow-up questions", plan)
    facts = []
    for question in plan["follow_up_questions"]:
        answer = assistant.ask(question, schema=ANSWER_SCHEMA)["answer"]
        show(question, answer)
        facts.append(f"Q: {question}\nA: {answer}")
    final = assistant.ask("\n\n".join(facts) + f"\n\nUsing these answers: {QUESTION}", schema=ANSWER_SCHEMA)
    show("final answer", final)
    return final


if __name__ == "__main__":
    main()
