"""What the linter reports: ``Finding`` (severity, rule, node, message, fix), the severities in
their order, and ``format_findings``, the human-readable report.
"""

from __future__ import annotations

from dataclasses import dataclass

SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning" | "info"
    rule: str  # short stable id, e.g. "QDQ-ZERO-POINT"
    node: str  # node name (or op_type#index if unnamed) or tensor name
    message: str  # what is wrong
    fix: str  # how to fix it


def format_findings(findings: list[Finding]) -> str:
    """Human-readable report: one block per finding, then the counts."""
    blocks = [
        f"{f.severity.upper():<7} {f.rule} at {f.node}: {f.message}\n        fix: {f.fix}"
        for f in findings
    ]
    counts = ", ".join(f"{sum(f.severity == s for f in findings)} {s}(s)" for s in SEVERITIES)
    return "\n".join([*blocks, counts])
