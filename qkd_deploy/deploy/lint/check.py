"""``lint_model``: every registered rule run on a graph, its hits made findings (a rule that
raises is one LINT-INTERNAL error), sorted by severity.
"""

from __future__ import annotations

import dataclasses

import onnx

from qkd_deploy.deploy.lint import rules  # noqa: F401  (registers the rules, in order)
from qkd_deploy.deploy.lint.findings import SEVERITIES, Finding
from qkd_deploy.deploy.lint.graph import Graph, as_text
from qkd_deploy.deploy.lint.registry import INTERNAL_RULE, REGISTRY, Rule


def lint_model(model: onnx.ModelProto) -> list[Finding]:
    """All findings for ``model``: errors, then warnings, then infos (rule order within)."""
    return run_rules(Graph(model))


def run_rules(g: Graph) -> list[Finding]:
    findings = [f for rule_id, rule in REGISTRY.items() for f in _findings(rule_id, rule, g)]
    findings = [_chosen_float(g, f) for f in findings]
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def _chosen_float(g: Graph, finding: Finding) -> Finding:
    """A fusion finding at a layer the exporter recorded as left in float on purpose
    (``quant.layer_bits: float``) is information, not a missing Q/DQ."""
    if not finding.rule.startswith("FUSE-") or not g.float_on_purpose(finding.node):
        return finding
    return dataclasses.replace(
        finding,
        severity="info",
        message=f"{finding.message} (left in float on purpose, as the exporter recorded)",
    )


def _findings(rule_id: str, rule: Rule, g: Graph) -> list[Finding]:
    """The rule's findings; a rule that fails on a malformed model is one LINT-INTERNAL error
    naming it, not a traceback."""
    try:
        hits = list(rule.check(g))
    except Exception as error:
        message = (
            f"rule {rule_id} could not check this model ({type(error).__name__}: {error}): the "
            "model is malformed where the rule looks (see MODEL-CHECKER), or the linter has a bug"
        )
        fix = "run onnx.checker.check_model(model, full_check=True) and re-export the model"
        return [Finding("error", INTERNAL_RULE, g.name, message, fix)]
    severity, fix = rule.severity, rule.fix
    return [
        Finding(hit.severity or severity, rule_id, as_text(hit.node), hit.message, hit.fix or fix)
        for hit in hits
    ]
