"""`qkd-deploy build-engine MODEL.onnx`: a TensorRT engine from a Q/DQ ONNX model, with its sidecar.

Torch-free (stdlib, numpy, onnx, tensorrt). TensorRT is imported only when an engine is built;
``--print-trtexec`` and everything that only reads the ONNX file work without it.

How the precision is chosen (docs/jetson.md, "TensorRT 10 and TensorRT 8.6"):
- TensorRT >= 10 + Q/DQ model (int8, int4): a strongly typed network. Tensor types come from the
  Q/DQ graph, and precision builder flags are not allowed with it (NVIDIA/TensorRT
  samples/trtexec/README.md, "Create a strongly typed plan file"; Python API "Builder" page,
  NetworkDefinitionCreationFlag.STRONGLY_TYPED).
- TensorRT 8.6 (JetPack 6.0): no strongly typed networks; EXPLICIT_BATCH network flag and
  BuilderFlag.INT8 for the same Q/DQ ONNX, whose opset must be <= 17 (onnx-tensorrt 8.6 limit).
  INT4 weights need TensorRT >= 10 ("Working with Quantized Types", 10.x).
- fp16 / fp32: the float model for comparison, weakly typed (BuilderFlag.FP16 for fp16).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from onnx import TensorProto

from qkd_deploy.errors import UserError
from qkd_deploy.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    load_onnx_graph,
    sha256_file,
)
from qkd_deploy.runtime import engine_info
from qkd_deploy.runtime.tensorrt import import_tensorrt, open_device

PRECISIONS = ("int8", "int4", "fp16", "fp32")
QDQ_PRECISIONS = ("int8", "int4")
# builder flag (and trtexec option) of each precision in a weakly typed network
WEAK_FLAGS = {"int8": "INT8", "fp16": "FP16"}
FIRST_STRONGLY_TYPED_MAJOR = 10
TRT8_MAX_OPSET = 17
Q_DQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass
class EngineBuildOptions:
    precision: str = "int8"  # "int8" (Q/DQ), "int4" (Q/DQ with INT4 weights), "fp16", "fp32"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    workspace_mib: int = 1024
    timing_cache: str | None = None  # loaded if it exists, saved (atomically) after the build
    strongly_typed: bool | None = None  # None: True on TensorRT >= 10 for Q/DQ models, never on 8.x


@dataclass(frozen=True)
class ModelInput:
    """What the build needs from the ONNX file: its single image input, its opset and which
    Q/DQ it holds."""

    name: str
    chw: tuple[int, int, int]
    batch: int | None  # None: dynamic batch dimension
    opset: int
    has_qdq: bool
    has_int4_weights: bool  # INT4 initializers feeding DequantizeLinear


def read_model_input(onnx_path: str | os.PathLike) -> ModelInput:
    """Input name, CHW shape, opset and Q/DQ presence of an ONNX classifier (weights not read)."""
    path = Path(onnx_path)
    model = load_onnx_graph(path)
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    int4 = {init.name for init in graph.initializer if init.data_type == TensorProto.INT4}
    inputs = [value for value in graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise UserError(
            f"{path} has inputs {[v.name for v in inputs]}; build-engine expects one image input"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    chw = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:])
    if len(dims) != 4 or min(chw) <= 0:
        raise UserError(
            f"{path}: input {inputs[0].name!r} must be (N, C, H, W) with fixed C, H, W; "
            f"export the model with a fixed image size"
        )
    return ModelInput(
        name=inputs[0].name,
        chw=chw,
        batch=dims[0].dim_value if dims[0].HasField("dim_value") else None,
        opset=next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1),
        has_qdq=any(node.op_type in Q_DQ_OPS for node in graph.node),
        has_int4_weights=any(
            node.op_type == "DequantizeLinear" and node.input[0] in int4 for node in graph.node
        ),
    )


def _check_options(options: EngineBuildOptions) -> None:
    """Checks that need neither the model nor TensorRT."""
    if options.precision not in PRECISIONS:
        raise UserError(f"unknown precision {options.precision!r}; choose from {PRECISIONS}")
    if not 1 <= options.min_batch <= options.opt_batch <= options.max_batch:
        raise UserError(
            f"batch sizes must satisfy 1 <= min ({options.min_batch}) <= opt "
            f"({options.opt_batch}) <= max ({options.max_batch})"
        )
    if options.workspace_mib < 1:
        raise UserError(f"--workspace-mib must be >= 1, got {options.workspace_mib}")
    if options.strongly_typed and options.precision == "fp16":
        raise UserError(
            "fp16 builds the float model with the FP16 builder flag, which strongly typed "
            "networks reject; drop --strongly-typed"
        )
    if options.strongly_typed is False and options.precision == "int4":
        raise UserError("int4 needs a strongly typed network (TensorRT >= 10)")


def _check_model(
    options: EngineBuildOptions, model: ModelInput, onnx_path: Any
) -> EngineBuildOptions:
    """Checks against the model; returns ``options`` with the precision the engine will really
    have. A Q/DQ model's weights are INT4 or not whatever --precision says (the network takes its
    types from the graph), so int8 of a model with INT4 weights is recorded as int4."""
    if options.precision in QDQ_PRECISIONS and not model.has_qdq:
        raise UserError(
            f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes, so a {options.precision} "
            f"engine would silently stay in float; export the quantized student "
            f"(qkd-deploy train / export) or use --precision fp16/fp32 for a float model"
        )
    if options.precision not in QDQ_PRECISIONS and model.has_qdq:
        raise UserError(
            f"{onnx_path} is a Q/DQ (quantized) model; --precision {options.precision} is meant "
            f"for the float model. Use --precision int8 (or int4) for this one"
        )
    if model.batch is not None and not options.min_batch == options.max_batch == model.batch:
        raise UserError(
            f"{onnx_path} has a fixed batch of {model.batch}; re-export it with a dynamic batch, "
            f"or pass --min-batch/--opt-batch/--max-batch {model.batch}"
        )
    if options.precision == "int4" and not model.has_int4_weights:
        raise UserError(
            f"{onnx_path} has no INT4 weights (INT4 initializers behind DequantizeLinear), so "
            f"an int4 engine would be INT8; use --precision int8, or export a student with "
            f"weights of <= 4 bits in its Linear layers with export.int4_gemm_weights=true"
        )
    if options.precision == "int8" and model.has_int4_weights:
        if options.strongly_typed is False:
            raise UserError(
                f"{onnx_path} has INT4 weights, which need a strongly typed network (TensorRT "
                f">= 10); drop --no-strongly-typed, or export with export.int4_gemm_weights=false"
            )
        options = dataclasses.replace(options, precision="int4")
    return options


def resolve_options(
    options: EngineBuildOptions, model: ModelInput, tensorrt_version: str, onnx_path: Any = "model"
) -> EngineBuildOptions:
    """Validate ``options`` for this model and TensorRT version; resolve ``strongly_typed``."""
    _check_options(options)
    options = _check_model(options, model, onnx_path)
    major = _major(tensorrt_version)
    if major < FIRST_STRONGLY_TYPED_MAJOR:
        if options.strongly_typed:
            raise UserError(
                f"TensorRT {tensorrt_version} has no strongly typed networks; drop "
                f"--strongly-typed (the INT8 builder flag is used instead)"
            )
        if options.precision == "int4":
            raise UserError(f"INT4 weights need TensorRT >= 10, found {tensorrt_version}")
        if model.opset > TRT8_MAX_OPSET:
            raise UserError(
                f"TensorRT {tensorrt_version} (JetPack 6.0) parses ONNX opset <= "
                f"{TRT8_MAX_OPSET}, but {onnx_path} has opset {model.opset}; export the model "
                f"with opset {TRT8_MAX_OPSET}"
            )
    strongly_typed = options.strongly_typed
    if strongly_typed is None:
        strongly_typed = major >= FIRST_STRONGLY_TYPED_MAJOR and options.precision in QDQ_PRECISIONS
    return dataclasses.replace(options, strongly_typed=strongly_typed)


def trtexec_command(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    options: EngineBuildOptions,
    input_name: str,
    input_shape_chw: tuple[int, int, int],
    fixed_batch: int | None = None,
) -> str:
    """The trtexec line that builds the same engine. ``strongly_typed=None`` assumes TensorRT
    >= 10 (strongly typed for Q/DQ precisions); pass False for the TensorRT 8.6 form. A model
    with a ``fixed_batch`` gets no shapes: trtexec refuses them for a static model ("Static
    model does not take explicit shapes", samples/common/sampleEngines.cpp)."""
    _check_options(options)
    strongly_typed = options.strongly_typed
    if strongly_typed is None:
        strongly_typed = options.precision in QDQ_PRECISIONS
    # trtexec help: "Input names can be wrapped with escaped single quotes (ex: 'Input:0')"
    name = f"'{input_name}'" if any(c in input_name for c in ":,") else input_name
    dims = "x".join(map(str, input_shape_chw))
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if strongly_typed:
        args.append("--stronglyTyped")
    elif options.precision in WEAK_FLAGS:
        args.append(f"--{options.precision}")
    if fixed_batch is None:
        for key, batch in (
            ("min", options.min_batch),
            ("opt", options.opt_batch),
            ("max", options.max_batch),
        ):
            args.append(f"--{key}Shapes={name}:{batch}x{dims}")
    # trtexec --memPoolSize: "If none of suffixes is appended, the default unit is in MiB"
    args.append(f"--memPoolSize=workspace:{options.workspace_mib}")
    if options.timing_cache:
        args.append(f"--timingCacheFile={options.timing_cache}")
    return " ".join(shlex.quote(arg) for arg in args)


def trtexec_path(engine_path: str | os.PathLike) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".trtexec.txt")


def build_engine(
    onnx_path: str | os.PathLike, engine_path: str | os.PathLike, options: EngineBuildOptions
) -> dict[str, Any]:
    """Build and write the engine, its sidecar ``<engine>.json`` and ``<engine>.trtexec.txt``;
    return the sidecar."""
    model = read_model_input(onnx_path)
    trt = import_tensorrt()
    options = resolve_options(options, model, trt.__version__, onnx_path)
    device = open_device(0)  # the GPU TensorRT builds on; fails before a long build
    try:
        gpu_name, compute_capability = device.gpu_name, device.compute_capability
        serialized = _build(trt, onnx_path, model, options)
    finally:
        device.close()
    atomic_write_bytes(engine_path, serialized)
    shapes = {
        key: [batch, *model.chw]
        for key, batch in (
            ("min", options.min_batch),
            ("opt", options.opt_batch),
            ("max", options.max_batch),
        )
    }
    sidecar = engine_info.write_sidecar(
        engine_path,
        {
            "tensorrt_version": trt.__version__,
            "gpu_name": gpu_name,
            "compute_capability": compute_capability,
            "precision": options.precision,
            "strongly_typed": options.strongly_typed,
            "input_name": model.name,
            "input_shapes": shapes,
            "onnx_sha256": sha256_file(onnx_path),
            "engine_sha256": sha256_file(engine_path),
        },
    )
    command = trtexec_command(onnx_path, engine_path, options, model.name, model.chw, model.batch)
    atomic_write_text(trtexec_path(engine_path), command + "\n")
    return sidecar


def _build(trt: Any, onnx_path: Any, model: ModelInput, options: EngineBuildOptions) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, options.strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise UserError(_parser_errors(parser, onnx_path))
    config = _builder_config(trt, builder, model, options)
    if options.timing_cache:
        _attach_timing_cache(config, Path(options.timing_cache))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(
            f"TensorRT could not build an engine from {onnx_path} (its log above says why); "
            f"check the model with 'qkd-deploy lint {onnx_path}', or raise --workspace-mib"
        )
    if options.timing_cache:
        # IBuilderConfig.get_timing_cache() / ITimingCache.serialize() (Python API "ITimingCache")
        atomic_write_bytes(options.timing_cache, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _network_flags(trt: Any, strongly_typed: bool) -> int:
    """create_network flags: EXPLICIT_BATCH only before TensorRT 10 (ignored and deprecated
    since; Python API "Builder" page), STRONGLY_TYPED only from TensorRT 10."""
    flag = trt.NetworkDefinitionCreationFlag
    if _major(trt.__version__) < FIRST_STRONGLY_TYPED_MAJOR:
        return 1 << int(flag.EXPLICIT_BATCH)
    return 1 << int(flag.STRONGLY_TYPED) if strongly_typed else 0


def _builder_config(trt: Any, builder: Any, model: ModelInput, options: EngineBuildOptions) -> Any:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if not options.strongly_typed and options.precision in WEAK_FLAGS:
        config.set_flag(_builder_flag(trt, WEAK_FLAGS[options.precision]))
    # For a fixed batch, _check_model made min = opt = max = that batch: a profile is "possible
    # but not required" for a static network (Python API "IOptimizationProfile"), and it keeps
    # profile 0's shapes, which TensorRTRunner reads, explicit.
    profile = builder.create_optimization_profile()
    profile.set_shape(
        model.name,
        (options.min_batch, *model.chw),
        (options.opt_batch, *model.chw),
        (options.max_batch, *model.chw),
    )
    config.add_optimization_profile(profile)
    return config


def _builder_flag(trt: Any, name: str) -> Any:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:  # TensorRT 11 removed the precision flags (10.x -> 11.x migration guide)
        raise UserError(
            f"TensorRT {trt.__version__} has no BuilderFlag.{name}; build Q/DQ models strongly "
            f"typed, and convert float models to FP16 before building"
        )
    return flag


def _attach_timing_cache(config: Any, path: Path) -> None:
    """Load the cache file if it exists (an empty buffer starts a new cache): TensorRT
    "Optimizing Builder Performance", Timing Cache; Python API IBuilderConfig."""
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise UserError(
            f"timing cache {path} was made by another TensorRT version or GPU, or is damaged; "
            f"delete it or pass another --timing-cache path"
        )


def _parser_errors(parser: Any, onnx_path: Any) -> str:
    lines = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        lines.append(f"  node {error.node()}{_node_label(error)}: {error.desc()}")
    return (
        f"TensorRT's ONNX parser rejected {onnx_path}:\n"
        + "\n".join(lines)
        + f"\nCheck the model against TensorRT's rules with 'qkd-deploy lint {onnx_path}'"
    )


def _node_label(error: Any) -> str:
    """Name and operator of the failing node: ParserError.node_name()/node_operator() exist from
    TensorRT 10 (nvonnxparser::IParserError C++ API 10.x); 8.6 reports only the node index."""
    if not hasattr(error, "node_name"):
        return ""
    return f" {error.node_name()!r} ({error.node_operator()})"


def _major(version: str) -> int:
    return int(str(version).split(".")[0])


def _parse_args(argv: list[str]) -> argparse.Namespace:
    defaults = EngineBuildOptions()
    parser = argparse.ArgumentParser(
        prog="qkd-deploy build-engine",
        description="Build a TensorRT engine (plus sidecar JSON and trtexec line) from ONNX.",
    )
    parser.add_argument("model", help="path of the .onnx model")
    parser.add_argument("--out", help="engine path (default: MODEL.<precision>.engine)")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)
    parser.add_argument("--min-batch", type=int, default=defaults.min_batch)
    parser.add_argument("--opt-batch", type=int, default=defaults.opt_batch)
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch)
    parser.add_argument("--workspace-mib", type=int, default=defaults.workspace_mib)
    parser.add_argument("--timing-cache", help="timing cache file, loaded if present, then saved")
    parser.add_argument(
        "--strongly-typed",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: strongly typed for Q/DQ models on TensorRT >= 10; "
        "--no-strongly-typed gives the TensorRT 8.6 form (INT8 builder flag)",
    )
    parser.add_argument(
        "--print-trtexec",
        action="store_true",
        help="print the equivalent trtexec command and exit (TensorRT not needed)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """`qkd-deploy build-engine`: build the engine, or only print its trtexec line."""
    args = _parse_args(argv)
    options = EngineBuildOptions(
        precision=args.precision,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        workspace_mib=args.workspace_mib,
        timing_cache=args.timing_cache,
        strongly_typed=args.strongly_typed,
    )
    model = read_model_input(args.model)
    options = _check_model(options, model, args.model)
    out = args.out or str(Path(args.model).with_suffix(f".{options.precision}.engine"))
    if args.print_trtexec:
        print(trtexec_command(args.model, out, options, model.name, model.chw, model.batch))
        return 0
    sidecar = build_engine(args.model, out, options)
    print(
        f"wrote {out} ({sidecar['precision']}, TensorRT {sidecar['tensorrt_version']}, "
        f"{sidecar['gpu_name']} sm {sidecar['compute_capability']}), "
        f"{engine_info.sidecar_path(out)} and {trtexec_path(out)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
