"""TensorRT engine runner (torch-free at import; TensorRT and CUDA are imported when used).

Uses the TensorRT >= 8.5 named-tensor API (``num_io_tensors``, ``get_tensor_name``,
``get_tensor_mode``, ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), which is
the only one left in TensorRT 10. Sources: TensorRT Python API reference, "ICudaEngine" and
"IExecutionContext" pages; NVIDIA/TensorRT ``samples/python/common_runtime.py``.

Device memory goes through cuda-python when it is installed, otherwise through torch.cuda (torch
is imported only there), so a Jetson without a usable torch still runs engines.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qkd_deploy.errors import UserError
from qkd_deploy.fileio import sha256_file
from qkd_deploy.runtime import engine_info

TENSORRT_MISSING = (
    "TensorRT's Python package 'tensorrt' is not installed. Install it with "
    "'pip install tensorrt' (x86 + CUDA), or on a Jetson use the one JetPack ships "
    "(python3-libnvinfer)."
)
CUDA_MISSING = (
    "TensorRT needs a CUDA memory library: install cuda-python ('pip install cuda-python', the "
    "major version matching your CUDA) or a CUDA-enabled torch."
)


def import_tensorrt() -> Any:
    """``import tensorrt`` with a UserError naming the package when it is missing."""
    try:
        import tensorrt
    except ImportError:
        raise UserError(TENSORRT_MISSING) from None
    return tensorrt


class DeviceMemory(Protocol):
    """One CUDA device, one stream, raw buffers: what the runner (and the builder) needs."""

    gpu_name: str
    compute_capability: str  # "8.7"
    stream_handle: int

    def alloc(self, nbytes: int) -> int: ...

    def copy_in(self, pointer: int, array: np.ndarray) -> None: ...

    def copy_out(self, array: np.ndarray, pointer: int) -> None: ...

    def free(self, pointer: int) -> None: ...

    def close(self) -> None: ...


class _BackendMissing(Exception):
    pass


class _CudaPythonMemory:
    """cuda-python runtime bindings: ``cuda.bindings.runtime`` (cuda-python >= 12.6) or the
    older ``cuda.cudart``. Every call returns ``(error, *results)`` (cuda-python docs, "Overview";
    used the same way in TensorRT's ``common_runtime.py``)."""

    def __init__(self, device: int) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            try:
                from cuda import cudart
            except ImportError:
                raise _BackendMissing from None
        self._cudart = cudart
        error = cudart.cudaSetDevice(device)[0]
        if error != cudart.cudaError_t.cudaSuccess:
            raise UserError(f"CUDA device {device} is not available ({error})")
        properties = self._call(cudart.cudaGetDeviceProperties(device))
        name = properties.name
        self.gpu_name = (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\0")
        self.compute_capability = f"{properties.major}.{properties.minor}"
        self._stream = self._call(cudart.cudaStreamCreate())
        self.stream_handle = int(self._stream)

    def _call(self, result: tuple) -> Any:
        error, *values = result
        if error != self._cudart.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA runtime error: {error}")
        return values[0] if len(values) == 1 else None

    def alloc(self, nbytes: int) -> int:
        return int(self._call(self._cudart.cudaMalloc(nbytes)))

    def _copy_async(self, destination: int, source: int, nbytes: int, direction: str) -> None:
        kind = getattr(self._cudart.cudaMemcpyKind, direction)
        self._call(self._cudart.cudaMemcpyAsync(destination, source, nbytes, kind, self._stream))

    def copy_in(self, pointer: int, array: np.ndarray) -> None:
        self._copy_async(pointer, array.ctypes.data, array.nbytes, "cudaMemcpyHostToDevice")

    def copy_out(self, array: np.ndarray, pointer: int) -> None:
        """Copy after all work queued on the stream, and wait for it."""
        self._copy_async(array.ctypes.data, pointer, array.nbytes, "cudaMemcpyDeviceToHost")
        self._call(self._cudart.cudaStreamSynchronize(self._stream))

    def free(self, pointer: int) -> None:
        self._call(self._cudart.cudaFree(pointer))

    def close(self) -> None:
        self._call(self._cudart.cudaStreamDestroy(self._stream))


class _TorchMemory:
    """torch.cuda fallback: buffers are uint8 tensors, kept alive by their data pointer."""

    def __init__(self, device: int) -> None:
        try:
            import torch
        except ImportError:
            raise _BackendMissing from None
        if not torch.cuda.is_available() or device >= torch.cuda.device_count():
            raise UserError(f"CUDA device {device} is not available to torch")
        self._torch = torch
        self._device = torch.device("cuda", device)
        torch.cuda.set_device(self._device)
        self.gpu_name = torch.cuda.get_device_name(self._device)
        major, minor = torch.cuda.get_device_capability(self._device)
        self.compute_capability = f"{major}.{minor}"
        self._stream = torch.cuda.Stream(self._device)
        self.stream_handle = int(self._stream.cuda_stream)
        self._buffers: dict[int, Any] = {}

    def alloc(self, nbytes: int) -> int:
        buffer = self._torch.empty(nbytes, dtype=self._torch.uint8, device=self._device)
        self._buffers[buffer.data_ptr()] = buffer
        return buffer.data_ptr()

    def _view(self, pointer: int, nbytes: int) -> Any:
        return self._buffers[pointer][:nbytes]

    def copy_in(self, pointer: int, array: np.ndarray) -> None:
        source = self._torch.from_numpy(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        with self._torch.cuda.stream(self._stream):
            self._view(pointer, array.nbytes).copy_(source)

    def copy_out(self, array: np.ndarray, pointer: int) -> None:
        """Copy after all work queued on the stream (a blocking copy waits for it)."""
        with self._torch.cuda.stream(self._stream):
            host = self._view(pointer, array.nbytes).cpu().numpy()
        array.reshape(-1).view(np.uint8)[:] = host

    def free(self, pointer: int) -> None:
        del self._buffers[pointer]

    def close(self) -> None:
        self._stream.synchronize()
        self._buffers.clear()


def open_device(device: int = 0) -> DeviceMemory:
    """Device memory on CUDA device ``device``: cuda-python if installed, else torch.cuda."""
    for backend in (_CudaPythonMemory, _TorchMemory):
        try:
            return backend(device)
        except _BackendMissing:
            continue
    raise UserError(CUDA_MISSING)


class TensorRTRunner:
    """Runs a serialized TensorRT engine (one input, one output, dynamic batch).

    The engine's sidecar is read and checked against the installed TensorRT, this GPU and the
    engine file's hash before the engine is deserialised.
    """

    name = "tensorrt"

    def __init__(self, engine_path: str | os.PathLike, device: int = 0) -> None:
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise UserError(
                f"TensorRT engine not found: {engine_path}. Build one with "
                f"'qkd-deploy build-engine MODEL.onnx --out {engine_path}'"
            )
        sidecar = engine_info.read_sidecar(engine_path)
        trt = import_tensorrt()
        self._memory = open_device(device)
        self._pointers: list[int] = []
        try:
            self._check(sidecar, engine_path, trt.__version__)
            self._load(trt, engine_path)
        except BaseException:
            self.close()
            raise

    def _check(self, sidecar: dict, engine_path: Path, tensorrt_version: str) -> None:
        try:
            engine_info.check_compatible(
                sidecar,
                tensorrt_version=tensorrt_version,
                compute_capability=self._memory.compute_capability,
                engine_sha256=sha256_file(engine_path),
            )
        except UserError as error:
            raise UserError(f"{engine_path}: {error}") from None

    def _load(self, trt: Any, engine_path: Path) -> None:
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise UserError(
                f"TensorRT could not deserialise {engine_path} (see its log above); "
                f"{engine_info.REBUILD}"
            )
        self._context = self._engine.create_execution_context()
        self._input, self._output = _single_io(trt, self._engine, engine_path)
        # (min, opt, max) shapes of profile 0 (ICudaEngine.get_tensor_profile_shape)
        minimum, _, maximum = self._engine.get_tensor_profile_shape(self._input, 0)
        self._min_shape, self._max_shape = tuple(minimum), tuple(maximum)
        self.input_shape = self._max_shape[1:]
        self._input_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._input)))
        self._output_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._output)))
        self._bind_buffers()

    def _bind_buffers(self) -> None:
        """Allocate input and output for the largest batch of the profile, bind them once."""
        self._context.set_input_shape(self._input, self._max_shape)
        max_output = tuple(self._context.get_tensor_shape(self._output))
        input_nbytes = int(np.prod(self._max_shape)) * self._input_dtype.itemsize
        output_nbytes = int(np.prod(max_output)) * self._output_dtype.itemsize
        self._input_pointer = self._allocate(input_nbytes)
        self._output_pointer = self._allocate(output_nbytes)
        self._context.set_tensor_address(self._input, self._input_pointer)
        self._context.set_tensor_address(self._output, self._output_pointer)

    def _allocate(self, nbytes: int) -> int:
        pointer = self._memory.alloc(nbytes)
        self._pointers.append(pointer)
        return pointer

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=self._input_dtype)
        self._check_batch(batch.shape)
        if not self._context.set_input_shape(self._input, batch.shape):
            raise UserError(f"TensorRT rejected input shape {batch.shape} for {self._input!r}")
        output = np.empty(tuple(self._context.get_tensor_shape(self._output)), self._output_dtype)
        self._memory.copy_in(self._input_pointer, batch)
        if not self._context.execute_async_v3(self._memory.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        self._memory.copy_out(output, self._output_pointer)
        return output.astype(np.float32, copy=False)

    def _check_batch(self, shape: tuple[int, ...]) -> None:
        expected = self._max_shape[1:]
        if tuple(shape[1:]) != expected:
            raise UserError(
                f"batch of shape {tuple(shape)} does not fit the engine input {self._input!r} "
                f"(N, {', '.join(map(str, expected))})"
            )
        low, high = self._min_shape[0], self._max_shape[0]
        if not low <= shape[0] <= high:
            raise UserError(
                f"batch size {shape[0]} is outside the engine's optimisation profile "
                f"[{low}, {high}]; split the batch (runtime.base.run_in_batches) or rebuild with "
                f"qkd-deploy build-engine --min-batch/--max-batch"
            )

    def close(self) -> None:
        memory = getattr(self, "_memory", None)
        if memory is None:
            return
        self._context = self._engine = self._runtime = None
        for pointer in self._pointers:
            memory.free(pointer)
        self._pointers.clear()
        memory.close()
        self._memory = None


def _single_io(trt: Any, engine: Any, engine_path: Path) -> tuple[str, str]:
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if len(inputs) != 1 or len(outputs) != 1:
        raise UserError(
            f"{engine_path} has inputs {inputs} and outputs {outputs}; the runner expects one "
            f"image input and one logits output"
        )
    return inputs[0], outputs[0]
