"""`qkd-deploy <command> ...`: one entry point, each command imported only when it runs.

Commands are looked up in ``COMMANDS`` (name -> "module:function"); each function takes the
remaining argv. Lazy imports keep torch-free commands (lint, build-engine, verify) torch-free.
"""

from __future__ import annotations

import importlib
import sys

from qkd_deploy.errors import expected_failure
from qkd_deploy.train.threads import prefer_passive_waiting

COMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "qkd_deploy.train_and_export:main",
        "train, distil, export, check and bench: the whole pipeline",
    ),
    "export": (
        "qkd_deploy.train_and_export:export_main",
        "export a finished run's models again (e.g. --opset 17) and measure them; never trains",
    ),
    "lint": ("qkd_deploy.deploy.lint:main", "check a Q/DQ ONNX model against TensorRT's rules"),
    "bench": ("qkd_deploy.bench.commands:bench_main", "ONNX Runtime latency of an ONNX model"),
    "report": ("qkd_deploy.bench.commands:report_main", "re-render and print a run's report"),
    "compare": (
        "qkd_deploy.bench.compare:main",
        "compare two runs; exit 1 on an accuracy or latency regression",
    ),
    "methods": ("qkd_deploy.distill.catalog:main", "list the distillation methods and options"),
    "bundle": ("qkd_deploy.deploy.bundle:main_bundle", "pack one student for the device"),
    "verify": ("qkd_deploy.deploy.bundle:main_verify", "check a deploy bundle on the device"),
    "sensitivity": (
        "qkd_deploy.pipeline.sensitivity:main",
        "per-layer quantization sensitivity of a run's float student (no training)",
    ),
    "diff": (
        "qkd_deploy.pipeline.diff:main",
        "run an ONNX model as written and on fused kernels; name the first tensor that differs",
    ),
    "build-engine": (
        "qkd_deploy.deploy.engine:main",
        "build a TensorRT engine (+ sidecar, trtexec line) from ONNX",
    ),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: qkd-deploy <command> [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"qkd-deploy: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    prefer_passive_waiting()  # before a command loads torch's OpenMP runtime
    module_name, function_name = COMMANDS[name][0].split(":")
    command = getattr(importlib.import_module(module_name), function_name)
    try:
        return int(command(rest) or 0)
    except KeyboardInterrupt:
        print(f"qkd-deploy {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        message = expected_failure(error)
        if message is None:
            raise  # a bug: its traceback
        print(f"qkd-deploy {name}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
