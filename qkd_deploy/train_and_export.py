"""``python -m qkd_deploy.train_and_export``: the whole pipeline in one command, from its
arguments to a config to ``qkd_deploy.pipeline.run``.

With no arguments it trains a float teacher on the embedded digits data, distils it into W8A8 and
W4A4 students with KD inside QAT, exports them as Q/DQ ONNX, checks them in ONNX Runtime, measures
accuracy and latency, and writes ``report.json``, ``report.md`` and ``manifest.json``.

Torch loads only once ``main`` runs (after the OpenMP wait policy is set), never on import.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path

from qkd_deploy.config import Config, load_config, save_config
from qkd_deploy.errors import TrainingDiverged, UserError, expected_failure
from qkd_deploy.targets import Target

# CLI flag -> the config keys it sets (``--epochs`` sets every training stage's epochs)
FLAG_KEYS = {
    "data": ["data.spec"],
    "normalize": ["data.normalize"],
    "student_arch": ["student.arch"],
    "student": ["student.module"],
    "student_checkpoint": ["student.checkpoint"],
    "method": ["student.method"],
    "float_method": ["student.float_method"],
    "target": ["quant.target"],
    "seed": ["seed"],
    "epochs": ["teacher_train.epochs", "student.float_train.epochs", "student.train.epochs"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m qkd_deploy.train_and_export",
        description="Train a teacher, distil low-bit students with QAT, export Q/DQ ONNX, "
        "check and benchmark them.",
    )
    p.add_argument("--out", help="run directory (default runs/<timestamp>)")
    p.add_argument("--config", help="YAML config file (see README); flags override it")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its files")
    p.add_argument(
        "--data",
        help="digits | fashion-mnist[:DIR] | mnist:DIR | cifar10:DIR | cifar100:DIR | folder:DIR",
    )
    p.add_argument(
        "--normalize",
        metavar="MEAN,STD",
        help="input normalisation on [0,1] pixels, one value or m1/m2/m3 per channel",
    )
    p.add_argument(
        "--teacher-arch",
        help="zoo model(s) to train as teachers, comma-separated (default: the method's)",
    )
    p.add_argument(
        "--teacher",
        action="append",
        default=[],
        metavar="MODULE:FACTORY",
        help="your own teacher model (repeat for several)",
    )
    p.add_argument(
        "--teacher-checkpoint",
        action="append",
        default=[],
        metavar="PATH",
        help="weights of the --teacher at the same position",
    )
    p.add_argument("--student-arch", help="zoo model for the students (default resnet8)")
    p.add_argument(
        "--student",
        metavar="MODULE:FACTORY",
        help="your own model for the students (instead of --student-arch)",
    )
    p.add_argument(
        "--student-checkpoint",
        metavar="PATH",
        help="trained float weights of the --student: the float stage does not train, QAT "
        "starts from them",
    )
    p.add_argument("--bits", help="students to make: 8,4 (= w8a8,w4a4) or w4a8,...")
    p.add_argument("--method", help="distillation method (default kd-decay)")
    p.add_argument(
        "--float-method",
        help="distil the float student too, before QAT (kd, kd-decay, avg-teachers or feed; "
        "default none: labels only)",
    )
    p.add_argument("--target", choices=[t.value for t in Target], help="export target")
    p.add_argument("--epochs", type=_at_least_one, help="epochs of every training stage")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. --set student.train.lr=0.02 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--allow-low-accuracy",
        action="store_true",
        help="exit 0 even when a student ends near chance (student.min_accuracy=0)",
    )
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    if args.student and args.student_arch:
        raise UserError(
            "--student and --student-arch both name the student; give your own model "
            "(--student MODULE:FACTORY) or a zoo one (--student-arch), not both"
        )
    overrides = []
    for flag, keys in FLAG_KEYS.items():
        value = getattr(args, flag)
        if value is not None:  # a string flag is taken as written: quoted, YAML sees no "#"
            text = json.dumps(value) if isinstance(value, str) else value
            overrides += [f"{key}={text}" for key in keys]
    teachers = _teacher_entries(args)
    if teachers:
        overrides.append("teachers=" + json.dumps(teachers))
    if args.student_arch:  # the flag wins over a config file's own student model
        overrides.append("student.module=null")
    if args.bits:
        overrides.append("student.bits=[" + ",".join(_bit_names(args.bits)) + "]")
    if args.no_progress:
        overrides.append("progress=false")
    if args.allow_low_accuracy:
        overrides.append("student.min_accuracy=0")
    return load_config(args.config, overrides + args.set)


def _teacher_entries(args: argparse.Namespace) -> list[dict]:
    """``--teacher``/``--teacher-checkpoint`` pairs (by position), then ``--teacher-arch``."""
    if len(args.teacher_checkpoint) > len(args.teacher):
        raise UserError("--teacher-checkpoint needs a --teacher MODULE:FACTORY for it")
    checkpoints = args.teacher_checkpoint + [None] * (
        len(args.teacher) - len(args.teacher_checkpoint)
    )
    entries = [
        {"module": m, "checkpoint": c} for m, c in zip(args.teacher, checkpoints, strict=True)
    ]
    if args.teacher_arch:
        entries += [{"arch": a.strip()} for a in args.teacher_arch.split(",") if a.strip()]
    return entries


def _bit_names(text: str) -> list[str]:
    from qkd_deploy.bits import BitWidths

    names = [BitWidths.parse(part).name for part in text.split(",") if part.strip()]
    if not names:
        raise UserError(f"--bits {text!r} names no bit-width; write e.g. --bits 8,4 or w4a8")
    return names


def config_and_directory(args: argparse.Namespace) -> tuple[Config, Path, bool]:
    """The run's config and directory, and whether the run is new; writes nothing (the
    directory is claimed by ``run`` once it holds the directory's lock)."""
    from qkd_deploy.pipeline.checks import check_method

    if args.resume:
        root = Path(args.resume)
        stored = _stored_config(root)
        check_resume_flags(args)
        overrides = args.set + (["progress=false"] if args.no_progress else [])
        if args.allow_low_accuracy:
            overrides.append("student.min_accuracy=0")
        config = load_config(str(stored), overrides)
        check_method(config)  # an edited config.yaml fails before the run goes on
        return config, root, False
    config = build_config(args)
    config.student.method_options = check_method(config)
    root = Path(args.out or config.out or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {root} is a file, not a folder; choose a new folder")
    config.out = str(root)
    return config, root, True


# every flag that sets the run's settings (what --resume cannot change)
SETTING_FLAGS = (
    "out",
    "config",
    "teacher_arch",
    "teacher",
    "teacher_checkpoint",
    "bits",
    *FLAG_KEYS,
)
# what a resumed run may change: nothing a model was trained with
RESUMABLE_SECTIONS = ("export.", "bench.")
RESUMABLE_KEYS = ("device", "threads", "jobs", "student.min_accuracy")


def check_resume_flags(args: argparse.Namespace) -> None:
    """A resumed run keeps the settings its models were trained with: a flag that would change
    them is an error, not silently ignored. ``--set export.*`` and ``--set bench.*`` may change
    (the finished models are then exported and measured again, e.g. ``export.opset=17`` for
    TensorRT 8.6), and ``--set device=...`` (where the rest trains)."""
    given = [
        "--" + flag.replace("_", "-")
        for flag in SETTING_FLAGS
        if getattr(args, flag) not in (None, [])
    ]
    if given:
        raise UserError(
            f"--resume continues a run with the settings in its config.yaml, so {', '.join(given)} "
            "would be ignored; start a new run for other settings"
        )
    for item in args.set:
        if not _resumable(item):
            raise UserError(
                f"--resume with --set {item!r}: a resumed run keeps the settings its models were "
                "trained with; only export.*, bench.* and device can change, and threads, jobs and "
                "student.min_accuracy (the models are then exported and measured again). Start a "
                "new run for other settings"
            )


def main(argv: list[str] | None = None) -> int:
    """The whole pipeline; under torchrun, process 0 runs it and the others train with it."""
    from qkd_deploy.train.threads import prefer_passive_waiting

    prefer_passive_waiting()  # before torch loads its OpenMP runtime
    from qkd_deploy.pipeline import run
    from qkd_deploy.train import distributed
    from qkd_deploy.train.loop import serve

    root = None
    try:
        args = parse_args(argv)
        with distributed.session() as group:
            if group is not None and not group.leader:
                _import_like_the_leader()
                serve(group)
                return 0
            config, root, new = config_and_directory(args)
            report = run(config, root, new)
    except KeyboardInterrupt:
        print(_interrupted(root), file=sys.stderr)
        return 130
    except Exception as error:
        message = expected_failure(error)
        if message is None:
            raise  # a bug: its traceback (the run directory is cleaned as after a user error)
        print(f"error: {message}{_resume_hint(error, root)}", file=sys.stderr)
        return 2
    from qkd_deploy.bench.report import summary_table

    print()
    print(summary_table(report))
    print(f"\nRun directory: {root}  (report.json, report.md, manifest.json, */model.onnx)")
    failures = accuracy_failures(report, config.student.min_accuracy)
    if failures:
        print(
            f"error: {'; '.join(failures)}. Every file of the run is kept in {root}; to accept "
            "such a student, run with --allow-low-accuracy (--set student.min_accuracy=0)",
            file=sys.stderr,
        )
        return 1
    return 0


def _import_like_the_leader() -> None:
    """The jobs process 0 sends hold the user's models pickled; their modules are imported from
    the working directory there (``models.user``), so they unpickle here from it too."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)


def accuracy_failures(report: dict, min_accuracy: float | None) -> list[str]:
    """The float and quantized students whose ONNX test accuracy is below ``min_accuracy``
    (None: 5 points above chance, where a student has learnt nothing usable)."""
    floor = min_accuracy
    if floor is None:
        floor = 1 / report["num_classes"] + 0.05
    models = report["float_references"] + report["students"]
    return [
        f"{m['name']} ends at {100 * m['accuracy_onnx']:.2f} % test accuracy, below the "
        f"{100 * floor:.2f} % floor (student.min_accuracy)"
        for m in models
        if m["accuracy_onnx"] < floor
    ]


def _resume_hint(error: Exception, root: Path | None) -> str:
    """How to go on after a failure that kept the run's files (a diverged stage, a full disk)."""
    if root is None or not (root / "config.yaml").is_file():
        return ""
    if isinstance(error, TrainingDiverged):
        if error.checkpoint is None:
            return ""
        return f"; or continue from that checkpoint as it is with --resume {root}"
    if isinstance(error, OSError):
        return f" (--resume {root})"
    return ""


def _interrupted(root: Path | None) -> str:
    """What to do after Ctrl-C: every finished stage and the last epoch checkpoint are kept."""
    if root is None or not root.is_dir():
        return "interrupted before the run started"
    return (
        f"interrupted; {root} keeps every finished stage and the last epoch's checkpoint: "
        f"continue with python -m qkd_deploy.train_and_export --resume {root}"
    )


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def export_main(argv: list[str]) -> int:
    """``qkd-deploy export RUN``: export and measure a finished run's models again with other
    export or bench settings (``--resume`` with those alone); it never trains."""
    from qkd_deploy.pipeline.plan import Plan

    p = argparse.ArgumentParser(
        prog="qkd-deploy export",
        description="Export a finished run's models again (e.g. --opset 17 for TensorRT 8.6), "
        "check and measure them; rewrites the run's ONNX files and report, never trains.",
    )
    p.add_argument("run", help="the run directory")
    p.add_argument("--opset", type=int, help="ONNX opset (17 for TensorRT 8.6 / JetPack 6.0)")
    p.add_argument("--set", action="append", default=[], metavar="export.KEY=VALUE")
    p.add_argument("--out", help="export into a copy of the run here, keeping the run as it is")
    args = p.parse_args(argv)
    root = Path(args.run)
    stored = _stored_config(root)
    for item in args.set:
        if not _resumable(item):
            raise UserError(
                f"--set {item!r}: export changes only export.*, bench.* and device settings "
                "(and threads, jobs, student.min_accuracy)"
            )
    config = load_config(str(stored))
    missing = [f for f in Plan.of(config).trained_model_files(root) if not f.is_file()]
    if missing:
        raise UserError(
            f"{root} has not finished training ({missing[0]} is missing) and export never trains; "
            f"finish it with python -m qkd_deploy.train_and_export --resume {root}"
        )
    sets = args.set + ([f"export.opset={args.opset}"] if args.opset is not None else [])
    if not args.out:
        return main(["--resume", str(root), *(f"--set={item}" for item in sets)])
    copy = _copy_run(root, Path(args.out))
    code = 2
    try:
        code = main(["--resume", str(copy), *(f"--set={item}" for item in sets)])
    finally:
        if code not in (0, 1):  # the error is printed; a copy that did not export goes
            shutil.rmtree(copy, ignore_errors=True)
    return code


def _resumable(item: str) -> bool:
    """Whether ``--set item`` changes only what a resumed run may change."""
    key = item.partition("=")[0].strip()
    return key in RESUMABLE_KEYS or key.startswith(RESUMABLE_SECTIONS)


def _stored_config(root: Path) -> Path:
    """The ``config.yaml`` of the run directory ``root``."""
    stored = root / "config.yaml"
    if not stored.is_file():
        raise UserError(f"{root}: no config.yaml there; give the directory of a run")
    return stored


def _copy_run(root: Path, out: Path) -> Path:
    """A copy of the run ``root`` at ``out`` (new or empty), without its lock file; its
    ``config.yaml`` names its own directory."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; choose a new directory")
    try:
        shutil.copytree(root, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".lock"))
    except BaseException:  # a full disk mid-copy leaves no half copy behind
        shutil.rmtree(out, ignore_errors=True)
        raise
    config = load_config(str(out / "config.yaml"))
    config.out = str(out)
    save_config(config, out / "config.yaml")
    return out


if __name__ == "__main__":
    sys.exit(main())
