"""KD-versus-plain-QAT accuracy targets on the embedded digits data, over several seeds.

For each seed: a float teacher (the default method's, or ``--teacher-arch``) and a float student
(resnet8), then QAT students that start from the float student: W8A8 and W4A4 with kd-decay (the
default), W4A4 with plain QAT (`none`) and with Hinton `kd`. Teacher and float student are
trained once per seed and shared by the methods (each method's run directory gets a copy, which
the pipeline treats as finished stages). Accuracies are those of the exported ONNX models in ONNX
Runtime on the test split.

    python benchmarks/kd_vs_qat.py [--seeds 0 1 2] [--teacher-arch ARCH] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from results_io import machine_line, summarize, targets_table, write_results

from qkd_deploy.config import load_config, save_config
from qkd_deploy.distill import METHODS
from qkd_deploy.pipeline import run

DEFAULT_TEACHER = METHODS["kd-decay"].default_teachers[0]
RUNS = [  # (method, bits)
    ("kd-decay", ["w8a8", "w4a4"]),
    ("none", ["w8a8", "w4a4"]),
    ("kd", ["w4a4"]),
]


def run_seed(seed: int, work: Path, teacher: str) -> dict[str, float]:
    results: dict[str, float] = {}
    first = None
    for method, bits in RUNS:
        root = work / f"seed{seed}" / method
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        if first is not None:  # share the teacher and the float student of this seed
            for stage in ("teacher", "student_float"):
                shutil.copytree(first / stage, root / stage)
        config = load_config(
            overrides=[
                f"seed={seed}",
                f"teachers=[{{arch: {teacher}}}]",
                f"student.method={method}",
                f"student.bits=[{','.join(bits)}]",
                "progress=false",
                f"out={root}",
            ]
        )
        save_config(config, root / "config.yaml")
        report = run(config, root)
        first = first or root
        results["teacher"] = report["teacher"]["accuracy"]
        results["float"] = report["float_references"][0]["accuracy_onnx"]
        for s in report["students"]:
            results[f"{method}/w{s['w_bits']}a{s['a_bits']}"] = s["accuracy_onnx"]
            results[f"{method}/w{s['w_bits']}a{s['a_bits']}/agreement"] = s["onnx_agreement"]
    return results


def targets(summary: dict) -> list[tuple[str, bool, str]]:
    mean = {k: v["mean"] for k, v in summary.items()}
    gap8 = 100 * (mean["float"] - mean["kd-decay/w8a8"])
    gap4 = 100 * (mean["float"] - mean["kd-decay/w4a4"])
    kd_vs_qat = 100 * (mean["kd-decay/w4a4"] - mean["none/w4a4"])
    agreement = min(min(v["values"]) for k, v in summary.items() if k.endswith("agreement"))
    return [
        ("W8A8 within 0.5 points of float", gap8 <= 0.5, f"float - W8A8 = {gap8:+.2f} points"),
        ("W4A4 within 1.5 points of float", gap4 <= 1.5, f"float - W4A4 = {gap4:+.2f} points"),
        ("W4A4 KD >= plain QAT", kd_vs_qat >= 0, f"kd-decay - none = {kd_vs_qat:+.2f} points"),
        ("ONNX agreement >= 99.5 %", agreement >= 0.995, f"lowest {100 * agreement:.2f} %"),
    ]


def _epochs(section: str) -> int:
    """The default config's epochs of a training section (``student.train``)."""
    node = load_config()
    for part in section.split("."):
        node = getattr(node, part)
    return node.epochs


def markdown(summary: dict, checks: list, seeds: list[int], seconds: float, teacher: str) -> str:
    lines = [
        "# KD vs plain QAT on digits (accuracy targets)",
        "",
        machine_line(),
        f"Seeds {seeds}; wall time {seconds / 60:.1f} min. Accuracy of the exported ONNX model in "
        "ONNX Runtime on the 360-image test split, mean ± std over seeds (%). Default config: "
        f"teacher {teacher} ({_epochs('teacher_train')} epochs), student resnet8 "
        f"({_epochs('student.float_train')} epochs float, {_epochs('student.train')} epochs QAT "
        "from the float student).",
        "",
        "| model | accuracy % | per seed |",
        "| --- | --- | --- |",
    ]
    for key, v in summary.items():
        if key.endswith("agreement"):
            continue
        per = " / ".join(f"{100 * x:.2f}" for x in v["values"])
        lines.append(f"| {key} | {100 * v['mean']:.2f} ± {100 * v['std']:.2f} | {per} |")
    lines += ["", *targets_table(checks)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default="runs/bench-kd-vs-qat")
    p.add_argument("--teacher-arch", default=DEFAULT_TEACHER, help="zoo model of the teacher")
    p.add_argument("--name", default="kd_vs_qat", help="results file name")
    args = p.parse_args(argv)
    start = time.perf_counter()
    per_seed = [run_seed(seed, Path(args.work), args.teacher_arch) for seed in args.seeds]
    seconds = time.perf_counter() - start
    summary = summarize(per_seed)
    checks = targets(summary)
    payload = {
        "seeds": args.seeds,
        "teacher": args.teacher_arch,
        "wall_time_s": round(seconds, 1),
        "summary": summary,
    }
    text = markdown(summary, checks, args.seeds, seconds, args.teacher_arch)
    write_results(args.out, args.name, payload, checks, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
