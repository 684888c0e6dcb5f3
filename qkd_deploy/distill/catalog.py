"""`qkd-deploy methods`: every registered method, its description and its config fields."""

from __future__ import annotations

import argparse
import dataclasses
import json

from qkd_deploy.distill import METHODS


def describe() -> list[dict]:
    """One entry per method: name, description, teachers it needs, data-free, option defaults."""
    entries = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        options = {f.name: _default(f) for f in dataclasses.fields(cls.Options)}
        entries.append(
            {
                "name": name,
                "description": cls.description,
                "needs_teachers": cls.needs_teachers,
                "default_teachers": list(cls.default_teachers) if cls.needs_teachers else [],
                "data_free": cls.data_free,
                "options": options,
            }
        )
    return entries


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qkd-deploy methods", description="list the distillation methods and their options"
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    entries = describe()
    if args.json:
        print(json.dumps(entries, indent=2, default=str))
        return 0
    for e in entries:
        teachers = f"{e['needs_teachers']}+ teacher(s)" if e["needs_teachers"] else "no teacher"
        flags = ", data-free" if e["data_free"] else ""
        print(f"{e['name']:<14} {e['description']} ({teachers}{flags})")
        for key, value in e["options"].items():
            print(f"{'':<16}method_options.{key} = {value!r}")
    return 0
