"""Forty JSON schemas for the structured-output tests: nested objects, arrays with bounds, enums,
patterns, numeric ranges, optional and required fields, $ref. Every string, number and array is
bounded so that the shortest valid output is a few dozen tokens: a small model must be able to
finish each one well within the tests' max_tokens."""
from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 99}

SCHEMAS: list[tuple[str, dict]] = [
    ("person", {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                "required": ["name", "age"]}),
    ("city", {"type": "object", "properties": {"city": NAME, "country": NAME}, "required": ["city", "country"]}),
    ("boolean_flag", {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}),
    ("enum_color", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]}),
    ("enum_int", {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}}, "required": ["level"]}),
    ("const", {"type": "object", "properties": {"kind": {"const": "fruit"}, "name": NAME}, "required": ["kind", "name"]}),
    ("negative_range", {"type": "object", "properties": {"t": {"type": "integer", "minimum": -40, "maximum": -1}},
                        "required": ["t"]}),
    ("exclusive_range", {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 10,
                                                                "exclusiveMaximum": 20}}, "required": ["n"]}),
    ("number_range", {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10}},
                      "required": ["score"]}),
    ("pattern_code", {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
                      "required": ["code"]}),
    ("pattern_phone", {"type": "object", "properties": {"phone": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}},
                       "required": ["phone"]}),
    ("pattern_word", {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z]{2,8}$"}},
                      "required": ["word"]}),
    ("string_bounds", {"type": "object", "properties": {"tag": {"type": "string", "minLength": 2, "maxLength": 5}},
                       "required": ["tag"]}),
    ("array_bounds", {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1,
                                                                "maxItems": 3}}, "required": ["tags"]}),
    ("array_exact", {"type": "object", "properties": {"pair": {"type": "array", "items": SMALL_INT, "minItems": 2,
                                                               "maxItems": 2}}, "required": ["pair"]}),
    ("array_of_enums", {"type": "object", "properties": {"days": {"type": "array", "items": {"enum": ["mon", "tue", "wed"]},
                                                                  "minItems": 1, "maxItems": 3}}, "required": ["days"]}),
    ("top_level_array", {"type": "array", "items": SMALL_INT, "minItems": 1, "maxItems": 4}),
    ("array_of_objects", {"type": "object", "properties": {"items": {
        "type": "array", "minItems": 1, "maxItems": 2,
        "items": {"type": "object", "properties": {"id": SMALL_INT, "label": NAME}, "required": ["id", "label"]}}},
        "required": ["items"]}),
    ("nested_object", {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": NAME, "age": SMALL_INT}, "required": ["name", "age"]}}, "required": ["user"]}),
    ("deeply_nested", {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {
        "type": "object", "properties": {"c": SMALL_INT}, "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]}),
    ("optional_fields", {"type": "object", "properties": {"name": NAME, "nickname": NAME, "age": SMALL_INT},
                         "required": ["name"]}),
    ("all_optional", {"type": "object", "properties": {"x": SMALL_INT, "y": SMALL_INT}}),
    ("nullable", {"type": "object", "properties": {"middle": {"type": ["string", "null"], "maxLength": 8}},
                  "required": ["middle"]}),
    ("any_of", {"type": "object", "properties": {"value": {"anyOf": [SMALL_INT, {"type": "boolean"}]}},
                "required": ["value"]}),
    ("one_of_shapes", {"type": "object", "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": SMALL_INT}, "required": ["kind", "r"]},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": SMALL_INT}, "required": ["kind", "side"]},
    ]}}, "required": ["shape"]}),
    ("ref_defs", {"$defs": {"point": {"type": "object", "properties": {"x": SMALL_INT, "y": SMALL_INT},
                                      "required": ["x", "y"]}},
                  "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
                  "required": ["start", "end"]}),
    ("ref_definitions", {"definitions": {"name": NAME}, "type": "object",
                         "properties": {"first": {"$ref": "#/definitions/name"}, "last": {"$ref": "#/definitions/name"}},
                         "required": ["first", "last"]}),
    ("ref_in_array", {"$defs": {"tag": {"type": "string", "enum": ["new", "old", "hot"]}}, "type": "object",
                      "properties": {"tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 1,
                                              "maxItems": 2}}, "required": ["tags"]}),
    ("ref_chain", {"$defs": {"name": NAME, "person": {"type": "object", "properties": {
        "name": {"$ref": "#/$defs/name"}, "age": SMALL_INT}, "required": ["name", "age"]}},
        "type": "object", "properties": {"owner": {"$ref": "#/$defs/person"}}, "required": ["owner"]}),
    ("product", {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^SKU[0-9]{4}$"},
                                                  "price": {"type": "integer", "minimum": 1, "maximum": 999},
                                                  "in_stock": {"type": "boolean"}},
                 "required": ["sku", "price", "in_stock"]}),
    ("rating", {"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                                                 "comment": {"type": "string", "maxLength": 10}},
                "required": ["stars"]}),
    ("yes_no", {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"enum": [
        "low", "high"]}}, "required": ["answer", "confidence"]}),
    ("date_pattern", {"type": "object", "properties": {"date": {"type": "string",
                                                                "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
                      "required": ["date"]}),
    ("coordinates", {"type": "object", "properties": {"lat": {"type": "integer", "minimum": -90, "maximum": 90},
                                                      "lon": {"type": "integer", "minimum": -180, "maximum": 180}},
                     "required": ["lat", "lon"]}),
    ("matrix", {"type": "object", "properties": {"rows": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}}},
        "required": ["rows"]}),
    ("status_union", {"type": "object", "properties": {"status": {"type": "string", "enum": ["ok", "error"]},
                                                       "code": {"type": "integer", "minimum": 100, "maximum": 599}},
                      "required": ["status", "code"]}),
    ("empty_object", {"type": "object", "properties": {}}),
    ("boolean_pair", {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}},
                      "required": ["a", "b"]}),
    ("unique_small_list", {"type": "object", "properties": {"ids": {"type": "array", "items": SMALL_INT,
                                                                    "minItems": 0, "maxItems": 3}},
                           "required": ["ids"]}),
    ("event", {"type": "object", "properties": {
        "title": NAME, "when": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23},
                                                                   "minute": {"type": "integer", "minimum": 0, "maximum": 59}},
                                "required": ["hour", "minute"]},
        "tags": {"type": "array", "items": {"enum": ["work", "home"]}, "maxItems": 2}},
        "required": ["title", "when"]}),
]

assert len(SCHEMAS) == 40 and len({name for name, _ in SCHEMAS}) == 40


def prompt_for(name: str) -> str:
    return f"A {name.replace('_', ' ')} as JSON:"
