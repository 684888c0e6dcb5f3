"""Independent training stages side by side in forked processes: when they run that way, how a
failing or interrupted stage ends the others, and how the idle cores are measured."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from qkd_deploy.errors import TrainingDiverged, UserError, expected_failure
from qkd_deploy.pipeline import side_by_side
from qkd_deploy.pipeline.side_by_side import Stage, stage_processes, train_side_by_side
from qkd_deploy.train import threads

CPU = torch.device("cpu")


def _sleeper(pid_file):
    """A stage that records its process id and then trains "forever"."""

    def train(progress):
        pid_file.write_text(str(os.getpid()))
        time.sleep(120)

    return train


def _gone(pid: int, within_s: float = 10) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _started(pid_file, within_s: float = 30) -> int:
    deadline = time.monotonic() + within_s
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the stage's process never started"
        time.sleep(0.05)
    return int(pid_file.read_text())


def test_stages_train_in_their_own_processes_at_the_same_time(tmp_path):
    """Each stage leaves its file; both were alive at once (each waits for the other's file)."""

    def stage(mine, other):
        def train(progress):
            (tmp_path / mine).write_text(str(os.getpid()))
            deadline = time.monotonic() + 60
            while not (tmp_path / other).exists():
                assert time.monotonic() < deadline
                time.sleep(0.01)

        return train

    seconds = train_side_by_side(
        [Stage("a", stage("a", "b")), Stage("b", stage("b", "a"))], processes=2, progress=False
    )
    pids = {(tmp_path / name).read_text() for name in "ab"}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    assert set(seconds) == {"a", "b"}


def test_a_stages_user_error_stops_the_others_and_is_raised_as_itself(tmp_path):
    def bad(progress):
        _started(tmp_path / "slow.pid")
        raise UserError("student.train.lr: the loss became NaN")

    start = time.monotonic()
    with pytest.raises(UserError, match="the loss became NaN"):
        train_side_by_side(
            [Stage("slow", _sleeper(tmp_path / "slow.pid")), Stage("bad", bad)], 2, False
        )
    assert time.monotonic() - start < 60
    assert _gone(int((tmp_path / "slow.pid").read_text()))


def test_a_diverged_stage_or_a_full_disk_arrives_as_itself(tmp_path):
    """What the command reports in one line with a resume hint keeps its type and details."""
    checkpoint = tmp_path / "w4a4" / "checkpoint.pt"

    def diverged(progress):
        raise TrainingDiverged("w4a4: the loss became NaN at epoch 3", checkpoint)

    with pytest.raises(TrainingDiverged) as caught:
        train_side_by_side([Stage("diverged", diverged), Stage("fine", lambda p: None)], 2, False)
    assert caught.value.checkpoint == checkpoint and "epoch 3" in str(caught.value)

    def full_disk(progress):
        raise OSError(errno.ENOSPC, "No space left on device", str(checkpoint))

    with pytest.raises(OSError) as caught:
        train_side_by_side([Stage("full", full_disk), Stage("fine", lambda p: None)], 2, False)
    assert expected_failure(caught.value) == (
        f"No space left on device: {checkpoint}; free disk space (or choose another --out), "
        "then continue with --resume"
    )


def test_an_error_that_does_not_pickle_still_brings_its_traceback():
    class Unpicklable(Exception):
        def __reduce__(self):
            raise TypeError("no")

    def raises(progress):
        raise Unpicklable("deep inside the stage")

    with pytest.raises(RuntimeError, match="(?s)stage odd failed.*deep inside the stage"):
        train_side_by_side([Stage("odd", raises), Stage("fine", lambda p: None)], 2, False)


def test_a_crashing_stage_is_raised_with_its_traceback():
    def crash(progress):
        return 1 / 0

    with pytest.raises(RuntimeError, match="(?s)stage crash failed.*ZeroDivisionError"):
        train_side_by_side([Stage("crash", crash), Stage("fine", lambda p: None)], 2, False)


def test_a_killed_stage_process_is_an_error_not_a_hang():
    def killed(progress):
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(RuntimeError, match="killed \\(signal 9\\)"):
        train_side_by_side([Stage("killed", killed), Stage("fine", lambda p: None)], 2, False)


def test_ctrl_c_in_the_parent_stops_every_stage_process(tmp_path):
    previous = signal.signal(signal.SIGALRM, signal.default_int_handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 1.5)  # Ctrl-C while the stages train
        with pytest.raises(KeyboardInterrupt):
            train_side_by_side(
                [
                    Stage("a", _sleeper(tmp_path / "a.pid")),
                    Stage("b", _sleeper(tmp_path / "b.pid")),
                ],
                2,
                False,
            )
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert _gone(_started(tmp_path / "a.pid")) and _gone(_started(tmp_path / "b.pid"))


def test_more_stages_than_processes_wait_their_turn(tmp_path):
    """Three stages, two processes: no stage starts while two others still train."""

    def stage(name):
        def train(progress):
            running = [p.name for p in tmp_path.glob("running-*")]
            (tmp_path / f"seen-{name}").write_text(" ".join(running))
            (tmp_path / f"running-{name}").touch()
            time.sleep(0.3)
            (tmp_path / f"running-{name}").unlink()

        return train

    train_side_by_side([Stage(n, stage(n)) for n in "abc"], 2, False)
    seen = {n: (tmp_path / f"seen-{n}").read_text().split() for n in "abc"}
    assert all(len(others) <= 1 for others in seen.values()), seen
    assert not list(tmp_path.glob("running-*"))


@pytest.mark.parametrize(
    ("requested", "threads_each", "decoders", "device", "stages", "idle", "expected"),
    [
        (1, 1, 0, CPU, 2, 8, 1),  # jobs=1: one at a time
        (3, 1, 0, CPU, 2, 1, 2),  # asked for: at most one per stage, whatever the load
        (0, 1, 0, CPU, 2, 2, 2),  # chosen: the idle cores
        (0, 1, 0, CPU, 3, 1, 1),  # a busy machine: one at a time
        (0, 2, 0, CPU, 2, 8, 1),  # more than one thread: a forked stage could hang in OpenMP
        (2, 2, 0, CPU, 2, 8, 1),  # even when asked for
        (0, 1, 1, CPU, 2, 2, 1),  # a thread and a decoding process: both idle cores
        (0, 1, 1, CPU, 3, 7, 3),
        (0, 1, 0, CPU, 1, 8, 1),  # one stage
        (2, 1, 0, torch.device("cuda"), 2, 8, 1),  # one GPU trains one stage at a time
    ],
)
def test_stage_processes(
    monkeypatch, requested, threads_each, decoders, device, stages, idle, expected
):
    monkeypatch.setattr(side_by_side, "idle_cores", lambda cores: idle)
    assert stage_processes(requested, threads_each, device, stages, decoders) == expected


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_busy_cores_counts_a_process_spinning_beside_it():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # the interpreter is up and spinning
        busy = threads.busy_cores_now(window_s=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy >= 0.6


def test_a_stage_is_finished_once_every_folder_holds_its_weights(tmp_path):
    stage = Stage("teachers", lambda p: None, ("teacher", "teacher_1"))
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.pt").touch()
    assert not stage.finished(tmp_path)  # teacher_1 still trains
    (tmp_path / "teacher_1").mkdir()
    (tmp_path / "teacher_1" / "checkpoint.pt").touch()
    assert not stage.finished(tmp_path)
    (tmp_path / "teacher_1" / "model.pt").touch()
    assert stage.finished(tmp_path)
    assert not Stage("unnamed", lambda p: None).finished(tmp_path)
