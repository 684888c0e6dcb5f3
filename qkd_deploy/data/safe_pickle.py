"""A restricted unpickler for data files (CIFAR batches): plain containers and numeric numpy
arrays only, so a tampered file can neither run code nor make the reader allocate more than
the file holds.

- Only numpy's own array and dtype reconstruction is allowed (``find_class``), each through a
  guard: ``numpy.ndarray`` cannot be called (``ndarray(shape)`` would allocate any shape),
  ``_reconstruct`` makes only the empty array numpy pickles start from, dtypes holding Python
  objects are refused (an object array of a claimed shape is allocated and zeroed before its
  items are checked), ``_codecs.encode`` (bytes in protocol-2 pickles) is latin-1 only.
  Numeric arrays are then filled by numpy, which checks the bytes against the shape first.
- The file is read whole (up to ``MAX_BYTES``) and unpickled by the pure-Python unpickler from
  memory, which reads what a length field claims without reserving it first (the C unpickler
  allocates it before reading), except BYTEARRAY8, whose length is checked against the file.
- Any failure of malformed bytes is one ``UserError`` naming the file.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

from qkd_deploy.errors import UserError

MAX_BYTES = 1 << 30  # a CIFAR-100 training batch is 155 MB


class _Array(np.ndarray):
    """Stands for ``numpy.ndarray`` in a pickle: ``_reconstruct`` makes empty ones, whose state
    (BUILD) is checked before numpy fills them. Results are plain ndarrays (``np.asarray``)."""

    def __new__(cls, *args, **kwargs):  # noqa: ARG004 - refuses any direct call
        raise pickle.UnpicklingError("refusing to call numpy.ndarray directly")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed numpy array state")
        _check_dtype(state[-3])
        super().__setstate__(state)


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _Array or not isinstance(shape, tuple) or math.prod(shape) != 0:
        raise pickle.UnpicklingError("numpy _reconstruct is only allowed for an empty ndarray")
    return np.ndarray.__new__(_Array, shape, _check_dtype(np.dtype(dtype)))


def _dtype(*args: Any) -> np.dtype:
    return _check_dtype(np.dtype(*args))


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    array = np.frombuffer(buffer, _check_dtype(np.dtype(dtype)))
    return array.reshape(shape, order=order)


def _latin1(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError("_codecs.encode is only allowed for latin-1 text")
    return text.encode("latin-1")


def _check_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("only numeric numpy arrays are allowed")
    return dtype


_ALLOWED = {
    ("numpy", "ndarray"): _Array,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1,
}


class _Unpickler(pickle._Unpickler):  # the Python one: see the module docstring
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, raw: bytes) -> None:
        super().__init__(io.BytesIO(raw), encoding="bytes")
        self.size = len(raw)

    def find_class(self, module: str, name: str) -> object:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return allowed

    def load_bytearray8(self) -> None:
        """BYTEARRAY8, whose Python version zero-fills the claimed length before reading."""
        (length,) = struct.unpack("<Q", self.read(8))
        if length > self.size:
            raise pickle.UnpicklingError(
                f"BYTEARRAY8 claims {length} bytes of a {self.size}-byte file"
            )
        data = bytearray(length)
        self.readinto(data)
        self.append(data)

    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def load(path: Path, what: str, fix: str) -> Any:
    """The object pickled in ``path`` (Python 2 strings as bytes); ``what`` names the kind of
    file expected and ``fix`` says what to do, in the error for a malformed one."""
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise UserError(f"{path} is {size} bytes, larger than {what} can be; {fix}")
        raw = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read {path}: {error}") from None
    try:
        return _Unpickler(raw).load()
    except Exception as error:  # malformed bytes can fail in any opcode with any type
        raise UserError(f"{path} is not {what} ({type(error).__name__}: {error}); {fix}") from None
