"""A resumed run trains on the data it started with: ``data.json`` records the splits'
fingerprints, and a resume on a changed folder is refused in one line."""

import json

import numpy as np
import pytest
from PIL import Image

from qkd_deploy.config import load_config
from qkd_deploy.errors import UserError
from qkd_deploy.pipeline.context import Context, load_data
from qkd_deploy.pipeline.stages import check_data_unchanged
from qkd_deploy.rundir import RunDir


def _write_images(root, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for label in range(2):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(folder / f"{i}.png")


def _context(images, run) -> Context:
    config = load_config(overrides=[f"data.spec=folder:{images}", "data.image_size=8"])
    data, preprocess = load_data(config)
    return Context(config, data, preprocess, RunDir(run))


def test_a_resume_on_the_same_data_passes_and_on_other_images_is_refused(tmp_path):
    images, run = tmp_path / "images", tmp_path / "run"
    _write_images(images, per_class=5)
    run.mkdir()
    check_data_unchanged(_context(images, run))  # the run starts: recorded
    record = json.loads((run / "data.json").read_text())
    assert record["train"]["images"] + record["test"]["images"] == 10
    check_data_unchanged(_context(images, run))  # resumed on the same data
    (images / "class1" / "4.png").rename(images / "class0" / "moved.png")  # same count
    with pytest.raises(UserError, match=r"changed since this run started .*Restore it"):
        check_data_unchanged(_context(images, run))
    assert json.loads((run / "data.json").read_text()) == record  # the record stays


def test_an_in_memory_data_set_is_fingerprinted_by_its_pixels(tmp_path):
    config = load_config()
    data, preprocess = load_data(config)
    check_data_unchanged(Context(config, data, preprocess, RunDir(tmp_path)))
    data.train.images[0, 0, 0, 0] ^= 1
    with pytest.raises(UserError, match="train split 1437 -> 1437 images"):
        check_data_unchanged(Context(config, data, preprocess, RunDir(tmp_path)))


def test_an_unreadable_record_names_itself(tmp_path):
    config = load_config()
    data, preprocess = load_data(config)
    (tmp_path / "data.json").write_text("{not json")
    with pytest.raises(UserError, match="data.json cannot be read"):
        check_data_unchanged(Context(config, data, preprocess, RunDir(tmp_path)))
