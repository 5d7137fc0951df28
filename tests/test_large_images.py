"""A 24 MP photo is an ordinary input: depth and 20-class segmentation of a 4000x6000 JPEG with
the bundled model stay under 2.5 GB of resident memory (the whole command, outputs included)."""
from __future__ import annotations

import sys

import pytest

from densert.benchmarks.bench_large_images import make_photo, measure

LIMIT_MB = 2.5 * 1024


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("task", ["depth", "segment"])
def test_24_megapixels_within_memory(task, tmp_path):
    img = make_photo(tmp_path / "photo.jpg", (4000, 6000))
    r = measure(task, img, None, tmp_path / "out")
    print(f"\n{task} 4000x6000: peak {r['peak_rss_mb']:.0f} MB, {r['wall_s']:.0f} s")
    assert r["peak_rss_mb"] < LIMIT_MB
    assert len(list((tmp_path / "out").glob("photo.*"))) >= 5
