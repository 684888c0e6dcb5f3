"""`qkd-deploy diff BUNDLE`: a bundle carries what diff needs (the model, its sample images and
their preprocessing), so it runs on the device from the bundle folder, which must be intact."""

import json
import shutil

import numpy as np
import pytest

from qkd_deploy.bench import diff
from qkd_deploy.data.preprocess import Preprocess
from qkd_deploy.deploy.bundle import diff_inputs, make_bundle
from qkd_deploy.errors import UserError
from qkd_deploy.pipeline import diff as diff_command


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory):
    return make_bundle(run_dir, tmp_path_factory.mktemp("diff") / "bundle").directory


def test_diff_runs_from_a_bundle_folder(bundle, capsys):
    code = diff_command.main([str(bundle), "--json"])
    rows = json.loads(capsys.readouterr().out)["fused ORT kernels vs graph as written"]
    assert len(rows) == len(diff.checkpoints(diff.load(bundle / "model.onnx")))
    assert code == int(any(r["share_off"] > diff.SHARE for r in rows))


def test_the_bundle_images_are_preprocessed_as_verify_does(bundle):
    model_path, images = diff_inputs(bundle)
    assert model_path == bundle / "model.onnx"
    with np.load(bundle / "sample.npz") as sample:
        raw = sample["images"]
    spec = json.loads((bundle / "preprocess.json").read_text())
    expected = Preprocess.from_dict(spec).apply_numpy(raw)
    assert images.dtype == np.float32 and np.array_equal(images, expected)
    assert images.shape == raw.shape


def test_a_tampered_bundle_is_refused(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "copy")
    with np.load(copy / "sample.npz") as sample:
        arrays = dict(sample)
    arrays["images"] = 255 - arrays["images"]
    np.savez(copy / "sample.npz", **arrays)
    with pytest.raises(UserError, match="sample.npz: sha256 differs"):
        diff_command.main([str(copy)])
