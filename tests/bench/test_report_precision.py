"""The report shows the per-layer precision of each student whose layers run in more than one
precision (``layer_precision`` in report.json, a line in report.md); a report without the key
(an older run, a uniform student) reads and renders as before."""

import json

import pytest

from qkd_deploy.bench.report import RENDERED, load_report, render_markdown, write_report
from tests.support.mixed_export import export_toy


def _student(name, onnx_path):
    return {
        "name": name,
        "method": "kd-decay",
        "w_bits": 8,
        "a_bits": 8,
        "accuracy_torch": 0.98,
        "accuracy_onnx": 0.98,
        "onnx_agreement": 1.0,
        "onnx_max_abs_error": 0.001,
        "onnx_path": onnx_path,
        "onnx_bytes": 1000,
        "latency_ms": {"onnxruntime_cpu": [{"batch": 1, "p50": 0.1, "p90": 0.1}]},
    }


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with a mixed student (conv2 in float) and a uniform W8A8 one."""
    root = tmp_path_factory.mktemp("run")
    for name, options in (
        ("mixed", {"float_layers": ("conv2",)}),
        ("uniform", {"first_last_bits": None}),
    ):
        (root / name).mkdir()
        export_toy(root / name / "model.onnx", "w8a8", **options)
    return root


def _report():
    return {
        "dataset": "digits",
        "test_samples": 360,
        "teacher": {"arch": "resnet8x4", "accuracy": 0.99},
        "students": [
            _student("mixed", "mixed/model.onnx"),
            _student("uniform", "uniform/model.onnx"),
        ],
        "environment": {"machine": "test"},
    }


def test_a_mixed_student_gets_its_layers_a_uniform_one_none(run_dir):
    write_report(run_dir, _report())
    report = load_report(run_dir, RENDERED)
    mixed, uniform = report["students"]
    assert "layer_precision" not in uniform
    layers = {layer["module"]: layer["precision"] for layer in mixed["layer_precision"]}
    assert layers == {"conv1": "w8a8", "conv2": "float", "add": "a8", "fc": "w8a8"}
    text = (run_dir / "report.md").read_text()
    assert "per-layer precision: w8a8: conv1, fc; float: conv2; a8: add" in text
    assert text.count("per-layer precision") == 1


def test_a_report_without_the_key_renders(run_dir):
    report = _report()
    assert "per-layer precision" not in render_markdown(report)
    (run_dir / "old.json").write_text(json.dumps(report))
    assert "layer_precision" not in load_report(run_dir / "old.json", RENDERED)["students"][0]


def test_a_student_whose_file_is_gone_keeps_what_the_report_had(tmp_path):
    report = _report()
    report["students"][0]["layer_precision"] = [{"module": "fc", "precision": "w4a8"}]
    write_report(tmp_path, report)
    kept = load_report(tmp_path, RENDERED)["students"][0]["layer_precision"]
    assert kept == [{"module": "fc", "precision": "w4a8"}]
    assert "per-layer precision: w4a8: fc" in (tmp_path / "report.md").read_text()


def test_a_layer_precision_that_is_not_a_list_is_refused(tmp_path):
    report = _report()
    report["students"][0]["layer_precision"] = "w4a4"
    (tmp_path / "report.json").write_text(json.dumps(report))
    with pytest.raises(Exception, match="layer_precision"):
        load_report(tmp_path, RENDERED)
