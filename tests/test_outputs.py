"""Result files: the streaming PNG encoder, banded pictures equal to whole-array ones, COCO RLE
equal to pycocotools, stable colours, unique output names, all-or-nothing sets, result objects."""
from __future__ import annotations

import errno
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from densert.runtime import colours, filesets, writers
from densert.runtime.png import PngWriter, write_png
from densert.runtime.results import DepthResult, SegResult, validate_sidecar


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.mark.parametrize("kind,shape,dtype", [("rgb8", (37, 53, 3), np.uint8),
                                              ("gray16", (37, 53), np.uint16),
                                              ("palette8", (37, 53), np.uint8)])
def test_png_writer_round_trips_through_pil(kind, shape, dtype):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 7 if kind == "palette8" else np.iinfo(dtype).max, shape).astype(dtype)
    pal = rng.integers(0, 256, (7, 3), dtype=np.uint8) if kind == "palette8" else None
    buf = io.BytesIO()
    write_png(buf, a, kind, pal, band_rows=5)  # bands that do not divide the height
    im = _decode(buf.getvalue())
    assert np.array_equal(np.asarray(im).astype(dtype), a)
    if pal is not None:
        assert im.mode == "P" and np.array_equal(np.array(im.getpalette()[:21]).reshape(7, 3), pal)


def test_png_writer_checks_rows():
    w = PngWriter(io.BytesIO(), 4, 3, "rgb8")
    with pytest.raises(ValueError, match=r"rows must be \[n, 4, 3\]"):
        w.write_rows(np.zeros((1, 5, 3), np.uint8))
    w.write_rows(np.zeros((2, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="3 rows high but 2 rows"):
        w.close()


def test_banded_pictures_equal_the_whole_array(monkeypatch):
    rng = np.random.default_rng(1)
    H, W = 45, 38
    depth = rng.uniform(0.5, 9, (H, W)).astype(np.float32)
    bins = rng.integers(0, 1001, (H, W)).astype(np.uint16)
    labels = rng.integers(0, 4, (H, W)).astype(np.uint16)
    image = rng.integers(0, 256, (H, W, 3), np.uint8)
    names = ["floor", "wall", "<OTHERS>", "chair"]

    def render():
        c = colours.DepthColouring()
        out = []
        for fn, args in ((writers.write_depth_png, (depth, bins, c)),
                         (writers.write_overlay_png, (image, labels, names)),
                         (writers.write_label_png, (labels, names)),
                         (writers.write_depth_mm_png, (depth,))):
            b = io.BytesIO()
            fn(b, *args)
            out.append(np.asarray(_decode(b.getvalue())))
        return out

    whole = render()
    monkeypatch.setattr(writers, "BAND_PIXELS", 7 * W + 3)  # ~7 rows a band
    assert all(np.array_equal(a, b) for a, b in zip(whole, render()))
    # the depth picture: turbo of the bin position, black where invalid
    t = 1 - (bins.astype(np.float32) - 1) / 999
    assert np.array_equal(whole[0][bins > 0], colours.turbo(t)[bins > 0])
    assert (whole[0][bins == 0] == 0).all()


def test_class_colours_follow_the_name_not_the_list():
    a = colours.class_colours(["wall", "floor", "<OTHERS>"])
    b = colours.class_colours(["floor", "sky", "wall"])
    assert (a[0] == b[2]).all() and (a[1] == b[0]).all() and (a[2] == 0).all()
    assert len({colours.class_colour(n) for n in ("wall", "floor", "sky", "car", "tree")}) == 5


def test_coco_rle_equals_pycocotools():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (1, 1), (64, 33)]:
        for p in (0.0, 0.3, 0.97, 1.0):
            m = rng.random(shape) < p
            ref = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
            got = writers.coco_rle(m)
            assert got == {"size": list(ref["size"]), "counts": ref["counts"].decode()}
            assert np.array_equal(mask_api.decode({"size": got["size"],
                                                    "counts": got["counts"].encode()}), m)


def test_output_stems_keep_inputs_apart(tmp_path):
    files = ["a/img.png", "b/img.png", "x.png", "x.bmp", "z.jpg"]
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    paths = [tmp_path / f for f in files] + [tmp_path / "z.jpg"]
    stems, notes = filesets.output_stems(paths)
    assert stems == ["a/img", "b/img", "x_png", "x_bmp", "z", "z-2"]
    assert len(set(stems)) == len(stems) and len(notes) == 5


def _arts(n_ok: int, fail):
    arts = [filesets.Artifact(f"s.{i}.txt", writers.text(f"file {i}\n")) for i in range(n_ok)]
    arts.append(filesets.Artifact("s.last.txt", fail))
    return arts


def test_write_set_is_all_or_nothing(tmp_path):
    filesets.write_set(tmp_path, [filesets.Artifact("old.txt", writers.text("kept\n"))])

    def disk_full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(filesets.OutputError, match="disk full while writing into .*nothing of this image"):
        filesets.write_set(tmp_path, _arts(3, disk_full))

    def interrupted(f):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        filesets.write_set(tmp_path, _arts(2, interrupted))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]  # no partial set, no temp
    paths = filesets.write_set(tmp_path, _arts(2, writers.text("end\n")))
    assert [p.read_text() for p in paths] == ["file 0\n", "file 1\n", "end\n"]
    assert oct(paths[0].stat().st_mode & 0o777) != oct(0o600)  # the umask's mode, not mkstemp's


def test_file_mode_follows_the_umask_set_after_import(tmp_path):
    """The umask is read when the first set is written, not when densert is imported: a program
    that sets its umask after the import gets files with that mode."""
    code = ("import os, sys\nfrom densert.runtime import filesets, writers\nos.umask(0o077)\n"
            "[p] = filesets.write_set(sys.argv[1], [filesets.Artifact('a.txt', writers.text('x'))])\n"
            "print(oct(os.stat(p).st_mode & 0o777))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0o600"


def test_check_writable_is_one_line(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(filesets.OutputError, match=f"cannot create output directory {f}/out"):
        filesets.check_writable(f / "out")


def _depth_result(metric=True):
    rng = np.random.default_rng(2)
    bins = rng.integers(1, 1001, (20, 30)).astype(np.uint16)
    bins[0, 0] = 0
    depth = np.where(bins > 0, bins * 0.08, 0).astype(np.float32)
    return DepthResult(depth=depth, bins=bins, codes_grid=np.ones((1, 1), np.uint16),
                       preset="cityscapes" if metric else "open-world", metric=metric, focal=None,
                       effective_focal=None, original_hw=(20, 30), resized_hw=(32, 32),
                       timings={"vision": 0.01, "prefill": 0.02},
                       info={"model": None, "backend": "torch", "device": "cpu",
                             "dtype": "float32", "options": {}, "image": None})


def test_depth_result_api(tmp_path):
    r = _depth_result()
    doc = json.loads(r.to_json())
    validate_sidecar(doc)
    assert doc["result"]["units"] == "m" and doc["total_ms"] == pytest.approx(30.0)
    assert r.plot().size == (30, 20) and r.plot(legend=True).size == (30, 20)  # pixel-aligned
    files = r.save(tmp_path, "f", O_opts(formats=("npy", "png16", "tiff"), invalid="nan"))
    assert sorted(p.name for p in files) == ["f.depth.mm.png", "f.depth.npy", "f.depth.tiff", "f.json"]
    a = np.load(tmp_path / "f.depth.npy")
    assert np.isnan(a[0, 0]) and np.array_equal(a[1:], r.depth[1:])
    tif = np.asarray(Image.open(tmp_path / "f.depth.tiff"))
    assert tif.dtype == np.float32 and np.isnan(tif[0, 0]) and np.array_equal(tif[1:], r.depth[1:])
    side = json.loads((tmp_path / "f.json").read_text())
    validate_sidecar(side)
    assert side["files"] == [p.name for p in files] and side["stem"] == "f"
    # relative depth: labelled relative, no millimetre file
    rel = _depth_result(metric=False)
    assert [p.name for p in rel.save(tmp_path / "r", "g")] == ["g.depth.npy", "g.depth.png", "g.depth.txt", "g.json"]
    assert json.loads(rel.to_json())["result"]["units"] == "relative"


def O_opts(**kw):
    from densert.runtime.options import OutputOptions
    return OutputOptions(**kw)


def test_seg_result_api(tmp_path):
    labels = np.zeros((60, 80), np.uint16)
    labels[:, 40:] = 1
    labels[57:] = 2                                             # background, below the legend
    img = np.full((60, 80, 3), 90, np.uint8)
    r = SegResult(labels=labels, class_names=["floor", "wall", "<OTHERS>"], generated_text=None,
                  original_hw=(60, 80), resized_hw=(64, 96), image=img,
                  info={"model": None, "backend": "torch", "device": "cpu", "dtype": "float32",
                        "options": {}, "image": None})
    shown = np.asarray(r.plot())
    assert shown.shape == (60, 80, 3)
    assert shown[59, 79].tolist() == [90, 90, 90]                # background: the image as it is
    wall = np.array(colours.class_colour("wall"), np.float32)
    assert np.abs(shown[55, 79] - (0.5 * 90 + 0.5 * wall)).max() <= 1  # a class: blended
    names = sorted(p.name for p in r.save(tmp_path, "s"))
    assert names == ["s.coco.json", "s.json", "s.labels.npy", "s.labels.png", "s.overlay.png", "s.seg.txt"]
    coco = json.loads((tmp_path / "s.coco.json").read_text())
    assert [s["name"] for s in coco["segments"]] == ["floor", "wall"]  # background left out
    with pytest.raises(ValueError, match="--formats tiff not available for segment"):
        O_opts(formats=("tiff",)).formats_for("segment")
