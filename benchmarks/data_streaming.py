"""``folder:DIR`` streaming: peak memory and images per second of one training epoch at
image_size 224, against a plain ``torch.utils.data.DataLoader`` over the same files.

N synthetic JPEGs (10 classes, 256-500 px per side at random aspect ratios, smooth colour
fields with noise, quality 90; 500 distinct ones, copied to N files) are written into a
temporary folder. Each configuration runs in
its own process, whose process tree (the loader's worker processes included) is sampled every
0.2 s for its memory: the sum of RSS (shared pages counted in every process, an upper bound)
and the sum of PSS (shared pages split between the processes that share them).

- ``qkd-deploy``: ``load_dataset("folder:DIR", 224)`` (the folder scan), then one shuffled,
  augmented epoch of the training split (80 %) through ``BatchLoader`` (random-resized crop and
  flip, normalisation; batch 64) with ``--workers`` decoding processes. The normalisation
  statistics pass (``split_statistics``, at most 10 000 images) is timed apart.
- ``plain``: the same training files through a ``DataLoader`` (batch 64, shuffle, the same
  workers) whose dataset opens each file with Pillow, converts it to RGB, cuts a random-resized
  crop, resizes it to 224 (bilinear), flips at random and normalises to a float tensor: what
  torchvision's ``ImageFolder`` with ``RandomResizedCrop`` does, without torchvision.

Targets (20 000 images): peak memory under 2 GB, and at least the plain loader's images/s.

    python benchmarks/data_streaming.py [--images 2000 8000] [--workers 1]
        [--out benchmarks/results] [--name data_streaming]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import machine_line, targets_table, write_results  # noqa: E402

SIZE, BATCH, CLASSES = 224, 64, 10
MEMORY_TARGET_MB = 2048


DISTINCT = 500  # distinct JPEGs; image i is a copy of image i % DISTINCT (decoding is not cached)


def distinct_jpeg(i: int) -> bytes:
    """Synthetic image ``i``: a smooth colour field with a wave and noise, 256-500 px a side."""
    from PIL import Image

    rng = np.random.default_rng(i)
    w, h = rng.integers(256, 501, 2)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    colour = rng.uniform(0, 255, (3, 3))
    field = colour[:, 0, None, None] * x / w + colour[:, 1, None, None] * y / h
    field += colour[:, 2, None, None] * np.sin((x + y) / rng.uniform(5, 40))
    pixels = field.transpose(1, 2, 0) / 2 + rng.normal(0, 12, (h, w, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def ensure_images(root: Path, count: int, pool: list[bytes]) -> None:
    """The first ``count`` images of the set in ``root``, in ``CLASSES`` class folders."""
    for i in range(count):
        path = root / f"class{i % CLASSES}" / f"{i:06d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pool[i % len(pool)])


# ---------------------------------------------------------------- one configuration (child)


class PlainDataset:
    """A torchvision-style dataset: one file -> one normalised float tensor."""

    def __init__(self, files: list[Path], labels: list[int], mean, std) -> None:
        self.files, self.labels = files, labels
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        from qkd_deploy.data.decode import random_resized_box

        rng = np.random.default_rng()
        with Image.open(self.files[i]) as img:
            img = img.convert("RGB")
            box = random_resized_box(img.width, img.height, rng)
            img = img.crop(box).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
        if rng.random() < 0.5:
            pixels = pixels[:, :, ::-1]
        return torch.from_numpy((pixels - self.mean) / self.std), self.labels[i]


def run_one(kind: str, root: Path, workers: int) -> dict:
    import torch

    from qkd_deploy.data import BatchLoader, load_dataset, split_statistics

    torch.set_num_threads(1)
    import sklearn.model_selection  # noqa: F401 - imported by the 80/20 split; not scan time

    began = time.perf_counter()
    data = load_dataset(f"folder:{root}", SIZE)
    scan_s = time.perf_counter() - began
    train = data.train
    result = {"kind": kind, "images": len(train), "workers": workers, "scan_s": round(scan_s, 1)}
    if kind == "qkd-deploy":
        began = time.perf_counter()
        preprocess = split_statistics(train, workers)
        result["statistics_s"] = round(time.perf_counter() - began, 1)
        loader = BatchLoader(
            train, preprocess, BATCH, shuffle=True, augment=data.augment, workers=workers
        )
    else:
        files = [train.path(i) for i in range(len(train))]
        dataset = PlainDataset(files, train.labels.tolist(), (0.5,) * 3, (0.25,) * 3)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=BATCH, shuffle=True, num_workers=workers
        )
    seen = 0
    began = time.perf_counter()
    for images, _ in loader:
        assert images.shape[1:] == (3, SIZE, SIZE) and images.dtype == torch.float32
        seen += len(images)
    seconds = time.perf_counter() - began
    result.update(epoch_s=round(seconds, 1), images_per_s=round(seen / seconds, 1))
    return result


# ---------------------------------------------------------------- measuring (parent)


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(sum of RSS, sum of PSS) in MB of ``pid`` and its descendants."""
    pids, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        pids.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        frontier += [int(c) for c in children]
    rss = pss = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss / 1024, pss / 1024


def measure(kind: str, root: Path, workers: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", kind, str(root), str(workers)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    peak_rss = peak_pss = 0.0
    while child.poll() is None:
        rss, pss = tree_memory_mb(child.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.2)
    out = child.stdout.read()
    if child.returncode:
        raise SystemExit(f"{kind} on {root} failed ({child.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(peak_rss_mb=round(peak_rss), peak_pss_mb=round(peak_pss))
    print(result, flush=True)
    return result


def best(results: list[dict]) -> dict:
    """One loader's runs: the fastest epoch (the machine is shared), the largest memory."""
    fastest = max(results, key=lambda r: r["images_per_s"])
    return {
        **fastest,
        "images_per_s_runs": [r["images_per_s"] for r in results],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "peak_pss_mb": max(r["peak_pss_mb"] for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each loader, alternated")
    parser.add_argument("--folder", help="keep the images here (default: a temporary folder)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="data_streaming")
    args = parser.parse_args(argv)
    if args.child:
        kind, root, workers = args.child
        print(json.dumps(run_one(kind, Path(root), int(workers))))
        return 0
    began = time.perf_counter()
    with ProcessPoolExecutor(2) as workers:
        pool = list(workers.map(distinct_jpeg, range(min(DISTINCT, max(args.images)))))
    print(f"{len(pool)} distinct JPEGs in {time.perf_counter() - began:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.folder or tmp)
        rows = []
        for count in args.images:
            root = base / f"n{count}"
            ensure_images(root, count, pool)
            runs = {"qkd-deploy": [], "plain": []}
            for _ in range(args.rounds):  # alternated: load from other jobs hits both alike
                for kind, results in runs.items():
                    results.append(measure(kind, root, args.workers))
            rows += [{"folder_images": count, **best(results)} for results in runs.values()]
    checks = targets(rows)
    payload = {"image_size": SIZE, "batch": BATCH, "workers": args.workers, "rows": rows}
    write_results(args.out, args.name, payload, checks, markdown(rows, checks, args))
    return 0


def targets(rows: list[dict]) -> list:
    ours = [r for r in rows if r["kind"] == "qkd-deploy"]
    largest = max(r["folder_images"] for r in rows)
    checks = []
    for r in ours:
        plain = next(
            p for p in rows if p["kind"] == "plain" and p["folder_images"] == r["folder_images"]
        )
        checks.append(
            (
                f"{r['folder_images']} images: images/s >= plain DataLoader",
                r["images_per_s"] >= plain["images_per_s"],
                f"{r['images_per_s']} vs {plain['images_per_s']}",
            )
        )
    big = next(r for r in ours if r["folder_images"] == largest)
    checks.append(
        (
            f"{largest} images: peak memory < {MEMORY_TARGET_MB} MB",
            big["peak_rss_mb"] < MEMORY_TARGET_MB,
            f"RSS sum {big['peak_rss_mb']} MB, PSS sum {big['peak_pss_mb']} MB",
        )
    )
    smallest = min(r["folder_images"] for r in rows)
    if largest > smallest:
        small = next(r for r in ours if r["folder_images"] == smallest)
        growth = big["peak_pss_mb"] - small["peak_pss_mb"]
        checks.append(
            (
                f"memory flat from {smallest} to {largest} images (PSS growth < 50 MB)",
                growth < 50,
                f"{growth:+} MB",
            )
        )
    return checks


def markdown(rows: list[dict], checks: list, args) -> str:
    lines = [
        "# folder:DIR streaming",
        "",
        f"{machine_line()}; {date.today().isoformat()}.",
        "",
        f"`python benchmarks/data_streaming.py --images {' '.join(map(str, args.images))} "
        f"--workers {args.workers} --rounds {args.rounds}`: synthetic JPEGs of 256-500 px, one "
        f"training epoch (80 % of the folder) at {SIZE}x{SIZE}, batch {BATCH}, random-resized "
        "crop + flip, OMP_NUM_THREADS=1; each loader run "
        f"{args.rounds} times, alternated: images/s of the fastest run (all runs in the JSON), "
        "memory the largest peak over the process tree, sampled every 0.2 s. Scan: "
        "`load_dataset` (opening every file's header), sklearn's import excluded.",
        "",
        "| folder images | loader | workers | train images | scan s | statistics s | epoch s "
        "| images/s | peak RSS sum MB | peak PSS sum MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['folder_images']} | {r['kind']} | {r['workers']} | {r['images']} | "
            f"{r['scan_s']} | {r.get('statistics_s', '-')} | {r['epoch_s']} | "
            f"{r['images_per_s']} | {r['peak_rss_mb']} | {r['peak_pss_mb']} |"
        )
    lines += ["", *targets_table(checks), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
