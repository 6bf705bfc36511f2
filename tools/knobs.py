"""Module-level knobs named on a tool's command line: ``dotted.module.ATTR=VALUE`` or ``dotted.module.DICT[KEY]=VALUE``
(VALUE a Python literal, else a string), resolved against what they name so that a misspelt knob is an error and
never silently measures the defaults. ``tools/benchmark.py --variant`` and ``tools/kernel_sass.py --set`` use them."""
from __future__ import annotations

import argparse
import ast
import importlib
import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, List, Tuple

# a spec's start, so that a comma inside a value (a tuple) does not split it
SPEC_SEP = r",(?=\s*[A-Za-z_][\w.]*(?:\[[^\]]*\])?=)"
_SPEC = re.compile(r"\s*(?P<path>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\[(?P<key>[^\]]+)\])?=(?P<value>.*)", re.S)


@dataclass
class Knob:
    """One resolved SPEC: ``owner.key = value``, or ``owner[key] = value`` for a dict knob (``item``)."""
    spec: str
    owner: Any
    key: Any
    value: Any
    item: bool

    def get(self) -> Any:
        return self.owner[self.key] if self.item else getattr(self.owner, self.key)

    def set(self, value: Any) -> None:
        if self.item:
            self.owner[self.key] = value
        else:
            setattr(self.owner, self.key, value)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError):  # a bare word such as accumulate
        return text


def _import_prefix(parts: List[str], spec: str, option: str) -> Tuple[Any, int]:
    """The module of the longest importable prefix of ``parts`` (at least one part is left for the
    attribute) and that prefix's length."""
    for i in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:i])
        try:
            return importlib.import_module(name), i
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise SystemExit(f"{option} {spec!r}: importing {name} failed: {e}") from e
        except Exception as e:  # noqa: BLE001  (the module exists but does not import)
            raise SystemExit(f"{option} {spec!r}: importing {name} failed: {type(e).__name__}: {e}") from e
    raise SystemExit(f"{option} {spec!r}: no importable module in {'.'.join(parts)!r}")


def resolve_knob(spec: str, option: str = "--variant") -> Knob:
    """``spec`` checked against what it names: a knob that does not exist is an error, never created,
    as a misspelt knob would otherwise time the defaults under a variant's name."""
    m = _SPEC.fullmatch(spec)
    if m is None:
        raise SystemExit(f"{option} {spec!r}: expected dotted.module.ATTR=VALUE or dotted.module.DICT[KEY]=VALUE")
    parts = m["path"].split(".")
    owner, i = _import_prefix(parts, spec, option)
    for j in range(i, len(parts)):
        if not hasattr(owner, parts[j]):
            raise SystemExit(f"{option} {spec!r}: {'.'.join(parts[:j])} has no attribute {parts[j]!r}")
        if j < len(parts) - 1 or m["key"] is not None:
            owner = getattr(owner, parts[j])
    value = _literal(m["value"])
    if m["key"] is None:
        return Knob(spec, owner, parts[-1], value, item=False)
    if not isinstance(owner, MutableMapping):
        raise SystemExit(f"{option} {spec!r}: {m['path']} is a {type(owner).__name__}, not a dict")
    key = _literal(m["key"])
    if key not in owner:
        raise SystemExit(f"{option} {spec!r}: {key!r} is not a key of {m['path']} ({', '.join(map(str, owner))})")
    return Knob(spec, owner, key, value, item=True)


def add_set_option(p: argparse.ArgumentParser, what: str) -> None:
    """The repeatable ``--set SPEC`` option of a tool whose ``what`` takes knobs (resolve each with ``resolve_knob``)."""
    p.add_argument("--set", action="append", default=[], metavar="SPEC",
                   help=f"repeatable: a kernel knob set for {what}, dotted.module.ATTR=VALUE or "
                        "dotted.module.DICT[KEY]=VALUE, as tools/benchmark.py --variant takes them")
