"""benchmarks/seed_margin.py: per-seed margins pooled over result files, and its refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "seed_margin.py"
SETTINGS = {
    "data": "fashion-mnist",
    "student": "resnet8",
    "teacher": "resnet20",
    "train_limit": 2000,
    "epochs": 10,
    "lr": 0.05,
    "teacher_epochs": 30,
    "float_epochs": 30,
    "jobs": 2,
    "methods": ["feed"],
    "bits": ["w2a2"],
}


def result_file(path: Path, seeds, feed, none, machine="CPU A", **settings) -> Path:
    summary = {"feed/w2a2": {"values": feed}, "none/w2a2": {"values": none}}
    payload = {
        "machine": machine,
        "settings": {**SETTINGS, **settings, "seeds": seeds},
        "summary": summary,
    }
    path.write_text(json.dumps(payload))
    return path


def run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True
    )


def test_margins_are_pooled_per_seed_with_mean_and_standard_error(tmp_path):
    a = result_file(tmp_path / "a.json", [0, 1], [0.81, 0.80], [0.78, 0.79])
    b = result_file(tmp_path / "b.json", [5], [0.805], [0.80], methods=["kd", "feed"])
    done = run(a, b, "--out", tmp_path / "out", "--name", "m")
    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "out" / "m.json").read_text())
    assert out["machine"] == "CPU A"
    assert out["margins"] == pytest.approx({"0": 3.0, "1": 1.0, "5": 0.5})
    assert out["mean"] == pytest.approx(1.5)
    std = ((1.5**2 + 0.5**2 + 1.0**2) / 2) ** 0.5  # sample std of 3, 1, 0.5
    assert out["std"] == pytest.approx(std)
    assert out["stderr"] == pytest.approx(std / 3**0.5)
    text = (tmp_path / "out" / "m.md").read_text()
    assert "| 5 | 80.00 | 80.50 | +0.50 |" in text and "not met" in text


@pytest.mark.parametrize(
    "second, message",
    [
        ({"seeds": [1], "epochs": 30}, "its epochs differs"),
        ({"seeds": [1], "machine": "CPU B"}, "pool one machine's results"),
        ({"seeds": [0]}, "seed 0 is in an earlier file too"),
        ({"seeds": [1], "float_method": "avg-teachers"}, "its float_method differs"),
    ],
)
def test_unlike_runs_are_refused(tmp_path, second, message):
    a = result_file(tmp_path / "a.json", [0], [0.81], [0.78])
    b = result_file(tmp_path / "b.json", feed=[0.8], none=[0.79], **second)
    done = run(a, b)
    assert done.returncode == 1 and message in done.stderr


def test_a_distilled_float_student_is_stated_and_older_files_count_as_plain(tmp_path):
    older = result_file(tmp_path / "old.json", [0], [0.81], [0.78])
    newer = result_file(tmp_path / "new.json", [1], [0.80], [0.79], float_method="none")
    assert run(older, newer).returncode == 0  # a file from before --float-method: plain
    distilled = result_file(tmp_path / "d.json", [0], [0.83], [0.78], float_method="kd")
    done = run(distilled, "--out", tmp_path / "out", "--name", "d")
    assert done.returncode == 0, done.stderr
    assert "distilled with `kd`" in (tmp_path / "out" / "d.md").read_text()
    assert json.loads((tmp_path / "out" / "d.json").read_text())["float_method"] == "kd"


def test_a_file_without_the_method_names_what_it_ran(tmp_path):
    a = result_file(tmp_path / "a.json", [0], [0.81], [0.78])
    done = run(a, "--method", "kd")
    assert done.returncode == 1 and "no 'kd/w2a2'" in done.stderr and "['feed']" in done.stderr
