"""`qkd-deploy methods`: every registered method, its description and its config fields."""

from __future__ import annotations

import argparse
import dataclasses
import json

from qkd_deploy.distill import METHODS


def describe() -> list[dict]:
    """One entry per method: name, description, teachers it takes (at least, at most: None for
    any number), data-free, whether it can distil the float student too (``--float-method``),
    option defaults."""
    entries = []
    for name in sorted(METHODS):
        cls = METHODS[name]
        entries.append(
            {
                "name": name,
                "description": cls.description,
                "needs_teachers": cls.needs_teachers,
                "max_teachers": cls.max_teachers,
                "default_teachers": list(cls.default_teachers) if cls.needs_teachers else [],
                "data_free": cls.data_free,
                "distils_float": cls.distils_float,
                "options": dataclasses.asdict(cls.Options()),
            }
        )
    return entries


def _teacher_count(least: int, most: int | None) -> str:
    if not least:
        return "no teacher"
    if least == most:
        return f"{least} teacher" + ("s" if least > 1 else "")
    return f"{least}+ teacher(s)" if most is None else f"{least}-{most} teachers"


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
        teachers = _teacher_count(e["needs_teachers"], e["max_teachers"])
        flags = ", data-free" if e["data_free"] else ""
        if e["distils_float"] and e["needs_teachers"]:
            flags += ", also as --float-method"
        print(f"{e['name']:<14} {e['description']} ({teachers}{flags})")
        for key, value in e["options"].items():
            print(f"{'':<16}method_options.{key} = {value!r}")
    return 0
