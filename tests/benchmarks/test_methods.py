"""benchmarks/methods.py: what it refuses before any training."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "methods.py"


def test_a_float_method_needing_more_teachers_than_a_method_has_is_refused(tmp_path):
    work = tmp_path / "work"
    args = ["--float-method", "avg-teachers", "--methods", "kd", "feed", "--work", str(work)]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2
    assert "avg-teachers needs at least 2 teachers" in done.stderr
    assert "from: kd;" in done.stderr  # feed distils from three: not named
    assert not work.exists()
