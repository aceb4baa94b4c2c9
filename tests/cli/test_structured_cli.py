"""`ondo generate` / `ondo chat` with --json-schema, --regex and --choice, on the tiny random model:
its text is noise, so a valid answer is the grammar's doing."""
from __future__ import annotations

import json

import jsonschema
import pytest
from tests.cli.conftest import run_ondo

from ondo.cli.options import CLIError, build_parser, structured_outputs

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "w": {"enum": ["x", "y"]}}, "required": ["n", "w"]}


def test_generate_follows_a_json_schema_file(cli_model, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    done = run_ondo("generate", cli_model, "Give JSON:", "--json-schema", schema_file, "--temperature", "0.9",
                    "--seed", "3", "--max-tokens", "40")
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout), SCHEMA)


def test_chat_answers_with_one_of_the_choices(cli_model):
    done = run_ondo("chat", cli_model, "--choice", "yes", "--choice", "no", "--temperature", "0", stdin="Is it?\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].strip() in ("yes", "no")


def test_a_bad_regex_is_one_line_and_exit_2(cli_model):
    done = run_ondo("generate", cli_model, "x", "--regex", "[a-")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --regex '[a-' is not a valid regex: regex parse error: [a- ^ error: unclosed character class"]


@pytest.mark.parametrize("argv,message", [
    (["--regex", "a", "--choice", "b"], "give one of --json-schema, --json-object, --regex, --choice, --grammar; "
                                        "got --regex and --choice"),
    (["--json-schema", "/nonexistent/schema.json"], "--json-schema file not found: /nonexistent/schema.json"),
    (["--grammar", "/nonexistent/g.ebnf"], "--grammar file not found"),
])
def test_flag_mistakes_are_named(argv, message):
    args = build_parser().parse_args(["generate", "prompt", *argv])
    with pytest.raises(CLIError) as error:
        structured_outputs(args)
    assert str(error.value).startswith(message)
