"""The main command end to end on a tiny config: real data, training, export, ONNX Runtime."""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import onnx
import pytest
import torch

from qkd_deploy import cli
from qkd_deploy.config import load_config, save_config
from qkd_deploy.data import BatchLoader, Preprocess, load_dataset, stratified_subset
from qkd_deploy.deploy.bundle import make_bundle
from qkd_deploy.distill.logit import KDDecayOptions
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import sha256_file
from qkd_deploy.models.registry import build_model
from qkd_deploy.pipeline import run
from qkd_deploy.pipeline.checks import check_method
from qkd_deploy.pipeline.models import quantize_options
from qkd_deploy.quant.convert import BitWidths, quantize_model
from qkd_deploy.train.batchnorm import reestimate_batchnorm
from qkd_deploy.train.device import describe, resolve_device
from qkd_deploy.train_and_export import main

TINY = """
teachers: [{arch: resnet8}]
teacher_train: {epochs: 2, batch_size: 128, lr: 0.1}
student:
  arch: resnet8
  bits: [w8a8, w4a4]
  float_train: {epochs: 2, batch_size: 128, lr: 0.1}
  train: {epochs: 1, batch_size: 128, lr: 0.01, warmup_epochs: 0}
data: {calibration_size: 128}
bench: {batch_sizes: [1, 4], warmup: 1, iterations: 3}
progress: false
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    config = root / "tiny.yaml"
    config.write_text(TINY)
    out = root / "run"
    assert main(["--config", str(config), "--out", str(out)]) == 0
    return config, out


def on_tiny_pool(tiny_run, run_dir, overrides):
    """A run directory of the tiny config with ``overrides`` holding a copy of the tiny run's
    teacher and float student (finished stages: the pipeline reuses them); returns its config."""
    config, out = tiny_run
    for stage in ("teacher", "student_float"):
        shutil.copytree(out / stage, run_dir / stage)
    cfg = load_config(str(config), [*overrides, f"out={run_dir}"])
    save_config(cfg, run_dir / "config.yaml")
    return cfg


def resume_on_tiny_pool(tiny_run, run_dir, overrides):
    """``on_tiny_pool``, run to the end; returns its config."""
    cfg = on_tiny_pool(tiny_run, run_dir, overrides)
    assert main(["--resume", str(run_dir)]) == 0
    return cfg


def quantized_resnet8(cfg, bits: int):
    """The tiny run's student architecture as the pipeline quantizes it at W{bits}A{bits}."""
    options = quantize_options(cfg.quant, BitWidths(bits, bits))
    return quantize_model(build_model("resnet8", 1, 10), options)


def test_report_follows_the_schema(tiny_run):
    _, out = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"] == "digits" and report["test_samples"] == 360
    assert report["teacher"]["arch"] == "resnet8" and 0.5 < report["teacher"]["accuracy"] <= 1
    assert [s["name"] for s in report["students"]] == ["resnet8_w8a8", "resnet8_w4a4"]
    for s in report["students"]:
        assert s["method"] == "kd-decay" and (s["w_bits"], s["a_bits"]) in ((8, 8), (4, 4))
        assert 0 <= s["accuracy_torch"] <= 1 and 0 <= s["accuracy_onnx"] <= 1
        assert s["onnx_agreement"] >= 0.99
        # tensorrt target: float biases, so the exported model is the trained one
        assert abs(s["accuracy_qat"] - s["accuracy_torch"]) <= 1 / 360 + 1e-9
        kernels = s["ort_cpu"]  # ONNX Runtime's fused kernels: a warning when they disagree
        assert 0 <= kernels["accuracy"] <= 1 and 0 <= kernels["agreement"] <= 1
        kernel_warnings = [w for w in s["warnings"] if "fused CPU kernels" in w]
        assert bool(kernel_warnings) == (kernels["agreement"] < 0.99)
        assert not [w for w in s["warnings"] if "collapsed" in w]  # students well above chance
        assert (out / s["onnx_path"]).stat().st_size == s["onnx_bytes"]
        rows = s["latency_ms"]["onnxruntime_cpu"]
        assert [r["batch"] for r in rows] == [1, 4] and all(r["p90"] >= r["p50"] > 0 for r in rows)
        assert s["engine"] is None
    assert report["preprocess"]["mean"] and report["input_shape"] == [1, 8, 8]
    assert "| resnet8_w4a4 |" in (out / "report.md").read_text()
    trained_on = describe(resolve_device("auto"))  # "cpu" here, the GPU where torch sees one
    assert report["environment"]["training_device"] == trained_on
    stages = report["environment"]["stage_processes"]  # 2 where both cores were idle
    beside = "" if stages == 1 else f", up to {stages} stages side by side"
    assert f"; trained on {trained_on}{beside};" in (out / "report.md").read_text()
    assert report["environment"]["onnxruntime_threads"] == 0  # bench.threads: ORT's default
    assert "(ONNX Runtime CPU, ONNX Runtime's default threads)" in (out / "report.md").read_text()


def test_onnx_files_are_quantized_and_self_contained(tiny_run):
    _, out = tiny_run
    model = onnx.load(out / "w4a4" / "model.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    assert not list(out.rglob("*.data"))


def test_manifest_hashes_every_file(tiny_run):
    _, out = tiny_run
    manifest = json.loads((out / "manifest.json").read_text())
    # the package's version; torch.__version__ may add the build (2.14.1+cu130)
    assert manifest["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert manifest["config"]["student"]["bits"] == ["w8a8", "w4a4"]
    files = manifest["files"]
    assert {"report.json", "config.yaml", "w8a8/model.onnx", "teacher/model.pt"} <= set(files)
    for name, entry in files.items():
        assert sha256_file(out / name) == entry["sha256"], name


def test_resume_finishes_a_killed_run_with_the_same_numbers(tiny_run, tmp_path):
    _, out = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "w4a4" / "model.pt").unlink()  # killed after its last checkpoint, before the end
    for name in ("report.json", "report.md", "manifest.json", "w4a4/model.onnx"):
        (copy / name).unlink()
    assert main(["--resume", str(copy)]) == 0
    before = json.loads((out / "report.json").read_text())["students"]
    after = json.loads((copy / "report.json").read_text())["students"]
    for a, b in zip(before, after, strict=True):
        assert (a["accuracy_torch"], a["accuracy_onnx"]) == (
            b["accuracy_torch"],
            b["accuracy_onnx"],
        )


def test_resume_reads_back_finished_exports_unless_settings_changed(tiny_run, tmp_path):
    _, out = tiny_run
    before = json.loads((out / "report.json").read_text())
    assert (out / "teacher" / "accuracy.json").is_file()
    kept, changed = tmp_path / "kept", tmp_path / "changed"
    for copy in (kept, changed):
        shutil.copytree(out, copy)
        (copy / "report.json").unlink()
    (kept / "w4a4" / "model.onnx").unlink()
    config = load_config(str(changed / "config.yaml"))
    config.bench.iterations += 1
    save_config(config, changed / "config.yaml")
    assert main(["--resume", str(kept)]) == 0
    assert main(["--resume", str(changed)]) == 0

    def latencies(root, report=None):
        report = report or json.loads((root / "report.json").read_text())
        return [s["latency_ms"] for s in report["float_references"] + report["students"]]

    # measured latencies never repeat to the last digit: equal ones were read back
    assert latencies(kept)[:2] == latencies(out, before)[:2]  # float student, w8a8
    assert latencies(kept)[2] != latencies(out, before)[2]  # w4a4 lost its ONNX file
    assert (kept / "w4a4" / "model.onnx").is_file()
    assert all(a != b for a, b in zip(latencies(changed), latencies(out, before), strict=True))
    assert json.loads((kept / "report.json").read_text())["teachers"] == before["teachers"]
    # other bench settings measure again but do not export again (onnx.json): same weights,
    # same export settings; the file was written once (copytree keeps the times)
    for stage in ("student_float", "w8a8", "w4a4"):
        onnx = changed / stage / "model.onnx"
        assert onnx.stat().st_mtime_ns == (out / stage / "model.onnx").stat().st_mtime_ns


def test_existing_run_directory_is_not_overwritten(tiny_run, capsys):
    config, out = tiny_run
    before = (out / "report.json").read_bytes()
    assert main(["--config", str(config), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "student.method_options.temperature=2"], "has no option(s) ['temperature']"),
        (["--method", "kd-decay", "--set", "student.method_options.schedule=step"], "'cosine'"),
        (["--method", "dafl", "--teacher-arch", "resnet8,resnet8"], "one teacher at most, got 2"),
        (["--method", "cmt-kd", "--teacher-arch", "resnet8,resnet8"], "for teacher_bits"),
        # no teachers given: the method's three default teachers are counted
        (["--method", "cmt-kd", "--set", "student.method_options.teacher_bits=[8,4]"], "got 3"),
        (["--float-method", "dml"], "'dml' cannot train the float student"),
        (["--float-method", "ptq"], "use one of avg-teachers, feed, kd, kd-decay, none"),
        (["--float-method", "kd", "--set", "student.float_reference=false"], "set it to true"),
        (["--float-method", "kd", "--set", "student.float_method_options.beta=2"], "['beta']"),
        (["--float-method", "avg-teachers", "--teacher-arch", "resnet8"], "at least 2 teacher"),
    ],
)
def test_a_bad_method_setting_fails_before_the_run_directory_is_made(
    args, message, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main([*args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


SEQUENTIAL_TEACHER = """
from torch import nn
def teacher():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))
"""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # resnet8's last stage is 2x2 on the 8x8 digits, mobilenetv2's 1x1 (pooled by default)
        (
            ["--method", "feed", "--teacher-arch", "resnet8,mobilenetv2"]
            + ["--set", "student.method_options.resize=none"],
            "teacher's is (1, 1)",
        ),
        (["--method", "indistill", "--teacher-arch", "mobilenetv2"], "the teacher 4"),
        (["--method", "feed", "--teacher", "sequential_teacher:teacher"], "no stage feature maps"),
        # kd takes any teacher; the float student's feed does not
        (
            ["--method", "kd", "--float-method", "feed", "--teacher", "sequential_teacher:teacher"],
            "no stage feature maps",
        ),
    ],
)
def test_a_model_that_does_not_fit_the_method_fails_before_any_training(
    args, message, tmp_path, capsys, monkeypatch
):
    (tmp_path / "sequential_teacher.py").write_text(SEQUENTIAL_TEACHER)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main([*args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # failed before the teachers stage wrote anything


def test_the_method_check_leaves_the_random_state_alone(tmp_path):
    from qkd_deploy.data import load_dataset, normalization_stats
    from qkd_deploy.pipeline import checks as P
    from qkd_deploy.rundir import RunDir

    data = load_dataset("digits", None)
    config = load_config(overrides=["student.method=dkel"])  # peers and an EMA teacher
    ctx = P.Context(config, data, normalization_stats(data.train.images.numpy()), RunDir(tmp_path))
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    P.check_method_fits(ctx)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert list(tmp_path.iterdir()) == []


def test_a_run_stores_every_method_option_and_resume_checks_them_first(tiny_run, tmp_path, capsys):
    _, out = tiny_run
    stored = load_config(str(out / "config.yaml")).student.method_options
    assert stored == dataclasses.asdict(KDDecayOptions())  # the default method, all its options
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.json").unlink()
    config = load_config(str(copy / "config.yaml"))
    config.student.method_options["schedule"] = "step"
    save_config(config, copy / "config.yaml")
    files = sorted(copy.rglob("*"))
    assert main(["--resume", str(copy)]) == 2
    assert "kd-decay schedule 'step'" in capsys.readouterr().err
    assert sorted(copy.rglob("*")) == files


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    assert main(["--data", "cifar10:/no/such/dir", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "/no/such/dir" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # the same command works once the data is there
    assert main(["--bits", "w1a8", "--out", str(tmp_path / "r2")]) == 2
    assert "2 to 8" in capsys.readouterr().err


def test_a_batch_larger_than_the_training_split_fails_before_training(tmp_path, capsys):
    from PIL import Image

    for split, count in (("train", 6), ("test", 2)):
        for name in ("cats", "dogs"):
            folder = tmp_path / "images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("L", (8, 8), color=40 * i).save(folder / f"{i}.png")
    out = tmp_path / "run"
    args = ["--data", f"folder:{tmp_path / 'images'}", "--out", str(out), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the training split has only 12 images, fewer than a batch (teacher_train" in err
    sets = "--set teacher_train.batch_size=12 --set student.float_train.batch_size=12 --set "
    assert sets + "student.train.batch_size=12" in err  # every stage at once, not one a run
    assert not out.exists()


def test_user_teacher_from_module_and_checkpoint(tiny_run, tmp_path, monkeypatch):
    """--teacher MODULE:FACTORY with --teacher-checkpoint replaces teacher training."""
    _, out = tiny_run
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent("""
        from qkd_deploy.models import build_model
        def teacher():
            return build_model("resnet8", 1, 10)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    run = tmp_path / "user_run"
    code = subprocess.run(
        [
            sys.executable,
            "-m",
            "qkd_deploy.train_and_export",
            "--teacher",
            "my_models:teacher",
            "--teacher-checkpoint",
            str(out / "teacher" / "model.pt"),
            "--bits",
            "8",
            "--epochs",
            "1",
            "--set",
            "bench.iterations=2",
            "--set",
            "bench.batch_sizes=[1]",
            "--no-progress",
            "--out",
            str(run),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert code.returncode == 0, code.stderr[-2000:]
    user = json.loads((run / "report.json").read_text())["teacher"]
    trained = json.loads((out / "report.json").read_text())["teacher"]
    assert user == {"arch": "my_models:teacher", "accuracy": trained["accuracy"]}
    assert not (run / "teacher").exists()


def test_compare_and_plot_a_real_run(tiny_run, tmp_path, capsys, monkeypatch):
    from qkd_deploy.cli import main as cli

    _, out = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    report = json.loads((run / "report.json").read_text())
    assert cli(["compare", str(out), str(run)]) == 0
    report["students"][-1]["accuracy_onnx"] -= 0.02
    (run / "report.json").write_text(json.dumps(report))
    assert cli(["compare", str(out), str(run)]) == 1
    assert f"| {report['students'][-1]['name']} | accuracy % |" in capsys.readouterr().out

    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)  # as without the 'plots' extra
        assert cli(["report", str(run), "--plot"]) == 2
    assert "qkd-deploy[plots]" in capsys.readouterr().err
    assert not (run / "report.png").exists()
    pytest.importorskip("matplotlib", reason="the 'plots' extra is not installed")
    from matplotlib.image import imread

    assert cli(["report", str(run), "--plot"]) == 0
    image = imread(run / "report.png")
    assert image.shape[:2] == (462, 1210)  # 11 x 4.2 inches at 110 dpi
    assert image[..., :3].std() > 0.05  # something was drawn


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "5"], "--epochs would be ignored"),
        (["--method", "kd", "--seed", "3"], "--method, --seed would be ignored"),
        (["--set", "student.train.lr=0.5"], "only export.*, bench.* and device can change"),
    ],
)
def test_resume_refuses_settings_it_would_ignore(tiny_run, tmp_path, capsys, args, message):
    _, out = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    files = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert main(["--resume", str(run), *args]) == 2
    assert message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == files


def test_export_command_reexports_a_finished_run_at_another_opset(tiny_run, tmp_path, capsys):
    """``qkd-deploy export RUN --opset 17 --out COPY`` (``--resume`` with export settings only,
    in a copy of the run): new ONNX files, the same weights and accuracies, the run untouched.
    It refuses a run whose training is not finished."""
    _, out = tiny_run
    unfinished = tmp_path / "unfinished"
    shutil.copytree(out, unfinished)
    (unfinished / "w4a4" / "model.pt").unlink()
    assert cli.main(["export", str(unfinished), "--opset", "17"]) == 2
    assert "has not finished training" in capsys.readouterr().err
    assert not (unfinished / "w4a4" / "model.pt").exists()
    assert cli.main(["export", str(out), "--set", "student.train.epochs=2"]) == 2
    assert "only export.*, bench.* and device" in capsys.readouterr().err
    # a device that is not there fails, and the copy made for it is not left behind
    failed = tmp_path / "on-cuda"
    assert cli.main(["export", str(out), "--set", "device=cuda", "--out", str(failed)]) == 2
    assert "cuda" in capsys.readouterr().err and not failed.exists()

    copy = tmp_path / "copy"
    trained = {p.relative_to(out): sha256_file(p) for p in out.glob("*/model.pt")}
    at_18 = sha256_file(out / "w4a4" / "model.onnx")
    export = ["export", str(out), "--opset", "17", "--set", "device=cpu", "--out", str(copy)]
    assert cli.main(export) == 0  # device too: a run trained on a GPU exports on a CPU
    assert sha256_file(out / "w4a4" / "model.onnx") == at_18  # --out keeps the run as it was
    copied = load_config(str(copy / "config.yaml"))
    assert copied.export.opset == 17 and copied.out == str(copy) and copied.device == "cpu"
    for name in ("student_float", "w8a8", "w4a4"):
        model = onnx.load(copy / name / "model.onnx")
        assert {o.domain: o.version for o in model.opset_import}[""] == 17
    assert {p.relative_to(copy): sha256_file(p) for p in copy.glob("*/model.pt")} == trained
    before, after = (json.loads((r / "report.json").read_text()) for r in (out, copy))
    assert [s["accuracy_onnx"] for s in after["students"]] == [
        s["accuracy_onnx"] for s in before["students"]
    ]
    # exporting in place keeps the run's own settings (here progress bars on)
    config = load_config(str(copy / "config.yaml"))
    config.progress = True
    save_config(config, copy / "config.yaml")
    bundle = make_bundle(copy, student="w4a4").directory  # the bit-width names the student
    assert bundle.name == "bundle_resnet8_w4a4"
    capsys.readouterr()
    assert cli.main(["export", str(copy), "--opset", "18"]) == 0
    assert load_config(str(copy / "config.yaml")).progress is True
    # its opset-17 bundle would still verify: it is removed, and the user told
    assert not bundle.exists() and not bundle.with_name(bundle.name + ".tar.gz").exists()
    assert f"removed {bundle.name}" in capsys.readouterr().err
    fresh = make_bundle(copy).directory
    assert cli.main(["export", str(copy)]) == 0  # nothing changed: the bundle stays
    assert (fresh / "model.onnx").is_file()


def test_ptq_exports_the_calibrated_float_student_without_training(tiny_run, tmp_path):
    """``--method ptq`` on the tiny run's trained teacher and float student (copied in): the
    students are the float student's weights, calibrated, never trained."""
    _, out = tiny_run
    run = tmp_path / "ptq"
    resume_on_tiny_pool(tiny_run, run, ["student.method=ptq", "student.bits=[w8a8, w2a2]"])
    report = json.loads((run / "report.json").read_text())
    (float_student,) = report["float_references"]
    w8, w2 = report["students"]
    assert w8["method"] == w2["method"] == "ptq"
    assert w8["accuracy_onnx"] >= float_student["accuracy_onnx"] - 0.03
    assert w2["accuracy_onnx"] < w8["accuracy_onnx"] - 0.05  # 2 bits without training lose
    float_weights = torch.load(out / "student_float" / "model.pt", weights_only=True)
    for bits in ("w8a8", "w2a2"):
        assert not (run / bits / "checkpoint.pt").exists()
        weights = torch.load(run / bits / "model.pt", weights_only=True)
        shared = [k for k in float_weights if k.endswith(".weight") and k in weights]
        assert len(shared) > 5
        assert all(torch.equal(weights[k], float_weights[k]) for k in shared)


def test_float_method_distils_the_float_student_that_quantization_starts_from(tiny_run, tmp_path):
    """``student.float_method=kd`` with the tiny run's trained teacher copied in: the float
    student trains with KD from it (the same initial weights, images and epochs as the tiny
    run's plain float student, so only the loss differs), and the quantized students start from
    it (``ptq`` keeps the float weights)."""
    config, out = tiny_run
    run = tmp_path / "kd-float"
    shutil.copytree(out / "teacher", run / "teacher")
    overrides = ["student.method=ptq", "student.bits=[w8a8]", "student.float_method=kd"]
    cfg = load_config(str(config), [*overrides, f"out={run}"])
    save_config(cfg, run / "config.yaml")
    assert main(["--resume", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    (float_student,) = report["float_references"]
    assert float_student["method"] == "kd"
    assert "| student_float resnet8 | kd | float |" in (run / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["float_references"][0]["method"] == "none"
    plain = torch.load(out / "student_float" / "model.pt", weights_only=True)
    distilled = torch.load(run / "student_float" / "model.pt", weights_only=True)
    trained = [k for k in plain if k.endswith(".weight")]
    assert not any(torch.equal(plain[k], distilled[k]) for k in trained)
    quantized = torch.load(run / "w8a8" / "model.pt", weights_only=True)
    shared = [k for k in trained if k in quantized]
    assert len(shared) > 5
    assert all(torch.equal(quantized[k], distilled[k]) for k in shared)


def test_float_checkpoints_hold_the_teachers_only_when_the_float_student_distils(
    tiny_run, tmp_path
):
    """The plain float student's checkpoint is the student's alone (as before float_method); a
    distilled one's also holds its frozen teachers, so a resumed stage restores all of it."""
    config, out = tiny_run
    plain = torch.load(out / "student_float" / "checkpoint.pt", weights_only=False)["model"]
    assert plain and not any(k.startswith("teachers.") for k in plain)
    run = tmp_path / "kd-float"
    shutil.copytree(out / "teacher", run / "teacher")
    overrides = ["student.method=ptq", "student.bits=[w8a8]", "student.float_method=kd"]
    save_config(load_config(str(config), [*overrides, f"out={run}"]), run / "config.yaml")
    assert main(["--resume", str(run)]) == 0
    distilled = torch.load(run / "student_float" / "checkpoint.pt", weights_only=False)["model"]
    assert any(k.startswith("teachers.0.") for k in distilled)


def test_teachers_default_to_the_float_methods_when_only_the_float_student_distils():
    from qkd_deploy.pipeline.plan import teacher_configs

    def archs(*overrides):
        return [t.arch for t in teacher_configs(load_config(overrides=list(overrides)))]

    assert archs("student.method=none", "student.float_method=avg-teachers") == [
        "resnet8x4",
        "resnet32x4",
    ]
    assert archs("student.method=feed", "student.float_method=kd") == ["resnet8x4", "resnet8x4"]
    assert archs("student.method=feed", "teachers=[{arch: resnet20}]") == ["resnet20"]


def test_ptq_reestimates_batchnorm_on_the_calibration_images_unless_told_not_to(tiny_run, tmp_path):
    """``ptq``'s ``bn_reestimate`` (default on): its student is the one of
    ``bn_reestimate=false`` with only the BatchNorm statistics recomputed on the calibration
    images."""
    _, out = tiny_run

    def ptq_run(name, *overrides):
        run_dir = tmp_path / name
        cfg = resume_on_tiny_pool(
            tiny_run, run_dir, ["student.method=ptq", "student.bits=[w2a2]", *overrides]
        )
        return cfg, torch.load(run_dir / "w2a2" / "model.pt", weights_only=True)

    cfg, reestimated = ptq_run("on")
    _, kept = ptq_run("off", "student.method_options.bn_reestimate=false")
    float_weights = torch.load(out / "student_float" / "model.pt", weights_only=True)
    stats = [k for k in kept if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(kept[k], float_weights[k]) for k in stats)  # off: the float's

    student = quantized_resnet8(cfg, 2)
    student.load_state_dict(kept)
    data = load_dataset(cfg.data.spec)
    report = json.loads((tmp_path / "on" / "report.json").read_text())
    preprocess = Preprocess.from_dict(report["preprocess"])
    calibration = stratified_subset(data.train, cfg.data.calibration_size, cfg.seed)
    reestimate_batchnorm(student, (x for x, _ in BatchLoader(calibration, preprocess, 256)))
    expected = student.state_dict()
    for k, value in reestimated.items():
        if k in stats:
            torch.testing.assert_close(value, expected[k])
            assert not torch.allclose(value, kept[k])
        elif "num_batches" not in k:
            assert torch.equal(value, kept[k]), k  # weights and step sizes untouched


def test_ptq_needs_the_float_student():
    config = load_config(overrides=["student.method=ptq", "student.float_reference=false"])
    with pytest.raises(UserError, match="student.float_reference=false skips that student"):
        check_method(config)


def test_ptq_students_batch_size_is_not_checked_as_it_never_trains():
    """A small folder with the default student batch of 64 is fine for ``ptq``."""
    from qkd_deploy.pipeline.plan import training_stages as _training_stages

    small = ["teacher_train.batch_size=8", "student.float_train.batch_size=8"]
    keys = [
        key for key, _ in _training_stages(load_config(overrides=[*small, "student.method=ptq"]))
    ]
    assert keys == ["teacher_train", "student.float_train"]
    keys = [key for key, _ in _training_stages(load_config(overrides=small))]
    assert keys == ["teacher_train", "student.float_train", "student.train"]


def test_same_seed_same_numbers(tiny_run, tmp_path):
    config, out = tiny_run
    assert main(["--config", str(config), "--out", str(tmp_path / "again")]) == 0

    def numbers(root):
        report = json.loads((root / "report.json").read_text())
        return [report["teacher"]["accuracy"]] + [
            (s["accuracy_torch"], s["accuracy_onnx"], s["onnx_max_abs_error"])
            for s in report["students"]
        ]

    assert numbers(out) == numbers(tmp_path / "again")


def test_onnxruntime_target_end_to_end_runs_on_integer_kernels(tiny_run, tmp_path):
    """``--target onnxruntime`` (from the tiny run's teacher and float student): the exported
    W4A8 student agrees with torch on every test image and ONNX Runtime runs no float layer
    (4-bit weights sit on INT8; sub-8-bit activations would need a Clip that ONNX Runtime
    cannot fuse)."""
    import onnxruntime as ort

    config, out = tiny_run
    run_dir = tmp_path / "ort"
    for stage in ("teacher", "student_float"):  # finished stages: the pipeline reuses them
        shutil.copytree(out / stage, run_dir / stage)
    overrides = ["quant.target=onnxruntime", "student.bits=[w4a8]"]
    report = run(load_config(str(config), overrides), run_dir)
    assert report["target"] == "onnxruntime"
    assert report["students"][0]["onnx_agreement"] == 1.0
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(run_dir / "w4a8" / "model.onnx"), options)
    ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert {"QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm"} <= ops
    assert not ops & {"Conv", "Add", "ReduceMean", "Gemm", "MatMul"}


@pytest.mark.parametrize(
    "accuracy, num_classes, warns",
    [(0.10, 10, True), (0.1499, 10, True), (0.16, 10, False), (0.83, 10, False), (0.54, 2, True)],
)
def test_collapse_warning_only_near_chance(accuracy, num_classes, warns):
    from qkd_deploy.pipeline.stages import collapse_warning

    warning = collapse_warning("w2a2", accuracy, num_classes, trained=True)
    assert (warning is not None) == warns
    if warns:
        assert "w2a2/checkpoint.pt" in warning and f"{100 * accuracy:.1f} %" in warning


def test_collapse_warning_of_an_untrained_student_asks_for_training_not_a_lower_rate():
    from qkd_deploy.pipeline.stages import collapse_warning

    warning = collapse_warning("w2a2", 0.11, 10, trained=False)
    assert "post-training quantization" in warning and "--method none" in warning
    assert "checkpoint.pt" not in warning and "student.train.lr" not in warning
    assert collapse_warning("w2a2", 0.83, 10, trained=False) is None


def test_a_bad_student_training_setting_fails_before_any_training(tmp_path):
    overrides = [f"out={tmp_path}", "progress=false", "student.train.grad_clip=0"]
    with pytest.raises(UserError, match=r"student\.train\.grad_clip must be a positive norm"):
        run(load_config(overrides=overrides), tmp_path)
    assert not (tmp_path / "teacher").exists()


def test_stages_side_by_side_train_what_one_at_a_time_trains(tiny_run, tmp_path):
    """``jobs=2`` trains the teacher beside the float student and the two low-bit students side
    by side, in forked processes: every weight and ONNX file is bit-identical to ``jobs=1``'s."""
    config, _ = tiny_run
    runs = {}
    for jobs in (1, 2):
        runs[jobs] = tmp_path / f"jobs{jobs}"
        assert (
            main(["--config", str(config), "--out", str(runs[jobs]), "--set", f"jobs={jobs}"]) == 0
        )
    files = sorted(p.relative_to(runs[1]) for p in runs[1].rglob("model.*"))
    assert len(files) == 7  # model.pt of the teacher, model.pt and .onnx of three students
    assert all(sha256_file(runs[1] / f) == sha256_file(runs[2] / f) for f in files)
    reports = {j: json.loads((runs[j] / "report.json").read_text()) for j in runs}
    assert [reports[j]["environment"]["stage_processes"] for j in (1, 2)] == [1, 2]
    assert "up to 2 stages side by side" in (runs[2] / "report.md").read_text()


def test_jobs_at_more_than_one_thread_train_one_stage_at_a_time(tiny_run, tmp_path):
    """``jobs=2`` with torch at 2 threads (``OMP_NUM_THREADS``): a stage process forked after
    the main process ran OpenMP at 2 threads hung in its first parallel region; the stages train
    one at a time instead, and the run says why."""
    config, _ = tiny_run
    out = tmp_path / "run"
    command = [sys.executable, "-m", "qkd_deploy.train_and_export", "--config", str(config)]
    process = subprocess.Popen(
        [*command, "--out", str(out), "--set", "jobs=2"],
        env={**os.environ, "OMP_NUM_THREADS": "2"},
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a hung stage process is killed too
    )
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr[-2000:]
    assert "note: jobs=2 ignored" in stderr and "trains at 2" in stderr
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["stage_processes"] == 1
    assert report["environment"]["threads"] == 2


@pytest.mark.parametrize("jobs", [1, 2])
def test_ctrl_c_says_how_to_resume(tiny_run, tmp_path, jobs):
    """SIGINT while the teacher trains, in this process or beside the float student in its own:
    no traceback, exit 130, the --resume command, no training process left behind."""
    config, _ = tiny_run
    out = tmp_path / "run"
    # a suite started as a background job (`pytest &` from a script) hands its children SIGINT
    # ignored, as POSIX shells do, and Python then keeps it ignored: give the command the
    # handler it has when a user starts it from a terminal
    interactive = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('qkd_deploy.train_and_export', run_name='__main__', alter_sys=True)"
    )
    command = [sys.executable, "-c", interactive, "--config", str(config)]
    process = subprocess.Popen(
        [*command, "--out", str(out), "--epochs", "50", "--set", f"jobs={jobs}"],
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpoint = out / "teacher" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.exists(), "the teacher never wrote its first epoch's checkpoint"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert f"continue with python -m qkd_deploy.train_and_export --resume {out}" in stderr
    assert checkpoint.exists()
    assert not list(out.rglob("*.tmp"))
    assert lock_freed(out / ".lock", within_s=0)  # no stage process holds the directory


LOCK_FREE = (
    "import fcntl, sys; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)"
)


def lock_freed(lock, within_s: float) -> bool:
    """Whether no process holds the run directory's lock, at once or within ``within_s``."""
    deadline = time.monotonic() + within_s
    while subprocess.run([sys.executable, "-c", LOCK_FREE, str(lock)]).returncode != 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_killed_run_leaves_no_stage_process_training_on(tiny_run, tmp_path):
    """SIGKILL the main process while its stages train side by side: the stage processes stop
    with it instead of training on in the background, holding the run directory; the last epoch
    checkpoint stays for --resume."""
    config, _ = tiny_run
    out = tmp_path / "run"
    command = [sys.executable, "-m", "qkd_deploy.train_and_export", "--config", str(config)]
    process = subprocess.Popen(
        # stages long enough (minutes) that a stage process training on would hold the lock
        [*command, "--out", str(out), "--epochs", "1000", "--set", "jobs=2"],
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: nothing outlives the test either
    )
    try:
        checkpoint = out / "teacher" / "checkpoint.pt"
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpoint.exists(), "the teacher never wrote its first epoch's checkpoint"
        process.kill()
        process.wait()
        assert lock_freed(out / ".lock", within_s=10), "a stage process outlived the killed run"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert torch.load(checkpoint, weights_only=True)["epoch"] >= 1


def test_bn_reestimate_recomputes_the_trained_students_batchnorm_statistics(tiny_run, tmp_path):
    """``student.bn_reestimate``: the saved W2A2 student is the last epoch's weights with the
    BatchNorm statistics re-estimated on one more epoch of its training stream, and is what the
    report measures."""
    run_dir = tmp_path / "bn"
    overrides = ["student.method=none", "student.bits=[w2a2]", "student.bn_reestimate=true"]
    cfg = resume_on_tiny_pool(tiny_run, run_dir, overrides)
    report = json.loads((run_dir / "report.json").read_text())

    saved = torch.load(run_dir / "w2a2" / "model.pt", weights_only=True)
    trained = torch.load(run_dir / "w2a2" / "checkpoint.pt", weights_only=True)["model"]
    trained = {
        k.removeprefix("student."): v for k, v in trained.items() if k.startswith("student.")
    }
    stats = [k for k in saved if k.endswith(("running_mean", "running_var"))]
    assert len(stats) > 10
    assert all(
        torch.equal(saved[k], trained[k])
        for k in saved
        if k not in stats and "num_batches" not in k
    )
    assert not any(torch.allclose(saved[k], trained[k]) for k in stats if k.endswith("running_var"))

    data = load_dataset(cfg.data.spec)
    preprocess = Preprocess.from_dict(report["preprocess"])
    student = quantized_resnet8(cfg, 2)
    student.load_state_dict(trained)
    loader = BatchLoader(
        data.train,
        preprocess,
        cfg.student.train.batch_size,
        shuffle=True,
        augment=data.augment,
        seed=cfg.seed + 2,  # the student's training stream
        drop_last=True,
    )
    loader.set_epoch(cfg.student.train.epochs)  # the epoch after the last one trained
    reestimate_batchnorm(student, (x for x, _ in loader))
    for k in stats:
        torch.testing.assert_close(student.state_dict()[k], saved[k])

    student.eval()
    with torch.no_grad():
        logits = student(preprocess.apply(data.test.images))
    (w2,) = report["students"]
    assert w2["accuracy_torch"] == pytest.approx(
        (logits.argmax(1) == data.test.labels).float().mean().item()
    )


@pytest.mark.parametrize(("bits", "jobs"), [(["w8a8"], 1), (["w8a8", "w4a4"], 2)])
def test_a_diverging_stage_stops_with_where_and_which_loss_and_keeps_the_finished_stages(
    tiny_run, tmp_path, capsys, bits, jobs
):
    """One line naming the stage, epoch and loss, whether the stage trained here or beside
    another in its own process (``jobs=2``: both students diverge, the first is reported)."""
    run_dir = tmp_path / "run"
    overrides = [f"student.bits=[{','.join(bits)}]", "student.train.lr=1e30", f"jobs={jobs}"]
    on_tiny_pool(tiny_run, run_dir, overrides)
    kept = {p: sha256_file(p) for p in run_dir.glob("*/model.pt")}
    assert main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert any(f"{b} kd-decay: loss" in err for b in bits)
    assert "=nan" in err and "training diverged" in err
    assert "at epoch 1/1" in err and "no epoch of this stage had finished" in err
    assert "train.lr, now 1e+30" in err and "grad_clip" in err
    assert {p: sha256_file(p) for p in run_dir.glob("*/model.pt")} == kept
    assert not any((run_dir / b / "model.pt").exists() for b in bits)


def test_a_student_at_chance_fails_the_run_keeps_its_files_and_may_be_accepted(
    tiny_run, tmp_path, capsys
):
    """A learning rate that kills the student without a NaN: the run finishes, says so and exits
    1; --resume --allow-low-accuracy accepts it without training again."""
    run_dir = tmp_path / "run"
    on_tiny_pool(tiny_run, run_dir, ["student.bits=[w8a8]", "student.train.lr=20"])
    assert main(["--resume", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "resnet8_w8a8 ends at" in err and "below the 15.00 % floor" in err
    assert "--allow-low-accuracy" in err
    weights = sha256_file(run_dir / "w8a8" / "model.pt")
    assert (run_dir / "report.json").is_file()
    assert main(["--resume", str(run_dir), "--allow-low-accuracy"]) == 0
    assert sha256_file(run_dir / "w8a8" / "model.pt") == weights


@pytest.mark.parametrize("damage", ["truncated", "planted"])
def test_a_damaged_model_file_is_named_on_resume_and_export(tiny_run, tmp_path, capsys, damage):
    _, out = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns(".lock"))
    model = copy / "w4a4" / "model.pt"
    if damage == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    else:  # a pickle that would run code if it were loaded without weights_only
        planted = tmp_path / "planted"
        model.write_bytes(pickle_calling(os.system, f"touch {planted}"))
    assert main(["--resume", str(copy)]) == 2
    err = capsys.readouterr().err
    assert str(model) in err and "Traceback" not in err and "delete" in err
    assert cli.main(["export", str(copy), "--opset", "17"]) == 2
    assert str(model) in capsys.readouterr().err
    if damage == "planted":
        assert not planted.exists()


def pickle_calling(function, argument) -> bytes:
    import pickle

    class Payload:
        def __reduce__(self):
            return function, (argument,)

    return pickle.dumps(Payload())


def test_a_bug_keeps_its_traceback_and_leaves_no_new_run_directory(tmp_path, monkeypatch):
    import qkd_deploy.pipeline.checks as pipeline

    def broken(ctx):
        raise RuntimeError("a bug in a check")

    monkeypatch.setattr(pipeline, "check_method_fits", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="a bug in a check"):
        main(["--out", str(out), "--no-progress"])
    assert not out.exists()


def test_a_full_disk_mid_run_is_one_error_and_the_run_resumes(
    tiny_run, tmp_path, monkeypatch, capsys
):
    """ENOSPC while a student is exported: the message names the file and --resume, every
    finished stage stays, and the resumed run finishes."""
    import errno

    import qkd_deploy.pipeline.runner as pipeline

    run_dir = tmp_path / "run"
    on_tiny_pool(tiny_run, run_dir, ["student.bits=[w8a8]"])
    export = pipeline.export_stage

    def disk_full(ctx, model, name, quantized):
        if quantized:
            target = ctx.run.root / name / "model.onnx"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return export(ctx, model, name, quantized)

    monkeypatch.setattr(pipeline, "export_stage", disk_full)
    code = main(["--resume", str(run_dir)])
    monkeypatch.undo()
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No space left on device: ") and "Traceback" not in err
    assert str(run_dir / "w8a8" / "model.onnx") in err and f"--resume {run_dir}" in err
    assert (run_dir / "w8a8" / "model.pt").is_file()
    assert main(["--resume", str(run_dir)]) == 0
    assert (run_dir / "w8a8" / "model.onnx").is_file()


def test_quant_trace_false_reaches_the_quantizer():
    """``quant.trace=false`` quantizes layers only (the fallback for an untraceable model)."""
    cfg = load_config(overrides=["quant.trace=false"])
    options = quantize_options(cfg.quant, BitWidths(8, 8))
    assert options.trace is False
    assert quantize_options(load_config().quant, BitWidths(8, 8)).trace is True
