"""BUILD.md, the device recipe of a bundle: how to build the engine (or run ONNX Runtime),
verify the bundle and, when it is signed, authenticate it."""

from __future__ import annotations

from typing import Any

from qkd_deploy.deploy.engine import (
    TRT8_MAX_OPSET,
    EngineBuildOptions,
    ModelInput,
    trtexec_command,
)


def build_recipe(expected: dict[str, Any], model: ModelInput, signed: bool = False) -> str:
    """BUILD.md: how to run the model on the device (a TensorRT engine, or ONNX Runtime for an
    ``onnxruntime``-target export, which TensorRT rejects), verify the bundle and, when it is
    ``signed``, authenticate it."""
    if expected["target"] == "onnxruntime":
        packages, steps = "numpy, onnx and onnxruntime", _onnxruntime_steps(model)
    else:
        packages = (
            "numpy, onnx and onnxruntime, and TensorRT's Python package (JetPack: "
            "python3-libnvinfer) with\ncuda-python for the engine"
        )
        steps = _tensorrt_steps(expected, model)
    accuracy_onnx = 100 * expected["accuracy_onnx"]
    return f"""# Deploy {expected["student"]} on the device

W{expected["w_bits"]}A{expected["a_bits"]} student ({expected["method"]}, target \
{expected["target"]}): {accuracy_onnx:.2f} % accuracy in ONNX Runtime on the \
{expected["dataset"]} test split ({expected["test_samples"]} images).

Nothing here needs torch. Install qkd-deploy without its training dependencies
(`pip install --no-deps qkd-deploy` or `pip install --no-deps .` in its source tree) next to
{packages}. Run the commands below in this folder.

{steps}
`verify` checks the sha256 of every file against `manifest.json`, runs the images of
`sample.npz` after the preprocessing of `preprocess.json`, and compares the logits with the
expected ones (tolerances in `expected.json`). Exit code 0 when everything passes, 1 otherwise.

{_trust_note(signed)}
"""


def _trust_note(signed: bool) -> str:
    """Which checks authenticate the bundle, not only show it intact."""
    trust = (
        "Trust a bundle (or a run directory) from elsewhere as you would trust code: ONNX "
        "Runtime and TensorRT parse its model."
    )
    if not signed:
        return (
            "## Authenticity\n\nThis bundle is not signed: the hashes show that it is intact, "
            "not who made it (anyone can edit `expected.json` or the model and write new "
            "hashes). `qkd-deploy bundle RUN --sign-key KEY` signs a bundle. " + trust
        )
    return (
        "## Authenticity\n\nThis bundle is signed: `signature.json` holds an HMAC-SHA256 of "
        "`manifest.json`, which holds every file's sha256, under the key it was made with.\n\n"
        "```bash\nqkd-deploy verify . --sign-key KEY    # also authenticates the bundle\n```\n\n"
        "With the key, an edit made without it fails `verify`, even with the hashes written "
        "again. Without `--sign-key`, `verify` checks integrity only and says the bundle was "
        "not authenticated. Keep the key secret and bring it to the device yourself, not in the "
        "bundle. " + trust
    )


def _onnxruntime_steps(model: ModelInput) -> str:
    shape = ", ".join(map(str, model.chw))
    return f"""## 1. Run it with ONNX Runtime (CPU)

This student was exported for ONNX Runtime (`quant.target=onnxruntime`): UINT8 activations
and INT32 biases, which ONNX Runtime runs as fused integer kernels. TensorRT rejects this model
(no UINT8 Q/DQ, no INT32 bias DequantizeLinear), so there is no engine to build: for TensorRT,
export the student with `quant.target=tensorrt`
(`python -m qkd_deploy.train_and_export ... --set quant.target=tensorrt`) and bundle that run.

```python
import onnxruntime as ort

session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
# batch: float32 (N, {shape}), uint8 images after preprocess.json: (pixels / 255 - mean) / std
logits = session.run(None, {{"{model.name}": batch}})[0]
```

Latency on this device: `qkd-deploy bench model.onnx`.

## 2. Verify

```bash
qkd-deploy verify .    # ONNX Runtime (CPU): logits within expected.json's tolerances
```
"""


def _tensorrt_steps(expected: dict[str, Any], model: ModelInput) -> str:
    precision, engine = expected["engine"]["precision"], expected["engine"]["file"]
    options = EngineBuildOptions(precision=precision)
    trtexec = trtexec_command("model.onnx", engine, options, model.name, model.chw)
    return f"""## 1. Build the engine (TensorRT >= 10)

```bash
qkd-deploy build-engine model.onnx --precision {precision} --out {engine}
```

This writes `{engine}` and its sidecar `{engine}.json` (TensorRT version, GPU,
hashes), which `verify` reads. The same engine with trtexec (no sidecar, so for timing only):

```bash
{trtexec}
```

{_tensorrt8_note(precision, model)}

## 2. Verify

```bash
qkd-deploy verify .    # ONNX Runtime (CPU): logits equal up to 1e-4
qkd-deploy verify . --engine {engine}    # TensorRT: argmax agreement >= 15/16
```
"""


def _tensorrt8_note(precision: str, model: ModelInput) -> str:
    heading = "## TensorRT 8.6 (JetPack 6.0)\n\n"
    if precision == "int4":
        return heading + "This model has INT4 weights, which need TensorRT >= 10."
    if model.opset > TRT8_MAX_OPSET:
        return heading + (
            f"TensorRT 8.6 parses ONNX opset <= {TRT8_MAX_OPSET}, and this model is opset "
            f"{model.opset}: on the training machine, export the finished run again at opset "
            f"{TRT8_MAX_OPSET} without retraining\n(`qkd-deploy export RUN --opset "
            f"{TRT8_MAX_OPSET} --out RUN-opset{TRT8_MAX_OPSET}`) and bundle that copy."
        )
    options = EngineBuildOptions(precision=precision, strongly_typed=False)
    engine = f"model.{precision}.engine"
    trtexec = trtexec_command("model.onnx", engine, options, model.name, model.chw)
    return heading + (
        "`qkd-deploy build-engine` detects TensorRT 8.6 and uses the INT8 builder flag; with "
        f"trtexec:\n\n```bash\n{trtexec}\n```"
    )
