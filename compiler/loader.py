"""Loading an intent file: YAML with positions, schema, models, semantics.

Every problem in a file is reported at once, each as FILE:LINE:COL, and
nothing downstream (the compiler, let alone the kernel) runs before the whole
intent is valid. ruamel.yaml keeps the line and column of every key and item;
errors from jsonschema and pydantic carry paths, which are mapped back here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path as FsPath
from typing import Any

import jsonschema
import yaml
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError

from . import fastyaml, semantics
from .errors import IntentError, Problem
from .intent import NetworkIntent

SCHEMA_PATH = FsPath(__file__).resolve().parent.parent / "schemas" / "intent.schema.json"

DocPath = tuple[str | int, ...]


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    from .schema import intent_schema

    # The committed file is what editors see; a test keeps it equal to intent_schema().
    schema = intent_schema()
    return jsonschema.Draft202012Validator(schema)


@dataclass(frozen=True)
class Positions:
    """Where each node of a document was written, for error messages."""

    root: Any

    def locate(self, path: DocPath) -> tuple[int, int]:
        """1-based (line, column) of the deepest node along `path` that exists."""
        node = self.root
        line, column = 1, 1
        for step in path:
            if isinstance(node, CommentedMap) and step in node:
                line, column = node.lc.key(step)
                line, column = line + 1, column + 1
                node = node[step]
            elif isinstance(node, CommentedSeq) and isinstance(step, int) and 0 <= step < len(node):
                line, column = node.lc.item(step)
                line, column = line + 1, column + 1
                node = node[step]
            else:
                break
        return line, column


def _plain(node: Any) -> Any:
    """ruamel's round-trip types to plain dicts/lists/scalars, for jsonschema and pydantic."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


@dataclass(frozen=True)
class LoadedIntent:
    intent: NetworkIntent
    path: str
    text: str = field(default="", repr=False, compare=False)

    def problems_at(self, findings: Iterable[tuple[DocPath, str]]) -> list[Problem]:
        """Findings of a later stage (what a backend refuses) as problems at FILE:LINE:COL of this file, in file order.

        A valid file took the fast path, which keeps no positions: the text is
        parsed again with them, on this error path only. A path the file does
        not spell out (a default) lands on its nearest written parent.
        """
        try:
            positions = Positions(YAML(typ="rt").load(self.text))
        except MarkedYAMLError:
            positions = Positions(None)
        problems = _dedupe([Problem(self.path, *positions.locate(path), message) for path, message in findings])
        return sorted(problems, key=lambda p: (p.line, p.column, p.message))


class _FastLoader(yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader):  # type: ignore[misc]
    """libyaml's C parser, refusing duplicate keys like the round-trip loader does."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key_node, deep=deep) for key_node, _ in node.value]
        if len(set(map(str, keys))) != len(keys):
            raise yaml.constructor.ConstructorError(None, None, "duplicate key", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _fast_document(text: str) -> Any:
    """The document as plain data, or None when the slow path must explain what is wrong."""
    try:
        # Exactly yaml.load(text, Loader=_FastLoader), without parsing long lists item by item.
        return fastyaml.load(text, _FastLoader)
    except yaml.YAMLError:
        return None


def parse_text(text: str, filename: str) -> LoadedIntent:
    """Parse and check an intent given as text; raises IntentError with every problem found.

    Valid files take a fast path (libyaml, no positions): that is what a daemon
    reloading a 10,000-element intent needs. Only when something is wrong is
    the file parsed again with ruamel.yaml, which keeps every line and column.
    """
    document = _fast_document(text)
    if isinstance(document, dict):
        # The models are stricter than the schema generated from them, so a
        # document they accept needs no schema pass; the schema only serves to
        # place errors, on the slow path.
        try:
            intent = NetworkIntent.model_validate(document)
        except ValidationError:
            pass
        else:
            if not semantics.check(intent):
                return LoadedIntent(intent=intent, path=filename, text=text)
    return _parse_with_positions(text, filename)


def _parse_with_positions(text: str, filename: str) -> LoadedIntent:
    round_trip = YAML(typ="rt")
    try:
        root = round_trip.load(text)
    except DuplicateKeyError as exc:
        mark = exc.problem_mark
        raise IntentError([Problem(filename, mark.line + 1, mark.column + 1, _yaml_message(exc))]) from None
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise IntentError([Problem(filename, line, column, f"YAML syntax: {_yaml_message(exc)}")]) from None
    if root is None:
        raise IntentError([Problem(filename, 1, 1, "the file is empty: expected a NetworkIntent document")])
    positions = Positions(root)
    document = _plain(root)

    def at(path: DocPath, message: str) -> Problem:
        line, column = positions.locate(path)
        return Problem(filename, line, column, message)

    problems = [at(_schema_path(e), _schema_message(e)) for e in _validator().iter_errors(document)]
    try:
        intent = NetworkIntent.model_validate(document)
    except ValidationError as exc:
        # With schema errors present, add only what the schema cannot see (CIDRs, marks, port ranges).
        errors = exc.errors()
        # A union (a CIDR or "default") fails once per member; the value error is the one that explains.
        explained = {_doc_path(e["loc"]) for e in errors if e["type"] == "value_error"}
        problems += [
            at(_doc_path(err["loc"]), _pydantic_message(err))
            for err in errors
            if (not problems or err["type"] == "value_error")
            and (err["type"] == "value_error" or _doc_path(err["loc"]) not in explained)
        ]
        raise IntentError(_dedupe(problems)) from None
    if problems:
        raise IntentError(_dedupe(problems))
    findings = semantics.check(intent)
    if findings:
        raise IntentError(_dedupe([at(path, message) for path, message in findings]))
    return LoadedIntent(intent=intent, path=filename, text=text)


def load_file(path: str | FsPath) -> LoadedIntent:
    """Read and check an intent file."""
    name = str(path)
    try:
        text = FsPath(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise IntentError([Problem(name, 1, 1, f"cannot read the file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise IntentError([Problem(name, 1, 1, f"the file is not UTF-8 text: {exc.reason}")]) from None
    return parse_text(text, name)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


def _yaml_message(exc: MarkedYAMLError) -> str:
    parts = [p for p in (exc.context, exc.problem) if p]
    return "; ".join(parts).replace("\n", " ") or "invalid YAML"


def _schema_path(error: jsonschema.ValidationError) -> DocPath:
    path: DocPath = tuple(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = error.schema.get("properties", {})
        extra = [key for key in error.instance if key not in allowed]
        if extra:
            return (*path, extra[0])
    return path


def _schema_message(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "document"
    if error.validator == "additionalProperties":
        return f"{where}: {error.message}"
    if error.validator in ("anyOf", "oneOf") and error.context:
        reasons = sorted({c.message for c in error.context})
        return f"{where}: {json.dumps(error.instance)} is not valid here ({'; '.join(reasons[:3])})"
    return f"{where}: {error.message}"


def _doc_path(loc: Sequence[Any]) -> DocPath:
    """pydantic error locations name union members and validators too; keep the document keys."""
    return tuple(
        step
        for step in loc
        if isinstance(step, int) or ("[" not in str(step) and str(step) not in ("int", "str"))
    )


def _pydantic_message(error: Any) -> str:
    where = ".".join(str(p) for p in _doc_path(error["loc"]))
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
