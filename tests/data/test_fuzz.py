"""Readers on a few hundred seeded mutants each: data or one UserError naming the file, never
another exception (``benchmarks/data_fuzz.py`` runs 20 000 and more); and the size checks that
come before any allocation."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
from pathlib import Path

import pytest

from qkd_deploy.data import BatchLoader, Preprocess, load_dataset, read_idx
from qkd_deploy.data.safe_pickle import _Array
from qkd_deploy.errors import UserError
from tests.support import data_mutants as M

CASES = 300


def write_cifar10(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (directory / f"data_batch_{i}").write_bytes(M.cifar_batch(2))
    (directory / "test_batch").write_bytes(M.cifar_batch(2, protocol=5))
    (directory / "batches.meta").write_bytes(M.cifar_meta())
    return directory


def no_escapes(outcomes: list[str | None]) -> None:
    escapes = [o for o in outcomes if o is not None]
    assert not escapes, f"{len(escapes)} of {len(outcomes)}: {escapes[:5]}"


@pytest.mark.parametrize("target", ["batches.meta", "data_batch_1", "test_batch"])
def test_cifar_reader_on_mutants(tmp_path: Path, target: str) -> None:
    directory = write_cifar10(tmp_path / "cifar")
    seed = (directory / target).read_bytes()
    assert load_dataset(f"cifar10:{directory}").num_classes == 10
    rng = random.Random(f"cifar {target}")
    outcomes = []
    for case in range(CASES):
        short = target == "batches.meta" and case % 2
        mutant = M.random_pickle(rng) if short else M.mutate(seed, rng)
        (directory / target).write_bytes(mutant)
        outcomes.append(M.escape(lambda: load_dataset(f"cifar10:{directory}"), directory / target))
    no_escapes(outcomes)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reader_on_mutants(tmp_path: Path, gz: bool) -> None:
    seed = M.idx(gz)
    path = tmp_path / "x-idx3-ubyte"
    rng = random.Random(f"idx {gz}")
    outcomes = []
    for _ in range(CASES):
        path.write_bytes(M.mutate(seed, rng))
        outcomes.append(M.escape(lambda: read_idx(path), path))
    no_escapes(outcomes)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow on corrupt TIFF tags
@pytest.mark.parametrize("kind", M.IMAGE_FORMATS)
def test_image_folder_on_mutants(tmp_path: Path, kind: str) -> None:
    """A folder whose first image is a mutant: loading it, its statistics and an epoch of both
    splits, at a squashed and an ImageNet-style size."""
    seed = M.image(kind)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}{M.suffix(kind)}").write_bytes(seed)
    victim = tmp_path / "a" / f"0{M.suffix(kind)}"
    preprocess = Preprocess((0.5,), (0.25,))

    def read(size: int) -> None:
        ds = load_dataset(f"folder:{tmp_path}", size)
        norm = Preprocess(preprocess.mean * ds.in_channels, preprocess.std * ds.in_channels)
        for split in (ds.train, ds.test):
            list(BatchLoader(split, norm, 2, shuffle=True, augment=ds.augment, workers=0))

    read(8)
    rng = random.Random(f"image {kind}")
    outcomes = []
    for case in range(CASES // 3):
        victim.write_bytes(M.mutate(seed, rng))
        outcomes.append(M.escape(lambda case=case: read(8 if case % 2 else 72), victim))
    no_escapes(outcomes)


def test_idx_header_claiming_more_than_the_file_holds_is_refused_before_reading(tmp_path):
    """10^12 elements promised by a 100-byte file (plain or gzip): refused from the header."""
    header = struct.pack(">BBBB3I", 0, 0, 0x08, 3, 10_000, 10_000, 10_000)
    for name, raw in (("plain", header + bytes(84)), ("gz", gzip.compress(header + bytes(84)))):
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(UserError, match=rf"{name}: the IDX header promises 1000000000000 "):
            read_idx(path)


def test_idx_with_data_beyond_its_header_is_refused(tmp_path):
    path = tmp_path / "long.gz"
    path.write_bytes(gzip.compress(M.idx() + b"\x00"))
    with pytest.raises(UserError, match="the file holds more"):
        read_idx(path)


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        # numpy.ndarray called directly would allocate the shape it is given
        (b"\x80\x02cnumpy\nndarray\n(J\x00\xe4\x0bTtR.", "call numpy.ndarray"),
        # an object array of a claimed shape is allocated and zeroed before its items are read
        (b"\x80\x02cnumpy\ndtype\nX\x01\x00\x00\x00O\x85R.", "only numeric numpy arrays"),
        # the empty array numpy pickles start from, made 10^10 elements large
        (
            b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xe4\x0bT\x85"
            b"C\x01b\x87R.",
            "only allowed for an empty ndarray",
        ),
        # a bytes opcode claiming 2^62 bytes: the C unpickler would reserve them first
        (b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b"ab.", "EOFError"),
        # BYTEARRAY8 claiming 2^40 bytes: the Python unpickler would zero-fill them first
        (b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b"ab.", "BYTEARRAY8 claims"),
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.", "latin-1"),
    ],
    ids=[
        "ndarray-call",
        "object-dtype",
        "huge-reconstruct",
        "huge-bytes",
        "huge-bytearray",
        "codec",
    ],
)
def test_pickle_payloads_that_would_allocate_are_refused(tmp_path, payload, refused):
    directory = write_cifar10(tmp_path / "cifar")
    (directory / "batches.meta").write_bytes(payload)
    with pytest.raises(UserError, match=refused) as caught:
        load_dataset(f"cifar10:{directory}")
    assert "batches.meta" in str(caught.value)


def test_arrays_from_a_pickle_are_plain_numpy_arrays(tmp_path):
    directory = write_cifar10(tmp_path / "cifar")
    ds = load_dataset(f"cifar10:{directory}")
    assert ds.train.images.shape == (10, 3, 32, 32)
    batch = pickle.loads(M.cifar_batch(2))
    assert (ds.train.images[0].flatten().numpy() == batch[b"data"][0]).all()
    assert not isinstance(ds.train.images.numpy(), _Array)
