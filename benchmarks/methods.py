"""Ranking table: every distillation method at W4A4 and W2A2 on Fashion-MNIST.

One student architecture, one epoch budget for every method, several seeds. Per seed, one pool
run trains the teachers and the float student once; every method's run directory gets copies of
them (the pipeline treats copied stages as finished), so all methods distil from the same
teachers and start QAT from the same float student. Baselines in the same table: the float
student, plain QAT (`none`), the pipeline's own post-training quantization (`ptq`: the float
student calibrated, its BatchNorm statistics re-estimated on the calibration images, and
exported at every bit-width, no training step) and ONNX Runtime's
`quantize_static` PTQ at INT8 (QDQ format, its CPU defaults: UINT8 activations, INT8 per-channel
weights) with MinMax, Entropy and Percentile calibration on the pipeline's calibration images.
Every accuracy is that of the exported ONNX model in ONNX Runtime on the full 10 000-image test
split.

Teachers and the float student are trained for 30 epochs on 2000 images before any QAT. With 6
epochs they stopped at 74-79 %, and QAT then mostly acted as extra float training of an
under-trained student, which hides what a teacher adds. At 30 epochs the float student is still
not converged (it fits only 88 % of its own training images), so QAT at a high learning rate also
trains it further.

Every method gets the QAT learning rate at which plain QAT (``none``) scored best: 0.05 of
0.01 / 0.03 / 0.05 / 0.1 (the pipeline's default is 0.01). A weaker baseline would flatter every
teacher.

    python benchmarks/methods.py [--seeds 0 1] [--jobs 2] [--train-limit 2000] [--epochs 10]
        [--lr 0.05] [--teacher-epochs 30] [--float-epochs 30] [--float-method none]
        [--methods kd cmt-kd ...]
        [--bits w8a8 w4a4 w2a2] [--out benchmarks/results] [--name methods]

Budget: two seeds in parallel, 2 hours; the results file states each seed's run time on its
machine. More seeds resume into the same ``--work`` directory.

Seeds run in parallel processes (``--jobs``), each with its share of the CPU cores: on 2 cores two
single-threaded trainings of this small student get through more work than one two-threaded one.
Data-free methods generate as many images per step as the others read (the training batch, 64)
instead of their papers' 512/256: the same number of steps and images for every method is the
one budget of the table.

Interrupted, it resumes: finished methods are read back, a half-trained one continues from its
checkpoints. A run folder that holds other settings (bit-widths, epochs, ...) stops it with an
error instead of being read back. Stop it with Ctrl-C or ``kill``: on Linux its worker
processes die with it (elsewhere kill the process group, ``kill -- -PGID``, or they train on;
their run directories' locks then stop a second invocation from using them).
``--float-method NAME`` (``avg-teachers``, ...) makes every distillation method distil its
float student too: each method's run trains its own from its teachers with NAME over the float
student's epochs (``student.float_method``) before its QAT; the baselines (plain QAT, ``ptq``,
ONNX Runtime's PTQ) keep the plain float student, and so does the W4A4 target.
``--pool-from WORK`` reuses the teachers and float students of an earlier ``--work`` folder
trained with the same settings (it checks them), for a table of new QAT settings.
Needs Debian's `dataset-fashion-mnist` (`apt-get install -y dataset-fashion-mnist`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
from ort_baseline import CALIBRATION_METHODS, ort_quantize_static
from results_io import machine_line, summarize, targets_table, write_results

from qkd_deploy.config import load_config, save_config, to_dict
from qkd_deploy.data import Preprocess, load_dataset, stratified_subset
from qkd_deploy.distill.base import float_methods, method_class
from qkd_deploy.errors import UserError
from qkd_deploy.pipeline import run
from qkd_deploy.pipeline.checks import check_method
from qkd_deploy.runtime.base import run_in_batches
from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner

LOW_BITS = ["w4a4", "w2a2"]
# method -> (teachers it distils from, bit-widths); teachers are the first n of the seed's pool
METHODS = {
    "kd": (1, ["w8a8", *LOW_BITS]),
    "kd-decay": (1, LOW_BITS),
    "avg-teachers": (3, LOW_BITS),
    "cmt-kd": (3, ["w8a8", *LOW_BITS]),
    "dml": (1, LOW_BITS),
    "pcl": (1, LOW_BITS),
    "dkel": (1, LOW_BITS),
    "feed": (3, LOW_BITS),
    "indistill": (1, LOW_BITS),
    "speq": (1, LOW_BITS),
    "dafl": (1, LOW_BITS),
    "cdfkd-mfs": (2, LOW_BITS),
    "ptq": (1, ["w8a8", *LOW_BITS]),
}
# methods without a teacher (online, self) still get the pool's first teacher: the report's
# reference accuracy, never used in their loss
POOL_METHOD = "none"
# baselines that run as pipeline methods, with their table labels: never a "best distillation"
BASELINE_LABELS = {
    POOL_METHOD: f"{POOL_METHOD} (plain QAT baseline)",
    "ptq": "ptq (the float student calibrated, no training; baseline)",
}
PIPELINE_BASELINES = tuple(BASELINE_LABELS)
FLOAT_STAGES = ("student_float",)
DATA_FREE = ("dafl", "cdfkd-mfs")
ORT_PTQ = "ort-ptq-"  # result keys of ONNX Runtime's quantize_static baselines: ort-ptq-NAME/int8
TRAIN_BATCH = 64  # the pipeline's default training batch; data-free methods generate this many


def teacher_stage(i: int) -> str:
    return "teacher" if i == 0 else f"teacher_{i}"


def base_overrides(args: argparse.Namespace, seed: int, root: Path) -> list[str]:
    epochs = args.epochs
    return [
        f"seed={seed}",
        f"out={root}",
        "progress=false",
        f"data.spec={args.data}",
        f"data.train_limit={args.train_limit}",
        f"teacher_train.epochs={args.teacher_epochs}",
        f"student.arch={args.student}",
        f"student.float_train.epochs={args.float_epochs}",
        f"student.train.epochs={epochs}",
        f"student.train.lr={args.lr}",
        "bench.batch_sizes=[1]",
        "bench.iterations=5",
        "bench.warmup=2",
    ]


def settings(config) -> dict:
    """A run's config without its ``out``: a work folder moved or copied elsewhere still matches."""
    return {k: v for k, v in to_dict(config).items() if k != "out"}


def run_method(
    args: argparse.Namespace, seed: int, method: str, teachers: int, bits: list[str], pool: Path
) -> tuple[dict, Path]:
    """One method's run in ``--work``, its teacher and float-student stages copied from the run
    directory ``pool`` (unless it is that directory)."""
    root = Path(args.work) / f"seed{seed}" / method
    overrides = base_overrides(args, seed, root) + [
        f"student.method={method}",
        f"student.bits=[{','.join(bits)}]",
        f"teachers=[{','.join('{arch: ' + args.teacher + '}' for _ in range(teachers))}]",
    ]
    if method in DATA_FREE:
        overrides.append(f"student.method_options.batch_size={TRAIN_BATCH}")
    own_float = distils_float_student(args, method)
    if own_float:
        overrides.append(f"student.float_method={args.float_method}")
    config = load_config(overrides=overrides)
    config.student.method_options = check_method(config)
    if (root / "config.yaml").is_file():  # an earlier invocation's run: resume or read it back
        earlier = load_config(str(root / "config.yaml"))
        # runs store every method option, so a default changed since then shows as a difference
        # (an older run's config stores only the options it set: today's defaults fill the rest)
        with contextlib.suppress(UserError):  # an option this version no longer has differs
            earlier.student.method_options = check_method(earlier)
        if settings(earlier) != settings(config):
            sys.exit(
                f"{root} holds a run with other settings than this invocation's (bit-widths, "
                "epochs, learning rate, method options, ...); give a new --work folder or remove "
                "that one"
            )
        if (root / "report.json").is_file():  # finished
            return json.loads((root / "report.json").read_text()), root
        return run(config, root), root  # interrupted: the pipeline resumes from its files
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if pool != root:
        copied = [teacher_stage(i) for i in range(teachers)]
        for stage in copied + ([] if own_float else list(FLOAT_STAGES)):
            shutil.copytree(pool / stage, root / stage)
    save_config(config, root / "config.yaml")
    return run(config, root), root


def distils_float_student(args: argparse.Namespace, method: str) -> bool:
    """With ``--float-method``, a distillation method (no baseline, no data-free method, whose
    student never starts from the float student) trains its own float student, distilled from
    its teachers, instead of copying the pool's."""
    return args.float_method != "none" and method not in (*PIPELINE_BASELINES, *DATA_FREE)


def too_few_teachers_for_float_method(args: argparse.Namespace) -> list[str]:
    """The methods of ``--methods`` whose teachers are too few for ``--float-method``."""
    needs = method_class(args.float_method).needs_teachers
    return [m for m in args.methods if distils_float_student(args, m) and METHODS[m][0] < needs]


def ptq_accuracies(pool: Path, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """ONNX Runtime quantize_static of the float student, each calibration method, on the same
    calibration images as the pipeline; accuracy in ONNX Runtime on the test split."""
    report = json.loads((pool / "report.json").read_text())
    preprocess = Preprocess.from_dict(report["preprocess"])
    data = load_dataset(args.data)
    train = stratified_subset(data.train, args.train_limit, seed)
    calibration = stratified_subset(train, 512, seed)
    calib_images = preprocess.apply_numpy(calibration.images.numpy())
    test_images = preprocess.apply_numpy(data.test.images.numpy())
    labels = data.test.labels.numpy()
    float_model = pool / "student_float" / "model.onnx"
    input_name = OnnxRuntimeRunner(float_model).input_name
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CALIBRATION_METHODS:
            out = ort_quantize_static(
                float_model, Path(tmp) / f"{name}.onnx", calib_images, input_name, name
            )
            logits = run_in_batches(OnnxRuntimeRunner(out), test_images, 500)
            results[f"{ORT_PTQ}{name}/int8"] = float((logits.argmax(1) == labels).mean())
    return results


def run_seeds(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Every seed, ``args.jobs`` at a time in separate processes sharing the CPU cores."""
    jobs = max(1, min(args.jobs, len(args.seeds)))
    if jobs == 1:
        outcomes = [run_seed(args, seed) for seed in args.seeds]
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(
            jobs,
            mp_context=get_context("spawn"),
            initializer=init_worker,
            initargs=(threads,),
        ) as pool:
            outcomes = list(pool.map(run_seed, [args] * len(args.seeds), args.seeds))
    return [r for r, _ in outcomes], [s for _, s in outcomes]


def init_worker(threads: int) -> None:
    """A seed's worker: its share of the cores, and on Linux it dies with the benchmark (a
    parent killed on its own would otherwise leave its workers training for an hour)."""
    torch.set_num_threads(threads)
    if sys.platform == "linux":
        pr_set_pdeathsig = 1  # <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def run_seed(args: argparse.Namespace, seed: int) -> tuple[dict[str, float], dict[str, float]]:
    """Accuracies (key ``method/wXaY``) and seconds per method run for one seed."""
    source = Path(args.pool_from or args.work) / f"seed{seed}" / POOL_METHOD
    pool_teachers = max(METHODS[m][0] for m in args.methods)
    pool_bits = [b for b in LOW_BITS if b in args.bits]
    report, pool = run_method(args, seed, POOL_METHOD, pool_teachers, pool_bits, source)
    seconds = {POOL_METHOD: run_seconds(report)}
    if args.pool_from:
        seconds["pool_from_training"] = pool_training_seconds(source)
    results = {f"teacher_{i}": t["accuracy"] for i, t in enumerate(report["teachers"])}
    results["float"] = report["float_references"][0]["accuracy_onnx"]
    results.update(_student_accuracies(report))
    if "w8a8" in args.bits:  # the PTQ baselines are INT8
        results.update(ptq_accuracies(pool, args, seed))
    for method in args.methods:
        teachers, method_bits = METHODS[method]
        bits = [b for b in method_bits if b in args.bits]
        if not bits:
            continue
        report, _ = run_method(args, seed, method, teachers, bits, pool)
        seconds[method] = run_seconds(report)
        results.update(_student_accuracies(report))
        if distils_float_student(args, method):
            results[f"{method}/float"] = report["float_references"][0]["accuracy_onnx"]
        print(f"seed {seed} {method}: {_student_accuracies(report)}", flush=True)
    return results, seconds


def check_reusable_pool(args: argparse.Namespace, seed: int) -> None:
    """``--pool-from``'s teachers and float student must be what this invocation would train."""
    source = Path(args.pool_from) / f"seed{seed}" / POOL_METHOD
    if not (source / "report.json").is_file():
        sys.exit(f"--pool-from: no finished pool run in {source}; give an earlier --work folder")
    theirs = to_dict(load_config(str(source / "config.yaml")))
    ours = to_dict(load_config(overrides=base_overrides(args, seed, source)))
    for key in ("seed", "data", "teacher_train"):
        if theirs[key] != ours[key]:
            sys.exit(f"--pool-from {source}: its {key} differs from this invocation's")
    for key in ("arch", "float_train"):
        if theirs["student"][key] != ours["student"][key]:
            sys.exit(f"--pool-from {source}: its student.{key} differs from this invocation's")
    if any(t["arch"] != args.teacher for t in theirs["teachers"]):
        sys.exit(f"--pool-from {source}: its teachers are not all {args.teacher}")


def pool_training_seconds(source: Path) -> float:
    """What training the reused teachers and float student took, by their run's report."""
    timings = json.loads((source / "report.json").read_text())["timings_s"]
    return round(timings["teachers"] + timings["student_float"], 1)


def run_seconds(report: dict) -> float:
    """A method run's training and export time from its report: still right when the benchmark
    reads a finished run back (copied teacher and float stages count almost nothing)."""
    return round(sum(report["timings_s"].values()), 1)


def _student_accuracies(report: dict) -> dict[str, float]:
    out = {}
    for s in report["students"]:
        key = f"{s['method']}/w{s['w_bits']}a{s['a_bits']}"
        out[key] = s["accuracy_onnx"]
        out[key + "/agreement"] = s["onnx_agreement"]
    return out


def _mean(summary: dict, key: str) -> float | None:
    return summary[key]["mean"] if key in summary else None


def best_distillation(summary: dict, bits: str) -> tuple[str, float] | None:
    """The distillation method (no baseline: not ``none``, ``ptq`` or ONNX Runtime's PTQ) with
    the best mean accuracy at ``bits``; None when no distillation method ran at ``bits``."""
    candidates = {
        k.split("/")[0]: v["mean"]
        for k, v in summary.items()
        if k.endswith(f"/{bits}")
        and not k.startswith((*(m + "/" for m in PIPELINE_BASELINES), ORT_PTQ))
    }
    if not candidates:
        return None
    method = max(candidates, key=candidates.get)
    return method, candidates[method]


def targets(summary: dict) -> list[tuple[str, bool, str]]:
    """The ranking's targets, each checked where this run has its bit-width."""
    checks = []
    best = best_distillation(summary, "w2a2")
    if best:
        best2, acc2 = best
        gain = 100 * (acc2 - _mean(summary, "none/w2a2"))
        checks.append(
            (
                "W2A2: best distillation beats plain QAT by >= 2 points",
                gain >= 2,
                f"{best2} - none = {gain:+.2f} points",
            )
        )
    best = best_distillation(summary, "w4a4")
    if best:
        best4, acc4 = best
        gap = 100 * (summary["float"]["mean"] - acc4)
        checks.append(
            (
                "W4A4: best distillation within 0.5 points of the float student",
                gap <= 0.5,
                f"float - {best4} = {gap:+.2f} points",
            )
        )
    if not any(k.startswith("kd/") for k in summary):
        return checks
    never = [
        m
        for m in {k.split("/")[0] for k in summary if "/w" in k}
        if m not in ("kd", *PIPELINE_BASELINES)
        and not any(
            summary[k]["mean"] > summary.get("kd/" + k.split("/")[1], {"mean": 1.0})["mean"]
            for k in summary
            if k.startswith(m + "/w") and not k.endswith("agreement")
        )
    ]
    checks.append(
        (
            "methods that beat kd nowhere (shown, not hidden)",
            True,
            ", ".join(sorted(never)) or "none",
        )
    )
    return checks


def markdown(
    summary: dict, checks: list, args: argparse.Namespace, seconds: float, timing: list[dict]
) -> str:
    seed_minutes = [sum(t.values()) / 60 for t in timing]
    data = _data_description(args)
    columns = ["w8a8", "w4a4", "w2a2"]
    rows = sorted(
        {k.split("/")[0] for k in summary if "/w" in k and not k.startswith(ORT_PTQ)},
        key=lambda m: -(_mean(summary, f"{m}/w2a2") or 0),
    )
    lines = [
        f"# Distillation methods on {data['dataset']} (ranking table)",
        "",
        machine_line(),
        "",
        f"Budget: student {args.student}, teachers {args.teacher} (pool of "
        f"{max(METHODS[m][0] for m in args.methods)}, trained once per seed), "
        f"{args.train_limit} stratified training images ({data['size']}, augmentation on), "
        f"{args.teacher_epochs} epochs for teachers, {args.float_epochs} for the float student, "
        f"**{args.epochs} QAT epochs at learning rate {args.lr} for every method**, "
        f"seeds {args.seeds}, {args.jobs} at a time. Runs of one "
        f"seed take {min(seed_minutes):.1f}-{max(seed_minutes):.1f} min by their reports "
        "(runs finished by an earlier invocation included); this invocation's wall time "
        f"{seconds / 60:.1f} min. Accuracy (%) of the exported ONNX model in ONNX Runtime on the "
        f"{data['test_samples']} test images, mean ± std over seeds: the graph as written "
        "(graph optimizations off), except ONNX Runtime's `quantize_static` rows, which run its "
        "fused integer kernels, as such a model deploys. Rows sorted by W2A2 accuracy."
        + (
            f" Teachers and float students copied from `{args.pool_from}`, trained there by an "
            "earlier invocation with these settings; their training time by its reports is in "
            "the run times above."
            if args.pool_from
            else ""
        )
        + (
            f" **Distillation methods distil their float student too**: each trains its own, "
            f"with `{args.float_method}` from its teachers over the same {args.float_epochs} "
            "epochs (`student.float_method`; its accuracy in the float column), and starts QAT "
            "from it. The baselines start from the plain float student."
            if args.float_method != "none"
            else ""
        ),
        "",
        "| method | float | " + " | ".join(c.upper() for c in columns) + " |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " |",
        f"| float student (baseline) | {_cell(summary, 'float')} | | | |",
    ]
    for method in rows:
        label = BASELINE_LABELS.get(method, method)
        cells = [_cell(summary, f"{method}/{c}") for c in ["float", *columns]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ptq = CALIBRATION_METHODS if "w8a8" in args.bits else []
    for name in ptq:  # UINT8 activations, INT8 per-channel weights: W8A8
        lines.append(
            f"| ORT quantize_static {name} (PTQ, baseline) | | "
            f"{_cell(summary, f'{ORT_PTQ}{name}/int8')} | | |"
        )
    teachers = [k for k in summary if k.startswith("teacher_")]
    missing = [m for m in METHODS if m not in args.methods]
    if missing:
        lines += ["", f"**Partial table**: not in this run: {', '.join(missing)}."]
    missing_bits = [c for c in columns if c not in args.bits]
    if missing_bits:
        lines += ["", f"**Partial table**: bit-widths not in this run: {', '.join(missing_bits)}."]
    lines += [
        "",
        "Teachers (float): " + ", ".join(f"{k} {_cell(summary, k)}" for k in teachers) + ".",
        "",
        *targets_table(checks),
    ]
    return "\n".join(lines) + "\n"


def _data_description(args: argparse.Namespace) -> dict[str, str]:
    """The data set as the plain-QAT run of the first seed measured it."""
    report = json.loads(
        (Path(args.work) / f"seed{args.seeds[0]}" / POOL_METHOD / "report.json").read_text()
    )
    channels, height, width = report["input_shape"]
    return {
        "dataset": report["dataset"],
        "size": f"{height}x{width}" + ("" if channels == 1 else f"x{channels}"),
        "test_samples": f"{report['test_samples']:,}".replace(",", " "),
    }


def _cell(summary: dict, key: str) -> str:
    if key not in summary:
        return ""
    v = summary[key]
    return f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--jobs", type=int, default=2, help="seeds trained in parallel processes")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument(
        "--bits",
        nargs="+",
        default=["w8a8", *LOW_BITS],
        choices=["w8a8", *LOW_BITS],
        help="bit-widths to run: each method runs those of its own that are given",
    )
    p.add_argument("--student", default="resnet8")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=10, help="QAT epochs, every method")
    p.add_argument("--lr", type=float, default=0.05, help="QAT learning rate, every method")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--float-epochs", type=int, default=30, help="float student, before QAT")
    p.add_argument(
        "--float-method",
        default="none",
        choices=float_methods(),
        help="distillation methods train their own float student with this method from their "
        "teachers (student.float_method); the baselines keep the pool's",
    )
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default="runs/bench-methods")
    p.add_argument("--name", default="methods", help="result files: OUT/NAME.md and .json")
    p.add_argument(
        "--pool-from",
        metavar="WORK",
        help="copy the teachers and float students of an earlier --work folder (same seeds and "
        "settings) instead of training them; their training time is added to the budget",
    )
    args = p.parse_args(argv)
    if not set(LOW_BITS) & set(args.bits):
        p.error(f"--bits needs one of {', '.join(LOW_BITS)}: the plain-QAT baseline runs there")
    too_few = too_few_teachers_for_float_method(args)
    if too_few:
        p.error(
            f"--float-method {args.float_method} needs at least "
            f"{method_class(args.float_method).needs_teachers} teachers, more than these "
            f"methods distil from: {', '.join(too_few)}; leave them out of --methods or use "
            "--float-method kd"
        )
    for seed in args.seeds if args.pool_from else []:
        check_reusable_pool(args, seed)
    start = time.perf_counter()
    per_seed, timing = run_seeds(args)
    seconds = time.perf_counter() - start
    summary = summarize(per_seed)
    checks = targets(summary)
    payload = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work", "name")},
        "wall_time_s": round(seconds, 1),
        "method_wall_time_s": timing,
        "summary": summary,
    }
    text = markdown(summary, checks, args, seconds, timing)
    write_results(args.out, args.name, payload, checks, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
