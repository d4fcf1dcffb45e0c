"""yaml.load for large intent files, without handing their long lists to the YAML parser.

The daemon re-reads its intent file on every save, and the reload latency is what
an operator waits for. For a 10,000-element intent (233 KB) libyaml and PyYAML's
constructor take ~60 ms, nearly all of it building 10,000 scalars one Python call
at a time. Yet such a file is mostly long runs of simple list items, and two saves
differ in a handful of them.

So `load` finds those runs with regexes (C speed), replaces each with a single
placeholder item, parses the small skeleton left, and splices each run's values
in place of its placeholder. Values come from memos kept across calls (item text
-> value, and for flow sequences also line -> values): only items never seen
before are parsed, in one batch per run, by the caller's loader (same type
resolution, same duplicate-key check).

The result is exactly yaml.load's. A run is only taken when its items are plain
scalars (or, in a block sequence, one-line mappings) whose meaning cannot depend
on their neighbours, and every placeholder must come back as exactly one list
element, which proves that its run stood where a list's items stand (not in a
comment, a quoted or block scalar, a tag, a key...). Anything else, including
every error, is settled by parsing the original text, so the caller gets
yaml.load's own result or exception.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from itertools import chain, repeat
from typing import Any

import yaml

# Shorter lists are cheap for libyaml; a run must save more than it costs.
_MIN_ITEMS = 32
# A memo above this size is emptied: ten times the items of a 10,000-element intent.
_MEMO_LIMIT = 200_000

# Anything that makes an item more than a plain scalar: comments, quotes, anchors,
# aliases, tags, block scalars, directives, reserved and complex-key indicators,
# nested collections; tabs, whose meaning depends on the context; a BOM.
_SPECIAL = re.escape("#'\"&*!|>%@\\`?{}[]\t\r\ufeff")

# A flow sequence with no nested collection and nothing special inside.
_FLOW_RUN = re.compile(rf"\[([^{_SPECIAL}]*)\]")
# What would make a flow item other than a plain scalar, searched in "," + content:
# an item starting with ':' (a mapping) or made of a lone '-' (a block entry); ':'
# as a mapping indicator; text at column 0 (where '---' and '...' end documents).
# Each pattern starts with a literal, which the regex engine skips to quickly.
_ITEM_START_UNFIT = re.compile(r",[ \n]*(?::|-(?:[ \n,]|\Z))")
_COLON_UNFIT = re.compile(r":(?:[ \n,]|\Z)")
_COLUMN_0 = re.compile(r"\n[^ \n]")
_PREFIX = re.compile(r"[0-9A-Fa-f.:]+/[0-9]{1,3}")

# One line of a block-sequence item: a plain scalar, possibly `key: value`, that
# starts neither a nested sequence nor an empty item.
_BLOCK_PLAIN = rf"(?:[^\s{_SPECIAL}:-]|[:-][^\s{_SPECIAL}])[^\n{_SPECIAL}]*+"
# An item: a one-line flow mapping, or such a line followed by more of them
# exactly two columns deeper (the further keys of a block mapping item). \1 is
# the indentation of the "- ", captured by _BLOCK_RUN.
_BLOCK_ITEM = rf"- (?:\{{[^\n{_SPECIAL}]*+\}} *+|{_BLOCK_PLAIN}$(?:\n\1  {_BLOCK_PLAIN}$)*+)$"
# Consecutive such items at the same indentation. The leading newline gives the
# regex engine a literal to skip to: scanning is then several times faster.
_BLOCK_RUN = re.compile(rf"\n( *){_BLOCK_ITEM}(?:\n\1{_BLOCK_ITEM}){{{_MIN_ITEMS - 1},}}", re.M)
# The first line with content after a block run: its indentation and first character.
_NEXT_LINE = re.compile(r"\n(?: *\n)*( *)(.?)")

# Line breaks that libyaml knows and the regexes above do not.
_ODD_BREAKS = ("\r", "\x85", "\u2028", "\u2029")

_SCALAR_TYPES = frozenset({str, int, float, bool, type(None), date, datetime})

# Per (loader, kind), one of:
#   "flow item":  a flow item without the whitespace around it -> its value;
#   "flow line":  a flow run's text between ",\n" breaks -> the tuple of its items' values;
#   "block item at N": the text of an item of a block sequence at column N, after
#   its "- " (continuation lines included) -> its value.
# Values are pure functions of their keys, so the memos need no lock: a call that
# finds a key gone (another thread emptied a memo) falls back, still exact.
_memos: dict[tuple[type, str], dict[str, Any]] = {}


class _Unfit(Exception):
    """The text is left to yaml.load."""


@dataclass(frozen=True)
class _Run:
    start: int
    end: int
    stand_in: str  # what replaces text[start:end], with {} for the placeholder
    units: list[str]  # flow: the lines of the sequence's content; block: the items' text
    indent: str | None  # block: the indentation of the items' "- "; flow: None


def load(text: str, loader: type) -> Any:
    """Exactly what yaml.load(text, Loader=loader) returns (equal data), or raises like it."""
    # Whatever stops the fast path (a run that proves unfit, an error in the
    # skeleton or in a batch, anything unforeseen), the plain parse decides and
    # raises yaml.load's own exception if there is one.
    with contextlib.suppress(Exception):
        return _spliced(text, loader)
    return yaml.load(text, Loader=loader)  # noqa: S506 - the caller's (safe) loader


def _spliced(text: str, loader: type) -> Any:
    if any(map(text.__contains__, _ODD_BREAKS)):
        raise _Unfit
    runs = _runs(text)
    if not runs:
        raise _Unfit  # nothing to gain
    prefix = f"__kf_splice_{secrets.token_hex(8)}_"
    while prefix in text:
        prefix = f"__kf_splice_{secrets.token_hex(8)}_"
    placeholders = {f"{prefix}{k}__": k for k in range(len(runs))}
    pieces = []
    position = 0
    for run, placeholder in zip(runs, placeholders, strict=True):
        pieces += [text[position:run.start], run.stand_in.format(placeholder)]
        position = run.end
    pieces.append(text[position:])
    document = yaml.load("".join(pieces), Loader=loader)  # noqa: S506 - the caller's (safe) loader
    found = _placeholders_in(document, placeholders)
    if sorted(k for _, _, k in found) != list(range(len(runs))):
        raise _Unfit  # a placeholder missing or repeated: its run was not a list's items
    values = [_flow_values(run.units, loader) if run.indent is None else _block_values(run.units, run.indent, loader)
              for run in runs]
    # From the last index down, so that splicing never moves a placeholder still to come.
    for node, index, k in sorted(found, key=lambda f: f[1], reverse=True):
        node[index:index + 1] = values[k]
    return document


def _runs(text: str) -> list[_Run]:
    """Every run worth splicing, in text order, none overlapping another."""
    runs: list[_Run] = []
    for run in sorted([*_flow_runs(text), *_block_runs(text)], key=lambda r: r.start):
        if not runs or run.start >= runs[-1].end:
            runs.append(run)
    return runs


def _flow_runs(text: str) -> Iterator[_Run]:
    for match in _FLOW_RUN.finditer(text):
        content = match[1]
        if content.count(",") < _MIN_ITEMS - 1 or _COLUMN_0.search(content):
            continue
        # The costlier searches only when the characters they look for are there.
        if (":" in content or "-" in content) and _ITEM_START_UNFIT.search("," + content):
            continue
        if ":" in content and _COLON_UNFIT.search(content):
            continue
        body = content.rstrip(" \n")
        if body.endswith(","):
            body = body[:-1]  # a trailing comma closes a flow sequence without adding an item
        # Lines are memoised whole: an edit leaves most of them as they were.
        yield _Run(match.start(), match.end(), "[{}]", body.split(",\n"), indent=None)


def _block_runs(text: str) -> Iterator[_Run]:
    padded = "\n" + text
    for match in _BLOCK_RUN.finditer(padded):
        indent = match[1]
        start, end = match.start(), match.end() - 1  # offsets in text
        item_start = "\n" + indent + "- "
        after = _NEXT_LINE.match(padded, match.end())
        if after and after[2] and (len(after[1]) > len(indent) or after[2] == "\t"):
            # A deeper line after the run continues its last item (a multi-line
            # scalar, a nested collection...): leave that item to the parser.
            end = text.rindex(item_start, start, end)
        items = text[start + len(item_start) - 1:end].split(item_start)
        if len(items) >= _MIN_ITEMS:
            yield _Run(start, end, indent + "- {}", items, indent)


def _placeholders_in(document: Any, placeholders: dict[str, int]) -> list[tuple[list[Any], int, int]]:
    """(list, index, run) of each placeholder standing as a list element."""
    found = []
    seen: set[int] = set()
    stack = [document]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue  # an alias: the same object, already searched
        seen.add(id(node))
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for index, child in enumerate(children):
            if isinstance(child, dict | list):
                stack.append(child)
            elif type(child) is str and isinstance(node, list) and child in placeholders:
                found.append((node, index, placeholders[child]))
    return found


def _flow_values(lines: list[str], loader: type) -> list[Any]:
    """A flow run's values. They are scalars, immutable: results may share them."""
    line_memo = _memo(loader, "flow line")
    new_lines = set(lines).difference(line_memo)
    if new_lines:
        # Whitespace around a flow item never changes its value: leaving it out of
        # the key keeps the memo useful when an edit re-wraps the lines. A line of
        # one item (a long list written one per line) is the common case: no split.
        singles = {line: line.strip(" \n") for line in new_lines if "," not in line}
        items = {line: list(map(str.strip, line.split(","), repeat(" \n"))) for line in new_lines
                 if line not in singles}
        keys = [*singles.values(), *chain.from_iterable(items.values())]
        if "" in keys:
            raise _Unfit  # an empty item: an error for the parser to report
        item_memo = _memo(loader, "flow item")
        # An address with a prefix length is a string under every schema (no number, boolean or null, in
        # YAML 1.2 or 1.1, contains a '/'): a blocklist's CIDRs need no parser at all.
        prefix = _PREFIX.fullmatch
        item_memo.update((key, key) for key in keys if prefix(key) and key not in item_memo)
        _parse_missing(keys, item_memo, lambda batch: "[" + ", ".join(batch) + "]", _is_scalar, loader)
        value = item_memo.__getitem__
        line_memo.update(zip(singles, zip(map(value, singles.values())), strict=True))
        line_memo.update((line, tuple(map(value, keys))) for line, keys in items.items())
    return list(chain.from_iterable(map(line_memo.__getitem__, lines)))


def _block_values(items: list[str], indent: str, loader: type) -> list[Any]:
    """A block run's values; mappings are copied, so that the memo's stay as parsed."""
    memo = _memo(loader, f"block item at {len(indent)}")
    item_start = indent + "- "
    _parse_missing(items, memo, lambda batch: item_start + f"\n{item_start}".join(batch), _memoisable, loader)
    values = list(map(memo.__getitem__, items))
    types = set(map(type, values))
    if dict not in types:
        return values
    if types == {dict}:
        return list(map(dict.copy, values))
    return [value.copy() if type(value) is dict else value for value in values]


def _memo(loader: type, kind: str) -> dict[str, Any]:
    memo = _memos.setdefault((loader, kind), {})
    if len(memo) > _MEMO_LIMIT:
        memo.clear()
    return memo


def _parse_missing(keys: list[str], memo: dict[str, Any], document: Callable[[list[str]], str],
                   simple: Callable[[Any], bool], loader: type) -> None:
    """Parse the keys missing from the memo, all in one document, and memoise their values."""
    missing = list(set(keys).difference(memo))
    if not missing:
        return
    values = yaml.load(document(missing), Loader=loader)  # noqa: S506 - the caller's (safe) loader
    if not isinstance(values, list) or len(values) != len(missing) or not all(map(simple, values)):
        raise _Unfit
    memo.update(zip(missing, values, strict=True))


def _is_scalar(value: Any) -> bool:
    return type(value) in _SCALAR_TYPES


def _memoisable(value: Any) -> bool:
    """A scalar, or a mapping of scalars (all a block item taken here can be): a shallow copy is a full copy."""
    if type(value) is dict:
        return all(map(_is_scalar, [*value, *value.values()]))
    return _is_scalar(value)
