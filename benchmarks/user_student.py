"""Your own float student, given with --student-checkpoint: how much W8A8 loses.

Targets: with the user's trained float student (a torchvision-style ResNet-18, written the
ordinary way: ``out += identity``, functional flatten), W8A8 after 1 QAT epoch is within 0.5
points of it, and ``ptq`` W8A8 (calibration only) within 1 point.

The float weights come from a first run that trains the network as the user would (labels only);
its ``student_float/model.pt`` is a plain state dict of the user's module, handed to the next
runs as ``--student-checkpoint``. Data: Fashion-MNIST (Debian's ``dataset-fashion-mnist``).

    python benchmarks/user_student.py [--train-limit 10000] [--float-epochs 6]

Writes ``benchmarks/results/user_student.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from results_io import machine_line, targets_table, write_results

from qkd_deploy.train_and_export import main as run_main

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the tests package: the torchvision-style networks


def fashion_resnet18():
    """torchvision's ResNet-18 layout at a quarter of its width, its stem made for 28x28
    grey images (3x3 conv, no max-pool), as users adapt it to small images."""
    from torch import nn

    from tests.support.torchvision_style import resnet18

    net = resnet18(num_classes=10, widths=(16, 32, 64, 128))
    net.conv1 = nn.Conv2d(1, 16, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def pipeline(out: Path, args, *flags: str) -> dict:
    """One main-command run on Fashion-MNIST with the user student (resumed where an earlier
    invocation left it); returns its report."""
    if (out / "config.yaml").is_file():
        code = run_main(["--resume", str(out), "--no-progress"])
        if code != 0:
            raise SystemExit(f"the run in {out} failed (exit {code})")
        return json.loads((out / "report.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    common = [
        "--data", "fashion-mnist", "--student", "user_student:fashion_resnet18", "--bits", "8",
        "--seed", str(args.seed), "--no-progress", "--out", str(out),
        "--set", f"data.train_limit={args.train_limit}",
        "--set", f"student.float_train.epochs={args.float_epochs}",
        "--set", "student.train.epochs=1",
        # none and ptq use no teacher, but the pipeline trains the method's default one for the
        # report: the cheapest here
        "--teacher-arch", "resnet8", "--set", "teacher_train.epochs=1",
        "--set", "bench.batch_sizes=[1]", "--set", "bench.iterations=5",
    ]  # fmt: skip
    code = run_main([*common, *flags])
    if code != 0:
        raise SystemExit(f"the run in {out} failed (exit {code})")
    return json.loads((out / "report.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--float-epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/bench-user-student")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    work = Path(args.work).resolve()
    sys.path.insert(0, str(HERE))  # the runs import user_student:fashion_resnet18
    start = time.perf_counter()
    trained = pipeline(work / "float", args, "--method", "none")
    checkpoint = work / "float" / "student_float" / "model.pt"
    given = ["--student-checkpoint", str(checkpoint)]
    qat = pipeline(work / "qat", args, "--method", "none", *given)
    ptq = pipeline(work / "ptq", args, "--method", "ptq", *given)
    minutes = (time.perf_counter() - start) / 60

    def accuracy(report: dict, row: str) -> float:
        models = report["float_references"] if row == "float" else report["students"]
        return 100 * models[0]["accuracy_onnx"]

    float_acc = accuracy(qat, "float")
    rows = {
        "float student (trained by the first run)": accuracy(trained, "float"),
        "float student (given as --student-checkpoint)": float_acc,
        "W8A8, 1 QAT epoch (none)": accuracy(qat, "student"),
        "W8A8, ptq": accuracy(ptq, "student"),
    }
    qat_drop = float_acc - rows["W8A8, 1 QAT epoch (none)"]
    ptq_drop = float_acc - rows["W8A8, ptq"]
    checks = [
        ("W8A8 after 1 QAT epoch within 0.5 points", qat_drop <= 0.5, f"{qat_drop:+.2f} points"),
        ("ptq W8A8 within 1 point", ptq_drop <= 1.0, f"{ptq_drop:+.2f} points"),
    ]
    lines = [
        "# Your own float student (--student-checkpoint): W8A8 after 1 QAT epoch and ptq",
        "",
        machine_line(),
        "",
        f"Fashion-MNIST, {args.train_limit} training images, the 10 000 test images; student: "
        "torchvision's ResNet-18 layout at a quarter width (`fashion_resnet18`); its float "
        f"weights trained {args.float_epochs} epochs by a first run (labels only); seed "
        f"{args.seed}; {minutes:.1f} min. Accuracy of the exported ONNX model in ONNX Runtime.",
        "",
        "| model | accuracy % |",
        "| --- | --- |",
        *(f"| {name} | {value:.2f} |" for name, value in rows.items()),
        "",
        *targets_table(checks),
    ]
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "out")}  # no paths
    payload = {"settings": settings, "accuracy": rows, "minutes": round(minutes, 1)}
    write_results(args.out, "user_student", payload, checks, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
