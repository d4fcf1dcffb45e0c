"""A saved plan: `kernform plan --out FILE` writes one, `kernform apply FILE` applies exactly it.

What gets reviewed (in a pull request, or by someone about to apply by hand)
is what gets applied, as Terraform's `plan -out` / `apply PLANFILE`: the file
holds each intent's text as it was planned, the sha256 of every input file it
came from, the target and the backend override, and each intent's plan
(formatVersion 1, schemas/plan.schema.json). Applying it reads the intents
from the saved texts, refuses when an input file no longer has the planned
content ("the file changed since the plan"), plans again against the kernel
and refuses unless that plan is the saved one action for action ("the kernel
changed since the plan": the kernel is what decides what an apply does, and
the only honest check of it is to read it again).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.errors import KernformError
from compiler.loader import STDIN_NAME, LoadedIntent, parse_text, read_intent_bytes

KIND = "kernform-saved-plan"
FORMAT_VERSION = 1
# A saved plan is JSON that starts with this (the writer puts "kind" first), so telling one from an
# intent needs no more than a peek at the file's first bytes.
_PREFIX = '{\n  "kind": "' + KIND + '"'


class StalePlan(KernformError):
    """The saved plan no longer describes what an apply would do; nothing was changed."""


@dataclass(frozen=True)
class SavedPlan:
    path: str
    netns: str | None
    backend: str | None
    inputs: dict[str, str]  # input file -> sha256 of its bytes when planned (stdin is not checked)
    intents: tuple[tuple[str, str], ...]  # (path, document text) per intent, in input order
    plans: dict[str, dict[str, Any]]  # intent name -> its formatVersion 1 plan

    def loaded(self) -> list[LoadedIntent]:
        """The intents as they were planned (their saved texts, parsed again)."""
        return [parse_text(text, path) for path, text in self.intents]

    def check_inputs(self) -> None:
        """Refuse when an input file's content is not what was planned."""
        for name, digest in self.inputs.items():
            try:
                now = _sha256(read_intent_bytes(name))
            except OSError as exc:
                raise StalePlan(f"the saved plan {self.path} was made from {name}, which cannot be read now "
                                f"({exc.strerror}); nothing was applied: run `kernform plan` again") from None
            if now != digest:
                raise StalePlan(f"{name} changed since the plan {self.path} was made; nothing was applied: "
                                "run `kernform plan` again and review the new plan")

    def check_plan(self, name: str, plan: dict[str, Any], target: str) -> None:
        """Refuse when the plan made now for intent `name` is not the saved one."""
        saved = self.plans.get(name)
        if saved is None:
            raise StalePlan(f"the saved plan {self.path} has no plan for intent {name}")
        if saved["actions"] != plan["actions"]:
            raise StalePlan(
                f"the kernel changed since the plan {self.path} was made: on {target}, intent {name} now needs "
                f"{_summary(plan)} where the saved plan has {_summary(saved)}; nothing was applied: run "
                "`kernform plan` again and review the new plan")


def _summary(plan: dict[str, Any]) -> str:
    counts = {"add": 0, "change": 0, "remove": 0}
    for action in plan["actions"]:
        counts[action["op"]] += 1
    return f"{counts['add']} to add, {counts['change']} to change, {counts['remove']} to remove"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dumps(netns: str | None, backend: str | None, loaded: list[LoadedIntent],
          plans: list[dict[str, Any]], version: str) -> str:
    """The saved plan of `loaded` (in input order) with their `plans`, as text to write."""
    inputs = {}
    for item in loaded:
        if item.path != STDIN_NAME and item.path not in inputs:
            inputs[item.path] = _sha256(read_intent_bytes(item.path))
    document = {
        "kind": KIND,
        "formatVersion": FORMAT_VERSION,
        "kernform": version,
        "netns": netns,
        "backend": backend,
        "inputs": inputs,
        "intents": [{"path": item.path, "text": item.text, "plan": plan}
                    for item, plan in zip(loaded, plans, strict=True)],
    }
    return json.dumps(document, indent=2) + "\n"


def is_saved_plan(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(len(_PREFIX)) == _PREFIX
    except OSError:
        return False


def load(path: str) -> SavedPlan:
    try:
        document = json.loads(Path(path).read_text())
        if document.get("kind") != KIND or document.get("formatVersion") != FORMAT_VERSION:
            raise ValueError(f"not a formatVersion {FORMAT_VERSION} saved plan")
        intents = tuple((str(i["path"]), str(i["text"])) for i in document["intents"])
        plans = {str(i["plan"]["intent"]): i["plan"] for i in document["intents"]}
        return SavedPlan(path, document["netns"], document["backend"], dict(document["inputs"]), intents, plans)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KernformError(f"{path}: cannot read the saved plan: {exc}") from None
