"""The committed JSON schemas are current and usable."""

from __future__ import annotations

import json

import jsonschema

from compiler import schema
from compiler.loader import parse_text


def test_committed_intent_schema_is_current() -> None:
    committed = schema.SCHEMA_FILE.read_text()
    assert committed == schema.render(), "schemas/intent.schema.json is stale: run `python -m compiler.schema`"


def test_schema_accepts_a_minimal_intent() -> None:
    document = {"apiVersion": "kernform/v1", "kind": "NetworkIntent", "metadata": {"name": "x"}}
    jsonschema.validate(document, json.loads(schema.SCHEMA_FILE.read_text()))


def test_dollar_schema_reference_is_allowed() -> None:
    text = "$schema: ../schemas/intent.schema.json\napiVersion: kernform/v1\nkind: NetworkIntent\nmetadata: {name: x}\n"
    assert parse_text(text, "x.yaml").intent.metadata.name == "x"
