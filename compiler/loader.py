"""Loading an intent file: YAML with positions, schema, models, semantics.

Every problem in a file is reported at once, each as FILE:LINE:COL, and
nothing downstream (the compiler, let alone the kernel) runs before the whole
intent is valid. Every path reads YAML one way, YAML 1.2's core schema
(compiler.yaml12): valid files through libyaml's C loader (compiler.fastyaml),
files with a problem through libyaml's events, which keep the line and column
of every key and item; errors from jsonschema and pydantic carry paths, which
are mapped back here.

A command may be given many intents (load_inputs): files, directories of
them, stdin, and files of several `---`-separated documents, each document
parsed on its own with its lines counted in the whole file. A file holds at
most MAX_FILE_BYTES.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path as FsPath
from typing import Any

import jsonschema
import yaml
from pydantic import ValidationError

from . import fastyaml, semantics, yaml12
from .errors import IntentError, Problem
from .intent import NetworkIntent
from .yaml12 import Positions

__all__ = ["LoadedIntent", "Positions", "collect_inputs", "load_file", "load_inputs", "parse_text", "read_intent_bytes"]

SCHEMA_PATH = FsPath(__file__).resolve().parent.parent / "schemas" / "intent.schema.json"
# Far above any real intent (a 10,000-CIDR blocklist is 233 KB), far below what exhausts a host.
MAX_FILE_BYTES = 16 * 1024 * 1024

DocPath = tuple[str | int, ...]
# The fast path's loader (tests compare compiler.fastyaml with yaml.load through it).
_FastLoader = yaml12.StrictLoader


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    from .schema import intent_schema

    # The committed file is what editors see; a test keeps it equal to intent_schema().
    schema = intent_schema()
    return jsonschema.Draft202012Validator(schema)


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
        positions = self._positions
        problems = _dedupe([Problem(self.path, *positions.locate(path), message) for path, message in findings])
        return sorted(problems, key=lambda p: (p.line, p.column, p.message))

    def where(self, path: DocPath) -> str:
        """FILE:LINE:COL of `path` in this document (its nearest written parent for a default)."""
        line, column = self._positions.locate(path)
        return f"{self.path}:{line}:{column}"

    @functools.cached_property
    def _positions(self) -> Positions:
        # Computed on error paths only (see problems_at); cached_property writes the instance's
        # __dict__ directly, which a frozen dataclass allows.
        return yaml12.read(self.text).positions


def _fast_document(text: str) -> Any:
    """The document as plain data, or None when the error path must read it (or explain what is wrong)."""
    if not yaml12.fits_fast_path(text):
        return None
    try:
        # Exactly yaml.load(text, Loader=StrictLoader), without parsing long lists item by item.
        return fastyaml.load(text, yaml12.StrictLoader)
    except Exception:  # noqa: BLE001 - whatever it is, the error path reads the file and says what is wrong
        return None


def parse_text(text: str, filename: str) -> LoadedIntent:
    """Parse and check an intent given as text; raises IntentError with every problem found.

    Valid files take a fast path (libyaml, no positions): that is what a daemon
    reloading a 10,000-element intent needs. Only when something is wrong (or
    the file uses anchors, tags or directives) is the file read again event by
    event, keeping every line and column. Both read YAML 1.2 (compiler.yaml12).
    """
    if len(text) > MAX_FILE_BYTES:
        raise IntentError([Problem(filename, 1, 1, _too_large("characters"))])
    document = _fast_document(text)
    invalid: ValidationError | None = None
    if isinstance(document, dict):
        # The models are stricter than the schema generated from them, so a
        # document they accept needs no schema pass; the schema only serves to
        # place errors, on the slow path.
        try:
            intent = NetworkIntent.model_validate(document)
        except ValidationError as exc:
            # The error path reads the same data (compiler.yaml12): what the models found stands.
            invalid = exc
        else:
            if not semantics.check(intent):
                return LoadedIntent(intent=intent, path=filename, text=text)
    return _parse_with_positions(text, filename, invalid)


def _too_large(unit: str) -> str:
    return (f"the file holds more than {MAX_FILE_BYTES} {unit} (16 MiB), more than any intent needs: "
            "is it the right file?")


def _parse_with_positions(text: str, filename: str, invalid: ValidationError | None = None) -> LoadedIntent:
    """The error path: the text read with positions (compiler.yaml12), then the models, the schema and the
    semantics, every problem at its FILE:LINE:COL. `invalid` is what the models said of the same document on
    the fast path, if they saw it."""
    reading = yaml12.read(text)
    if reading.problems:
        raise IntentError(_dedupe([Problem(filename, line, column, _shorten(message))
                                   for line, column, message in reading.problems]))
    if reading.document is None:
        raise IntentError([Problem(filename, 1, 1, "the file is empty: expected a NetworkIntent document")])
    positions = reading.positions
    document = reading.document

    def at(path: DocPath, message: str) -> Problem:
        line, column = positions.locate(path)
        return Problem(filename, line, column, _shorten(message))

    if invalid is None:
        try:
            intent = NetworkIntent.model_validate(document)
        except ValidationError as exc:
            invalid = exc
    if invalid is not None:
        errors = invalid.errors()
        # The schema explains shapes (a missing field, a wrong type) better than the models do, and sees no
        # more than they do: it is asked only when the models found more than bad values (CIDRs, marks,
        # port ranges), which it cannot see. A 10 MB blocklist with one bad CIDR skips it.
        problems = []
        if any(err["type"] != "value_error" for err in errors):
            problems = [at(path, message) for e in _schema_errors(_validator().iter_errors(document))
                        for path, message in _schema_problems(e)]
        # A union (a CIDR or "default") fails once per member; the value error is the one that explains.
        explained = {_doc_path(e["loc"]) for e in errors if e["type"] == "value_error"}
        problems += [
            at(_doc_path(err["loc"]), _pydantic_message(err))
            for err in errors
            if (not problems or err["type"] == "value_error")
            and (err["type"] == "value_error" or _doc_path(err["loc"]) not in explained)
        ]
        raise IntentError(_dedupe(problems))
    findings = semantics.check(intent)
    if findings:
        raise IntentError(_dedupe([at(path, _related(message, filename, positions)) for path, message in findings]))
    return LoadedIntent(intent=intent, path=filename, text=text)


def _related(message: str, filename: str, positions: Positions) -> str:
    """A finding's message with the other nodes it names (semantics.Related) at FILE:LINE:COL."""
    if not isinstance(message, semantics.Related):
        return message
    return message.template.format(*(f"{filename}:{line}:{column}"
                                     for line, column in map(positions.locate, message.paths)))


def load_file(path: str | FsPath) -> LoadedIntent:
    """Read and check an intent file."""
    name = str(path)
    return parse_text(_read_file(name), name)


def read_intent_bytes(path: str) -> bytes:
    """The file's bytes, at most MAX_FILE_BYTES + 1 of them: a file that holds more (a link to /dev/zero) is read
    no further, and parse_text refuses its text as too large. Raises OSError."""
    with open(path, "rb") as stream:
        return stream.read(MAX_FILE_BYTES + 1)


def _read_bounded(path: str) -> str:
    """The file's text, refused beyond MAX_FILE_BYTES without reading further."""
    data = read_intent_bytes(path)
    if len(data) > MAX_FILE_BYTES:
        raise IntentError([Problem(path, 1, 1, _too_large("bytes"))])
    # Line ends as a text-mode read gives them (universal newlines).
    return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


# ------------------------------------------------------------------ many intents
STDIN = "-"
STDIN_NAME = "<stdin>"
INTENT_SUFFIXES = (".yaml", ".yml")

# A line holding a document marker (`---` or `...`): only then can a file hold several documents. YAML
# forbids these at the start of a line inside any scalar, so the test has no false negatives.
_MARKER = re.compile(r"(?:^|[\r\n\x85\u2028\u2029])(?:---|\.\.\.)(?=[ \t\r\n\x85\u2028\u2029]|$)")
# The line breaks libyaml counts lines by.
_BREAK = re.compile(r"\r\n|[\r\n\x85\u2028\u2029]")


def expand_inputs(paths: Sequence[str]) -> list[str | Problem]:
    """The files `paths` name, in order: a directory gives its `*.yaml`/`*.yml` files sorted by name (not
    recursive; hidden entries, such as the `..data` directories and `..2024_...` links of a mounted
    ConfigMap, are skipped, as kubectl and netplan do); `-` is stdin. A path that gives nothing is a Problem.
    The same file named twice (a directory and one of its files) is read once."""
    result: list[str | Problem] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        real = os.path.realpath(name)
        if real not in seen:
            seen.add(real)
            result.append(name)

    stdin_seen = False
    for path in paths:
        if path == STDIN:
            if stdin_seen:
                result.append(Problem(STDIN_NAME, 1, 1, "stdin ('-') is given twice: it can be read once"))
            else:
                result.append(STDIN)
            stdin_seen = True
            continue
        if os.path.isdir(path):
            try:
                entries = sorted(os.scandir(path), key=lambda e: e.name)
            except OSError as exc:
                result.append(Problem(path, 1, 1, f"cannot list the directory: {exc.strerror or exc}"))
                continue
            files = [e for e in entries if not e.name.startswith(".") and e.name.endswith(INTENT_SUFFIXES)
                     and e.is_file()]  # follows symlinks, as ConfigMap mounts need
            if not files:
                result.append(Problem(path, 1, 1, "the directory holds no intent files (*.yaml, *.yml)"))
            for entry in files:
                add(os.path.join(path, entry.name))
            continue
        add(path)
    return result


def split_documents(text: str) -> list[str]:
    """The documents of a YAML stream, each padded with empty lines to where it starts in `text`, so that
    each parses on its own with its line numbers in the whole file. Empty documents (a lone `---`) are
    left out. A syntax error ends the scan: the rest of the text is one piece, whose parse reports it."""
    if not _MARKER.search(text):
        return [text] if text.strip() else []
    starts: list[int] = []  # first line of each document
    empty: set[int] = set()
    floor = 0  # the first line the next document can start on: after an explicit end (`...`)
    completed = 0
    try:
        pending = None
        for event in yaml.parse(text, Loader=_FastLoader):
            if isinstance(event, yaml.DocumentStartEvent):
                pending = max(event.start_mark.line, floor)
                starts.append(pending)
            elif isinstance(event, yaml.ScalarEvent) and pending is not None:
                # A document that is only an empty plain scalar is empty (`---` followed by nothing).
                if event.value == "" and event.tag is None and event.style in (None, "") and event.implicit[0]:
                    empty.add(len(starts) - 1)
                pending = None
            elif isinstance(event, yaml.DocumentEndEvent):
                pending = None
                completed += 1
                floor = event.end_mark.line + 1 if event.explicit else event.end_mark.line
            elif pending is not None:
                pending = None
    except yaml.YAMLError:
        # The rest of the text, from the end of the last complete document, is one piece.
        starts = [*starts[:completed], floor]
        empty.discard(completed)
    offsets = [0] + [m.end() for m in _BREAK.finditer(text)]
    pieces = []
    for index, line in enumerate(starts):
        if index in empty:
            continue
        end = offsets[starts[index + 1]] if index + 1 < len(starts) else len(text)
        pieces.append("\n" * line + text[offsets[line]:end])
    return pieces


def _read(name: str, stdin: Callable[[], str]) -> tuple[str, str]:
    """(the name positions are reported with, the text); raises IntentError when it cannot be read."""
    if name == STDIN:
        try:
            return STDIN_NAME, stdin()
        except (OSError, UnicodeDecodeError) as exc:
            raise IntentError([Problem(STDIN_NAME, 1, 1, f"cannot read stdin: {exc}")]) from None
    return name, _read_file(name)


def _read_file(name: str) -> str:
    try:
        return _read_bounded(name)
    except OSError as exc:
        raise IntentError([Problem(name, 1, 1, f"cannot read the file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise IntentError([Problem(name, 1, 1, f"the file is not UTF-8 text: {exc.reason}")]) from None


def collect_inputs(paths: Sequence[str], stdin: Callable[[], str] | None = None
                   ) -> tuple[list[LoadedIntent], list[Problem]]:
    """Every intent the inputs hold, in input order, and every problem of those that are wrong.

    Inputs are files, directories (see expand_inputs) and `-` for stdin; a file may hold several
    documents separated by `---`, each an intent whose problems are reported at FILE:LINE:COL with
    lines counted in the whole file. Two intents with the same metadata.name are a problem at the
    second naming the first: the name is what owns kernel objects (the nft table kernform-<name>).
    Pure apart from reading the inputs."""
    read_stdin = stdin if stdin is not None else functools.partial(sys.stdin.read, MAX_FILE_BYTES + 1)
    loaded: list[LoadedIntent] = []
    problems: list[Problem] = []
    for item in expand_inputs(paths):
        if isinstance(item, Problem):
            problems.append(item)
            continue
        try:
            name, text = _read(item, read_stdin)
        except IntentError as exc:
            problems += exc.problems
            continue
        documents = split_documents(text)
        if not documents:
            problems.append(Problem(name, 1, 1, "the file is empty: expected a NetworkIntent document"))
        for document in documents:
            try:
                loaded.append(parse_text(document, name))
            except IntentError as exc:
                problems += exc.problems
    first: dict[str, LoadedIntent] = {}
    for intent in loaded:
        name = intent.intent.metadata.name
        earlier = first.setdefault(name, intent)
        if earlier is not intent:
            problems += intent.problems_at([(("metadata", "name"), (
                f"intent {name!r} is also defined at {earlier.where(('metadata', 'name'))}: an intent's name owns "
                f"its kernel objects (nft table kernform-{name}, pins /sys/fs/bpf/kernform/{name}), so names "
                "must be unique across the inputs"))])
    return loaded, problems


def load_inputs(paths: Sequence[str], stdin: Callable[[], str] | None = None) -> list[LoadedIntent]:
    """Every intent the inputs hold, in input order (see collect_inputs); raises IntentError with every
    problem of every input at once."""
    loaded, problems = collect_inputs(paths, stdin)
    if problems:
        raise IntentError(problems)
    return loaded


def _dedupe(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


def _shorten(message: str, limit: int = 400) -> str:
    """A message that quotes a huge value (a 10 MB string) quotes its start and its end."""
    if len(message) <= limit:
        return message
    return f"{message[:limit // 2]} ... {message[-limit // 2:]}"


def _schema_errors(errors: Iterable[jsonschema.ValidationError]) -> Iterator[jsonschema.ValidationError]:
    """The errors, each union (`FilterChain | null`, `int | str`) that failed replaced by the errors of its one
    member of the value's type, when there is one: `stateful: "yes"` is wrong in `input.stateful`, not in
    `input`."""
    for error in errors:
        if error.validator not in ("anyOf", "oneOf") or not error.context:
            yield error
            continue
        by_member: dict[Any, list[jsonschema.ValidationError]] = {}
        for sub in error.context:
            by_member.setdefault(sub.relative_schema_path[0], []).append(sub)
        # A member the value is not even of the type of has one error, on `type`, at the value itself.
        fitting = [subs for subs in by_member.values()
                   if not (len(subs) == 1 and subs[0].validator == "type" and not subs[0].relative_path)]
        if len(fitting) == 1:
            yield from _schema_errors(fitting[0])
        else:
            yield error


def _schema_problems(error: jsonschema.ValidationError) -> Iterator[tuple[DocPath, str]]:
    """(where, what) of one schema error: an unknown key each at its own position, with the known key it
    probably meant; a value outside a list of choices with the choice it probably meant."""
    path: DocPath = tuple(error.absolute_path)
    where = ".".join(str(p) for p in path) or "document"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        extra = [key for key in error.instance if key not in allowed]
        for key in extra:
            yield (*path, key), (f"{where}: unknown key {key!r}{_did_you_mean(str(key), allowed)} (known here: "
                                 f"{', '.join(allowed)})")
        if extra:
            return
    if error.validator == "enum" and isinstance(error.instance, str):
        choices = [c for c in error.validator_value if isinstance(c, str)]
        yield path, f"{where}: {error.message}{_did_you_mean(error.instance, choices)}"
        return
    yield path, _schema_message(error)


def _did_you_mean(given: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(given, known, n=1, cutoff=0.6)
    return f": did you mean {close[0]!r}?" if close else ""


def _schema_message(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "document"
    if error.validator == "additionalProperties":
        return f"{where}: {error.message}"
    if error.validator in ("anyOf", "oneOf") and error.context:
        reasons = sorted({c.message for c in error.context})
        return f"{where}: {_shorten(json.dumps(error.instance), 120)} is not valid here ({'; '.join(reasons[:3])})"
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
