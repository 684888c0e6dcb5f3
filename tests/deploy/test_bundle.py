"""Deploy bundles from a real (tiny) run: contents, verify on ONNX Runtime and TensorRT, tamper
detection, safe archives, refusals, and the torch-free rule."""

import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import onnx
import pytest

from qkd_deploy.data.preprocess import Preprocess
from qkd_deploy.deploy.bundle import (
    CONTENTS,
    MANIFEST,
    TENSORRT_MIN_AGREEMENT,
    extract_bundle,
    main_bundle,
    main_verify,
    make_bundle,
    select_student,
    verify_bundle,
)
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import sha256_file
from qkd_deploy.runtime.engine_info import write_sidecar
from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner
from tests.support.bundle_run import STUDENT


@pytest.fixture(scope="module")
def bundle(run_dir):
    """The default bundle (inside the run); tests that change files work on a copy."""
    return make_bundle(run_dir)


@pytest.fixture
def copy(bundle, tmp_path):
    return shutil.copytree(bundle.directory, tmp_path / "bundle")


def _json(path):
    return json.loads(path.read_text())


# --- the bundle ------------------------------------------------------------------------------


def test_bundle_holds_model_labels_preprocessing_and_expected_outputs(run_dir, bundle):
    folder = bundle.directory
    assert folder == run_dir / f"bundle_{STUDENT}" and bundle.student == STUDENT
    assert sorted(p.name for p in folder.iterdir()) == sorted([*CONTENTS, MANIFEST])
    report = _json(run_dir / "report.json")
    student = report["students"][0]
    assert sha256_file(folder / "model.onnx") == sha256_file(run_dir / student["onnx_path"])
    assert _json(folder / "labels.json") == report["class_names"]

    spec = _json(folder / "preprocess.json")
    assert Preprocess.from_dict(spec) == Preprocess.from_dict(report["preprocess"])
    assert spec["input_shape"] == report["input_shape"]
    assert (spec["input_name"], spec["output_name"]) == ("images", "logits")

    expected = _json(folder / "expected.json")
    assert (expected["student"], expected["method"], expected["dataset"]) == (
        STUDENT,
        "kd-decay",
        "digits",
    )
    assert (expected["w_bits"], expected["a_bits"], expected["target"]) == (4, 4, "tensorrt")
    assert expected["accuracy_onnx"] == student["accuracy_onnx"]
    assert expected["test_samples"] == 360
    assert expected["onnx_agreement"] == student["onnx_agreement"]
    assert expected["tolerances"]["onnxruntime"] == {"max_abs_error": 1e-4, "min_agreement": 1.0}
    assert expected["tolerances"]["tensorrt"]["min_agreement"] == TENSORRT_MIN_AGREEMENT
    largest = float(np.abs(np.load(folder / "sample.npz")["logits"]).max())
    assert expected["tolerances"]["onnxruntime_fused"] == {
        "max_abs_error": pytest.approx(max(1e-4, 0.02 * largest)),
        "min_agreement": TENSORRT_MIN_AGREEMENT,
    }

    with np.load(folder / "sample.npz") as sample, np.load(run_dir / "sample_batch.npz") as raw:
        np.testing.assert_array_equal(sample["images"], raw["images"])
        np.testing.assert_array_equal(sample["labels"], raw["labels"])
        logits = sample["logits"]
        images = sample["images"]
    assert logits.dtype == np.float32 and logits.shape == (16, len(report["class_names"]))
    runner = OnnxRuntimeRunner(folder / "model.onnx", optimize=False)  # the graph as written
    batch = Preprocess.from_dict(spec).apply_numpy(images)
    np.testing.assert_allclose(runner.run(batch), logits, atol=1e-5)

    files = _json(folder / MANIFEST)["files"]
    assert sorted(files) == sorted(CONTENTS)
    for name, entry in files.items():
        assert entry == {
            "sha256": sha256_file(folder / name),
            "bytes": (folder / name).stat().st_size,
        }


def test_build_recipe_names_both_builds_the_trt86_export_and_verify(bundle):
    text = (bundle.directory / "BUILD.md").read_text()
    assert "qkd-deploy build-engine model.onnx --precision int8 --out model.int8.engine" in text
    assert "trtexec --onnx=model.onnx --saveEngine=model.int8.engine --stronglyTyped" in text
    assert "TensorRT 8.6" in text and "`qkd-deploy export RUN --opset 17 --out RUN-opset17`" in text
    assert "qkd-deploy verify ." in text and "--engine model.int8.engine" in text


def test_build_recipe_of_an_onnxruntime_target_runs_onnxruntime_and_builds_no_engine(
    run_dir, tmp_path
):
    """A W4A8 student exported for ONNX Runtime (UINT8 Q/DQ, INT32 biases: TensorRT rejects it),
    from the run's trained teacher and float student."""
    from qkd_deploy.config import load_config
    from qkd_deploy.pipeline import run

    out = tmp_path / "ort"
    for stage in ("teacher", "student_float"):
        shutil.copytree(run_dir / stage, out / stage)
    overrides = ["quant.target=onnxruntime", "student.bits=[w4a8]"]
    run(load_config(str(run_dir.parent / "tiny.yaml"), overrides), out)
    bundle = make_bundle(out)
    graph = onnx.load(bundle.directory / "model.onnx").graph
    assert any(init.data_type == onnx.TensorProto.UINT8 for init in graph.initializer)
    expected = _json(bundle.directory / "expected.json")
    assert expected["target"] == "onnxruntime" and expected["engine"] is None

    text = (bundle.directory / "BUILD.md").read_text()
    assert "Run it with ONNX Runtime" in text
    assert 'ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])' in text
    assert 'session.run(None, {"images": batch})' in text
    assert "build-engine" not in text and "trtexec" not in text and "--engine" not in text
    assert "TensorRT rejects this model" in text and "--set quant.target=tensorrt" in text
    assert "qkd-deploy verify ." in text
    # the fused kernels (on a CPU that accumulates in 32 bits) within their own tolerance
    assert main_verify([str(bundle.directory)]) == 0
    with pytest.raises(UserError, match="exported for ONNX Runtime, which TensorRT rejects"):
        verify_bundle(bundle.directory, runtime="tensorrt", engine=tmp_path / "x.engine")


def test_archive_holds_the_same_folder(bundle):
    assert bundle.archive == bundle.directory.with_name(bundle.directory.name + ".tar.gz")
    with tarfile.open(bundle.archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == sorted(
            f"{bundle.directory.name}/{name}" for name in (*CONTENTS, MANIFEST)
        )
        for name, member in members.items():
            assert member.uname == "" and member.uid == 0
            data = tar.extractfile(member).read()
            assert data == (bundle.directory.parent / name).read_bytes()


def test_default_student_is_the_one_with_fewest_bits():
    students = [
        {"name": n, "w_bits": w, "a_bits": a} for n, w, a in [("a", 8, 8), ("b", 4, 8), ("c", 8, 4)]
    ]
    assert select_student({"students": students})["name"] == "b"  # b and c tie: the first
    assert select_student({"students": students}, "c")["name"] == "c"


# --- verify ----------------------------------------------------------------------------------


def test_verify_passes_on_the_folder_and_on_the_archive(bundle, capsys):
    assert main_verify([str(bundle.directory)]) == 0
    out = capsys.readouterr().out
    assert "16/16 argmax agree" in out and out.rstrip().endswith("PASS")

    assert main_verify([str(bundle.archive), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["passed"] and result["runner"].startswith("onnxruntime_cpu")
    # the default export keeps TensorRT's float biases: ONNX Runtime checks the graph as written
    assert result["runner"].startswith("onnxruntime_cpu (graph as written; the fused kernels:")
    assert "round this TensorRT model's float biases" in result["runner"]
    assert result["agreement"] == 1.0 and result["max_abs_error"] <= 1e-4
    assert [c["name"] for c in result["checks"]] == ["files", "agreement", "max error"]
    assert result["sample_accuracy"] == result["expected"]["sample"]["accuracy"]


def _change_model(folder):
    with open(folder / "model.onnx", "ab") as f:
        f.write(b"\0")


def _change_expected_logits(folder):
    with np.load(folder / "sample.npz") as sample:
        arrays = dict(sample)
    arrays["logits"] = arrays["logits"] + 1
    np.savez(folder / "sample.npz", **arrays)


@pytest.mark.parametrize(
    "name, change",
    [("model.onnx", _change_model), ("sample.npz", _change_expected_logits)],
)
def test_a_changed_file_fails_verify_and_is_named(copy, name, change, capsys):
    change(copy)
    result = verify_bundle(copy)
    assert not result["passed"]
    [files] = result["checks"]
    assert not files["passed"] and files["detail"].startswith(f"{name}: sha256 differs")
    assert main_verify([str(copy)]) == 1
    out = capsys.readouterr().out
    assert name in out and out.rstrip().endswith("FAIL")


def test_a_missing_or_unlisted_file_fails_verify(copy):
    (copy / "labels.json").unlink()
    manifest = _json(copy / MANIFEST)
    del manifest["files"]["expected.json"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    [files] = verify_bundle(copy)["checks"]
    assert not files["passed"]
    assert "labels.json: missing" in files["detail"]
    assert "expected.json: not listed in manifest.json" in files["detail"]


def test_wrong_logits_with_a_matching_manifest_fail_the_comparison(copy):
    """The comparison itself works: expected logits off by 1 (manifest updated to match)."""
    _change_expected_logits(copy)
    manifest = _json(copy / MANIFEST)
    manifest["files"]["sample.npz"]["sha256"] = sha256_file(copy / "sample.npz")
    (copy / MANIFEST).write_text(json.dumps(manifest))
    result = verify_bundle(copy)
    checks = {c["name"]: c["passed"] for c in result["checks"]}
    assert checks == {"files": True, "agreement": True, "max error": False}
    assert not result["passed"]


def _archive_with(path, name, data=b"x", kind=tarfile.REGTYPE):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize(
    "name, kind",
    [
        ("../evil.txt", tarfile.REGTYPE),
        ("bundle/../../evil.txt", tarfile.REGTYPE),
        ("/tmp/evil.txt", tarfile.REGTYPE),
        ("bundle/link", tarfile.SYMTYPE),
    ],
)
def test_unsafe_archives_are_refused_before_extracting(tmp_path, name, kind):
    archive = _archive_with(tmp_path / "bad.tar.gz", name, kind=kind)
    destination = tmp_path / "x" / "y"
    destination.mkdir(parents=True)
    with pytest.raises(UserError, match="refusing member"):
        extract_bundle(archive, destination)
    assert not list(destination.iterdir()) and not (tmp_path / "evil.txt").exists()
    with pytest.raises(UserError, match="refusing member"):
        verify_bundle(archive)


def test_an_archive_of_the_folder_contents_verifies(bundle, tmp_path, capsys):
    """``tar czf b.tgz -C bundle_x .``: the files at the archive's root, below its member ``./``."""
    archive = tmp_path / "b.tgz"
    subprocess.run(["tar", "czf", archive, "-C", bundle.directory, "."], check=True)
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == sorted([".", *(f"./{n}" for n in (*CONTENTS, MANIFEST))])
    destination = tmp_path / "x"
    assert extract_bundle(archive, destination) == destination
    assert sorted(p.name for p in destination.iterdir()) == sorted([*CONTENTS, MANIFEST])
    assert main_verify([str(archive)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("PASS")


@pytest.mark.parametrize(
    "names", [["a/manifest.json", "b/model.onnx"], ["./", "manifest.json", "bundle/model.onnx"]]
)
def test_an_archive_of_more_than_one_folder_is_refused(tmp_path, names):
    archive = tmp_path / "two.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(UserError, match="a bundle archive holds one folder, found"):
        verify_bundle(archive)


def test_verify_refuses_what_is_not_a_bundle(tmp_path):
    with pytest.raises(UserError, match="not found"):
        verify_bundle(tmp_path / "nothing")
    with pytest.raises(UserError, match="manifest.json not found"):
        verify_bundle(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(UserError, match="neither a bundle folder nor a .tar.gz"):
        verify_bundle(tmp_path / "model.onnx")


# --- refusals --------------------------------------------------------------------------------


def test_unknown_student_lists_the_valid_names(run_dir, tmp_path):
    with pytest.raises(UserError, match=f"no student 'resnet8_w2a2'.*{STUDENT}"):
        make_bundle(run_dir, tmp_path / "b", student="resnet8_w2a2")
    assert not (tmp_path / "b").exists()


def test_a_folder_without_report_is_refused(tmp_path):
    with pytest.raises(UserError, match="report.json not found.*finished run"):
        make_bundle(tmp_path, tmp_path / "b")


def test_an_existing_out_is_refused_and_left_untouched_an_empty_one_is_used(
    run_dir, bundle, tmp_path
):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="pass another --out or delete it"):
        main_bundle([str(run_dir), "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text()
    assert not (tmp_path / "taken.tar.gz").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left

    empty = tmp_path / "empty"
    empty.mkdir()
    assert make_bundle(run_dir, empty).directory == empty and (empty / MANIFEST).is_file()

    before = {p.name: p.read_bytes() for p in bundle.directory.iterdir()}
    with pytest.raises(UserError, match="already exists"):
        make_bundle(run_dir)  # the default out, made by the fixture
    assert {p.name: p.read_bytes() for p in bundle.directory.iterdir()} == before


# --- torch-free ------------------------------------------------------------------------------

TORCH_FREE = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
from qkd_deploy.deploy.bundle import main_bundle, main_verify
assert main_bundle([sys.argv[1], "--out", sys.argv[2]]) == 0
assert main_verify([sys.argv[2]]) == 0
assert main_verify([sys.argv[2] + ".tar.gz", "--json"]) == 0
assert not [m for m, v in sys.modules.items() if v is not None and m.split(".")[0] == "torch"]
assert "tensorrt" not in sys.modules
"""


def test_bundle_and_verify_run_without_torch(run_dir, tmp_path):
    out = tmp_path / "device"
    done = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(run_dir), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert '"passed": true' in done.stdout


# --- TensorRT --------------------------------------------------------------------------------


def test_tensorrt_verify_refuses_an_engine_of_another_model(copy):
    engine = copy / "model.int8.engine"
    engine.write_bytes(b"plan")
    write_sidecar(
        engine,
        {
            "tensorrt_version": "10.3.0",
            "gpu_name": "Orin",
            "compute_capability": "8.7",
            "precision": "int8",
            "input_name": "images",
            "input_shapes": {"min": [1, 1, 8, 8], "opt": [8, 1, 8, 8], "max": [32, 1, 8, 8]},
            "onnx_sha256": "a" * 64,
            "engine_sha256": sha256_file(engine),
        },
    )
    with pytest.raises(UserError, match="built from another model"):
        verify_bundle(copy, runtime="tensorrt")
    with pytest.raises(UserError, match="--runtime tensorrt"):
        verify_bundle(copy, runtime="onnxruntime", engine=engine)


def test_tensorrt_verify_of_an_archive_needs_the_engine(bundle):
    with pytest.raises(UserError, match="needs --engine"):
        verify_bundle(bundle.archive, runtime="tensorrt")


def _engine_skip_reason():
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt not installed (runs on a Jetson / a machine with TensorRT and a GPU)"
    from qkd_deploy.runtime.tensorrt import open_device

    try:
        open_device(0).close()
    except UserError as error:
        return f"no usable CUDA GPU: {error}"
    return None


ENGINE_SKIP_REASON = _engine_skip_reason()


@pytest.mark.skipif(ENGINE_SKIP_REASON is not None, reason=str(ENGINE_SKIP_REASON))
def test_verify_with_a_tensorrt_engine_built_on_this_device(copy, capsys):
    from qkd_deploy.deploy.engine import EngineBuildOptions, build_engine

    engine = copy / "model.int8.engine"
    build_engine(copy / "model.onnx", engine, EngineBuildOptions(precision="int8"))
    assert main_verify([str(copy), "--runtime", "tensorrt"]) == 0, capsys.readouterr().out
    result = verify_bundle(copy, runtime="tensorrt", engine=engine)
    assert result["passed"] and result["runner"] == "tensorrt"
    assert result["agreement"] >= TENSORRT_MIN_AGREEMENT
