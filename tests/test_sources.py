import numpy as np
import pytest

from ptq.calib.preprocess import PRESETS
from ptq.calib.sources import SAMPLE_PHOTOS, open_source
from ptq.errors import DataError

PRE = PRESETS["imagenet"]


def test_samples_are_deterministic_and_split_by_photo():
    a = open_source("samples", 12, PRE, (3, 224, 224), seed=1).tensor()
    b = open_source("samples", 12, PRE, (3, 224, 224), seed=1).tensor()
    c = open_source("samples", 12, PRE, (3, 224, 224), seed=2).tensor()
    assert a.shape == (12, 3, 224, 224) and np.array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())
    assert not set(SAMPLE_PHOTOS["calib"]) & set(SAMPLE_PHOTOS["eval"])
    ev = open_source("samples", 12, PRE, (3, 224, 224), seed=1, split="eval")
    assert ev.description == "samples:eval"


def test_image_folder_skips_undecodable_files(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    src = open_source(str(tmp_path), None, PRE, (3, 224, 224), seed=0)
    assert len(src) == 3 and src.skipped == 1
    assert src.tensor().shape == (3, 3, 224, 224)


def test_folder_with_only_broken_images_is_refused(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"xx")
    with pytest.raises(DataError, match="could be decoded"):
        open_source(str(tmp_path), None, PRE, (3, 224, 224), seed=0)


def test_tensor_file_shape_and_nan_checks(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(DataError, match=r"expects \(N, 3, 224, 224\)"):
        open_source(str(tmp_path / "bad.npy"), None, PRE, (3, 224, 224), seed=0)
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[2, 0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", x)
    src = open_source(str(tmp_path / "nan.npy"), None, PRE, (1, 8, 8), seed=0)
    with pytest.raises(DataError, match="NaN"):
        src.tensor()
