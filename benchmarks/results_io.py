"""What every benchmark script shares: the machine line, mean/std over seeds, the targets
table, and writing the results as JSON + Markdown (atomically)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from qkd_deploy.fileio import atomic_write_text
from qkd_deploy.rundir import library_versions, machine_description

Check = tuple[str, bool, str]  # (target, met, what was measured)


def machine_line() -> str:
    versions = ", ".join(f"{k} {v}" for k, v in library_versions().items() if k != "qkd-deploy")
    return f"Machine: {machine_description()}; {versions}"


def summarize(per_seed: list[dict[str, float]]) -> dict[str, dict]:
    """Mean, population std and the values over seeds, for every key all seeds have."""
    keys = [k for k in per_seed[0] if all(k in r for r in per_seed)]
    return {
        k: {
            "mean": statistics.mean(r[k] for r in per_seed),
            "std": statistics.pstdev(r[k] for r in per_seed),
            "values": [r[k] for r in per_seed],
        }
        for k in keys
    }


def targets_table(checks: list[Check]) -> list[str]:
    lines = ["| target | met | measured |", "| --- | --- | --- |"]
    return lines + [f"| {name} | {'yes' if ok else 'NO'} | {d} |" for name, ok, d in checks]


def write_results(out: str | Path, name: str, payload: dict, checks: list[Check], text: str):
    """``out/name.json`` (the machine, versions, ``payload`` and the targets) and
    ``out/name.md`` (``text``); the text is printed too."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine_description(),
        "versions": library_versions(),
        **payload,
        "targets": [{"target": n, "met": ok, "measured": d} for n, ok, d in checks],
    }
    atomic_write_text(out / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out / f"{name}.md", text)
    print(text)
