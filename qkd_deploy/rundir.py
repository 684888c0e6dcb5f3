"""The run directory: where each stage's files live, and ``manifest.json`` (torch-free).

Each stage reads the files of the one before, so any stage can be re-run alone; the manifest
records inputs, config, library versions and the sha256 of every file.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from qkd_deploy.errors import UserError
from qkd_deploy.fileio import atomic_write_json, sha256_file

SAMPLE_BATCH = "sample_batch.npz"  # test images and their preprocessing, for the bundle
DATA_RECORD = "data.json"  # the fingerprints of the data the run started on
_PACKAGES = ("qkd-deploy", "torch", "onnx", "onnxruntime", "onnxscript", "numpy", "tensorrt")


class RunDir:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def stage(self, name: str) -> Path:
        """The folder of one trained model (``teacher``, ``student_float``, ``w4a4``, ...)."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the directory for this process's run: a second run on it (a ``--resume`` of a
        run still going, or a stray worker of a killed benchmark) would interleave checkpoints
        and reports. The lock is the kernel's (``flock`` on ``.lock``), so it ends with its
        process, however that process ends."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.root / ".lock"
        with open(lock, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise UserError(
                    f"run directory {self.root} is in use by another run (pid {holder}); "
                    "wait for it to finish or stop it, then resume, or choose another --out"
                ) from None
            if not _same_file(handle, lock):  # its holder removed it (a run that failed early)
                raise UserError(
                    f"run directory {self.root} was removed by the run that held it; run the "
                    "command again"
                )
            handle.truncate(0)
            handle.write(str(os.getpid()))
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def remove_if_unstarted(self) -> None:
        """Undo a new run that stopped before any stage wrote a file (bad data, a model that does
        not fit the method, a checkpoint that does not load): its ``config.yaml``, data record,
        sample batch and lock go, and so do empty stage folders and then the directory, so
        fixing the input and running the same command again just works."""
        ours = {self.config, self.root / ".lock"} | {
            self.root / name for name in (SAMPLE_BATCH, DATA_RECORD)
        }
        if not self.root.is_dir():
            return
        entries = list(self.root.iterdir())
        folders = [p for p in entries if p.is_dir() and not p.is_symlink()]
        if any(p not in ours and p not in folders for p in entries):
            return
        if any(any(folder.iterdir()) for folder in folders):
            return
        for folder in folders:
            folder.rmdir()
        for path in ours:
            path.unlink(missing_ok=True)
        self.root.rmdir()

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    def cached(
        self, record: Path, key: dict, compute: Callable[[], dict], outputs: tuple[Path, ...] = ()
    ) -> dict:
        """``compute()``, or its result stored in ``record`` by an earlier run with the same
        ``key`` whose ``outputs`` (files ``compute`` writes) are unchanged since.

        A resumed run (or a run whose stages were copied from another) so skips evaluating what
        has not changed; a different key (new weights, settings or library versions) recomputes.
        """
        key = json.loads(json.dumps(key))
        if record.is_file():
            stored = json.loads(record.read_text())
            if stored.get("key") == key and stored.get("outputs") == _hashes(outputs):
                return stored["result"]
        result = compute()
        atomic_write_json(record, {"key": key, "outputs": _hashes(outputs), "result": result})
        return result


def _same_file(handle, path: Path) -> bool:
    """Whether the open ``handle`` is still the file at ``path``."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _hashes(files: tuple[Path, ...]) -> dict[str, str | None]:
    return {p.name: sha256_file(p) if p.is_file() else None for p in files}


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # no kernel release: it changes under the same hardware (container hosts), and latency
    # comparisons take this string for the machine's identity
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def write_manifest(run_dir: Path, inputs: dict, config: dict) -> dict:
    files = {
        str(p.relative_to(run_dir)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")
    }
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "config": config,
        "versions": library_versions(),
        "machine": machine_description(),
        "files": files,
    }
    atomic_write_json(run_dir / "manifest.json", manifest)
    return manifest
