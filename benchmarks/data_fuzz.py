"""Data-reader fuzz: seeded mutants of CIFAR pickles, IDX files and images, each read by the
reader qkd-deploy uses, counted by outcome.

The mutants come from ``tests/support/data_mutants.py`` (the fuzz test uses a few hundred per reader
with other seeds): ``batches.meta`` (half mutants of a real one, half random opcode streams of
at most 64 bytes), a CIFAR data batch (protocol 2), IDX files (plain and gzip) and images in
seven formats (each put in a small folder that is loaded, its statistics computed and an epoch
read). An escape is any exception other than one ``UserError`` naming the file. Peak RSS is
the process's (``ru_maxrss``), torch and numpy included. Targets: 0 escapes; peak RSS well
under 1 GB (the reader must not allocate what a corrupt length field claims).

    python benchmarks/data_fuzz.py [--meta 20000] [--batches 5000] [--idx 5000]
        [--images 1400] [--seed 1] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package

from results_io import machine_line, targets_table, write_results  # noqa: E402

from qkd_deploy.data import BatchLoader, Preprocess, load_dataset, read_idx  # noqa: E402
from tests.support import data_mutants as M  # noqa: E402

RSS_TARGET_MB = 1024
# address space allowed to this process: a reader that tried to reserve what a corrupt length
# claims fails there with a MemoryError (counted as an escape) instead of taking the machine
ADDRESS_SPACE_LIMIT = 8 << 30


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_corpus(
    name: str,
    count: int,
    make: Callable[[int], bytes],
    path: Path,
    read: Callable[[], object],
) -> dict:
    """Write each of ``count`` mutants to ``path`` and read it; the outcome counts."""
    outcomes: Counter = Counter()
    escapes, slowest = [], 0.0
    start = time.perf_counter()
    for case in range(count):
        path.write_bytes(make(case))
        began = time.perf_counter()
        problem = M.escape(read, path)
        slowest = max(slowest, time.perf_counter() - began)
        if problem is None:
            outcomes["data or UserError"] += 1
        else:
            outcomes["escape"] += 1
            escapes.append({"case": case, "detail": problem[:300]})
    result = {
        "inputs": count,
        "escapes": outcomes["escape"],
        "seconds": round(time.perf_counter() - start, 1),
        "slowest_input_s": round(slowest, 3),
        "peak_rss_mb_after": round(peak_rss_mb(), 1),
        "escape_examples": escapes[:10],
    }
    print(f"{name}: {result}", flush=True)
    return result


def cifar_dir(root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(M.cifar_batch(2))
    (root / "test_batch").write_bytes(M.cifar_batch(2, protocol=5))
    (root / "batches.meta").write_bytes(M.cifar_meta())
    return root


def image_folder(root: Path, kind: str) -> Path:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}{M.suffix(kind)}").write_bytes(M.image(kind))
    return root / "a" / f"0{M.suffix(kind)}"


def read_folder(root: Path, size: int) -> None:
    ds = load_dataset(f"folder:{root}", size)
    norm = Preprocess((0.5,) * ds.in_channels, (0.25,) * ds.in_channels)
    for split in (ds.train, ds.test):
        list(BatchLoader(split, norm, 2, shuffle=True, augment=ds.augment, workers=0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta", type=int, default=20000)
    parser.add_argument("--batches", type=int, default=5000)
    parser.add_argument("--idx", type=int, default=5000)
    parser.add_argument("--images", type=int, default=1400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    import warnings

    warnings.simplefilter("ignore")  # Pillow warns on every corrupt TIFF tag
    rng = random.Random(args.seed)
    start_rss = peak_rss_mb()
    corpora = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cifar = cifar_dir(work / "cifar")
        spec = f"cifar10:{cifar}"
        meta, batch = M.cifar_meta(), M.cifar_batch(2)
        corpora["batches.meta"] = run_corpus(
            "batches.meta",
            args.meta,
            lambda case: M.random_pickle(rng) if case % 2 else M.mutate(meta, rng),
            cifar / "batches.meta",
            lambda: load_dataset(spec),
        )
        (cifar / "batches.meta").write_bytes(meta)
        corpora["data_batch"] = run_corpus(
            "data_batch",
            args.batches,
            lambda case: M.mutate(batch, rng),
            cifar / "data_batch_1",
            lambda: load_dataset(spec),
        )
        seeds = {False: M.idx(False), True: M.idx(True)}
        idx_path = work / "idx"
        corpora["idx"] = run_corpus(
            "idx",
            args.idx,
            lambda case: M.mutate(seeds[bool(case % 2)], rng),
            idx_path,
            lambda: read_idx(idx_path),
        )
        per_format = max(1, args.images // len(M.IMAGE_FORMATS))
        for kind in M.IMAGE_FORMATS:
            folder = work / f"images-{kind}"
            victim = image_folder(folder, kind)
            seed = M.image(kind)
            read_folder(folder, 8)  # the seed reads (and first-call imports are not timed)
            corpora[f"image {kind}"] = run_corpus(
                f"image {kind}",
                per_format,
                lambda case, seed=seed: M.mutate(seed, rng),
                victim,
                lambda folder=folder: read_folder(folder, 8 if rng.random() < 0.5 else 72),
            )
    total = sum(c["escapes"] for c in corpora.values())
    peak = peak_rss_mb()
    checks = [
        (
            f"{args.meta} batches.meta inputs: 0 escapes",
            corpora["batches.meta"]["escapes"] == 0,
            str(corpora["batches.meta"]["escapes"]),
        ),
        (
            "every corpus: 0 escapes",
            total == 0,
            f"{total} in {sum(c['inputs'] for c in corpora.values())}",
        ),
        (f"peak RSS < {RSS_TARGET_MB} MB", peak < RSS_TARGET_MB, f"{peak:.0f} MB"),
    ]
    payload = {
        "seed": args.seed,
        "rss_before_mb": round(start_rss, 1),
        "peak_rss_mb": round(peak, 1),
        "corpora": corpora,
    }
    write_results(
        args.out, "data_fuzz", payload, checks, markdown(corpora, checks, args, start_rss, peak)
    )
    return 0 if all(ok for _, ok, _ in checks) else 1


def markdown(corpora: dict, checks: list, args, start_rss: float, peak: float) -> str:
    lines = [
        "# Data-reader fuzz",
        "",
        f"{machine_line()}; {date.today().isoformat()}; seed {args.seed}.",
        "",
        "`python benchmarks/data_fuzz.py` (mutants from `tests/support/data_mutants.py`). "
        "An escape is any exception other than one `UserError` naming the file, or one "
        "reporting a failed allocation (8 GiB address-space limit). Peak RSS is the whole "
        f"process's (torch and numpy loaded: {start_rss:.0f} MB before the first input).",
        "",
        "| corpus | inputs | escapes | seconds | slowest input s | peak RSS MB after |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in corpora.items():
        lines.append(
            f"| {name} | {c['inputs']} | {c['escapes']} | {c['seconds']} | "
            f"{c['slowest_input_s']} | {c['peak_rss_mb_after']} |"
        )
    lines += ["", *targets_table(checks), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
