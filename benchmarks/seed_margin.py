"""One method's margin over a baseline, per seed, pooled over several `methods.py` result files.

A table of two seeds gives a mean that one lucky seed can carry. This reads the per-seed
accuracies of finished `benchmarks/methods.py` results (the same settings and machine, other
seeds: e.g. the table and later `--seeds 2 3 --methods feed --bits w2a2` runs) and states the
margin of ``--method`` over ``--baseline`` for every seed, its mean, sample standard deviation
and standard error, against the W2A2 target (2 points). Nothing is trained.

    python benchmarks/seed_margin.py benchmarks/results/methods.json \
        benchmarks/results/methods-seeds23-amd.json [--method feed] [--baseline none] \
        [--bits w2a2] [--target 2] [--out benchmarks/results] [--name NAME]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from qkd_deploy.fileio import atomic_write_text

# settings that make seeds comparable; seeds, jobs, the methods and bit-widths run may differ
SHARED_SETTINGS = (
    "data",
    "student",
    "teacher",
    "train_limit",
    "epochs",
    "lr",
    "teacher_epochs",
    "float_epochs",
    "float_method",
)
# settings that results from before the setting existed lack, with the value they ran with
SETTING_DEFAULTS = {"float_method": "none"}


def setting(result: dict, key: str):
    return result["settings"].get(key, SETTING_DEFAULTS.get(key))


def per_seed(result: dict, key: str, path: Path) -> list[float]:
    if key not in result["summary"]:
        sys.exit(f"{path}: no {key!r} in its summary; it ran {result['settings']['methods']}")
    return result["summary"][key]["values"]


def pooled_margins(files: list[Path], method: str, baseline: str, bits: str) -> dict:
    """Seed -> (method, baseline) accuracy over ``files``; refuses mixed settings or machines
    and a seed given twice."""
    first = json.loads(files[0].read_text())
    seeds: dict[int, tuple[float, float]] = {}
    for path in files:
        result = json.loads(path.read_text())
        for key in SHARED_SETTINGS:
            if setting(result, key) != setting(first, key):
                sys.exit(f"{path}: its {key} differs from {files[0]}'s; pool like runs only")
        if result["machine"] != first["machine"]:
            sys.exit(
                f"{path} ran on {result['machine']!r}, {files[0]} on {first['machine']!r}: "
                "a CPU gives its own numbers for a seed, so pool one machine's results"
            )
        ours = per_seed(result, f"{method}/{bits}", path)
        theirs = per_seed(result, f"{baseline}/{bits}", path)
        for seed, a, b in zip(result["settings"]["seeds"], ours, theirs, strict=True):
            if seed in seeds:
                sys.exit(f"{path}: seed {seed} is in an earlier file too")
            seeds[seed] = (a, b)
    return {"machine": first["machine"], "settings": first["settings"], "seeds": seeds}


def margin_summary(seeds: dict[int, tuple[float, float]]) -> dict:
    """Per-seed margins in points, their mean, sample std and standard error."""
    margins = {s: 100 * (a - b) for s, (a, b) in sorted(seeds.items())}
    values = list(margins.values())
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {
        "margins": margins,
        "mean": statistics.mean(values),
        "std": std,
        "stderr": std / math.sqrt(len(values)),
    }


def markdown(args: argparse.Namespace, pooled: dict, summary: dict) -> str:
    m, b = args.method, args.baseline
    rows = [
        f"| {s} | {100 * pooled['seeds'][s][1]:.2f} | {100 * pooled['seeds'][s][0]:.2f} | "
        f"{v:+.2f} |"
        for s, v in summary["margins"].items()
    ]
    met = "met" if summary["mean"] >= args.target else "not met"
    float_method = setting(pooled, "float_method")
    distilled = (
        f" `{m}` started QAT from a float student distilled with `{float_method}` "
        f"(`methods.py --float-method`), `{b}` from the plain one."
        if float_method != "none" and b in ("none", "ptq")
        else ""
    )
    return "\n".join(
        [
            f"# `{m}` over `{b}` at {args.bits.upper()}, per seed",
            "",
            f"Machine: {pooled['machine']}. From: {', '.join(str(f) for f in args.files)}."
            + distilled,
            "",
            f"| seed | {b} % | {m} % | margin (points) |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            f"Mean margin **{summary['mean']:+.2f}** points over {len(rows)} seeds (sample std "
            f"{summary['std']:.2f}, standard error {summary['stderr']:.2f}); target "
            f">= {args.target:g}: {met}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="methods.py result JSON files")
    parser.add_argument("--method", default="feed")
    parser.add_argument("--baseline", default="none")
    parser.add_argument("--bits", default="w2a2")
    parser.add_argument("--target", type=float, default=2.0, help="points")
    parser.add_argument("--out", type=Path, help="write OUT/NAME.md and .json (else print)")
    parser.add_argument("--name", default="margin")
    args = parser.parse_args(argv)
    pooled = pooled_margins(args.files, args.method, args.baseline, args.bits)
    summary = margin_summary(pooled["seeds"])
    text = markdown(args, pooled, summary)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": pooled["machine"],
            "files": [str(f) for f in args.files],
            "method": args.method,
            "baseline": args.baseline,
            "bits": args.bits,
            "float_method": setting(pooled, "float_method"),
            **summary,
            "margins": {s: round(v, 4) for s, v in summary["margins"].items()},
        }
        atomic_write_text(args.out / f"{args.name}.json", json.dumps(payload, indent=2) + "\n")
        atomic_write_text(args.out / f"{args.name}.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
