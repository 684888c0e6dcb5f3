"""The rule registry: ``lint_rule`` registers a check with its severity, source and default fix;
``RULES`` lists them (id -> summary) in registration order, which is the order of the findings
within a severity.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from qkd_deploy.deploy.lint.graph import Graph


class Hit(NamedTuple):
    node: str
    message: str
    severity: str | None = None  # None: the rule's severity
    fix: str | None = None  # None: the rule's fix


Check = Callable[[Graph], Iterator[Hit]]


@dataclass(frozen=True)
class Rule:
    severity: str
    fix: str
    check: Check


RULES: dict[str, str] = {}  # rule id -> "severity: what it checks [source]"
INTERNAL_RULE = "LINT-INTERNAL"  # a rule that raised: reported as an error, never a traceback
REGISTRY: dict[str, Rule] = {}


def lint_rule(
    rule_id: str, severity: str, summary: str, source: str, fix: str
) -> Callable[[Check], Check]:
    """Register a check; its hits default to this severity and fix."""

    def register(check: Check) -> Check:
        RULES[rule_id] = f"{severity}: {summary} [{source}]"
        REGISTRY[rule_id] = Rule(severity, fix, check)
        return check

    return register
