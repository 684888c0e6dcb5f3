"""Seeded mutants of the data files qkd-deploy reads, for the readers' fuzz test and benchmark.

Seeds are small valid files: a CIFAR ``batches.meta`` and data batch (pickle protocols 2 and
5), IDX files (plain and gzip) and images (PNG, 16-bit PNG, JPEG, BMP, GIF, TIFF, PGM). A mutant
is a seed after one to four random byte edits (flips, extreme integers written over 1-8 bytes,
which is how a length or a dimension field becomes huge, cuts, insertions, deletions,
duplicated runs), or, for pickles, a short random opcode stream. ``escape`` runs one reader on
one mutant: it must return data or raise one ``UserError`` naming the file, never anything
else.
"""

from __future__ import annotations

import gzip
import io
import pickle
import pickletools
import random
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from qkd_deploy.errors import UserError

CIFAR10_NAMES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]
IMAGE_FORMATS = ("png", "png16", "jpg", "bmp", "gif", "tif", "pgm")
_OPCODES = bytes(ord(op.code) for op in pickletools.opcodes)
_EXTREMES = [b"\xff" * 8, b"\x7f" + b"\xff" * 7, b"\x00" * 8, b"\x80" + b"\x00" * 7]


def cifar_meta() -> bytes:
    meta = {b"num_cases_per_batch": 10000, b"label_names": CIFAR10_NAMES, b"num_vis": 3072}
    return pickle.dumps(meta, protocol=2)


def cifar_batch(n: int = 2, protocol: int = 2) -> bytes:
    rng = np.random.default_rng(n)
    batch = {
        b"batch_label": b"training batch 1 of 5",
        b"labels": rng.integers(0, 10, n).tolist(),
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }
    return pickle.dumps(batch, protocol=protocol)


def idx(gz: bool = False) -> bytes:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = struct.pack(">BBBB3I", 0, 0, 0x08, 3, *array.shape) + array.tobytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def image(kind: str) -> bytes:
    """A small image in format ``kind`` (one of ``IMAGE_FORMATS``)."""
    rng = np.random.default_rng(0)
    if kind == "png16":
        img = Image.fromarray(rng.integers(0, 4096, (5, 6), dtype=np.uint16))
    elif kind == "pgm":
        img = Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8))
    else:
        img = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    fmt = {"png16": "PNG", "jpg": "JPEG", "tif": "TIFF", "pgm": "PPM"}.get(kind, kind.upper())
    img.save(buffer, format=fmt)
    return buffer.getvalue()


def suffix(kind: str) -> str:
    return ".png" if kind == "png16" else f".{kind}"


def mutate(seed: bytes, rng: random.Random) -> bytes:
    """``seed`` after one to four random byte edits."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        if not data:
            data += rng.randbytes(rng.randint(1, 8))
        at = rng.randrange(len(data))
        edit = rng.randrange(7)
        if edit == 0:  # flip bits of one byte
            data[at] ^= rng.randint(1, 255)
        elif edit == 1:  # a huge or zero integer over 1-8 bytes (a length, a dimension)
            width = rng.choice([1, 2, 4, 8])
            data[at : at + width] = rng.choice(_EXTREMES)[:width]
        elif edit == 2:  # cut the file short
            del data[at:]
        elif edit == 3:  # insert random bytes
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        elif edit == 4:  # delete a run
            del data[at : at + rng.randint(1, 16)]
        elif edit == 5:  # duplicate a run
            data[at:at] = data[at : at + rng.randint(1, 32)]
        else:  # a random pickle opcode (for pickles: another instruction)
            data[at] = rng.choice(_OPCODES)
    return bytes(data)


def random_pickle(rng: random.Random, max_bytes: int = 64) -> bytes:
    """A short stream of random pickle opcodes and argument bytes after a PROTO header."""
    data = bytearray(b"\x80" + bytes([rng.randint(0, 5)]))
    while len(data) < rng.randint(3, max_bytes):
        data.append(rng.choice(_OPCODES) if rng.random() < 0.6 else rng.randrange(256))
    return bytes(data[:max_bytes])


def escape(read: Callable[[], object], path: Path) -> str | None:
    """None if ``read()`` returns or raises one ``UserError`` naming ``path``; else what went
    wrong (another exception, an error that does not say which file, or one that reports a
    failed allocation: the reader tried to reserve what the file claimed)."""
    try:
        read()
    except UserError as error:
        if path.name not in str(error):
            return f"UserError without the file name: {error}"
        if "MemoryError" in str(error):
            return f"allocation attempted: {error}"
    except Exception as error:  # what the fuzz looks for
        return f"{type(error).__name__}: {error}"
    return None
