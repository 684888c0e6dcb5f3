"""qkd-deploy compare: regressions between two runs' reports (a real run's: test_main_command)."""

import copy
import json
import re

import onnx
import pytest

from qkd_deploy.bench.compare import compare_reports
from qkd_deploy.bench.report import render_markdown, summary_table
from qkd_deploy.cli import main
from qkd_deploy.errors import UserError


def _model(name, accuracy, p50_b1, p50_b32):
    rows = [{"batch": 1, "p50": p50_b1, "p90": p50_b1}, {"batch": 32, "p50": p50_b32, "p90": 1}]
    return {"name": name, "accuracy_onnx": accuracy, "latency_ms": {"onnxruntime_cpu": rows}}


BASE = {
    "dataset": "digits",
    "test_samples": 360,
    "target": "tensorrt",
    "teacher": {"arch": "resnet8x4", "accuracy": 0.995},
    "float_references": [_model("student_float", 0.990, 0.05, 0.30)],
    "students": [
        _model("resnet8_w8a8", 0.992, 0.20, 3.0),
        _model("resnet8_w4a4", 0.985, 0.15, 2.2),
    ],
    "environment": {"machine": "Xeon, 2 cores"},
}


def _changed(**edits):
    """BASE with ``student_name=(accuracy, p50_b1)`` edits."""
    new = copy.deepcopy(BASE)
    for student in new["students"]:
        if student["name"] in edits:
            accuracy, p50 = edits[student["name"]]
            student["accuracy_onnx"] = accuracy
            student["latency_ms"]["onnxruntime_cpu"][0]["p50"] = p50
    return new


def _regressions(base, new, drop=0.5, slower=0.10):
    return [(c.model, c.quantity) for c in compare_reports(base, new, drop, slower) if c.regression]


def test_latency_is_only_judged_when_asked():
    slower = _changed(resnet8_w8a8=(0.992, 0.40))  # twice as slow
    changes = compare_reports(BASE, slower, 0.5, None)
    assert not any(c.regression for c in changes)
    assert "not judged (give --max-latency-increase)" in {c.note for c in changes}


def test_identical_runs_have_no_regression():
    changes = compare_reports(BASE, copy.deepcopy(BASE), 0.5, 0.10)
    assert len(changes) == 9  # 3 models x (accuracy + 2 batch sizes)
    assert not any(c.regression for c in changes)


def test_an_accuracy_drop_past_the_tolerance_regresses():
    assert _regressions(BASE, _changed(resnet8_w4a4=(0.979, 0.15))) == [
        ("resnet8_w4a4", "accuracy %")  # 0.6 points
    ]
    assert _regressions(BASE, _changed(resnet8_w4a4=(0.981, 0.15))) == []  # 0.4 points
    assert _regressions(BASE, _changed(resnet8_w4a4=(0.999, 0.15))) == []  # a gain


def test_slower_on_the_same_machine_regresses_on_another_is_not_judged():
    slower = _changed(resnet8_w8a8=(0.992, 0.25))  # +25 % at batch 1
    assert _regressions(BASE, slower) == [("resnet8_w8a8", "p50 ms onnxruntime_cpu b1")]
    assert _regressions(BASE, slower, slower=0.30) == []
    slower["environment"]["machine"] = "Jetson Orin"
    changes = compare_reports(BASE, slower, 0.5, 0.10)
    assert not any(c.regression for c in changes)
    assert {c.note for c in changes if c.quantity.startswith("p50")} == {
        "other machine: not judged"
    }


def test_a_drop_of_exactly_the_tolerance_passes():
    base = _changed(resnet8_w4a4=(0.9, 0.15))
    assert _regressions(base, _changed(resnet8_w4a4=(0.895, 0.15))) == []  # 0.5 points
    assert _regressions(base, _changed(resnet8_w4a4=(0.8949, 0.15))) == [
        ("resnet8_w4a4", "accuracy %")
    ]


def test_latency_with_another_onnxruntime_thread_count_is_not_judged():
    base, slower = copy.deepcopy(BASE), _changed(resnet8_w8a8=(0.992, 0.40))
    base["environment"]["onnxruntime_threads"] = 2
    slower["environment"]["onnxruntime_threads"] = 1
    changes = compare_reports(base, slower, 0.5, 0.10)
    assert not any(c.regression for c in changes)
    assert {c.note for c in changes if c.quantity.startswith("p50")} == {
        "other ONNX Runtime thread count: not judged"
    }
    slower["environment"]["onnxruntime_threads"] = 2
    assert _regressions(base, slower) == [("resnet8_w8a8", "p50 ms onnxruntime_cpu b1")]


def test_report_names_onnxruntime_threads_and_keeps_float_only_latency():
    report = copy.deepcopy(BASE)
    report["students"] = []  # student.bits=[]: the float reference alone is measured
    report["float_references"][0].update(arch="resnet8", accuracy_torch=0.99, onnx_bytes=2048)
    report["environment"].update(threads=2, onnxruntime_threads=1)
    assert "b1 p50/p90 ms" in summary_table(report) and "0.050 / 0.050" in summary_table(report)
    assert "(ONNX Runtime CPU, 1 threads)" in render_markdown(report)
    report["environment"]["onnxruntime_threads"] = 0
    assert "(ONNX Runtime CPU, ONNX Runtime's default threads)" in render_markdown(report)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-sizes", "0"], r"batch_sizes \[0\]: give whole numbers >= 1"),
        (["--batch-sizes=-1,4"], r"batch_sizes \[-1\]"),
        (["--iterations", "0"], "iterations must be >= 1, got 0"),
        (["--warmup", "-1"], "warmup must be >= 0, got -1"),
    ],
)
def test_bench_refuses_settings_that_measure_nothing(tmp_path, capsys, flags, message):
    model = tmp_path / "m.onnx"
    _tiny_onnx(model)
    assert main(["bench", str(model), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


def _tiny_onnx(path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["images"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 2, 2])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_a_missing_model_regresses_and_a_new_one_is_listed():
    new = copy.deepcopy(BASE)
    new["students"][1]["name"] = "resnet8_w2a2"
    changes = compare_reports(BASE, new, 0.5, 0.10)
    assert [(c.model, c.regression, c.note) for c in changes if c.quantity == "model"] == [
        ("resnet8_w4a4", True, "missing in the new run"),
        ("resnet8_w2a2", False, "new in this run"),
    ]


def test_engine_latency_is_compared_too():
    base, new = copy.deepcopy(BASE), copy.deepcopy(BASE)
    for report, p50 in ((base, 0.10), (new, 0.20)):
        report["students"][0]["engine"] = {
            "precision": "int8",
            "latency_ms": {"tensorrt": [{"batch": 8, "p50": p50, "p90": p50}]},
        }
    assert _regressions(base, new) == [("resnet8_w8a8", "p50 ms tensorrt b8")]


def test_compare_command_exit_codes(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "report.json").write_text(json.dumps(BASE))
    worse = tmp_path / "worse.json"
    worse.write_text(json.dumps(_changed(resnet8_w4a4=(0.95, 0.15))))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "a" / "report.json")]) == 0
    assert main(["compare", str(tmp_path / "a"), str(worse)]) == 1
    assert "1 regression(s)" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a"), str(worse), "--max-accuracy-drop", "4"]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(worse), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["quantity"]) for r in rows if r["regression"]] == [
        ("resnet8_w4a4", "accuracy %")
    ]
    slower = tmp_path / "slower.json"
    slower.write_text(json.dumps(_changed(resnet8_w8a8=(0.992, 0.40))))
    assert main(["compare", str(tmp_path / "a"), str(slower)]) == 0
    assert main(["compare", str(tmp_path / "a"), str(slower), "--max-latency-increase", "0.5"]) == 1
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "nothing")]) == 2
    assert "nothing not found; give a finished run" in capsys.readouterr().err


def test_runs_on_different_test_data_are_refused():
    other = copy.deepcopy(BASE)
    other["dataset"] = "fashion-mnist"
    with pytest.raises(UserError, match="different test data"):
        compare_reports(BASE, other, 0.5, 0.10)
