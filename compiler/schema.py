"""The intent's JSON schema, generated from the models and committed in schemas/.

Editors with a YAML language server complete and check intents through a
`$schema` reference to the committed file; `python -m compiler.schema` rewrites
it, and a test fails when it is stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .intent import NetworkIntent

SCHEMA_ID = "https://kernform.dev/schemas/intent.schema.json"
SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schemas" / "intent.schema.json"


def intent_schema() -> dict[str, Any]:
    schema = NetworkIntent.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    schema["title"] = "kernform NetworkIntent (kernform/v1)"
    return schema


def render() -> str:
    return json.dumps(intent_schema(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    SCHEMA_FILE.write_text(render(), encoding="utf-8")
    print(f"wrote {SCHEMA_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
