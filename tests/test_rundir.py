"""RunDir.cached: a stage's measurements are read back only while nothing they depend on changed."""

from qkd_deploy.rundir import RunDir


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
