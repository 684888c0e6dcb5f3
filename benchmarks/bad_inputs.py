"""Bad input to every command, each in a fresh process, as a user would type it.

Target: 0 tracebacks, 0 silent successes (exit 0 on bad input), 0 run directories left behind by
a new run that failed, 0 hangs. Each case is one command line against files the script makes:
a finished tiny run, damaged copies of it, broken configs, models, reports and bundles.

    python benchmarks/bad_inputs.py        # about 5 minutes on 2 cores

Writes ``benchmarks/results/bad_inputs.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from results_io import machine_line, targets_table, write_results

MAIN = [sys.executable, "-m", "qkd_deploy.train_and_export", "--no-progress"]
CLI = [sys.executable, "-m", "qkd_deploy.cli"]
TINY = """
teachers: [{arch: resnet8}]
teacher_train: {epochs: 1, batch_size: 128, lr: 0.1}
student:
  bits: [w8a8]
  float_train: {epochs: 1, batch_size: 128, lr: 0.1}
  train: {epochs: 1, batch_size: 128, lr: 0.01, warmup_epochs: 0}
data: {calibration_size: 128}
bench: {batch_sizes: [1], warmup: 1, iterations: 2}
"""


@dataclass
class Case:
    name: str
    argv: list[str]
    new_run: Path | None = None  # a directory that must not exist afterwards


@dataclass
class Outcome:
    name: str
    code: int | None
    seconds: float
    traceback: bool
    left_behind: bool
    first_line: str


def make_files(root: Path) -> dict[str, Path]:
    """A finished tiny run and every broken file the cases use."""
    f = {name: root / name for name in ("run", "tiny.yaml", "notes.txt", "empty")}
    f["tiny.yaml"].write_text(TINY)
    f["notes.txt"].write_text("not a folder")
    f["empty"].mkdir()
    command = [*MAIN, "--config", str(f["tiny.yaml"]), "--out", str(f["run"])]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    onnx_bytes = (f["run"] / "w8a8" / "model.onnx").read_bytes()
    files = {
        "empty.onnx": b"",
        "truncated.onnx": onnx_bytes[: len(onnx_bytes) // 3],
        "garbage.onnx": os.urandom(4096),
        "latin1.yaml": "data: {spec: 'folder:/données'}\n".encode("latin-1"),
        "list.yaml": b"- just\n- a list\n",
        "broken.yaml": b"student: {bits: [w8a8\n",
        "unknown.yaml": b"student: {colour: blue}\n",
        "truncated.pt": (f["run"] / "w8a8" / "model.pt").read_bytes()[:100],
        "teachers.py": b"def build():\n    return 'not a model'\n",
        "key.txt": b"short",
        "not-json.json": b"{not json",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
        f[name] = root / name
    for name, damage in _run_damages().items():
        copy = root / name
        shutil.copytree(f["run"], copy, ignore=shutil.ignore_patterns(".lock"))
        damage(copy)
        f[name] = copy
    one_class = root / "one-class" / "train" / "only"
    one_class.mkdir(parents=True)
    f["one-class"] = root / "one-class"
    bundle = root / "bundle"
    subprocess.run(
        [*CLI, "bundle", str(f["run"]), "--out", str(bundle)], check=True, stdout=subprocess.DEVNULL
    )
    f["bundle"] = bundle
    f["bundle-damaged"] = _damaged_bundle(bundle, root / "bundle-damaged")
    f["bundle-truncated.tar.gz"] = root / "bundle-truncated.tar.gz"
    with tarfile.open(root / "whole.tar.gz", "w:gz") as tar:
        tar.add(bundle, arcname=".")
    data = (root / "whole.tar.gz").read_bytes()
    f["bundle-truncated.tar.gz"].write_bytes(data[: len(data) // 2])
    return f


def _run_damages():
    def truncate(path: Path) -> None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return {
        "run-truncated-model": lambda r: truncate(r / "w8a8" / "model.pt"),
        "run-planted-model": lambda r: (r / "w8a8" / "model.pt").write_bytes(
            b"cos\nsystem\n(S'true'\ntR."
        ),
        "run-broken-config": lambda r: (r / "config.yaml").write_text("student: [\n"),
        "run-unknown-config": lambda r: (r / "config.yaml").write_text("colour: blue\n"),
        "run-report-not-json": lambda r: (r / "report.json").write_text("{not json"),
        "run-report-list": lambda r: (r / "report.json").write_text("[]"),
        "run-report-no-students": lambda r: (r / "report.json").write_text('{"dataset": "x"}'),
    }


def _damaged_bundle(bundle: Path, copy: Path) -> Path:
    shutil.copytree(bundle, copy)
    expected = copy / "expected.json"
    values = json.loads(expected.read_text())
    values.pop("tolerances", None)
    expected.write_text(json.dumps(values))
    return copy


def cases(f: dict[str, Path], root: Path) -> list[Case]:
    new = root / "new-run"

    def main(*argv: str) -> Case:
        return Case(" ".join(argv), [*MAIN, *argv, "--out", str(new)], new)

    def cli(*argv: str) -> Case:
        return Case(" ".join(["qkd-deploy", *argv]), [*CLI, *argv])

    def resume(run: str, *argv: str) -> Case:
        return Case(f"--resume {run} {' '.join(argv)}", [*MAIN, "--resume", str(f[run]), *argv])

    run, onnx = str(f["run"]), str(f["run"] / "w8a8" / "model.onnx")
    return [
        *(
            main(*a)
            for a in [
                ["--bits", ","],
                ["--bits", "8,w8a8"],
                ["--bits", "w1a8"],
                ["--bits", "abc"],
                ["--set", "seed=["],
                ["--set", 'seed=!!python/object/apply:os.system ["true"]'],
                ["--set", "seed=abc"],
                ["--set", "nosuch=1"],
                ["--set", "student.train.lr=-1"],
                ["--set", "student.train.epochs=0"],
                ["--set", "data.calibration_size=0"],
                ["--set", "export.opset=5"],
                ["--set", "export.opset=99"],
                ["--set", "export.min_agreement=2"],
                ["--set", "bench.batch_sizes=[0]"],
                ["--set", "bench.iterations=0"],
                ["--set", "quant.target=gpu"],
                ["--set", "quant.layer_bits={nosuch: w4a4}"],
                ["--method", "nosuch"],
                ["--method", "feed", "--set", "student.method_options={nosuch: 1}"],
                ["--data", "nosuch"],
                ["--data", "cifar10:/nonexistent"],
                ["--data", "folder:/nonexistent"],
                ["--data", f"folder:{f['empty']}"],
                ["--data", f"folder:{f['one-class']}"],
                ["--normalize", "abc"],
                ["--normalize", "0.5,0"],
                ["--teacher", "nosuchmodule:build"],
                ["--teacher", "teachers:build"],
                ["--teacher-checkpoint", "x.pt"],
                ["--teacher", "teachers:nosuch"],
                ["--student-arch", "nosuch"],
                ["--config", "/nonexistent.yaml"],
                ["--config", str(f["latin1.yaml"])],
                ["--config", str(f["list.yaml"])],
                ["--config", str(f["broken.yaml"])],
                ["--config", str(f["unknown.yaml"])],
                ["--epochs", "0"],
                ["--epochs", "abc"],
                ["--set", "threads=-1"],
                ["--set", "device=tpu"],
                ["--set", "student.min_accuracy=3"],
                ["--target", "nosuch"],
                ["--set", "student.float_method=ptq"],
            ]
        ),
        Case("--out FILE", [*MAIN, "--out", str(f["notes.txt"])]),
        Case("--out FILE/sub", [*MAIN, "--out", str(f["notes.txt"] / "sub")]),
        Case("--out existing run", [*MAIN, "--out", run]),
        resume("run", "--epochs", "3"),
        resume("run", "--set", "student.train.lr=1"),
        resume("run-truncated-model"),
        resume("run-planted-model"),
        resume("run-broken-config"),
        resume("run-unknown-config"),
        Case("--resume /nonexistent", [*MAIN, "--resume", "/nonexistent"]),
        Case("--resume FILE", [*MAIN, "--resume", str(f["notes.txt"])]),
        cli("lint", "/nonexistent.onnx"),
        cli("lint", str(f["empty.onnx"])),
        cli("lint", str(f["truncated.onnx"])),
        cli("lint", str(f["garbage.onnx"])),
        cli("lint", str(f["empty"])),
        cli("bench", str(f["empty.onnx"])),
        cli("bench", str(f["truncated.onnx"])),
        cli("bench", str(f["garbage.onnx"])),
        cli("bench", onnx, "--batch-sizes", "0"),
        cli("report", "/nonexistent"),
        cli("report", str(f["run-report-not-json"])),
        cli("report", str(f["run-report-list"])),
        cli("report", str(f["run-report-no-students"])),
        cli("compare", str(f["run-report-not-json"]), run),
        cli("compare", "/nonexistent", run),
        cli("verify", "/nonexistent"),
        cli("verify", str(f["bundle-damaged"])),
        cli("verify", str(f["bundle-truncated.tar.gz"])),
        cli("verify", str(f["bundle"]), "--sign-key", str(f["key.txt"])),
        cli("bundle", run, "--student", "nosuch"),
        cli("bundle", "/nonexistent"),
        cli("export", "/nonexistent"),
        cli("export", run, "--opset", "5"),
        cli("export", run, "--set", "student.train.lr=1"),
        cli("export", str(f["run-truncated-model"]), "--opset", "17"),
        cli("build-engine", onnx),
        cli("nosuch"),
        cli("methods", "--nosuch"),
        cli("sensitivity", "/nonexistent"),
        cli("diff", "/nonexistent.onnx"),
    ]


def attempt(case: Case, cwd: Path, timeout: float) -> Outcome:
    start = time.perf_counter()
    try:
        done = subprocess.run(
            case.argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=None
        )
        code, err = done.returncode, done.stderr
    except subprocess.TimeoutExpired:
        code, err = None, ""
    left = case.new_run is not None and case.new_run.exists()
    if left:
        shutil.rmtree(case.new_run)
    lines = [line for line in err.splitlines() if line.strip()]
    tmp = str(cwd)  # the temporary folder's name means nothing to a reader
    return Outcome(
        case.name.replace(tmp, "$TMP"),
        code,
        round(time.perf_counter() - start, 1),
        "Traceback (most recent call last)" in err,
        left,
        (lines[-1] if lines else "").replace(tmp, "$TMP")[:200],
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = make_files(root)
        outcomes = [attempt(c, root, args.timeout) for c in cases(files, root)]
    tracebacks = [o for o in outcomes if o.traceback]
    silent = [o for o in outcomes if o.code == 0]
    left = [o for o in outcomes if o.left_behind]
    hangs = [o for o in outcomes if o.code is None]
    checks = [
        ("0 tracebacks", not tracebacks, str(len(tracebacks))),
        ("0 silent successes (exit 0)", not silent, str(len(silent))),
        ("0 run directories left behind", not left, str(len(left))),
        ("0 hangs", not hangs, str(len(hangs))),
    ]
    lines = [
        "# Bad input to every command",
        "",
        machine_line(),
        "",
        f"{len(outcomes)} command lines, each in a fresh process (`benchmarks/bad_inputs.py`).",
        "",
        *targets_table(checks),
        "",
        "| case | exit | s | what the user read (last line) |",
        "| --- | --- | --- | --- |",
        *(
            f"| `{o.name}` | {o.code} | {o.seconds} | {o.first_line.replace('|', '/')} |"
            for o in outcomes
        ),
    ]
    payload = {"cases": [o.__dict__ for o in outcomes]}
    write_results(out, "bad_inputs", payload, checks, "\n".join(lines) + "\n")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
