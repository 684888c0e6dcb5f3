"""Bad input to the torch-free commands: each gives one UserError naming the file and the fix
(exit code 2, no traceback). ``bench`` on models ONNX Runtime cannot load or run, ``verify`` on
damaged bundles and archives (nothing written before an archive is checked), ``compare`` and
``report`` on malformed ``report.json`` files; older reports still load."""

import copy
import io
import json
import shutil
import tarfile
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import qkd_deploy.deploy.bundle.extract as bundle_extract
import qkd_deploy.deploy.bundle.files as bundle_files
from qkd_deploy.bench.report import BUNDLED, RENDERED, load_report
from qkd_deploy.cli import main
from qkd_deploy.deploy.bundle import MANIFEST, extract_bundle, make_bundle, verify_bundle
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import sha256_file


def _one_error_line(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(name in err for name in names), err
    return err


# --- bench -------------------------------------------------------------------------------------


def _conv_model(path, channels_in_weight=1):
    """images (N, 1, 2, 2) -> Conv 1x1 -> logits; ``channels_in_weight`` != 1 fails at run."""
    shape = [1, channels_in_weight, 1, 1]
    weight = helper.make_tensor("w", TensorProto.FLOAT, shape, [1.0] * channels_in_weight)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _identity_model(path, input_type):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("images", input_type, ["N", 4])],
        [helper.make_tensor_value_info("logits", input_type, ["N", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


@pytest.mark.parametrize(
    "content, says",
    [
        (b"", "No graph was found"),
        (b"not a protobuf", "Protobuf parsing failed"),
        ("truncated", "Protobuf parsing failed"),
    ],
)
def test_bench_on_a_model_onnxruntime_cannot_load(tmp_path, capsys, content, says):
    model = tmp_path / "m.onnx"
    if content == "truncated":
        data = _conv_model(tmp_path / "whole.onnx").read_bytes()
        content = data[: len(data) // 2]
    model.write_bytes(content)
    assert main(["bench", str(model)]) == 2
    _one_error_line(capsys, str(model), "ONNX Runtime cannot load it", says, "qkd-deploy lint")


def test_bench_on_a_model_that_fails_to_run_or_takes_no_float_images(tmp_path, capsys):
    broken = _conv_model(tmp_path / "broken.onnx", channels_in_weight=3)  # 1 input channel
    assert main(["bench", str(broken)]) == 2
    _one_error_line(capsys, str(broken), "ONNX Runtime failed to run it", "(1, 1, 2, 2)")
    integers = _identity_model(tmp_path / "int.onnx", TensorProto.INT64)
    with pytest.raises(UserError, match=r"input 'images' is tensor\(int64\).*float32"):
        from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner

        OnnxRuntimeRunner(integers)


# --- verify: damaged bundles ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory):
    return make_bundle(run_dir, tmp_path_factory.mktemp("bad_input") / "bundle")


@pytest.fixture
def folder(bundle, tmp_path):
    return shutil.copytree(bundle.directory, tmp_path / "bundle")


def _edit_json(folder, name, edit, rehash=True):
    data = json.loads((folder / name).read_text())
    edit(data)
    (folder / name).write_text(json.dumps(data))
    if rehash:
        _rehash(folder, name)


def _rehash(folder, name):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = {
        "sha256": sha256_file(folder / name),
        "bytes": (folder / name).stat().st_size,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _write_npz(folder, rehash=True, **arrays):
    with np.load(folder / "sample.npz") as sample:
        merged = {**dict(sample), **arrays}
    np.savez(folder / "sample.npz", **{k: v for k, v in merged.items() if v is not None})
    if rehash:
        _rehash(folder, "sample.npz")


def _npz_with_a_huge_header(folder):
    """logits.npy declares 2**40 float32 values but stores 640 bytes."""
    with np.load(folder / "sample.npz") as sample:
        arrays = dict(sample)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)}
    )
    with zipfile.ZipFile(folder / "sample.npz", "w") as archive:
        for name in ("images", "labels"):
            buffer = io.BytesIO()
            np.save(buffer, arrays[name])
            archive.writestr(f"{name}.npy", buffer.getvalue())
        archive.writestr("logits.npy", b"\x93NUMPY" + header.getvalue()[6:] + bytes(640))
    _rehash(folder, "sample.npz")


def _garbage(folder, name):
    (folder / name).write_bytes(b"\x00\xffgarbage")
    _rehash(folder, name)


DAMAGE = {
    "manifest without files": (
        lambda f: _edit_json(f, MANIFEST, lambda m: m.pop("files"), rehash=False),
        ["manifest.json lacks 'files'", "make it again with qkd-deploy bundle"],
    ),
    "manifest entry without sha256": (
        lambda f: _edit_json(f, MANIFEST, lambda m: m["files"]["model.onnx"].pop("sha256"), False),
        ["manifest.json: model.onnx lacks 'sha256'"],
    ),
    "manifest listing a path outside": (
        lambda f: _edit_json(f, MANIFEST, lambda m: m["files"].update({"../x": {}}), False),
        ["lists '../x', which is not a file name"],
    ),
    "manifest not JSON": (
        lambda f: (f / MANIFEST).write_text("{"),
        ["manifest.json is not valid JSON"],
    ),
    "expected without tolerances": (
        lambda f: _edit_json(f, "expected.json", lambda e: e.pop("tolerances")),
        ["expected.json lacks 'tolerances'", "make it again"],
    ),
    "tolerance without max_abs_error": (
        lambda f: _edit_json(
            f, "expected.json", lambda e: e["tolerances"]["onnxruntime"].pop("max_abs_error")
        ),
        ["expected.json: tolerances.onnxruntime lacks 'max_abs_error'"],
    ),
    "tolerance as text": (
        lambda f: _edit_json(
            f, "expected.json", lambda e: e["tolerances"].update(onnxruntime="loose")
        ),
        ['expected.json: tolerances: onnxruntime is "loose", of the wrong type'],
    ),
    "expected without the sample accuracy": (
        lambda f: _edit_json(f, "expected.json", lambda e: e.pop("sample")),
        ["expected.json lacks 'sample'"],
    ),
    "preprocess mean a number": (
        lambda f: _edit_json(f, "preprocess.json", lambda p: p.update(mean=0.5)),
        ["preprocess.json", "make it again"],
    ),
    "pickled sample": (
        lambda f: _write_npz(f, logits=np.array([{"a": 1}], dtype=object)),
        ["sample.npz", "Python objects", "make it again"],
    ),
    "sample without logits": (
        lambda f: _write_npz(f, logits=None),
        ["sample.npz holds no array 'logits'"],
    ),
    "sample not a zip": (
        lambda f: _garbage(f, "sample.npz"),
        ["sample.npz is not an .npz of plain arrays"],
    ),
    "sample header larger than its data": (
        _npz_with_a_huge_header,
        ["sample.npz: logits.npy declares float32 (1099511627776,), more than it stores"],
    ),
    "sample logits of another shape": (
        lambda f: _write_npz(f, logits=np.zeros((16, 3), np.float32)),
        ["expected logits (16, 3), but the model gives (16, 10)"],
    ),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_on_a_damaged_bundle_is_one_clear_error(folder, damage, capsys):
    change, says = DAMAGE[damage]
    change(folder)
    assert main(["verify", str(folder)]) == 2
    _one_error_line(capsys, str(folder), *says)


def test_a_sample_larger_than_any_sample_is_refused(folder, monkeypatch, capsys):
    monkeypatch.setattr(bundle_files, "MAX_SAMPLE_BYTES", 1000)
    assert main(["verify", str(folder)]) == 2
    _one_error_line(capsys, "sample.npz is", "bytes, more than a sample holds")


def test_a_foreign_folder_beside_a_run_is_not_taken_for_a_stale_bundle(run_dir, tmp_path):
    from qkd_deploy.deploy.bundle import remove_stale_bundles

    run = shutil.copytree(run_dir, tmp_path / "run")
    foreign = run / "bundle_mine"
    foreign.mkdir()
    (foreign / "expected.json").write_text("[1, 2]")
    assert remove_stale_bundles(run) == [] and foreign.is_dir()


# --- verify: archives ----------------------------------------------------------------------------


def _repack(bundle, path, extra=(), sizes=None):
    """The bundle's archive with ``extra`` (name, bytes) members; ``sizes`` edits the manifest's
    listed sizes first."""
    with tarfile.open(bundle.archive) as source, tarfile.open(path, "w:gz") as tar:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith(MANIFEST) and sizes:
                manifest = json.loads(data)
                for name, size in sizes.items():
                    manifest["files"][name]["bytes"] = size
                data = json.dumps(manifest).encode()
            _add(tar, member.name, data)
        for name, data in extra:
            _add(tar, name, data)
    return path


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _refused(archive, tmp_path, match):
    destination = tmp_path / f"x_{archive.name}"
    destination.mkdir()
    with pytest.raises(UserError, match=match):
        extract_bundle(archive, destination)
    assert not list(destination.iterdir())  # nothing written
    with pytest.raises(UserError, match=match):
        verify_bundle(archive)


def test_an_unlisted_member_is_refused_before_anything_is_written(bundle, tmp_path):
    extra = [(f"{bundle.directory.name}/extra.bin", b"\0" * 4096)]
    archive = _repack(bundle, tmp_path / "extra.tar.gz", extra)
    _refused(archive, tmp_path, "refusing member 'bundle/extra.bin', which manifest.json does not")


def test_a_member_larger_than_listed_is_refused(bundle, tmp_path):
    archive = _repack(bundle, tmp_path / "small.tar.gz", sizes={"model.onnx": 100})
    _refused(archive, tmp_path, r"refusing member 'bundle/model.onnx' of \d+ bytes, manifest.json")


def test_an_archive_without_manifest_or_with_a_member_twice_is_refused(bundle, tmp_path):
    top = bundle.directory.name
    twice = _repack(bundle, tmp_path / "twice.tar.gz", [(f"{top}/labels.json", b"[]")])
    _refused(twice, tmp_path, "appears twice")
    bare = tmp_path / "bare.tar.gz"
    with tarfile.open(bare, "w:gz") as tar:
        _add(tar, f"{top}/model.onnx", b"x")
    _refused(bare, tmp_path, "holds no manifest.json")


def test_archive_size_and_member_count_caps(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(bundle_extract, "MAX_BUNDLE_BYTES", 10_000)
    _refused(bundle.archive, tmp_path, "members hold more than 10000 bytes")
    monkeypatch.undo()
    many = [(f"{bundle.directory.name}/f{i}", b"") for i in range(40)]
    _refused(_repack(bundle, tmp_path / "many.tar.gz", many), tmp_path, "more than 32 members")


@pytest.mark.parametrize("cut", ["half", "gzip garbage"])
def test_a_truncated_or_corrupt_archive_is_one_clear_error(bundle, tmp_path, capsys, cut):
    data = bundle.archive.read_bytes()
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(data[: len(data) // 2] if cut == "half" else data[:10] + b"\xff" * 64)
    assert main(["verify", str(broken)]) == 2
    _one_error_line(capsys, str(broken), "cannot read it as a .tar.gz bundle")


# --- compare and report: malformed report.json -------------------------------------------------

GOOD = {
    "dataset": "digits",
    "test_samples": 360,
    "teacher": {"arch": "resnet8x4", "accuracy": 0.99},
    "float_references": [
        {
            "name": "student_float",
            "arch": "resnet8",
            "accuracy_torch": 0.98,
            "accuracy_onnx": 0.98,
            "onnx_bytes": 2048,
            "latency_ms": {"onnxruntime_cpu": [{"batch": 1, "p50": 0.1, "p90": 0.2}]},
        }
    ],
    "students": [
        {
            "name": "resnet8_w4a4",
            "method": "kd",
            "w_bits": 4,
            "a_bits": 4,
            "accuracy_torch": 0.97,
            "accuracy_onnx": 0.97,
            "onnx_agreement": 1.0,
            "onnx_max_abs_error": 0.0,
            "onnx_path": "w4a4/model.onnx",
            "onnx_bytes": 1024,
            "latency_ms": {"onnxruntime_cpu": [{"batch": 1, "p50": 0.3, "p90": 0.4}]},
            "engine": None,
        }
    ],
    "environment": {"machine": "AMD EPYC, 2 cores"},
}


def _broken(edit):
    report = copy.deepcopy(GOOD)
    edit(report)
    return json.dumps(report)


MALFORMED = {
    "not JSON": ("{", "is not valid JSON"),
    "a list": ("[1, 2]", "the report is a JSON list, not an object"),
    "students not a list": (_broken(lambda r: r.update(students={})), "students is {}, not a list"),
    "a student without accuracy": (
        _broken(lambda r: r["students"][0].pop("accuracy_onnx")),
        "students[0] lacks 'accuracy_onnx'",
    ),
    "accuracy as text": (
        _broken(lambda r: r["students"][0].update(accuracy_onnx="97 %")),
        'students[0].accuracy_onnx is "97 %", not a number',
    ),
    "accuracy a bool": (
        _broken(lambda r: r["float_references"][0].update(accuracy_onnx=True)),
        "float_references[0].accuracy_onnx is true, not a number",
    ),
    "latency rows not a list": (
        _broken(lambda r: r["students"][0]["latency_ms"].update(onnxruntime_cpu=3)),
        "students[0].latency_ms.onnxruntime_cpu is not a list of rows",
    ),
    "a latency row without p50": (
        _broken(lambda r: r["students"][0]["latency_ms"]["onnxruntime_cpu"][0].pop("p50")),
        "latency_ms.onnxruntime_cpu[0] lacks 'p50'",
    ),
    "engine latency not an object": (
        _broken(lambda r: r["students"][0].update(engine={"latency_ms": []})),
        "students[0].engine.latency_ms is [], not an object",
    ),
    "environment a list": (
        _broken(lambda r: r.update(environment=[])),
        "environment is [], not an object",
    ),
    "not UTF-8": (b"\xff\xfe{}", "is not valid JSON"),
}


@pytest.mark.parametrize("command", ["compare", "report"])
@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_report_is_one_clear_error(tmp_path, capsys, command, case):
    content, says = MALFORMED[case]
    run = tmp_path / "run"
    run.mkdir()
    file = run / "report.json"
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    good = tmp_path / "good.json"
    good.write_text(json.dumps(GOOD))
    argv = ["compare", str(good), str(run)] if command == "compare" else ["report", str(run)]
    assert main(argv) == 2
    _one_error_line(capsys, str(file), says, "give the report.json of a finished qkd-deploy run")


def test_the_report_command_needs_what_it_renders(tmp_path, capsys):
    report = copy.deepcopy(GOOD)
    del report["teacher"]  # compare does without it
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path)]) == 2
    _one_error_line(capsys, "the report lacks 'teacher'")


def test_an_older_report_still_loads(tmp_path, capsys):
    """Before float references, ONNX Runtime's fused kernels, thread counts and warning lists."""
    report = copy.deepcopy(GOOD)
    del report["float_references"], report["environment"]
    report["students"][0]["warning"] = "the kernels saturate"
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path)]) == 0
    assert "warning: resnet8_w4a4: the kernels saturate" in capsys.readouterr().out
    assert main(["compare", str(tmp_path), str(tmp_path)]) == 0


def test_a_huge_report_is_refused_before_reading(tmp_path, monkeypatch):
    import qkd_deploy.bench.report as report_module

    monkeypatch.setattr(report_module, "MAX_REPORT_BYTES", 100)
    (tmp_path / "report.json").write_text(json.dumps(GOOD))
    with pytest.raises(UserError, match="too large for a report.json"):
        load_report(tmp_path)


def test_a_real_run_report_loads_for_every_reader(run_dir):
    for needs in (RENDERED, BUNDLED):
        assert load_report(run_dir, needs)["students"]
