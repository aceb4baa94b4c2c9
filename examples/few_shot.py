"""Few-shot prompting: show the model a handful of solved examples, then ask.

The examples are written as past chat turns, so the model sees the pattern it must follow; the
label set is enforced with `choices`, so the answer is always one of them.
"""
from common import Assistant, parse_args, show

LABELS = ["positive", "negative", "neutral"]
SHOTS = [("The food was wonderful and the staff were kind.", "positive"),
         ("I waited an hour and the soup was cold.", "negative"),
         ("The restaurant opens at nine.", "neutral")]
REVIEWS = ["Best pizza I have had in years!", "The room was dirty and noisy.", "The museum is on Main Street."]


def main(argv=None) -> list[str]:
    args = parse_args(__doc__, argv)
    assistant = Assistant(args)
    messages = [{"role": "system", "content": f"Classify the sentiment of each review as one of: {', '.join(LABELS)}."}]
    for review, label in SHOTS:
        messages += [{"role": "user", "content": review}, {"role": "assistant", "content": label}]
    labels = []
    for review in REVIEWS:
        label = assistant.ask(messages + [{"role": "user", "content": review}], choices=LABELS)
        show(review, label)
        labels.append(label)
    return labels


if __name__ == "__main__":
    main()
