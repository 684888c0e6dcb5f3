"""The main command with your own student (``--student MODULE:FACTORY``, optionally its trained
float weights with ``--student-checkpoint``): QAT, distillation, PTQ, feature methods, both export
targets, resume, export and bundle, and the checks before training."""

import json
import shutil
import textwrap

import pytest
import torch
import yaml

from qkd_deploy import cli
from qkd_deploy.config import load_config
from qkd_deploy.data import load_dataset, split_statistics
from qkd_deploy.deploy.bundle import make_bundle
from qkd_deploy.fileio import sha256_file
from qkd_deploy.pipeline import checks as P
from qkd_deploy.rundir import RunDir
from qkd_deploy.train_and_export import export_main, main

NETS = "qkd_user_student_nets"  # the module the tests write, imported from the working directory
NETS_SOURCE = textwrap.dedent("""
    import torch
    from torch import nn

    def block(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU())

    class Net(nn.Module):
        \"\"\"A stem, a residual block written with +, a strided block, pool and linear.\"\"\"

        def __init__(self, width):
            super().__init__()
            self.stem = block(1, width)
            self.layer1 = block(width, width)
            self.layer2 = block(width, 2 * width, stride=2)
            self.fc = nn.Linear(2 * width, 10)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.layer1(x)
            x = self.layer2(x)
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    class ViewNet(Net):
        \"\"\"Flattens a feature map with ``.view``, as many CIFAR models do: fails in
        channels-last layout.\"\"\"

        def __init__(self, width):
            super().__init__(width)
            self.fc = nn.Linear(2 * width * 4 * 4, 10)

        def forward(self, x):
            # torch gives a one-channel image's convolution a channels-last output: the user's
            # own training on grey images would need this .contiguous() too; on RGB, not
            x = self.stem(x).contiguous()
            x = self.layer2(x + self.layer1(x))
            return self.fc(x.view(x.size(0), -1))

    class TupleNet(Net):
        \"\"\"Returns (logits, features), as some training code wants.\"\"\"

        def forward(self, x):
            return super().forward(x), x

    def student():
        return Net(8)

    def tuple_student():
        return TupleNet(8)

    def view_student():
        return ViewNet(8)

    def teacher():
        return Net(16)
""")
STAGES = "[layer1, layer2]"
STAGE_SECTIONS = ("teacher_train", "student.float_train", "student.train")
QUICK = [  # one epoch everywhere, small calibration and latency runs
    *("--epochs 1 --bits 8 --no-progress".split()),
    *("--set data.calibration_size=128 --set bench.batch_sizes=[1]".split()),
    *("--set bench.warmup=1 --set bench.iterations=2".split()),
    *("--set student.train.batch_size=128 --set student.float_train.batch_size=128".split()),
]


def _train(factory, epochs: int) -> torch.nn.Module:
    """A model from ``factory`` after a few epochs of Adam on the digits, normalised as the
    pipeline normalises them; seeded before the model is built, so its initial weights do not
    depend on which tests ran before in this worker."""
    data = load_dataset("digits", None)
    preprocess = split_statistics(data.train, 0)
    images, labels = preprocess.apply(data.train.images), data.train.labels
    torch.manual_seed(0)
    model = factory()
    optimizer = torch.optim.Adam(model.parameters(), 0.01)
    for _ in range(epochs):
        for batch in torch.randperm(len(images)).split(64):
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """A folder holding the user's module and trained float weights of its two models."""
    folder = tmp_path_factory.mktemp("nets")
    (folder / f"{NETS}.py").write_text(NETS_SOURCE)
    namespace: dict = {}
    exec(NETS_SOURCE, namespace)
    torch.save(_train(namespace["student"], 4).state_dict(), folder / "student.pt")
    torch.save(_train(namespace["teacher"], 4).state_dict(), folder / "teacher.pt")
    return folder


@pytest.fixture(autouse=True)
def in_nets(nets, monkeypatch):
    """Every command runs in the user's folder, as a user would (modules import from there)."""
    monkeypatch.chdir(nets)


TEACHER = ["--teacher", f"{NETS}:teacher", "--teacher-checkpoint", "teacher.pt"]
GIVEN = ["--student", f"{NETS}:student", "--student-checkpoint", "student.pt"]


def _run(out, *args) -> dict:
    assert main([*args, *QUICK, "--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def given_run(nets):
    """Plain QAT (``none``) from the user's trained float student, tensorrt target."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(nets)
        out = nets / "runs" / "given"
        return out, _run(out, *GIVEN, *TEACHER, "--method", "none")


def test_a_given_float_student_is_evaluated_not_trained_and_qat_starts_from_it(nets, given_run):
    out, report = given_run
    (float_row,) = report["float_references"]
    assert float_row["method"] == "checkpoint" and float_row["arch"] == f"{NETS}:student"
    given = torch.load(nets / "student.pt")
    kept = torch.load(out / "student_float" / "model.pt")
    assert all(torch.equal(given[k], kept[k]) for k in given) and given.keys() == kept.keys()
    assert float_row["accuracy_onnx"] > 0.8  # the given weights, evaluated as they are
    (w8a8,) = report["students"]
    assert w8a8["name"] == "student_w8a8" and w8a8["method"] == "none"
    # one epoch of QAT at lr 0.01 from fresh weights lands far below; from the given ones, near
    assert w8a8["accuracy_onnx"] > float_row["accuracy_onnx"] - 0.05
    assert w8a8["onnx_agreement"] >= 0.99
    stored = yaml.safe_load((out / "config.yaml").read_text())
    config = stored["student"]
    assert config["module"] == f"{NETS}:student" and config["checkpoint"] == "student.pt"
    assert config["arch"] is None
    assert stored["teachers"] == [
        {
            "arch": None,
            "module": f"{NETS}:teacher",
            "checkpoint": "teacher.pt",
            "feature_layers": None,
        }
    ]
    inputs = json.loads((out / "manifest.json").read_text())["inputs"]
    assert inputs["student_checkpoint"] == {
        "path": "student.pt",
        "sha256": sha256_file(nets / "student.pt"),
    }


def test_resume_export_and_bundle_work_with_a_user_student(given_run, tmp_path):
    out, report = given_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "w8a8")
    (copy / "report.json").unlink()
    assert main(["--resume", str(copy)]) == 0  # the module is imported again
    resumed = json.loads((copy / "report.json").read_text())
    assert resumed["students"][0]["accuracy_onnx"] == report["students"][0]["accuracy_onnx"]
    exported = tmp_path / "opset17"
    assert export_main([str(out), "--opset", "17", "--out", str(exported)]) == 0
    import onnx

    model = onnx.load(exported / "w8a8" / "model.onnx")
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    bundle = make_bundle(out, tmp_path / "bundle")
    assert (bundle.directory / "model.onnx").is_file()


def test_ptq_of_a_given_student_for_onnxruntime(nets):
    report = _run(
        nets / "runs" / "ptq", *GIVEN, *TEACHER, "--method", "ptq", "--target", "onnxruntime"
    )
    (float_row,) = report["float_references"]
    (w8a8,) = report["students"]
    assert float_row["method"] == "checkpoint" and w8a8["method"] == "ptq"
    assert w8a8["accuracy_onnx"] >= float_row["accuracy_onnx"] - 0.02  # W8A8 PTQ is near-lossless
    assert report["target"] == "onnxruntime" and w8a8["onnx_agreement"] >= 0.99


def test_kd_decay_trains_a_user_student_from_its_factory(nets):
    args = ["--student", f"{NETS}:student", *TEACHER, "--target", "onnxruntime"]
    longer = [f"student.float_train.{k}" for k in ("optimizer=adamw", "lr=0.01", "epochs=4")]
    report = _run(nets / "runs" / "kd", *args, *(a for s in longer for a in ("--set", s)))
    (float_row,) = report["float_references"]
    assert float_row["method"] == "none" and float_row["accuracy_onnx"] > 0.5  # trained here
    assert report["students"][0]["method"] == "kd-decay"
    assert report["students"][0]["accuracy_onnx"] > 0.5


def test_a_student_that_flattens_with_view_trains_in_the_ordinary_layout(nets, capsys):
    """``x.view(x.size(0), -1)`` on a feature map fails in channels-last, the CPU's training
    layout: the run finds out before training and trains the float and QAT students without it."""
    report = _run(nets / "runs" / "view", "--student", f"{NETS}:view_student", *TEACHER)
    assert "note: training in the ordinary memory layout" in capsys.readouterr().err
    (float_row,) = report["float_references"]
    assert float_row["method"] == "none" and float_row["accuracy_onnx"] > 0.5  # trained here
    assert report["students"][0]["accuracy_onnx"] > 0.5
    assert report["students"][0]["onnx_agreement"] >= 0.99


def test_feed_distils_the_stage_layers_named_for_student_and_teacher(nets):
    teachers = (
        f"teachers=[{{module: '{NETS}:teacher', checkpoint: teacher.pt, feature_layers: {STAGES}}}]"
    )
    args = [
        *GIVEN,
        "--method",
        "feed",
        "--set",
        teachers,
        "--set",
        f"student.feature_layers={STAGES}",
    ]
    report = _run(nets / "runs" / "feed", *args)
    (w8a8,) = report["students"]
    assert w8a8["method"] == "feed" and w8a8["accuracy_onnx"] > 0.5
    checkpoint = torch.load(nets / "runs" / "feed" / "w8a8" / "checkpoint.pt", weights_only=False)
    assert checkpoint["history"][0]["losses"]["feed"] > 0  # the stage maps were distilled


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "feed", *TEACHER], "student.feature_layers (e.g."),
        (
            ["--method", "feed", *TEACHER, "--set", f"student.feature_layers={STAGES}"],
            "teachers[0].feature_layers (e.g.",
        ),
        (
            ["--method", "indistill", *TEACHER, "--set", "student.feature_layers=[layer1, layr2]"],
            "student.feature_layers: ['layr2'] name no module of Net",
        ),
        (["--student-arch", "resnet8"], "--student and --student-arch both name the student"),
        (["--student", f"{NETS}:tuple_student"], "returns a tuple, not a tensor"),
        (["--float-method", "kd", *TEACHER], "student.float_method=kd trains the float student"),
    ],
)
def test_a_user_student_that_does_not_fit_fails_before_any_training(
    args, message, tmp_path, capsys
):
    out = tmp_path / "run"
    assert main([*GIVEN, *args, *QUICK, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_a_student_checkpoint_that_does_not_load_fails_before_the_teacher_trains(tmp_path, capsys):
    """The teacher's weights given as the student's: refused before the zoo teacher trains for
    it, and the run leaves no directory, so the corrected command runs as it is."""
    out = tmp_path / "run"
    wrong = ["--student", f"{NETS}:student", "--student-checkpoint", "teacher.pt"]
    assert main([*wrong, *QUICK, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "teacher.pt" in err and "Traceback" not in err
    assert not out.exists()
    assert main([*GIVEN, *QUICK, "--method", "ptq", "--out", str(out)]) == 0


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("indistill", []),
        ("cmt-kd", ["teachers=[{arch: resnet8}]", "student.method_options.teacher_bits=[8]"]),
        ("cdfkd-mfs", []),
        ("dafl", []),
        ("pcl", []),
    ],
)
def test_every_feature_method_steps_on_a_user_student(method, overrides, nets):
    """The checks before training build the method on the run's models and compute one step's
    losses: the same code the training runs."""
    user_teacher = {
        "module": f"{NETS}:teacher",
        "checkpoint": "teacher.pt",
        "feature_layers": ["layer1", "layer2"],
    }
    config = load_config(
        overrides=[
            f"student.module={NETS}:student",
            f"student.feature_layers={STAGES}",
            f"student.method={method}",
            "teachers="
            + json.dumps([user_teacher, user_teacher][: 2 if method == "cdfkd-mfs" else 1]),
            *overrides,
        ]
    )
    data = load_dataset("digits", None)
    ctx = P.Context(config, data, split_statistics(data.train, 0), RunDir(nets / "unused"))
    distiller, images, labels = P.untrained_method(ctx)
    distiller.train()
    logits, terms = distiller.forward_train(images, labels, 0.0)
    assert logits.shape[1] == 10 and all(torch.isfinite(t) for t in terms.values())
    assert distiller.student.feature_layers == ["layer1", "layer2"]  # quantized, names kept


def test_your_student_and_weights_on_a_folder_of_images_written_here(nets, tmp_path):
    """The main command end to end with --student and --student-checkpoint on a small image
    folder (10 classes of grey PNGs, streamed by a decoding process), as a user with their own
    data would run it; the two low-bit students train side by side, each stage process with its
    own decoding process. A precision budget, ``sensitivity`` and ``diff --run`` read the
    folder's images too."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for label in range(10):
            folder = tmp_path / "images" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(25 * label, 12, (8, 8)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, "L").save(folder / f"{i}.png")
    out = tmp_path / "run"
    small = [f"--set={stage}.batch_size=16" for stage in STAGE_SECTIONS]
    args = [*GIVEN, "--teacher-arch", "resnet8", "--method", "none", "--allow-low-accuracy"]
    args += ["--data", f"folder:{tmp_path / 'images'}", "--set", "data.image_size=8"]
    args += ["--epochs", "1", "--bits", "8,4", "--no-progress", "--set", "data.calibration_size=32"]
    args += ["--set", "bench.batch_sizes=[1]", "--set", "bench.iterations=2", *small]
    args += ["--set", "jobs=2", "--set", "data.workers=1", "--set", "quant.budget=share:0.5"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["input_shape"] == [1, 8, 8] and report["num_classes"] == 10
    (float_row,) = report["float_references"]
    assert float_row["method"] == "checkpoint"
    given = torch.load(nets / "student.pt")
    kept = torch.load(out / "student_float" / "model.pt")
    assert all(torch.equal(given[k], kept[k]) for k in given)
    assert report["environment"]["stage_processes"] == 2
    for student in report["students"]:
        assert student["onnx_agreement"] >= 0.99 and (out / student["onnx_path"]).is_file()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert len(config["quant"]["layer_bits"]) == 1  # half its selectable layers, rounded down
    assert cli.main(["sensitivity", str(out), "--images", "20"]) == 0
    table = json.loads((out / "sensitivity.json").read_text())
    assert table["images"] == 20 and table["layers"]
    assert cli.main(["diff", str(out / "w4a4" / "model.onnx"), "--run", str(out)]) in (0, 1)
