"""One YAML meaning for intent files: the YAML 1.2 core schema, on the fast and the error path alike.

libyaml (through PyYAML) parses every intent file, but PyYAML resolves plain
scalars by YAML 1.1 rules, which an editor's YAML 1.2 language server and most
other tools do not share: `0100` is 64 in YAML 1.1 and 100 in YAML 1.2, `on` is
true or the string "on", `1:30` is 90 or "1:30". A file must mean one thing to
every reader, so the rules here are YAML 1.2's core schema, narrowed:

- integers are decimal without leading zeros (`80`, `-1`); floats are YAML 1.2's
  when YAML 1.1 reads them as the same float; booleans are only true/false
  (True, TRUE, ...); null is null/Null/NULL/~ or nothing;
- a plain scalar that YAML 1.1 and YAML 1.2 read differently (leading zeros,
  hexadecimal, octal, binary, base 60, `_` in numbers, dates, yes/no/on/off/y/n,
  the merge key `<<`, `=`) is refused at its position, with both readings. A
  hexadecimal number is taken only where the language writes marks (the value
  of a `fwmark` key, the items of a `marks` list), as its text: both YAML
  readings and the mark's own syntax then agree;
- no explicit tags (`!!binary`, `!!set`, `!!int "x"`, `!foo`), no `%YAML`
  directive other than 1.2, no control characters (comments included), no
  YAML 1.1 line breaks (NEL, LS, PS), no byte order mark after the first
  character;
- nesting at most MAX_DEPTH deep, anchors and aliases expanding the document
  by at most MAX_ALIAS_NODES nodes (a "billion laughs" file is refused when its
  aliases pass the bound, not after it has filled the memory), no alias inside
  its own anchor, no duplicate keys, no key that is a collection.

Two readers share these rules. `StrictLoader` is a PyYAML C loader for the
fast path (compiler.fastyaml): its resolver tags scalars with tags of its own,
so an explicit tag, or a scalar it refuses, finds no constructor and the load
fails. `read` walks libyaml's events for the error path: the same data, the
line and column of every node (Positions) and every refusal at its position.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

# Nesting an intent needs is about 8 levels; libyaml itself stops at 1000.
MAX_DEPTH = 64
# Nodes that aliases may add to a document (an alias adds the nodes of its anchor).
MAX_ALIAS_NODES = 100_000
# Refusals listed at once; the reader stops after that many.
MAX_PROBLEMS = 100
# No number an intent takes has more digits (Python refuses to convert more than 4300).
MAX_DIGITS = 40

# The loader's own tags: no file can spell them, so an explicit tag never finds a constructor.
_PREFIX = "tag:kernform.dev,2024:"
STR, INT, FLOAT, BOOL, NULL, SEQ, MAP = (_PREFIX + t for t in ("str", "int", "float", "bool", "null", "seq", "map"))
# Refused readings: a scalar YAML 1.1 and 1.2 read differently; a hexadecimal number (taken as text in marks).
AMBIGUOUS, HEX = _PREFIX + "yaml-1.1", _PREFIX + "hex"
# A `!` (non-specific) tag on a collection.
TAGGED = _PREFIX + "tagged"

_WORDS: dict[str, str] = {
    **dict.fromkeys(("true", "True", "TRUE", "false", "False", "FALSE"), BOOL),
    **dict.fromkeys(("null", "Null", "NULL", "~", ""), NULL),
    **dict.fromkeys((f"{sign}.{word}" for sign in ("", "+", "-") for word in ("inf", "Inf", "INF")), FLOAT),
    **dict.fromkeys((".nan", ".NaN", ".NAN"), FLOAT),
    # YAML 1.1 booleans (y/n included: the 1.1 type repository lists them, PyYAML does not), merge and value keys.
    **dict.fromkeys((w for word in ("y", "yes", "n", "no", "on", "off") for w in (word, word.title(), word.upper())),
                    AMBIGUOUS),
    "<<": AMBIGUOUS,
    "=": AMBIGUOUS,
}
_TRUE = frozenset(("true", "True", "TRUE"))
_YAML11_TRUE = frozenset(w for word in ("y", "yes", "on") for w in (word, word.title(), word.upper()))
_NUMBER_START = frozenset("0123456789+-.")
_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_HEX = re.compile(r"0x[0-9a-fA-F]+")
_OCTAL_12 = re.compile(r"0o[0-7]+")
_FLOAT_12 = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
# PyYAML's YAML 1.1 float: a dot always, an exponent only with a sign.
_FLOAT_11 = re.compile(r"[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?")


# What YAML 1.1 (PyYAML's resolver, whose patterns these are) reads as an int, a float or a date, joined with
# YAML 1.2's octal: a scalar starting like a number that matches is not a string to one of the two readers.
# One pattern, not PyYAML's list: classify runs for every scalar of a 10 MB blocklist.
_NOT_TEXT_TO_ONE = re.compile(r"""
      [-+]?0b[0-1_]+ | [-+]?0[0-7_]+ | [-+]?(?:0|[1-9][0-9_]*) | [-+]?0x[0-9a-fA-F_]+
    | [-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+
    | [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)? | \.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    | [-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]* | [-+]?\.(?:inf|Inf|INF) | \.(?:nan|NaN|NAN)
    | [0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]
    | [0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?(?:[Tt]|[\ \t]+)[0-9][0-9]?:[0-9][0-9]:[0-9][0-9](?:\.[0-9]*)?
      (?:[\ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?
    | 0o[0-7]+
""", re.X)


def classify(value: str) -> str:
    """The tag of a plain scalar: STR, INT, FLOAT, BOOL, NULL, or HEX / AMBIGUOUS (refused, see `refusal`)."""
    tag = _WORDS.get(value)
    if tag is not None:
        return tag
    if value[0] not in _NUMBER_START:
        return STR
    if _INT.fullmatch(value):
        return INT
    if _HEX.fullmatch(value):
        return HEX
    if _FLOAT_12.fullmatch(value):
        return FLOAT if _FLOAT_11.fullmatch(value) else AMBIGUOUS
    if _NOT_TEXT_TO_ONE.fullmatch(value):
        return AMBIGUOUS
    return STR


def construct(tag: str, value: str) -> Any:
    """The value of a scalar `classify` tagged STR, INT, FLOAT, BOOL or NULL; ValueError for a refused one."""
    if tag == STR:
        return value
    if tag == INT:
        if len(value) > MAX_DIGITS:
            raise ValueError(f"{_short(value)}: a number of {len(value)} digits is larger than any an intent takes")
        return int(value)
    if tag == BOOL:
        return value in _TRUE
    if tag == NULL:
        return None
    if tag == FLOAT:
        text = value.lower()
        return math.nan if text == ".nan" else float(text.replace(".inf", "inf"))
    raise ValueError(refusal(value))


def _short(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[:limit - 3] + "..."


def _reading_11(value: str) -> Any:
    """The YAML 1.1 reading of a plain scalar (PyYAML's, with y/n as booleans), or a description of it."""
    if value in _WORDS:
        if value == "<<":
            return _Described("a merge key (the fields of the mapping it names)")
        if value == "=":
            return _Described("the value key")
        return value in _YAML11_TRUE if _WORDS[value] == AMBIGUOUS else construct(_WORDS[value], value)
    loader = yaml.SafeLoader("")
    try:
        tag = loader.resolve(ScalarNode, value, (True, False))
        return loader.construct_object(ScalarNode(tag, value))
    except (ValueError, yaml.YAMLError):
        return _Described("an impossible date")
    finally:
        loader.dispose()


def _reading_12(value: str) -> Any:
    """The YAML 1.2 core schema reading of a plain scalar."""
    if value in _WORDS:
        return value if _WORDS[value] == AMBIGUOUS else construct(_WORDS[value], value)
    if re.fullmatch(r"[-+]?[0-9]+", value):
        return int(value)
    if _OCTAL_12.fullmatch(value):
        return int(value[2:], 8)
    if _HEX.fullmatch(value):
        return int(value[2:], 16)
    if _FLOAT_12.fullmatch(value):
        return float(value)
    return value


@dataclass(frozen=True)
class _Described:
    text: str


def _describe(reading: Any) -> str:
    if isinstance(reading, _Described):
        return reading.text
    if isinstance(reading, bool):
        return f"the boolean {str(reading).lower()}"
    if isinstance(reading, str):
        return f"the string {_short(reading)!r}"
    if reading is None:
        return "null"
    if isinstance(reading, int | float):
        return str(reading)
    return f"the date {reading}"


def _kind(value: str) -> str:
    body = value.lstrip("+-")
    if value in _WORDS:
        return "a merge key" if value == "<<" else "'='" if value == "=" else "a YAML 1.1 boolean"
    if re.fullmatch(r"0[0-9_]+", body):
        return "a number with a leading zero"
    if body.startswith("0x"):
        return "a hexadecimal number"
    if body.startswith("0o"):
        return "an octal number"
    if body.startswith("0b"):
        return "a binary number"
    if ":" in body:
        return "a base 60 number"
    if "_" in body:
        return "a number with '_'"
    if "-" in body:
        return "a date"
    return "a number"


def refusal(value: str) -> str:
    """Why a plain scalar `classify` tags AMBIGUOUS or HEX is refused: both readings, and what to write."""
    shown = _short(value)
    if len(value) > MAX_DIGITS:
        return f"{shown}: a number of {len(value)} characters is larger than any an intent takes"
    if value == "<<":
        return ("<<: a merge key in YAML 1.1 and an ordinary key '<<' in YAML 1.2; write the fields out "
                "(anchors and aliases of whole values are fine)")
    old, new = _reading_11(value), _reading_12(value)
    if _HEX.fullmatch(value):
        return (f"{shown}: a hexadecimal number is {new} in YAML 1.1 and in YAML 1.2's core schema but the "
                f"string {value!r} in its JSON schema, and kernform takes hexadecimal only for marks "
                f"(fwmark, marks); write {new}")
    if isinstance(new, int) and not isinstance(new, bool):
        advice = f"write {new}, or quote it"
    elif isinstance(old, bool):
        advice = f"write {str(old).lower()}, or quote it"
    elif isinstance(old, int):
        advice = f"write {old}, or quote it"
    else:
        advice = "quote it"
    return f"{shown}: {_kind(value)} is {_describe(old)} in YAML 1.1 and {_describe(new)} in YAML 1.2; {advice}"


# Mark-valued keys: their value (fwmark) or items (marks) may be hexadecimal, taken as text.
MARK_KEY = "fwmark"
MARK_LIST_KEY = "marks"


# ------------------------------------------------------------------ the fast path: a PyYAML loader
def _construct_scalar_as(tag: str) -> Any:
    def constructor(loader: Any, node: ScalarNode) -> Any:
        try:
            return construct(tag, node.value)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(None, None, str(exc), node.start_mark) from None

    return constructor


_BASE = yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader


class StrictLoader(_BASE):  # type: ignore[misc,valid-type]
    """libyaml's C parser with the YAML 1.2 reading above: a plain scalar it refuses, an explicit tag, a
    duplicate key or a collection as a key fails the load (the error path, `read`, says where and why)."""

    yaml_constructors: dict[Any, Any] = {}

    def resolve(self, kind: type, value: Any, implicit: Any) -> str:
        if kind is ScalarNode:
            return classify(value) if implicit[0] else STR
        if not implicit:
            return TAGGED
        return SEQ if kind is SequenceNode else MAP

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[str, Any]:
        if not isinstance(node, MappingNode):
            raise yaml.constructor.ConstructorError(None, None, "expected a mapping", node.start_mark)
        mapping: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(None, None, "a key must be a scalar", key_node.start_mark)
            # Keys are names: as text, like the error path's (`80:` and "80": are one key, and a duplicate).
            key = key if type(key) is str else str(key)
            if key in mapping:
                raise yaml.constructor.ConstructorError(None, None, "duplicate key", key_node.start_mark)
            if key == MARK_KEY and value_node.tag == HEX:
                value_node.tag = STR
            elif key == MARK_LIST_KEY and isinstance(value_node, SequenceNode):
                for item in value_node.value:
                    if item.tag == HEX:
                        item.tag = STR
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


def _construct_str(loader: Any, node: ScalarNode) -> str:
    return node.value


StrictLoader.add_constructor(STR, _construct_str)  # nearly every scalar: the shortest way
for _tag in (INT, FLOAT, BOOL, NULL):
    StrictLoader.add_constructor(_tag, _construct_scalar_as(_tag))
StrictLoader.add_constructor(SEQ, yaml.constructor.SafeConstructor.construct_yaml_seq)
StrictLoader.add_constructor(MAP, yaml.constructor.SafeConstructor.construct_yaml_map)
StrictLoader.add_constructor(None, yaml.constructor.SafeConstructor.construct_undefined)


# Characters no intent file holds: YAML's non-printable ones (control characters, surrogates, U+FFFE/FFFF),
# YAML 1.1's extra line breaks (NEL, LS, PS: content in YAML 1.2) and a byte order mark after the start.
_REFUSED_CHARACTER = re.compile("[^\t\n\r\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd"
                                "\U00010000-\U0010ffff]")
# What only the error path reads: anchors, tags and directives (a `!`, `&` or `%` where it would start one).
_SLOW_ONLY = re.compile(r"(?:^|[ \t\[{,])(?:!|&(?![ \t\r\n]|$))|^%", re.M)


def fits_fast_path(text: str) -> bool:
    """Whether the fast path (StrictLoader, no positions) can read `text` exactly as `read` does. Anchors (the
    expansion bound), tags, directives and refused characters are left to `read`."""
    # The substring tests run at memory speed; the regex (7 ms over a 10,000-CIDR file) only when they hit.
    if ("!" in text or "&" in text or "%" in text) and _SLOW_ONLY.search(text) is not None:
        return False
    return _REFUSED_CHARACTER.search(text, 1 if text[:1] == "\ufeff" else 0) is None


# ------------------------------------------------------------------ the error path: events with positions
# A node's position and those of its children: (line, column, children), 1-based; children are a dict
# (mapping keys, each at the key's position) or a list (sequence items), None for a scalar.
Spot = tuple[int, int, Any]


@dataclass(frozen=True)
class Positions:
    """Where each node of a document was written, for error messages."""

    root: Any

    def locate(self, path: tuple[str | int, ...]) -> tuple[int, int]:
        """1-based (line, column) of the deepest node along `path` that exists."""
        children = self.root
        line, column = 1, 1
        for step in path:
            in_mapping = isinstance(children, dict) and isinstance(step, str) and step in children
            in_sequence = isinstance(children, list) and isinstance(step, int) and 0 <= step < len(children)
            if not (in_mapping or in_sequence):
                break
            line, column, children = children[step]
        return line, column


@dataclass(frozen=True)
class Reading:
    """A document as `read` found it: its data (None for an empty one), where each node is, and every
    refusal as (line, column, message). The data is complete only when there are no problems."""

    document: Any
    positions: Positions
    problems: list[tuple[int, int, str]]


class _Stop(Exception):
    """Reading ends here (a syntax error, a bound passed, too many problems)."""


class _Frame:
    __slots__ = ("data", "is_map", "key", "key_at", "list_key", "anchor", "size", "spots", "start")

    def __init__(self, is_map: bool, start: tuple[int, int], anchor: str | None, list_key: Any) -> None:
        self.is_map = is_map
        self.data: Any = {} if is_map else []
        self.spots: Any = {} if is_map else []
        self.key: Any = _NO_KEY  # a mapping's pending key, once read
        self.key_at = (0, 0)
        self.list_key = list_key  # a sequence's key in its parent mapping
        self.anchor = anchor
        self.size = 1
        self.start = start


_NO_KEY = object()
_DROPPED = object()  # the key of a value that is not kept (a duplicate, a collection as a key)


@dataclass
class _Anchor:
    value: Any
    children: Any
    size: int
    hex: bool  # a hexadecimal scalar, taken as text in a mark: refused where an alias puts it elsewhere
    open: bool = False


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.problems: list[tuple[int, int, str]] = []
        self.stack: list[_Frame] = []
        self.anchors: dict[str, _Anchor] = {}
        self.expanded = 0
        self.documents = 0
        self.root: Any = None
        self.root_children: Any = None

    def problem(self, at: tuple[int, int], message: str, fatal: bool = False) -> None:
        self.problems.append((at[0], at[1], message))
        if len(self.problems) >= MAX_PROBLEMS:
            self.problems.append((at[0], at[1], f"reading stops after {MAX_PROBLEMS} problems: fix these first"))
            raise _Stop
        if fatal:
            raise _Stop

    def run(self) -> Reading:
        start = 1 if self.text[:1] == "\ufeff" else 0
        refused = _REFUSED_CHARACTER.search(self.text, start)
        if refused is not None:
            self.problems.append((*_line_column(self.text, refused.start()), self._character_message(refused[0])))
            return self.reading()
        loader = StrictLoader(self.text)
        try:
            while loader.check_event():
                self.event(loader.get_event())
        except _Stop:
            pass
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            at = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
            parts = [p for p in (exc.context, exc.problem) if p]
            self.problems.append((*at, "YAML syntax: " + ("; ".join(parts).replace("\n", " ") or "invalid YAML")))
        except yaml.YAMLError as exc:  # a ReaderError the check above did not foresee
            self.problems.append((1, 1, f"YAML: {exc}".replace("\n", " ")))
        finally:
            loader.dispose()
        return self.reading()

    def reading(self) -> Reading:
        return Reading(self.root, Positions(self.root_children), self.problems)

    def _character_message(self, character: str) -> str:
        count = len(self.text) - len(_REFUSED_CHARACTER.sub("", self.text))
        more = f" ({count - 1} more in the file)" if count > 1 else ""
        code = f"U+{ord(character):04X}"
        if character in "\x85\u2028\u2029":
            what = (f"{code} is a line break in YAML 1.1 and an ordinary character in YAML 1.2; "
                    "break lines with a newline")
        elif character == "\ufeff":
            what = f"{code} (a byte order mark) may only be the first character of a file"
        elif "\ud800" <= character <= "\udfff":
            what = f"{code} is half of a UTF-16 surrogate pair, not a character"
        else:
            what = f"{code} is a control character, which YAML allows nowhere in a file, comments included"
        return what + more

    # ------------------------------------------------------------ events
    def event(self, event: Any) -> None:
        kind = type(event)
        if kind is yaml.ScalarEvent:
            self.scalar(event)
        elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            self.start(event, kind is yaml.MappingStartEvent)
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            self.end()
        elif kind is yaml.AliasEvent:
            self.alias(event)
        elif kind is yaml.DocumentStartEvent:
            self.documents += 1
            at = _at(event.start_mark)
            if self.documents > 1:
                self.problem(at, "YAML syntax: expected a single document in the stream, but found another "
                             "document", fatal=True)
            if event.version is not None and tuple(event.version) != (1, 2):
                version = ".".join(map(str, event.version))
                self.problem(at, f"%YAML {version}: kernform reads YAML 1.2 only; remove the directive")

    def _in_mark(self) -> bool:
        """Whether the next node is a mark: the value of a `fwmark` key, or an item of a `marks` list."""
        if not self.stack:
            return False
        top = self.stack[-1]
        return top.key == MARK_KEY if top.is_map else top.list_key == MARK_LIST_KEY

    def _check_tag(self, tag: str | None, at: tuple[int, int]) -> None:
        if tag is not None:
            self.problem(at, f"the tag {tag}: kernform takes no explicit tags (a value's type is given by how it "
                         "is written; quote a string)")

    def scalar(self, event: Any) -> None:
        at = _at(event.start_mark)
        value: Any = event.value
        is_hex = False
        if event.tag is not None:
            self._check_tag(event.tag, at)
        elif event.implicit[0]:
            tag = classify(value)
            if tag == HEX and self._in_mark():
                is_hex = True
            elif tag in (HEX, AMBIGUOUS):
                self.problem(at, refusal(value))
            else:
                try:
                    value = construct(tag, value)
                except ValueError as exc:
                    self.problem(at, str(exc))
        if event.anchor is not None:
            self.anchors[event.anchor] = _Anchor(value, None, 1, is_hex)
        self.attach(value, at, None, 1)

    def start(self, event: Any, is_map: bool) -> None:
        at = _at(event.start_mark)
        self._check_tag(event.tag, at)
        if len(self.stack) >= MAX_DEPTH:
            self.problem(at, f"nesting deeper than {MAX_DEPTH} levels: no intent goes near that deep", fatal=True)
        parent = self.stack[-1] if self.stack else None
        list_key = parent.key if parent is not None and parent.is_map else None
        frame = _Frame(is_map, at, event.anchor, list_key)
        if event.anchor is not None:
            self.anchors[event.anchor] = _Anchor(None, None, 0, False, open=True)
        self.stack.append(frame)

    def end(self) -> None:
        frame = self.stack.pop()
        if frame.anchor is not None:
            self.anchors[frame.anchor] = _Anchor(frame.data, frame.spots, frame.size, False)
        self.attach(frame.data, frame.start, frame.spots, frame.size)

    def alias(self, event: Any) -> None:
        at = _at(event.start_mark)
        anchor = self.anchors.get(event.anchor)
        if anchor is None:
            self.problem(at, f"YAML syntax: found undefined alias *{event.anchor}", fatal=True)
            return
        if anchor.open:
            self.problem(at, f"the alias *{event.anchor} is inside its own anchor: a document cannot contain itself",
                         fatal=True)
        self.expanded += anchor.size
        if self.expanded > MAX_ALIAS_NODES:
            self.problem(at, f"the aliases up to *{event.anchor} expand the document by more than "
                         f"{MAX_ALIAS_NODES} nodes; write it without anchors and aliases", fatal=True)
        if anchor.hex and not self._in_mark():
            self.problem(at, refusal(anchor.value))
        self.attach(anchor.value, at, anchor.children, anchor.size)

    def attach(self, value: Any, at: tuple[int, int], children: Any, size: int) -> None:
        if not self.stack:
            self.root, self.root_children = value, children
            return
        top = self.stack[-1]
        top.size += size
        if not top.is_map:
            top.data.append(value)
            top.spots.append((*at, children))
            return
        if top.key is _NO_KEY:  # `value` is a key
            if isinstance(value, dict | list):
                self.problem(at, "a key must be a scalar, not a mapping or a sequence")
                top.key = _DROPPED
                return
            key = value if isinstance(value, str) else str(value)
            if key in top.data:
                line, column, _ = top.spots[key]
                self.problem(at, f"duplicate key {_short(key)!r} (first at line {line}, column {column})")
                top.key = _DROPPED
                return
            top.key, top.key_at = key, at
            return
        if top.key is not _DROPPED:
            top.data[top.key] = value
            top.spots[top.key] = (*top.key_at, children)
        top.key = _NO_KEY


def _at(mark: Any) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


def _line_column(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of `text[index]`, lines broken by \\n, \\r\\n or \\r as YAML breaks them."""
    before = text[:index]
    line = before.count("\n") + before.count("\r") - before.count("\r\n") + 1
    start = max(before.rfind("\n"), before.rfind("\r")) + 1
    return line, index - start + 1


def read(text: str) -> Reading:
    """The document in `text` read by the rules above, with positions and refusals (see Reading). Never raises
    for what a file holds: a syntax error is a problem like the others."""
    return _Reader(text).run()
