"""Training stages that do not depend on each other, side by side on idle CPU cores.

On small images one torch thread trains fastest (``train.threads``), so a sequential run on a
2-core machine leaves a core idle. The teachers and a float student trained on the labels need
nothing from each other, nor do the low-bit students once the float student exists: each such
group of stages can train in forked processes, one stage per process, each at one torch thread.
A stage leaves its weights (and its ONNX file) in the run directory, and the parent loads
them afterwards with the same stage functions, which find the files and skip the work. Every
stage seeds itself, so the weights are bit-identical to a sequential run's. The ONNX Runtime
checks and latency stay in the parent, one after another, so nothing measures latency beside a
training process.

Only at one thread per stage: torch's OpenMP runtime on Linux (GNU libgomp) is not fork-safe. A
forked process that runs a parallel region with more than one thread after its parent ran one
waits forever for pool threads that did not survive the fork (measured: a stage process hung in
its first tensor copy with the run at 2 threads). One thread runs a region inline, without the
pool, so stages at one thread each are safe whatever the parent ran.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qkd_deploy.errors import expected_failure
from qkd_deploy.train import distributed
from qkd_deploy.train.threads import available_cores, idle_cores

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


@dataclass(frozen=True)
class Stage:
    """One training stage: ``train(progress)`` leaves ``model.pt`` in each of its ``folders``
    of the run directory."""

    name: str
    train: Callable[[bool], object]
    folders: tuple[str, ...] = ()

    def finished(self, root: Path) -> bool:
        return bool(self.folders) and all((root / f / "model.pt").is_file() for f in self.folders)


def stage_processes(
    requested: int, threads: int, device: torch.device, stages: int, decoders: int = 0
) -> int:
    """How many processes train ``stages`` independent stages: ``requested`` (the ``jobs``
    setting; 0 chooses the cores idle right now divided by the cores each stage keeps busy: its
    thread and its ``decoders``, the processes that decode a streamed folder), at most one per
    stage. One process when the run trains at more than one torch ``threads`` (see the module
    docstring), on a GPU (one device trains one stage at a time), under torchrun (its processes
    train every stage together) and where ``fork`` is missing."""
    if stages < 2 or threads > 1 or device.type != "cpu" or distributed.world_size() > 1:
        return 1
    if "fork" not in multiprocessing.get_all_start_methods() or sys.platform != "linux":
        return 1
    wanted = requested or idle_cores(available_cores()) // (1 + decoders)
    return max(1, min(wanted, stages))


def train_side_by_side(stages: Sequence[Stage], processes: int, progress: bool) -> dict[str, float]:
    """Train every stage in forked processes, at most ``processes`` (>= 2) at a time, the first
    stage with the progress bar and the others silent; returns each one's wall time in seconds.
    A stage that fails stops the others (their last epoch checkpoints stay) and is raised here
    (see ``_raise``)."""
    seconds: dict[str, float] = {}
    if progress:  # with the progress bars: which stages train silently beside the first
        names = ", ".join(", ".join(stage.folders or (stage.name,)) for stage in stages)
        print(
            f"training {names} side by side in {processes} processes (progress: the first; "
            "--set jobs=1 trains one at a time)",
            file=sys.stderr,
        )
    waiting = list(stages)
    running: dict[multiprocessing.connection.Connection, tuple[Stage, object]] = {}
    with _stopped_on_exit(running):
        while waiting or running:
            while waiting and len(running) < processes:
                stage = waiting.pop(0)
                running.update(_start(stage, progress and stage is stages[0]))
            for conn in multiprocessing.connection.wait(list(running)):
                stage, process = running.pop(conn)
                outcome = _outcome(conn, process)
                if outcome[0] != "done":
                    _raise(stage, outcome)
                seconds[stage.name] = outcome[1]
    return seconds


def _start(stage: Stage, progress: bool) -> dict:
    """Fork a process that trains ``stage``; returns {its end of the pipe: (stage, process)}."""
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    process = multiprocessing.get_context("fork").Process(
        target=_train_in_child,
        args=(stage, progress, send, os.getpid()),
        name=stage.name,  # not a daemon: a stage may start its own data-decoding processes
    )
    process.start()
    send.close()
    return {receive: (stage, process)}


def _train_in_child(stage: Stage, progress: bool, send, parent: int) -> None:
    """The forked process: train, send ("done", seconds) or what went wrong, and leave with
    ``os._exit`` (the parent's exit handlers, lock and files are not this process's to touch)."""
    outcome: tuple = ("failed", None, "its process ended without a word")
    try:
        _die_with_parent(parent)
        # SIGTERM (the parent stopping it) unwinds like Ctrl-C: temporary files are removed
        signal.signal(signal.SIGTERM, _interrupt)
        start = time.perf_counter()
        stage.train(progress)
        outcome = ("done", time.perf_counter() - start)
    except KeyboardInterrupt:
        outcome = ("interrupted",)
    except BaseException as error:  # noqa: BLE001 - sent to the parent, which raises it
        outcome = ("failed", error, "".join(traceback.format_exception(error)))
    finally:
        with contextlib.suppress(BaseException):
            try:
                send.send(outcome)
            except Exception:  # the error itself does not pickle: its traceback does
                send.send(("failed", None, outcome[2]))
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(0)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _die_with_parent(parent: int) -> None:
    """Ask Linux to stop this process when its parent dies (a parent killed with SIGKILL must not
    leave a stage training on in the background and holding the run directory)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request
        os._exit(1)


def _outcome(conn, process) -> tuple:
    """What a finished process sent, or why it sent nothing (killed: the exit code's signal)."""
    try:
        outcome = conn.recv()
    except EOFError:
        process.join()
        code = process.exitcode
        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        outcome = ("failed", None, f"its process was killed ({why}) before it finished")
    process.join()
    conn.close()
    return outcome


def _raise(stage: Stage, outcome: tuple) -> None:
    """A failure the user can act on (``errors.expected_failure``: bad input, a diverged loss, a
    full disk) is raised as itself, so the command reports it in one line as it would have
    without the process; anything else, a bug, with the stage's traceback."""
    if outcome[0] == "interrupted":
        raise KeyboardInterrupt
    _, error, trace = outcome
    if error is not None and expected_failure(error) is not None:
        raise error
    raise RuntimeError(f"training stage {stage.name} failed in its own process:\n{trace}")


@contextlib.contextmanager
def _stopped_on_exit(running: dict) -> Iterator[None]:
    """Whatever ends the wait (a failed stage, Ctrl-C), no training process outlives it."""
    try:
        yield
    finally:
        for _, process in running.values():
            if process.is_alive():
                process.terminate()
        for conn, (_, process) in list(running.items()):
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
