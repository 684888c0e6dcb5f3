"""TensorRT engine build, sidecar and runner.

Sidecar logic, option resolution and the trtexec line are pure and run everywhere; the engine
tests build and run real engines and skip where TensorRT or a CUDA GPU is missing.
"""

import importlib.util
import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qkd_deploy.deploy.engine import (
    EngineBuildOptions,
    build_engine,
    main,
    read_model_input,
    resolve_options,
    trtexec_command,
    trtexec_path,
)
from qkd_deploy.errors import UserError
from qkd_deploy.runtime.engine_info import (
    check_compatible,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from qkd_deploy.runtime.tensorrt import TensorRTRunner, open_device

CHW = (3, 8, 8)
CLASSES = 5


# --- small models written with onnx.helper -------------------------------------------------


def _qdq(name, scale_name, out):
    """Activation Q -> DQ with an INT8 zero point of 0 (TensorRT's explicit quantization)."""
    return [
        helper.make_node("QuantizeLinear", [name, scale_name, "zp8"], [out + "_q"]),
        helper.make_node("DequantizeLinear", [out + "_q", scale_name, "zp8"], [out]),
    ]


def _weight(name, array, rng_scale, int4=False):
    """INT8 weight initializer + per-output-channel DequantizeLinear; ``int4``: an INT4
    initializer (opset 21) without zero point, as the exporter writes Linear weights of <= 4
    bits."""
    scale = np.full(array.shape[0], rng_scale, np.float32)
    if int4:
        q = np.clip(np.round(array / rng_scale), -8, 7).astype(np.int8)
        inits = [
            helper.make_tensor(name + "_q", TensorProto.INT4, q.shape, q.ravel().tolist()),
            numpy_helper.from_array(scale, name + "_scale"),
        ]
        node = helper.make_node("DequantizeLinear", [name + "_q", name + "_scale"], [name], axis=0)
        return inits, node
    q = np.clip(np.round(array / rng_scale), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(q, name + "_q"),
        numpy_helper.from_array(scale, name + "_scale"),
        numpy_helper.from_array(np.zeros(array.shape[0], np.int8), name + "_zp"),
    ]
    node = helper.make_node(
        "DequantizeLinear", [name + "_q", name + "_scale", name + "_zp"], [name], axis=0
    )
    return inits, node


def _classifier(
    path, *, quantized=True, opset=17, batch="batch", inputs=("images",), int4_fc=False
):
    rng = np.random.default_rng(0)
    conv_w = rng.normal(0, 0.3, (4, CHW[0], 3, 3)).astype(np.float32)
    fc_w = rng.normal(0, 0.5, (CLASSES, 4)).astype(np.float32)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 0.1, CLASSES).astype(np.float32), "fc_b"),
    ]
    nodes = []
    if quantized:
        inits += [
            numpy_helper.from_array(np.array(1 / 32, np.float32), "s_in"),
            numpy_helper.from_array(np.array(1 / 16, np.float32), "s_act"),
            numpy_helper.from_array(np.array(0, np.int8), "zp8"),
        ]
        conv_inits, conv_dq = _weight("conv_w", conv_w, 0.01)
        fc_inits, fc_dq = _weight("fc_w", fc_w, 0.1 if int4_fc else 0.01, int4=int4_fc)
        inits += conv_inits + fc_inits
        nodes += [conv_dq, fc_dq, *_qdq("images", "s_in", "x")]
        conv_in, pooled_q = "x", "pooled_dq"
    else:
        inits += [
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(fc_w, "fc_w"),
        ]
        conv_in, pooled_q = "images", "flat"
    nodes += [
        helper.make_node("Conv", [conv_in, "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
    ]
    if quantized:
        nodes += _qdq("flat", "s_act", pooled_q)
    nodes.append(helper.make_node("Gemm", [pooled_q, "fc_w", "fc_b"], ["logits"], transB=1))
    graph_inputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, *CHW]) for name in inputs
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        graph_inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture
def qdq_model(tmp_path):
    return _classifier(tmp_path / "student.onnx")


@pytest.fixture
def float_model(tmp_path):
    return _classifier(tmp_path / "float.onnx", quantized=False)


@pytest.fixture
def int4_model(tmp_path):
    return _classifier(tmp_path / "int4.onnx", opset=21, int4_fc=True)


def _sidecar_info(**overrides):
    info = {
        "tensorrt_version": "10.3.0",
        "gpu_name": "Orin",
        "compute_capability": "8.7",
        "precision": "int8",
        "input_name": "images",
        "input_shapes": {"min": [1, *CHW], "opt": [8, *CHW], "max": [32, *CHW]},
        "onnx_sha256": "a" * 64,
        "engine_sha256": "b" * 64,
    }
    info.update(overrides)
    return info


# --- sidecar ---------------------------------------------------------------------------------


def test_sidecar_round_trip(tmp_path):
    engine = tmp_path / "model.int8.engine"
    written = write_sidecar(engine, _sidecar_info())
    assert sidecar_path(engine).name == "model.int8.engine.json"
    assert "created" in written
    assert read_sidecar(engine) == written


def test_check_compatible_passes_on_equal_values():
    sidecar = _sidecar_info(tensorrt_version="10.3.0.26")
    check_compatible(
        sidecar, tensorrt_version="10.3.0", compute_capability="8.7", engine_sha256="b" * 64
    )


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"tensorrt_version": "10.4.0"}, ["TensorRT version", "10.3.0", "10.4.0"]),
        ({"compute_capability": "8.6"}, ["compute capability", "8.7", "8.6", "Orin"]),
        ({"engine_sha256": "c" * 64}, ["sha256", "bbbbbbbbbbbb", "cccccccccccc"]),
    ],
)
def test_check_compatible_names_both_values_and_the_fix(kwargs, names):
    here = {"tensorrt_version": "10.3.0", "compute_capability": "8.7", "engine_sha256": "b" * 64}
    with pytest.raises(UserError) as raised:
        check_compatible(_sidecar_info(), **{**here, **kwargs})
    message = str(raised.value)
    assert all(name in message for name in names), message
    assert "qkd-deploy build-engine" in message


def test_check_compatible_reports_every_mismatch_in_one_error():
    with pytest.raises(UserError) as raised:
        check_compatible(
            _sidecar_info(),
            tensorrt_version="8.6.2",
            compute_capability="7.2",
            engine_sha256="c" * 64,
        )
    message = str(raised.value)
    assert "8.6.2" in message and "7.2" in message and "cccccccccccc" in message


def test_missing_or_corrupt_sidecar_is_a_user_error(tmp_path):
    engine = tmp_path / "model.engine"
    with pytest.raises(UserError, match="build-engine"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(UserError, match="cannot read engine sidecar"):
        read_sidecar(engine)
    sidecar_path(engine).write_text(json.dumps({"precision": "int8"}))
    with pytest.raises(UserError, match="tensorrt_version"):
        read_sidecar(engine)


# --- reading the model and resolving options -----------------------------------------------


def test_read_model_input(qdq_model, float_model, int4_model):
    model = read_model_input(qdq_model)
    assert (model.name, model.chw, model.batch, model.opset, model.has_qdq) == (
        "images",
        CHW,
        None,
        17,
        True,
    )
    assert not model.has_int4_weights
    assert not read_model_input(float_model).has_qdq
    assert read_model_input(int4_model).has_int4_weights


def test_read_model_input_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such model file"):
        read_model_input(tmp_path / "missing.onnx")
    (tmp_path / "garbage.onnx").write_text("not a protobuf")
    with pytest.raises(UserError, match="cannot read it as ONNX"):
        read_model_input(tmp_path / "garbage.onnx")
    two = _classifier(tmp_path / "two.onnx", quantized=False, inputs=("images", "extra"))
    with pytest.raises(UserError, match="one image input"):
        read_model_input(two)


def test_strongly_typed_on_tensorrt_10_int8_flag_on_8_6(qdq_model):
    model = read_model_input(qdq_model)
    assert resolve_options(EngineBuildOptions(), model, "10.3.0.26").strongly_typed is True
    assert resolve_options(EngineBuildOptions(), model, "8.6.2").strongly_typed is False


def test_float_builds_are_weakly_typed(float_model):
    model = read_model_input(float_model)
    for precision in ("fp16", "fp32"):
        options = resolve_options(EngineBuildOptions(precision=precision), model, "10.3.0")
        assert options.strongly_typed is False


def test_tensorrt_8_6_needs_opset_17(tmp_path):
    model = read_model_input(_classifier(tmp_path / "opset18.onnx", opset=18))
    assert resolve_options(EngineBuildOptions(), model, "10.3.0").strongly_typed
    with pytest.raises(UserError, match="export the model with opset 17"):
        resolve_options(EngineBuildOptions(), model, "8.6.2")


@pytest.mark.parametrize(
    ("options", "version", "match"),
    [
        (EngineBuildOptions(strongly_typed=True), "8.6.2", "no strongly typed networks"),
        (EngineBuildOptions(precision="fp16"), "10.3.0", "meant for the float model"),
        (EngineBuildOptions(precision="int4", strongly_typed=False), "10.3.0", "int4 needs"),
        (EngineBuildOptions(min_batch=4, opt_batch=2), "10.3.0", "1 <= min"),
        (EngineBuildOptions(workspace_mib=0), "10.3.0", "workspace"),
        (EngineBuildOptions(precision="int2"), "10.3.0", "unknown precision"),
    ],
)
def test_invalid_builds_are_user_errors(qdq_model, options, version, match):
    with pytest.raises(UserError, match=match):
        resolve_options(options, read_model_input(qdq_model), version)


def test_int8_of_a_float_model_is_refused(float_model):
    with pytest.raises(UserError, match="no QuantizeLinear/DequantizeLinear"):
        resolve_options(EngineBuildOptions(), read_model_input(float_model), "10.3.0")


def test_fixed_batch_model_needs_matching_profile(tmp_path):
    model = read_model_input(_classifier(tmp_path / "fixed.onnx", batch=4))
    with pytest.raises(UserError, match="fixed batch of 4"):
        resolve_options(EngineBuildOptions(), model, "10.3.0")
    fixed = EngineBuildOptions(min_batch=4, opt_batch=4, max_batch=4)
    assert resolve_options(fixed, model, "10.3.0").strongly_typed


def test_int4_precision_follows_the_model(qdq_model, int4_model):
    """The network takes its types from the Q/DQ graph: int4 of a model without INT4 weights
    would build INT8 and is refused; int8 of a model with INT4 weights builds (and records)
    int4, which TensorRT 8.6 and weakly typed networks cannot build."""
    with pytest.raises(UserError, match="no INT4 weights.*--precision int8"):
        resolve_options(EngineBuildOptions(precision="int4"), read_model_input(qdq_model), "10.3")
    assert _onnxruntime_logits(int4_model, _images(2)).shape == (2, CLASSES)  # a valid model
    model = read_model_input(int4_model)
    for precision in ("int8", "int4"):
        options = resolve_options(EngineBuildOptions(precision=precision), model, "10.3.0")
        assert (options.precision, options.strongly_typed) == ("int4", True)
        with pytest.raises(UserError, match="INT4 weights need TensorRT >= 10"):
            resolve_options(EngineBuildOptions(precision=precision), model, "8.6.2")
    with pytest.raises(UserError, match="INT4 weights.*drop --no-strongly-typed"):
        resolve_options(EngineBuildOptions(strongly_typed=False), model, "10.3.0")


# --- trtexec line ----------------------------------------------------------------------------


def _trtexec(model_path, **options):
    model = read_model_input(model_path)
    return trtexec_command(
        model_path, "out.engine", EngineBuildOptions(**options), model.name, model.chw
    )


def test_trtexec_int8_strongly_typed(qdq_model):
    line = _trtexec(qdq_model)
    assert line.startswith(f"trtexec --onnx={qdq_model} --saveEngine=out.engine --stronglyTyped ")
    for part in (
        "--minShapes=images:1x3x8x8",
        "--optShapes=images:8x3x8x8",
        "--maxShapes=images:32x3x8x8",
        "--memPoolSize=workspace:1024",
    ):
        assert part in line
    assert "--int8" not in line and "--fp16" not in line


def test_trtexec_fp16(float_model):
    line = _trtexec(float_model, precision="fp16", max_batch=64, workspace_mib=512)
    assert " --fp16 " in line and "--stronglyTyped" not in line
    assert "--maxShapes=images:64x3x8x8" in line
    assert "--memPoolSize=workspace:512" in line


def test_trtexec_tensorrt_8_6_int8_flag(qdq_model, tmp_path):
    cache = str(tmp_path / "timing.cache")
    line = _trtexec(qdq_model, strongly_typed=False, opt_batch=4, timing_cache=cache)
    assert " --int8 " in line and "--stronglyTyped" not in line
    assert "--optShapes=images:4x3x8x8" in line
    assert line.endswith(f"--timingCacheFile={cache}")


def test_trtexec_quotes_awkward_input_names():
    line = trtexec_command("m.onnx", "m.engine", EngineBuildOptions(), "input:0", CHW)
    assert "'--minShapes='\"'\"'input:0'\"'\"':1x3x8x8'" in line


def test_print_trtexec_needs_no_tensorrt(qdq_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main([qdq_model, "--print-trtexec", "--max-batch", "16", "--no-strongly-typed"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("trtexec ")
    assert "--saveEngine=" + qdq_model.replace(".onnx", ".int8.engine") in line
    assert " --int8 " in line and "--maxShapes=images:16x3x8x8" in line


def test_print_trtexec_names_the_engine_after_the_models_precision(int4_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main([int4_model, "--print-trtexec"]) == 0
    line = capsys.readouterr().out.strip()
    assert "--saveEngine=" + int4_model.replace(".onnx", ".int4.engine") in line


def test_trtexec_gives_a_fixed_batch_model_no_shapes(tmp_path, monkeypatch, capsys):
    """trtexec refuses explicit shapes for a static model; a dynamic one needs them."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    fixed = _classifier(tmp_path / "fixed.onnx", batch=4)
    assert (
        main([fixed, "--print-trtexec", *"--min-batch 4 --opt-batch 4 --max-batch 4".split()]) == 0
    )
    line = capsys.readouterr().out.strip()
    assert line.startswith("trtexec ") and "Shapes=" not in line
    dynamic = _classifier(tmp_path / "dynamic.onnx")
    assert (
        main([dynamic, "--print-trtexec", *"--min-batch 4 --opt-batch 4 --max-batch 4".split()])
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert all(f"--{key}Shapes=images:4x3x8x8" in line for key in ("min", "opt", "max"))


def test_print_trtexec_checks_the_model(float_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError, match="no QuantizeLinear"):
        main([float_model, "--print-trtexec"])


# --- missing packages ------------------------------------------------------------------------


def test_build_engine_without_tensorrt_names_the_package(qdq_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(UserError) as raised:
        build_engine(qdq_model, str(tmp_path / "m.engine"), EngineBuildOptions())
    assert "pip install tensorrt" in str(raised.value) and "JetPack" in str(raised.value)
    assert not (tmp_path / "m.engine").exists()


def test_runner_refuses_missing_engine_or_sidecar_before_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    engine = tmp_path / "m.engine"
    with pytest.raises(UserError, match="engine not found"):
        TensorRTRunner(engine)
    engine.write_bytes(b"plan")
    with pytest.raises(UserError, match=r"m\.engine\.json not found"):
        TensorRTRunner(engine)
    write_sidecar(engine, _sidecar_info())
    with pytest.raises(UserError, match="pip install tensorrt"):
        TensorRTRunner(engine)


def test_device_memory_without_cuda_python_or_torch_names_both(monkeypatch):
    for name in ("cuda", "cuda.bindings", "torch"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(UserError) as raised:
        open_device(0)
    assert "cuda-python" in str(raised.value) and "torch" in str(raised.value)


# --- real engines (TensorRT + CUDA GPU) ------------------------------------------------------


def _engine_skip_reason():
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt not installed"
    try:
        open_device(0).close()
    except UserError:
        return "no CUDA GPU"
    return None


SKIP_REASON = _engine_skip_reason()
needs_engine = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


def _images(batch):
    return np.random.default_rng(batch).uniform(0, 1, (batch, *CHW)).astype(np.float32)


def _onnxruntime_logits(model_path, images):
    from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(model_path, optimize=False)
    try:
        return runner.run(images)
    finally:
        runner.close()


@needs_engine
def test_int8_engine_matches_onnxruntime(qdq_model, tmp_path):
    engine = tmp_path / "student.int8.engine"
    cache = tmp_path / "timing.cache"
    options = EngineBuildOptions(min_batch=1, opt_batch=4, max_batch=8, timing_cache=str(cache))
    sidecar = build_engine(qdq_model, str(engine), options)
    assert engine.is_file() and cache.is_file() and trtexec_path(engine).is_file()
    assert read_sidecar(engine) == sidecar
    assert sidecar["input_shapes"]["max"] == [8, *CHW]
    runner = TensorRTRunner(engine)
    try:
        for batch in (1, 3, 8):
            images = _images(batch)
            logits = runner.run(images)
            reference = _onnxruntime_logits(qdq_model, images)
            assert logits.shape == (batch, CLASSES) and logits.dtype == np.float32
            # INT8 kernels may round accumulations differently: a few activation steps at most
            np.testing.assert_allclose(logits, reference, atol=0.05)
        with pytest.raises(UserError, match=r"outside the engine's optimisation profile \[1, 8\]"):
            runner.run(_images(9))
        with pytest.raises(UserError, match="does not fit"):
            runner.run(np.zeros((2, 1, 8, 8), np.float32))
    finally:
        runner.close()
    build_engine(qdq_model, str(tmp_path / "again.engine"), options)  # reuses the timing cache


@needs_engine
def test_fp16_engine_of_the_float_model(float_model, tmp_path):
    engine = tmp_path / "float.fp16.engine"
    sidecar = build_engine(float_model, str(engine), EngineBuildOptions(precision="fp16"))
    assert sidecar["precision"] == "fp16" and sidecar["strongly_typed"] is False
    runner = TensorRTRunner(engine)
    try:
        images = _images(4)
        np.testing.assert_allclose(
            runner.run(images), _onnxruntime_logits(float_model, images), atol=1e-2
        )
    finally:
        runner.close()


@needs_engine
def test_runner_refuses_an_engine_from_another_device(qdq_model, tmp_path):
    engine = tmp_path / "student.int8.engine"
    sidecar = build_engine(qdq_model, str(engine), EngineBuildOptions(max_batch=8))
    write_sidecar(engine, {**sidecar, "compute_capability": "1.0"})
    with pytest.raises(UserError, match="compute capability 1.0"):
        TensorRTRunner(engine)
    write_sidecar(engine, sidecar)
    engine.write_bytes(engine.read_bytes() + b"\0")
    with pytest.raises(UserError, match="replaced or damaged"):
        TensorRTRunner(engine)
