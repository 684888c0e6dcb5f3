"""The CLI, and the rule that deployment-side modules work without torch (a Jetson often has
no usable torch)."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qkd_deploy.cli import main


def _tiny_onnx(path):
    weight = numpy_helper.from_array(np.ones((3, 4), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["images"], ["flat"]),
            helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1),
        ],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


TORCH_FREE = """
import sys
sys.modules["torch"] = None  # any import of torch now fails
import qkd_deploy.cli, qkd_deploy.runtime.onnxruntime, qkd_deploy.bench.latency
import qkd_deploy.bench.report, qkd_deploy.bench.accuracy, qkd_deploy.bench.commands
import qkd_deploy.bench.compare, qkd_deploy.bench.plots
import qkd_deploy.deploy.lint, qkd_deploy.data.preprocess, qkd_deploy.rundir
sys.exit(qkd_deploy.cli.main(["bench", sys.argv[1], "--batch-sizes", "1,3", "--iterations", "2",
                              "--json"]))
"""


def test_deployment_side_runs_without_torch(tmp_path):
    model = _tiny_onnx(tmp_path / "tiny.onnx")
    done = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(model)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert [r["batch"] for r in result["latency_ms"]] == [1, 3]


def test_unknown_command_and_help(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("train", "lint", "bench", "report"))


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert "missing.onnx" in err and "Traceback" not in err
    assert main(["report", str(tmp_path)]) == 2
    assert "report.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "providers", ["CPUExecutionProvider", " CPUExecutionProvider , ", ["CPUExecutionProvider"]]
)
def test_providers_take_one_name_a_comma_separated_list_or_a_list(tmp_path, providers):
    from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(_tiny_onnx(tmp_path / "tiny.onnx"), providers=providers)
    assert runner.providers == ["CPUExecutionProvider"] and runner.name == "onnxruntime_cpu"


def test_bench_providers_by_name_and_one_error_for_unavailable_ones(tmp_path, capsys):
    model = str(_tiny_onnx(tmp_path / "tiny.onnx"))
    bench = ["bench", model, "--batch-sizes", "1", "--iterations", "2", "--json", "--providers"]
    assert main([*bench, "CPUExecutionProvider"]) == 0
    assert json.loads(capsys.readouterr().out)["runner"] == "onnxruntime_cpu"

    assert main([*bench, "NoSuchExecutionProvider,CPUExecutionProvider"]) == 2
    err = capsys.readouterr().err
    assert "providers NoSuchExecutionProvider: not in this onnxruntime build" in err
    assert "which has " in err and "CPUExecutionProvider" in err.split("which has ")[1]
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bench_takes_an_engine_to_the_tensorrt_runner(tmp_path, capsys):
    engine = tmp_path / "model.int8.engine"
    engine.write_bytes(b"not an engine")
    assert main(["bench", str(engine)]) == 2
    err = capsys.readouterr().err
    assert "model.int8.engine.json" in err and "build-engine" in err  # sidecar checked first


@pytest.mark.parametrize(
    "warnings",
    [
        {"warnings": ["the kernels saturate", "training collapsed"]},
        {"warning": "the kernels saturate"},  # a report written before the list
    ],
)
def test_report_command_rerenders_markdown(tmp_path, capsys, warnings):
    report = {
        "dataset": "digits",
        "test_samples": 2,
        "teacher": {"arch": "resnet20", "accuracy": 0.5},
        "students": [
            {
                "name": "resnet8_w4a4",
                "method": "kd",
                "w_bits": 4,
                "a_bits": 4,
                "accuracy_torch": 0.5,
                "accuracy_onnx": 0.5,
                "onnx_agreement": 1.0,
                "onnx_max_abs_error": 0.0,
                "ort_cpu": {"accuracy": 0.0, "agreement": 0.5, "max_abs_error": 0.1},
                **warnings,
                "onnx_path": "w4a4/model.onnx",
                "onnx_bytes": 2048,
                "latency_ms": {"onnxruntime_cpu": [{"batch": 1, "p50": 1.0, "p90": 2.0}]},
                "engine": None,
            }
        ],
    }
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path)]) == 0
    row = "| resnet8_w4a4 | kd | w4a4 | 50.00 | 50.00 | 100.00 | 0.00 | 2.0 | 1.000 / 2.000 |"
    out = capsys.readouterr().out
    assert row in out
    assert "warning: resnet8_w4a4: the kernels saturate" in out  # as report.md has them
    markdown = (tmp_path / "report.md").read_text()
    assert row in markdown and "- **warning**: the kernels saturate" in markdown
    expected = warnings.get("warnings", [warnings.get("warning")])
    assert markdown.count("- **warning**: ") == len(expected)


def test_methods_lists_every_registered_method_with_its_options(capsys):
    from qkd_deploy.distill import METHODS

    assert main(["methods", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in entries] == sorted(METHODS)
    kd = next(e for e in entries if e["name"] == "kd-decay")
    assert kd["options"] == {"tau": 4.0, "soft_start": 0.5, "schedule": "linear"}
    assert next(e for e in entries if e["name"] == "none")["needs_teachers"] == 0
    dafl = next(e for e in entries if e["name"] == "dafl")
    assert (dafl["needs_teachers"], dafl["max_teachers"]) == (1, 1)
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "(1 teacher, data-free)" in listing and "(2+ teacher(s), data-free)" in listing
    as_float = {e["name"] for e in entries if e["distils_float"]}
    assert as_float == {"none", "kd", "kd-decay", "avg-teachers", "feed"}
    assert "(1+ teacher(s), also as --float-method)" in listing  # kd
