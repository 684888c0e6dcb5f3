"""RunDir.cached: a stage's measurements are read back only while nothing they depend on changed.
RunDir.exclusive: one run at a time per directory."""

import os
import stat
import subprocess
import sys
from contextlib import contextmanager

import pytest

from qkd_deploy.config import load_config, save_config
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import atomic_write_text
from qkd_deploy.rundir import RunDir, _same_file
from qkd_deploy.train_and_export import main

HOLD_THE_DIRECTORY = """
import sys
from qkd_deploy.rundir import RunDir, _same_file
with RunDir(sys.argv[1]).exclusive():
    print("held", flush=True)
    sys.stdin.read()
"""


@contextmanager
def held_by_another_process(root):
    """A real second process holding ``root`` until the block ends; yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_DIRECTORY, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_cached_result_is_read_back_until_its_key_or_output_changes(tmp_path):
    run = RunDir(tmp_path)
    output = tmp_path / "model.onnx"
    calls = []

    def compute():
        calls.append(1)
        output.write_bytes(b"graph %d" % len(calls))
        return {"accuracy": 0.5, "calls": len(calls)}

    record = tmp_path / "export.json"
    first = run.cached(record, {"weights": "abc", "bits": (4, 4)}, compute, outputs=(output,))
    again = run.cached(record, {"weights": "abc", "bits": (4, 4)}, compute, outputs=(output,))
    assert first == again == {"accuracy": 0.5, "calls": 1}

    assert run.cached(record, {"weights": "new", "bits": (4, 4)}, compute, (output,))["calls"] == 2
    output.write_bytes(b"edited by hand")
    assert run.cached(record, {"weights": "new", "bits": (4, 4)}, compute, (output,))["calls"] == 3
    output.unlink()
    assert run.cached(record, {"weights": "new", "bits": (4, 4)}, compute, (output,))["calls"] == 4
    assert len(calls) == 4


def test_a_directory_held_by_another_process_is_refused_until_that_process_ends(tmp_path):
    with held_by_another_process(tmp_path) as pid:
        with pytest.raises(UserError, match=rf"in use by another run \(pid {pid}\)"):
            with RunDir(tmp_path).exclusive():
                pass
    with RunDir(tmp_path).exclusive():
        assert (tmp_path / ".lock").read_text() == str(os.getpid())


def test_resuming_a_run_that_is_still_going_fails_before_writing_anything(tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    save_config(load_config(overrides=[f"out={root}", "progress=false"]), root / "config.yaml")
    before = (root / "config.yaml").read_bytes()
    with held_by_another_process(root) as pid:
        assert main(["--resume", str(root)]) == 2
    assert f"in use by another run (pid {pid})" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == [".lock", "config.yaml"]
    assert (root / "config.yaml").read_bytes() == before


def test_an_unstarted_run_directory_is_removed_and_a_started_one_kept(tmp_path):
    """Unstarted: the run's own files from before training (config, lock, sample batch) and
    empty stage folders; a stage's file (an epoch checkpoint) makes it started."""
    unstarted, started = RunDir(tmp_path / "new"), RunDir(tmp_path / "started")
    for run in (unstarted, started):
        with run.exclusive():
            save_config(load_config(), run.config)
        (run.root / "sample_batch.npz").write_bytes(b"test images")
        run.stage("student_float")
    (started.stage("teacher") / "checkpoint.pt").write_bytes(b"an epoch's weights")
    unstarted.remove_if_unstarted()
    started.remove_if_unstarted()
    assert not unstarted.root.exists()
    assert sorted(str(p.relative_to(started.root)) for p in started.root.rglob("*")) == [
        ".lock",
        "config.yaml",
        "sample_batch.npz",
        "student_float",
        "teacher",
        "teacher/checkpoint.pt",
    ]


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path):
    """Run files are shared (reports served, models copied): not private like the temp file."""
    previous = os.umask(0o022)
    try:
        written = atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temporary file left


def test_a_new_run_takes_the_lock_before_it_checks_or_writes_anything(tmp_path, capsys):
    """The forced interleaving: run A holds the (still empty) directory and has not written its
    config yet. Run B, started on the same --out, must neither pass nor clean up: it fails on
    the lock, and A's directory and lock stay as they were."""
    root = tmp_path / "run"
    root.mkdir()
    with held_by_another_process(root) as pid:
        assert main(["--out", str(root), "--no-progress"]) == 2
        assert f"in use by another run (pid {pid})" in capsys.readouterr().err
        assert sorted(p.name for p in root.iterdir()) == [".lock"]
        assert (root / ".lock").read_text() == str(pid)
        # A goes on: it claims the directory it holds
        save_config(load_config(overrides=[f"out={root}"]), root / "config.yaml")
    assert sorted(p.name for p in root.iterdir()) == [".lock", "config.yaml"]


def test_a_lock_counts_only_while_it_is_the_directory_s_lock_file(tmp_path):
    """A run that opened the lock file of a run which then failed early and removed it (with
    its directory) must not carry on in a directory nobody holds: ``exclusive`` checks that the
    file it locked is still the one at the path."""
    lock = tmp_path / ".lock"
    with open(lock, "a+") as handle:
        assert _same_file(handle, lock)
        lock.unlink()
        assert not _same_file(handle, lock)
        lock.write_text("")  # a later run's new lock file
        assert not _same_file(handle, lock)
