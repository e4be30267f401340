"""Frame sources: image directories, video files, live streams (newest-frame dropping, reconnect), bad input."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from consortium.edge.vision.sources import ImageDirSource, LiveSource, SourceError, VideoFileSource, open_source
from consortium.edge.vision.synth import Scenario, default_scenario, write_video


@pytest.fixture(scope="module")
def short_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sc = default_scenario(frames=30)
    return write_video(Scenario(sc.width, sc.height, sc.fps, 30, sc.line, sc.trips),
                       tmp_path_factory.mktemp("src") / "short.avi")


def test_video_file_and_image_directory(short_video: Path, tmp_path: Path) -> None:
    src = open_source(str(short_video))
    assert isinstance(src, VideoFileSource) and src.fps == 25
    frames = list(src)
    src.close()
    assert [f.index for f in frames] == list(range(30))
    assert frames[10].ts == pytest.approx(10 / 25)
    for f in frames[:5]:
        cv2.imwrite(str(tmp_path / f"{f.index:03d}.png"), f.image)
    (tmp_path / "notes.txt").write_text("not an image")
    images = open_source(str(tmp_path))
    assert isinstance(images, ImageDirSource)
    got = list(images)
    assert len(got) == 5 and got[0].image.shape == (360, 640, 3)
    np.testing.assert_array_equal(got[3].image, frames[3].image)


def test_unreadable_sources_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "missing.mp4"))
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 10)
    with pytest.raises(SourceError, match=r"garbage\.mp4"):
        list(open_source(str(garbage)))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SourceError, match="broken.jpg"):
        list(open_source(str(tmp_path / "d")))
    with pytest.raises(SourceError, match="Cannot open stream"):
        LiveSource("rtsp://127.0.0.1:1/none", reconnect_s=0.05, max_reconnects=0)


def test_live_source_drops_old_frames_and_reconnects(short_video: Path) -> None:
    # a "stream" that ends every 30 frames: the grabber reopens it; a slow consumer sees only fresh frames
    live = LiveSource(str(short_video), reconnect_s=0.01, max_reconnects=3)
    seen = []
    deadline = time.monotonic() + 20
    try:
        for frame in live:
            seen.append(frame)
            time.sleep(0.03)  # slower than the grabber
            if (live.reconnects >= 1 and len(seen) >= 5) or time.monotonic() > deadline:
                break
        assert live.dropped > 0
        assert time.perf_counter() - seen[-1].captured < 1.0
    finally:
        live.close()
    assert live.reconnects >= 1


def test_live_source_gives_up_after_max_reconnects(short_video: Path, tmp_path: Path) -> None:
    copy = tmp_path / "cam.avi"
    copy.write_bytes(short_video.read_bytes())
    live = LiveSource(str(copy), reconnect_s=0.01, max_reconnects=2)
    copy.unlink()  # the camera goes away for good
    try:
        with pytest.raises(SourceError, match="Lost stream .* 2 reopen attempts failed"):
            for _ in live:
                time.sleep(0.01)
    finally:
        live.close()
