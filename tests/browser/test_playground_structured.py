"""The playground's JSON schema box: the answer follows the schema; a bad schema is shown next to the box."""
from __future__ import annotations

import json

import jsonschema
import pytest

pytestmark = pytest.mark.slow

REPLY = "#messages .message.assistant .content"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8},
                                           "sure": {"type": "boolean"}}, "required": ["answer", "sure"]}


def test_the_answer_follows_the_schema_in_the_box(page):
    page.fill("#field-max_tokens", "48")
    page.fill("#field-temperature", "0")
    page.fill("#field-json_schema", json.dumps(SCHEMA))
    page.fill("#chat-input", "Is the sea blue?")
    page.click("#send")
    page.wait_for_function("document.getElementById('stats').textContent.includes('tokens/s')", timeout=60_000)
    jsonschema.validate(json.loads(page.inner_text(REPLY)), SCHEMA)


@pytest.mark.parametrize("text,message", [
    ('["not", "an object"]', "json_schema must be a JSON schema object"),             # checked in the page
    ('{"type": "integer", "minimum": 9, "maximum": 1}', "is not a usable JSON schema"),  # the server's 400
])
def test_a_bad_schema_is_shown_next_to_the_box(page, text, message):
    page.fill("#field-json_schema", text)
    page.fill("#chat-input", "hello")
    page.click("#send")
    page.wait_for_function("document.getElementById('error-json_schema').textContent !== ''", timeout=30_000)
    assert message in page.inner_text("#error-json_schema")
