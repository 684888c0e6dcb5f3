"""Image folders (``folder:DIR``), read from disk batch by batch.

A ``FolderSplit`` holds the file names (relative to the root, as one compact byte-string
array), the labels and how to decode; images are decoded only when a batch asks for them, in a
``torch.utils.data.DataLoader``'s worker processes, so memory does not grow with the number of
images. Loading a folder opens every file once to learn its mode (a folder of grayscale images
stays grayscale, 16-bit images share one scale), which reads headers only, except for 16-bit
images, which are decoded to find their largest pixel.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from qkd_deploy.data.augment import Augment
from qkd_deploy.data.decode import GRAY_MODES, Geometry, ImageFormat, decode, probe
from qkd_deploy.errors import UserError

DEFAULT_FOLDER_SIZE = 32
# up to this size images are squashed whole to size x size and augmented with a padded crop
# (today's recipe for CIFAR-like images); above it, ImageNet's crops
LARGEST_SQUASHED = 64
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_CROP_STREAM = 2  # the loader's random streams are 0 (shuffle) and 1 (batch augmentation)


@dataclass
class FolderSplit:
    """One split of an image folder: ``files`` (relative to ``root``, ``numpy.bytes_``) and their
    int64 ``labels``, decoded by ``form`` and ``geometry`` when read."""

    root: Path
    files: np.ndarray
    labels: torch.Tensor
    form: ImageFormat
    geometry: Geometry

    def __len__(self) -> int:
        return len(self.files)

    @property
    def channels(self) -> int:
        return self.form.channels

    def path(self, i: int) -> Path:
        return self.root / os.fsdecode(self.files[i])

    def subset(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> FolderSplit:
        """The images at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return replace(self, files=self.files[index], labels=self.labels[torch.from_numpy(index)])

    def fingerprint(self) -> str:
        """sha256 of the file names and their labels (not the files' contents: reading a large
        folder would take minutes): another image, one gone or one moved to another class
        changes it."""
        digest = hashlib.sha256(b"\0".join(self.files.tolist()))
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()

    def first(self, n: int) -> torch.Tensor:
        """The first ``n`` images (fewer in a smaller split), uint8 NCHW, as evaluation sees
        them."""
        return self.read(range(min(n, len(self))))

    def read(self, index: Sequence[int], crop_seed: tuple[int, int] | None = None) -> torch.Tensor:
        """Decode the images at ``index`` in this process: uint8 NCHW. With ``crop_seed``
        ``(seed, epoch)``, training crops (``crop`` geometry), each drawn from a generator
        seeded by (seed, epoch, image index) alone, so the same image gets the same crop in
        whichever process or batch reads it."""
        size, channels = self.geometry.size, self.channels
        out = np.empty((len(index), size, size, channels), dtype=np.uint8)
        for row, i in enumerate(index):
            rng = None
            if crop_seed is not None and self.geometry.style == "crop":
                rng = np.random.default_rng([*crop_seed, _CROP_STREAM, int(i)])
            out[row] = decode(self.path(int(i)), self.form, self.geometry, rng)
        return torch.from_numpy(out.transpose(0, 3, 1, 2).copy())

    def stream(
        self,
        batches: Sequence[torch.Tensor],
        workers: int,
        crop_seed: tuple[int, int] | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) of each index batch in turn, decoded by ``workers`` processes
        (0: in this one); see ``read`` for ``crop_seed``."""
        loader = DataLoader(
            _BatchReader(self, crop_seed),
            batch_size=None,
            sampler=[b.tolist() for b in batches],
            num_workers=workers,
            prefetch_factor=2 if workers else None,
        )
        for item in loader:
            if isinstance(item, str):  # a worker's UserError, as one line (see _BatchReader)
                raise UserError(item)
            yield item


class _BatchReader(Dataset):
    """A DataLoader dataset whose item is a whole batch (a list of indices): one request per
    batch to a worker, and a file's error comes back as its message, which the main process
    raises as one ``UserError`` (a worker's exception would be re-raised with its traceback in
    the message)."""

    def __init__(self, split: FolderSplit, crop_seed: tuple[int, int] | None) -> None:
        self.split = split
        self.crop_seed = crop_seed

    def __getitem__(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor] | str:
        try:
            return self.split.read(index, self.crop_seed), self.split.labels[index]
        except UserError as error:
            return str(error)

    def __len__(self) -> int:
        return len(self.split)


# ---------------------------------------------------------------- reading a folder


@dataclass
class FolderData:
    """What ``read_folder`` finds: the splits, the class names and the training augmentation."""

    train: FolderSplit
    test: FolderSplit
    class_names: list[str]
    augment: Augment


def read_folder(root: Path, image_size: int | None) -> FolderData:
    """One sub-folder per class; train/ + test/ (or val/) sub-folders, else a fixed 80/20 split.

    Images become L if every one of them is grayscale, else RGB, at ``image_size`` (default 32):
    up to ``LARGEST_SQUASHED`` squashed whole and augmented by a padded crop and a flip, above
    it ImageNet's crops (``decode``) and a flip. 16-bit grayscale images are scaled to 8 bits by
    the set's largest pixel; floating-point images are refused.
    """
    size = image_size or DEFAULT_FOLDER_SIZE
    (train_root, train_classes), test_part = _folder_layout(root)
    class_names = list(train_classes)
    parts = [(train_root, *_flatten(train_classes, class_names))]
    if test_part is not None:
        parts.append((test_part[0], *_flatten(test_part[1], class_names)))
    form = _folder_format([(part_root, files) for part_root, files, _ in parts])
    if size <= LARGEST_SQUASHED:
        geometry = Geometry(size, "squash")
        augment = Augment(crop_padding=max(1, size // 8), hflip=True)
    else:
        geometry = Geometry(size, "crop")
        augment = Augment(hflip=True, resized_crop=True)
    splits = [FolderSplit(*part, form, geometry) for part in parts]
    if test_part is None:
        train, test = _split_80_20(root, splits[0], class_names)
    else:
        train, test = splits
    return FolderData(train, test, class_names, augment)


def _class_folders(root: Path) -> dict[str, list[str]]:
    """Sorted class folder name -> sorted image file names in it; refuses empty folders."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(
            f"{root} has no class sub-folders; put the images of each class in "
            "their own folder (DIR/<class>/<image>)"
        )
    classes = {}
    for folder in folders:
        with os.scandir(folder) as entries:
            images = [  # hidden files are not images (macOS "._x.jpg" resource forks)
                entry
                for entry in entries
                if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES
                and not entry.name.startswith(".")
            ]
        broken = [e.path for e in images if e.is_symlink() and not e.is_file()]
        if broken:
            raise UserError(
                f"{broken[0]} is a link to {os.readlink(broken[0])}, which does not exist "
                f"({len(broken)} such in {folder}); fix the links or remove them"
            )
        files = sorted(entry.name for entry in images if entry.is_file())
        if not files:
            raise UserError(
                f"class folder {folder} holds no images (looked for "
                f"{', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove it"
            )
        classes[folder.name] = files
    return classes


def _flatten(
    classes: dict[str, list[str]], class_names: list[str]
) -> tuple[np.ndarray, torch.Tensor]:
    """All files of ``classes`` as ``<class>/<file>`` byte strings, and their labels (index of
    the folder name in class_names)."""
    names = [os.fsencode(f"{name}/{file}") for name, files in classes.items() for file in files]
    labels = [class_names.index(name) for name, files in classes.items() for _ in files]
    return np.array(names, dtype=np.bytes_), torch.tensor(labels, dtype=torch.int64)


def _folder_format(parts: list[tuple[Path, np.ndarray]]) -> ImageFormat:
    """L if every image of the (root, files) parts is grayscale, else RGB; the largest pixel of
    the 16-bit ones."""
    gray, peak = True, None
    for root, files in parts:
        for name in files:
            mode, deep_peak = probe(root / os.fsdecode(name))
            gray = gray and mode in GRAY_MODES
            if deep_peak is not None:
                peak = deep_peak if peak is None else max(peak, deep_peak)
    return ImageFormat("L" if gray else "RGB", 255 if peak is None else max(peak, 1))


def _split_80_20(
    root: Path, whole: FolderSplit, class_names: list[str]
) -> tuple[FolderSplit, FolderSplit]:
    """The fixed stratified 80/20 train/test split (random_state=0) of a folder without one."""
    from sklearn.model_selection import train_test_split

    counts = torch.bincount(whole.labels, minlength=len(class_names)).tolist()
    too_small = [name for name, count in zip(class_names, counts, strict=True) if count < 2]
    if too_small:
        raise UserError(
            f"{root}: class folder(s) {too_small} hold fewer than 2 images, too few "
            "for the automatic 80/20 split; add images or provide train/ and test/ "
            "sub-folders"
        )
    try:
        train_idx, test_idx = train_test_split(
            np.arange(len(whole)), test_size=0.2, stratify=whole.labels.numpy(), random_state=0
        )
    except ValueError as err:
        raise UserError(
            f"{root}: cannot make a stratified 80/20 train/test split ({err}); add "
            "images or provide train/ and test/ sub-folders"
        ) from None
    return whole.subset(train_idx), whole.subset(test_idx)


_Part = tuple[Path, dict[str, list[str]]]  # a split's root and its classes' files


def _folder_layout(root: Path) -> tuple[_Part, _Part | None]:
    """(train, test) parts if ``root`` has train/ and test/ (or val/), else (the whole folder,
    None)."""
    if not (root / "train").is_dir():
        return (root, _class_folders(root)), None
    for name in ("test", "val"):
        if (root / name).is_dir():
            train, test = _class_folders(root / "train"), _class_folders(root / name)
            unknown = sorted(set(test) - set(train))
            if unknown:
                raise UserError(
                    f"{root / name} has class folders {unknown} that "
                    f"{root / 'train'} lacks; both must use the same class names"
                )
            return (root / "train", train), (root / name, test)
    raise UserError(
        f"{root} has a train/ folder but no test/ or val/ folder; add one, or put "
        "the class folders directly in DIR for an automatic 80/20 split"
    )
