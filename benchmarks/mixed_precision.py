"""Mixed precision under a share budget on Fashion-MNIST: sensitivity-chosen layers vs the same
number of randomly chosen layers vs uniform bits.

Per (student architecture, seed): one float student (plain, on the labels), shared by every
student below. Per bit-width and baseline, plain-QAT students (``--method none``) from it:
``uniform``, the baseline; ``probe``, ``quant.budget=share:S`` chosen after one epoch of QAT
(``quant.budget_probe_epochs=1``: each layer raised to W8A8 inside the trained model);
``untrained``, the same budget chosen as the pipeline does by default, from the untrained float
student's layers alone (``quant.budget_probe_epochs=0``); ``random``, ``--random-draws``
students with as many layers drawn at random among those the budget could raise, at W8A8
(``quant.layer_bits``), compared by their mean. Two baselines (``--first-last``): ``off``, one
bit-width for every layer (``quant.first_last_bits=null``), and ``8``, the pipeline's
default with the first conv and the last linear at 8 bits (then the budget raises among the
other layers). Reported: ONNX accuracy on
the full test split, and the share of the uniform student's gap to the float student that each
mixed student recovers.

    python benchmarks/mixed_precision.py [--archs resnet8 mobilenetv2] [--bits w4a4 w2a2]
        [--seeds 0 1] [--first-last off 8] [--jobs ARCH:BITS:FIRST_LAST ...]
        [--train-limit 2000] [--float-epochs 10] [--epochs 3] [--share 0.1]
        [--lr ARCH=LR ...] [--random-draws 3] [--oracle] [--work DIR]
        [--out benchmarks/results]
        [--name mixed_precision]

``--jobs`` lists the (arch, bits, baseline) triples to run, in that order, for every seed, in
place of every combination of ``--archs``, ``--bits`` and ``--first-last``.

Needs Debian's `dataset-fashion-mnist` (`apt-get install -y dataset-fashion-mnist`).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from pathlib import Path

from results_io import machine_line, targets_table, write_results

from qkd_deploy.config import load_config, save_config
from qkd_deploy.models import build_model
from qkd_deploy.pipeline import run

SHARED_STAGES = ("teacher", "student_float")
# QAT learning rate per student: at 0.05 a 2-bit MobileNetV2 collapses to chance here
LEARNING_RATES = {"resnet8": 0.05, "mobilenetv2": 0.01}
TARGET_RECOVERED = 0.5
CHECKED = "untrained"  # the chooser the targets are checked on: the pipeline's default


def _config(args, arch: str, bits: str, seed: int, out: Path, extra: list[str]):
    overrides = [
        "data.spec=fashion-mnist",
        f"data.train_limit={args.train_limit}",
        f"student.arch={arch}",
        f"student.bits=[{bits}]",
        "student.method=none",
        "teachers=[{arch: resnet8}]",  # plain QAT reads no teacher: the cheapest one, 1 epoch
        "teacher_train.epochs=1",
        f"student.float_train.epochs={args.float_epochs}",
        f"student.train.epochs={args.epochs}",
        f"student.train.lr={args.lr[arch]}",
        f"seed={seed}",
        "progress=false",
        "bench.batch_sizes=[1]",
        "bench.iterations=2",
        "bench.warmup=1",
        f"out={out}",
        *extra,
    ]
    return load_config(overrides=overrides)


def _run(args, arch: str, bits: str, seed: int, folder: str, extra: list[str]) -> dict:
    """One pipeline run in ``work/ARCH-sSEED/FOLDER``, starting from the shared float student
    (trained by the first run of this architecture and seed); a finished run is read back."""
    root = Path(args.work) / f"{arch}-s{seed}"
    out, pool = root / folder, root / "float"
    if (out / "report.json").is_file():
        return json.loads((out / "report.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if (pool / "student_float" / "model.pt").is_file():
        for stage in SHARED_STAGES:
            shutil.copytree(pool / stage, out / stage)
    config = _config(args, arch, bits, seed, out, extra)
    save_config(config, out / "config.yaml")
    report = run(config, out)
    if not pool.exists():
        pool.mkdir(parents=True)
        for stage in SHARED_STAGES:
            shutil.copytree(out / stage, pool / stage)
    return report


def _raisable(arch: str, first_last: str) -> list[str]:
    """Layers the budget could raise: every quantizable module, less the first conv and the last
    linear when those are at 8 bits already."""
    from torch import nn

    from qkd_deploy.models.layers import Add

    model = build_model(arch, 1, 10)
    names = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear, Add)]
    if first_last == "off":
        return names
    convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    return [n for n in names if n not in (convs[:1] + linears[-1:])]


def _stage_seconds(*reports: dict) -> float:
    """The pipeline's stage times of these runs (the same when a finished run is read back)."""
    return round(sum(sum(r["timings_s"].values()) for r in reports), 1)


def one(args, arch: str, bits: str, seed: int, first_last: str) -> dict:
    base = [
        "quant.first_last_bits=null"
        if first_last == "off"
        else f"quant.first_last_bits={first_last}"
    ]
    prefix = f"{bits}-fl{first_last}"
    uniform = _run(args, arch, bits, seed, f"{prefix}-uniform", base)
    budget = [*base, f"quant.budget=share:{args.share}"]
    probe = _run(
        args, arch, bits, seed, f"{prefix}-sensitivity", [*budget, "quant.budget_probe_epochs=1"]
    )
    untrained = _run(
        args, arch, bits, seed, f"{prefix}-alone", [*budget, "quant.budget_probe_epochs=0"]
    )
    record, seconds = _budget_record(args, arch, seed, f"{prefix}-sensitivity")
    record_untrained, seconds_untrained = _budget_record(args, arch, seed, f"{prefix}-alone")
    draws = _random_draws(args, arch, bits, seed, first_last, base, len(record["layer_bits"]))
    float_acc = uniform["float_references"][0]["accuracy_onnx"]
    students = (("uniform", uniform), ("probe", probe), ("untrained", untrained))
    acc = {name: report["students"][0]["accuracy_onnx"] for name, report in students}
    acc["random"] = statistics.mean(draw["accuracy"] for draw in draws)
    gap = float_acc - acc["uniform"]
    recovered = {
        f"recovered_{name}": (acc[name] - acc["uniform"]) / gap if gap > 0 else None
        for name in ("probe", "untrained", "random")
    }
    singles = _each_layer_alone(args, arch, bits, seed, first_last, base) if args.oracle else {}
    return {
        "arch": arch,
        "bits": bits,
        "first_last_bits": first_last,
        "seed": seed,
        "float": float_acc,
        **acc,
        "each_layer_alone": singles,
        "raised": record["layer_bits"],
        "raised_untrained": record_untrained["layer_bits"],
        "random_draws": [{k: v for k, v in d.items() if k != "report"} for d in draws],
        "selectable_layers": record["predicted"]["selectable_layers"],
        "sensitivity_seconds": seconds,
        "sensitivity_seconds_untrained": seconds_untrained,
        **recovered,
        "seconds": _stage_seconds(uniform, probe, untrained, *(d["report"] for d in draws)),
    }


def _random_draws(
    args, arch: str, bits: str, seed: int, first_last: str, base: list[str], count: int
) -> list[dict]:
    """``--random-draws`` students, each with ``count`` layers drawn at random at W8A8: their
    mean is the expected value of spending the budget blindly (one draw can hit the chooser's
    own layer, or the best or the worst one)."""
    draws = []
    for draw in range(args.random_draws):
        layers = random.Random(1000 + 100 * draw + seed).sample(_raisable(arch, first_last), count)
        layer_bits = "{" + ", ".join(f"{name}: w8a8" for name in layers) + "}"
        folder = f"{bits}-fl{first_last}-random" + (f"{draw}" if draw else "")
        report = _run(args, arch, bits, seed, folder, [*base, f"quant.layer_bits={layer_bits}"])
        accuracy = report["students"][0]["accuracy_onnx"]
        draws.append({"layers": layers, "accuracy": accuracy, "report": report})
    return draws


def _each_layer_alone(
    args, arch: str, bits: str, seed: int, first_last: str, base: list[str]
) -> dict[str, float]:
    """``--oracle``: the ONNX accuracy of a student with each raisable layer alone at W8A8."""
    accuracies = {}
    for layer in _raisable(arch, first_last):
        raised = [*base, f"quant.layer_bits={{{layer}: w8a8}}"]
        report = _run(args, arch, bits, seed, f"{bits}-fl{first_last}-only-{layer}", raised)
        accuracies[layer] = report["students"][0]["accuracy_onnx"]
    return accuracies


def _budget_record(args, arch: str, seed: int, folder: str) -> tuple[dict, float]:
    """A run's budget.json and the seconds of its sensitivity measurement."""
    path = Path(args.work) / f"{arch}-s{seed}" / folder
    record = json.loads((path / "budget.json").read_text())
    return record, json.loads((path / "sensitivity.json").read_text())["seconds"]


def checks(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """Per (arch, bits, baseline), for the pipeline's default chooser: the mean recovered share
    over seeds >= 50 %, and the chosen student above the expected random one on every seed."""
    out = []
    groups = sorted({(r["arch"], r["bits"], r["first_last_bits"]) for r in rows})
    for arch, bits, first_last in groups:
        group = [
            r
            for r in rows
            if (r["arch"], r["bits"], r["first_last_bits"]) == (arch, bits, first_last)
        ]
        label = f"{arch} {bits}, first/last {first_last}"
        recovered = [r[f"recovered_{CHECKED}"] for r in group]
        if None in recovered:
            no_gap = ", ".join(str(r["seed"]) for r in group if r[f"recovered_{CHECKED}"] is None)
            out.append(
                (
                    f"{label}: recovers >= 50 % of the gap",
                    False,
                    f"no gap: the uniform student is at or above the float one (seed {no_gap})",
                )
            )
        else:
            mean = statistics.mean(recovered)
            values = ", ".join(f"{100 * x:.1f}" for x in recovered)
            out.append(
                (
                    f"{label}: recovers >= 50 % of the gap (mean of seeds)",
                    mean >= TARGET_RECOVERED,
                    f"{100 * mean:.1f} % (seeds: {values} %)",
                )
            )
        margins = [100 * (r[CHECKED] - _random_expected(r)) for r in group]
        out.append(
            (
                f"{label}: beats random layers (their expected accuracy) on every seed",
                all(m > 0 for m in margins),
                "by " + ", ".join(f"{m:+.2f}" for m in margins) + " points",
            )
        )
    return out


def _random_expected(row: dict) -> float:
    """The expected accuracy of the budget spent on random layers: for one layer with
    ``--oracle``, the mean of every single-layer student; else the mean of the random draws."""
    if row["each_layer_alone"] and len(row["raised"]) == 1:
        return statistics.mean(row["each_layer_alone"].values())
    return row["random"]


def _command(args) -> str:
    if args.jobs:
        which = f"--jobs {' '.join(args.jobs)}"
        archs = {job.split(":")[0] for job in args.jobs}
    else:
        which = (
            f"--archs {' '.join(args.archs)} --bits {' '.join(args.bits)} --first-last "
            f"{' '.join(args.first_last)}"
        )
        archs = set(args.archs)
    rates = " ".join(f"{a}={lr}" for a, lr in args.lr.items() if a in archs)
    return (
        f"OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py {which} --seeds "
        f"{' '.join(map(str, args.seeds))} --train-limit {args.train_limit} --float-epochs "
        f"{args.float_epochs} --epochs {args.epochs} --share {args.share} --lr {rates}"
        + f" --random-draws {args.random_draws}"
        + (" --oracle" if args.oracle else "")
    )


def _jobs(args) -> list[tuple[str, str, int, str]]:
    triples = (
        [tuple(job.split(":")) for job in args.jobs]
        if args.jobs
        else [(a, b, f) for a in args.archs for b in args.bits for f in args.first_last]
    )
    return [
        (arch, bits, seed, first_last) for arch, bits, first_last in triples for seed in args.seeds
    ]


def markdown(rows: list[dict], args, machine: str, done: bool) -> str:
    lines = [
        "# Mixed precision under a share budget (Fashion-MNIST)",
        "",
        f"{machine}. {time.strftime('%Y-%m-%d')}. Command: `{_command(args)}`",
        "",
        "Plain QAT (`none`, learning rate `--lr`), ONNX accuracy % on the 10 000 test images. "
        "`first/last`: `off` = one bit-width for every layer; `8` = first conv and last linear "
        "at 8 bits in every student. `probe`: `quant.budget=share` chosen after one epoch of "
        "QAT (`quant.budget_probe_epochs=1`: each layer raised inside the trained model); "
        "`untrained`: the same budget chosen as the pipeline does by default, from the "
        "untrained float student, each layer alone (`quant.budget_probe_epochs=0`); "
        "`random`: as many layers drawn at random, at W8A8, "
        "the mean of the draws (each draw in brackets). "
        "`raised`: the layers each chooser raised to W8A8 (of the selectable layers). "
        "`recovered`: share of the uniform student's gap to the float student that the mixed "
        "student closes; the targets are checked on `untrained`, the pipeline's default. "
        "`sens. s`: the probe's training, sensitivity and choice inside the "
        "run (probe / untrained); `s`: the stage times of its runs (the float student's "
        "training counted in the first row of its seed only).",
        "",
    ]
    if not done:
        lines += ["**Partial: the run is still going or was stopped.**", ""]
    lines += [
        "| arch | bits | first/last | seed | float | uniform | probe | untrained | random | "
        "raised (probe) | raised (untrained) | recovered: probe | untrained | random | "
        "sens. s | s |",
        "|" + " --- |" * 16,
    ]

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f} %"

    def layers(chosen: dict) -> str:
        return ", ".join(chosen) or "none"

    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['bits']} | {r['first_last_bits']} | {r['seed']} | "
            f"{100 * r['float']:.2f} | {100 * r['uniform']:.2f} | {100 * r['probe']:.2f} | "
            f"{100 * r['untrained']:.2f} | {_draws(r)} | "
            f"{layers(r['raised'])} ({len(r['raised'])}/{r['selectable_layers']}) | "
            f"{layers(r['raised_untrained'])} | {pct(r['recovered_probe'])} | "
            f"{pct(r['recovered_untrained'])} | {pct(r['recovered_random'])} | "
            f"{r['sensitivity_seconds']} / {r['sensitivity_seconds_untrained']} | "
            f"{r['seconds']} |"
        )
    lines += _oracle_lines(rows)
    lines += ["", "## Targets", "", *targets_table(checks(rows))]
    return "\n".join(lines) + "\n"


def _oracle_lines(rows: list[dict]) -> list[str]:
    """``--oracle``: every layer raised alone, best first, and where each chooser's layer ranks
    (the row's uniform student and each single-layer student: ONNX accuracy %)."""
    rows = [r for r in rows if r["each_layer_alone"]]
    if not rows:
        return []
    lines = [
        "",
        "## Each layer raised alone (`--oracle`)",
        "",
        "One student per raisable layer, that layer alone at W8A8; best first. `rank`: where "
        "the layer each chooser raised stands among them (1 = best), for one-layer choices "
        "(`random`: each draw); `mean`: the mean of the single-layer students, the exact "
        "expected accuracy of one layer raised at random.",
        "",
        "| arch | bits | seed | uniform | best | worst | mean | rank: probe | untrained | "
        "random | layers, best first (accuracy %) |",
        "|" + " --- |" * 11,
    ]
    for r in rows:
        ranked = sorted(r["each_layer_alone"].items(), key=lambda item: -item[1])
        order = [layer for layer, _ in ranked]
        probe, untrained = (_rank(order, r[key]) for key in ("raised", "raised_untrained"))
        randomly = ", ".join(_rank(order, draw["layers"]) for draw in r["random_draws"])
        mean = statistics.mean(r["each_layer_alone"].values())
        listing = ", ".join(f"{layer} {100 * acc:.2f}" for layer, acc in ranked)
        lines.append(
            f"| {r['arch']} | {r['bits']} | {r['seed']} | {100 * r['uniform']:.2f} | "
            f"{100 * ranked[0][1]:.2f} | {100 * ranked[-1][1]:.2f} | {100 * mean:.2f} | "
            f"{probe} | {untrained} | "
            f"{randomly} | {listing} |"
        )
    return lines


def _draws(row: dict) -> str:
    """The random students' mean accuracy %, each draw in brackets."""
    each = ", ".join(f"{100 * draw['accuracy']:.2f}" for draw in row["random_draws"])
    return f"{100 * row['random']:.2f} ({each})"


def _rank(order: list[str], chosen) -> str:
    """Where a one-layer choice stands in ``order`` (1 = first); "-" for other choices."""
    chosen = list(chosen)
    return str(order.index(chosen[0]) + 1) if len(chosen) == 1 else "-"


def _pair(item: str) -> tuple[str, float]:
    arch, _, lr = item.partition("=")
    return arch, float(lr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["resnet8", "mobilenetv2"])
    p.add_argument("--bits", nargs="+", default=["w4a4", "w2a2"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--first-last", nargs="+", default=["off", "8"], choices=["off", "8"])
    p.add_argument("--jobs", nargs="+", default=[], metavar="ARCH:BITS:FIRST_LAST")
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--float-epochs", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--share", type=float, default=0.1)
    p.add_argument(
        "--lr", nargs="+", default=[], metavar="ARCH=LR", help="QAT learning rate of a student"
    )
    p.add_argument(
        "--oracle", action="store_true", help="also train a student per layer, it alone raised"
    )
    p.add_argument(
        "--random-draws", type=int, default=3, help="students with randomly chosen layers"
    )
    p.add_argument("--work", default="/tmp/qkd-mixed-precision")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default="mixed_precision")
    args = p.parse_args()
    args.lr = {**LEARNING_RATES, **dict(_pair(item) for item in args.lr)}
    machine = machine_line()
    jobs = _jobs(args)
    rows: list[dict] = []
    for job in jobs:  # the results are rewritten after every row: a stopped run leaves them
        rows.append(one(args, *job))
        done = len(rows) == len(jobs)
        payload = {"rows": rows, "complete": done}
        write_results(
            args.out, args.name, payload, checks(rows), markdown(rows, args, machine, done)
        )


if __name__ == "__main__":
    main()
