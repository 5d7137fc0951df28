"""Datasets on disk in the formats people already have: one folder layout for depth, semantic
segmentation and referring segmentation (training/README.md, "One folder layout").

::

    DIR/images/<stem>.png|.jpg|.jpeg   RGB images (greyscale / RGBA / palette are converted)
    DIR/depth/<stem>.png               16-bit PNG, millimetres (NYUv2 / KITTI style; 0 = invalid)
    DIR/depth/<stem>.npy               float32 metres (0, negative or NaN = invalid)
    DIR/labels/<stem>.png              class index per pixel (L, P or 16-bit PNG)
    DIR/classes.txt                    class names, line i = index i
    DIR/refer.json                     COCO-style: images, annotations (RLE or polygons), refs
    DIR/meta.json                      optional settings, below
    DIR/val.txt                        optional split file: validation stems, one a line

``meta.json`` (every key optional)::

    {"depth_preset": "nyuv2",          open-world | nyuv2 | cityscapes | ddad (default open-world)
     "focal": 518.8,                   focal length in px (open-world preset; default none)
     "depth_scale": 1000.0,            16-bit PNG value / depth_scale = metres (KITTI: 256)
     "ignore_index": 255,              label value without a class
     "split": "val.txt",               split file (default: --val-fraction of the stems)
     "images": {"<stem>": {"depth_preset": "ddad", "focal": 720.0}}}   per-image overrides

``refer.json`` (RefCOCO's refs and instances in one file)::

    {"images": [{"id": 1, "file_name": "0001.png"}],
     "annotations": [{"id": 7, "image_id": 1,
                      "segmentation": {"size": [H, W], "counts": "..."}    COCO RLE, or
                                      [[x0, y0, x1, y1, ...], ...]}],      polygons (pixels)
     "refs": [{"ann_id": 7, "sentences": ["the red ball", {"sent": "the ball on the left"}]}]}

Masks are decoded with ``pycocotools``. Every file is checked when the folder is opened, so a
broken dataset fails before training starts, with one line naming the file: missing pairs, size
mismatches, label values without a class, empty masks, unknown stems in meta.json or the split.
When ``depth/`` (or ``labels/``) exists, every image needs its depth (label) file: put partly
annotated images in a second folder and pass both (``--data A --data B``).

The split is by image (an image's depth, labels and expressions are all train or all val).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from densert.errors import DatasetError
from densert.extras import require
from densert.tasks import prompts
from densert.tasks.depth_bins import OPEN_WORLD, get_preset

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
DEPTH_EXTS = (".png", ".npy")
DEFAULT_IGNORE_INDEX = 255
MM_PER_M = 1000.0                  # the default 16-bit depth PNG scale: millimetres
META_DEFAULTS = {"depth_preset": OPEN_WORLD, "focal": None, "depth_scale": MM_PER_M,
                 "ignore_index": DEFAULT_IGNORE_INDEX, "split": None, "images": {}}
PER_IMAGE_KEYS = ("depth_preset", "focal")
_PNG16_MODES = ("I;16", "I;16B", "I;16L", "I")
_LABEL_MODES = ("L", "P", *_PNG16_MODES)


# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------

def _exists(path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"missing file: {p}")
    return p


def load_image(path) -> np.ndarray:
    """uint8 [H, W, 3] RGB (greyscale / RGBA / palette images are converted)."""
    p = _exists(path)
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise DatasetError(f"{p}: not a readable image ({e})") from None


def load_depth(path, scale: float | None = None) -> np.ndarray:
    """float32 metric depth [H, W], 0 = invalid.

    ``.npy``: float arrays are metres (``scale`` must be None); integer arrays need ``scale``.
    ``.png``: 16-bit, metres = value / scale (1000 for millimetres, 256 for KITTI); 0 stays invalid.
    """
    p = _exists(path)
    if p.suffix == ".npy":
        try:
            raw = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise DatasetError(f"{p}: not a plain .npy array ({e})") from None
    elif p.suffix.lower() == ".png":
        with Image.open(p) as im:
            if im.mode not in _PNG16_MODES:
                raise DatasetError(f"{p}: depth PNG must be 16-bit single channel, got mode {im.mode!r}")
            raw = np.asarray(im).astype(np.int64)
        if scale is None:
            raise DatasetError(f"{p}: a 16-bit depth PNG needs `scale` (value / scale = metres)")
    else:
        raise DatasetError(f"{p}: depth must be .npy or 16-bit .png, got {p.suffix!r}")
    if raw.ndim == 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2:
        raise DatasetError(f"{p}: depth must be [H, W], got shape {raw.shape}")
    if raw.dtype.kind in "iu" and scale is None:
        raise DatasetError(f"{p}: integer depth needs `scale` (value / scale = metres)")
    if raw.dtype.kind not in "iuf":
        raise DatasetError(f"{p}: depth must be numbers, got dtype {raw.dtype}")
    d = raw.astype(np.float64) / (scale if scale is not None else 1.0)
    d = np.where(np.isfinite(d) & (d > 0), d, 0.0)
    return d.astype(np.float32)


def load_label_map(path) -> np.ndarray:
    """int64 [H, W] class indices from a single-channel (L, P palette index, or 16-bit) PNG."""
    p = _exists(path)
    try:
        with Image.open(p) as im:
            if im.mode not in _LABEL_MODES:
                raise DatasetError(f"{p}: label PNG must hold class indices in one channel (L / "
                                   f"P / 16-bit), got mode {im.mode!r}; convert colour-coded "
                                   "masks to indices first")
            return np.asarray(im).astype(np.int64)
    except DatasetError:
        raise
    except _DECODE_ERRORS as e:
        raise DatasetError(f"{p}: not a readable label PNG ({e}); the file is corrupt or "
                           "truncated") from None


def load_class_names(source) -> list[str]:
    """Class names from a list, a .txt (one name per line, line i = index i) or a .json
    (a list, or a {"index": "name"} object with indices 0..K-1)."""
    if isinstance(source, (list, tuple)):
        names = [str(n) for n in source]
    else:
        p = _exists(source)
        if p.suffix == ".json":
            obj = _read_json(p)
            if isinstance(obj, dict):
                try:
                    idx = sorted((int(k), v) for k, v in obj.items())
                except ValueError:
                    raise DatasetError(f"{p}: JSON object keys must be integer class indices") from None
                if [i for i, _ in idx] != list(range(len(idx))):
                    raise DatasetError(f"{p}: class indices must be 0..{len(idx) - 1} without gaps, "
                                       f"got {[i for i, _ in idx]}")
                names = [str(v) for _, v in idx]
            elif isinstance(obj, list):
                names = [str(n) for n in obj]
            else:
                raise DatasetError(f"{p}: expected a JSON list or object of class names")
        else:
            names = [ln.strip() for ln in p.read_text().splitlines()]
            while names and not names[-1]:
                names.pop()
    if not names or any(not n for n in names):
        raise DatasetError(f"class names from {source}: empty list or empty name at index "
                           f"{[i for i, n in enumerate(names) if not n]}")
    if len(set(names)) != len(names):
        raise DatasetError(f"class names from {source} contain duplicates")
    try:
        prompts.semantic(names)   # the names must fit the segmentation prompt (no commas)
    except ValueError as e:
        raise DatasetError(f"class names from {source}: {e}") from None
    return names


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{p}: not readable JSON ({e})") from None


# What PIL raises for a file it cannot decode (truncated, corrupt, a decompression bomb).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _image_size(p: Path) -> tuple[int, int]:
    """(H, W) of a dataset image, decoded whole: the up-front check must catch a truncated file
    (its header alone reads fine), not the training step that first loads it."""
    try:
        with Image.open(p) as im:
            im.load()
            return im.height, im.width
    except _DECODE_ERRORS as e:
        raise DatasetError(f"{p}: not a readable image ({e}); the file is corrupt or "
                           "truncated") from None


def _depth_size(p: Path) -> tuple[int, int]:
    if p.suffix == ".npy":
        try:
            a = np.load(p, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise DatasetError(f"{p}: not a plain .npy array ({e})") from None
        shape = a.shape[:2] if a.ndim == 3 and a.shape[-1] == 1 else a.shape
        if len(shape) != 2 or a.dtype.kind != "f":
            raise DatasetError(f"{p}: depth .npy must be float [H, W] metres, got {a.dtype} "
                               f"{tuple(a.shape)}")
        return int(shape[0]), int(shape[1])
    try:
        with Image.open(p) as im:
            if im.mode not in _PNG16_MODES:
                raise DatasetError(f"{p}: depth PNG must be 16-bit single channel (millimetres), "
                                   f"got mode {im.mode!r}")
            im.load()
            return im.height, im.width
    except DatasetError:
        raise
    except _DECODE_ERRORS as e:
        raise DatasetError(f"{p}: not a readable depth PNG ({e}); the file is corrupt or "
                           "truncated") from None


def _by_stem(d: Path, exts, what: str) -> dict[str, Path]:
    """stem -> file of ``d`` with one of ``exts``; two files of one stem are an error."""
    out: dict[str, Path] = {}
    for p in sorted(d.iterdir()):
        if p.suffix.lower() not in exts:
            continue
        if p.stem in out:
            raise DatasetError(f"{p}: two {what} files share the stem {p.stem!r} ({out[p.stem].name})")
        out[p.stem] = p
    return out


def _check_size(what: str, p: Path, hw: tuple[int, int], image: Path, image_hw) -> None:
    if tuple(hw) != tuple(image_hw):
        raise DatasetError(f"size mismatch: {what} {p} is {hw[0]}x{hw[1]} but image {image} is "
                           f"{image_hw[0]}x{image_hw[1]}")


# --------------------------------------------------------------------------------------------
# Referring masks (COCO RLE or polygons, decoded with pycocotools)
# --------------------------------------------------------------------------------------------

def decode_segmentation(seg, hw: tuple[int, int]) -> np.ndarray:
    """A COCO ``segmentation`` (RLE dict with string or list counts, or a list of polygons) ->
    bool mask [H, W]. Raises ValueError on a malformed entry."""
    mask_utils = require("pycocotools.mask", "reading refer.json")
    h, w = hw
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise ValueError("an RLE segmentation needs 'size' and 'counts'")
        if [int(v) for v in seg["size"]] != [h, w]:
            raise ValueError(f"RLE size {list(seg['size'])} but the image is {h}x{w}")
        counts = seg["counts"]
        rle = (mask_utils.frPyObjects(seg, h, w) if isinstance(counts, list)
               else {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts})
    elif isinstance(seg, list) and seg and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                                               for p in seg):
        rle = mask_utils.merge(mask_utils.frPyObjects([[float(v) for v in p] for p in seg], h, w))
    else:
        raise ValueError("segmentation must be an RLE object or a list of polygons "
                         "[[x0, y0, x1, y1, ...], ...] with at least 3 points each")
    with warnings.catch_warnings():
        # pycocotools 2.0.x under numpy 2 warns about its own __array__ on every decode
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), x1/y1 exclusive, of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass(frozen=True)
class Expression:
    stem: str
    ann_id: int
    text: str


# --------------------------------------------------------------------------------------------
# One dataset folder
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One training / validation unit: (task, image stem), and for "refer" the expression."""
    task: str          # "depth" | "segment" | "refer"
    stem: str
    expr: int = -1     # index into UserData.expressions


class UserData:
    """A dataset folder, checked file by file when opened (see the module docstring)."""

    def __init__(self, root, val_fraction: float = 0.2):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: no such dataset directory")
        self.meta = self._read_meta()
        self.depth_scale = float(self.meta["depth_scale"])
        self.ignore_index = int(self.meta["ignore_index"])
        self.images = self._list_images()
        self.sizes = {s: _image_size(p) for s, p in self.images.items()}
        self.depth = self._pair_dir("depth", DEPTH_EXTS, _depth_size, "depth")
        self.class_names: list[str] | None = None
        self.labels = self._read_labels()
        self.expressions: list[Expression] = []
        self._segmentations: dict[int, tuple[str, object]] = {}
        self._read_refer()
        if not (self.depth or self.labels or self.expressions):
            raise DatasetError(f"{self.root}: no annotations (none of depth/, labels/ + classes.txt, "
                               "refer.json)")
        self.val = self._split(val_fraction)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def tasks(self) -> tuple[str, ...]:
        have = {"depth": bool(self.depth), "segment": bool(self.labels),
                "refer": bool(self.expressions)}
        return tuple(t for t, ok in have.items() if ok)

    # ---- reading and checking ----
    def _read_meta(self) -> dict:
        p = self.root / "meta.json"
        meta = dict(META_DEFAULTS)
        if not p.is_file():
            return meta
        obj = _read_json(p)
        if not isinstance(obj, dict):
            raise DatasetError(f"{p}: expected a JSON object")
        unknown = sorted(set(obj) - set(META_DEFAULTS))
        if unknown:
            raise DatasetError(f"{p}: unknown key(s) {unknown}; known: {sorted(META_DEFAULTS)}")
        meta.update(obj)
        self._check_depth_settings(p, "", meta)
        if not (isinstance(meta["depth_scale"], (int, float)) and meta["depth_scale"] > 0):
            raise DatasetError(f"{p}: depth_scale must be a positive number, got {meta['depth_scale']!r}")
        if not isinstance(meta["ignore_index"], int):
            raise DatasetError(f"{p}: ignore_index must be an integer, got {meta['ignore_index']!r}")
        if not isinstance(meta["images"], dict):
            raise DatasetError(f"{p}: 'images' must map image stems to settings")
        for stem, s in meta["images"].items():
            if not isinstance(s, dict) or set(s) - set(PER_IMAGE_KEYS):
                raise DatasetError(f"{p}: images[{stem!r}] must be an object with keys among "
                                   f"{list(PER_IMAGE_KEYS)}")
            self._check_depth_settings(p, f"images[{stem!r}].", s)
        return meta

    @staticmethod
    def _check_depth_settings(p: Path, where: str, s: dict) -> None:
        if "depth_preset" in s:
            try:
                get_preset(s["depth_preset"])
            except ValueError as e:
                raise DatasetError(f"{p}: {where}depth_preset: {e}") from None
        f = s.get("focal")
        if f is not None and not (isinstance(f, (int, float)) and f > 0):
            raise DatasetError(f"{p}: {where}focal must be a positive number of pixels, got {f!r}")

    def _list_images(self) -> dict[str, Path]:
        d = self.root / "images"
        if not d.is_dir():
            raise DatasetError(f"{d}: missing (a dataset keeps its RGB images in images/)")
        out = _by_stem(d, IMAGE_EXTS, "image")
        if not out:
            raise DatasetError(f"{d}: no images ({', '.join(IMAGE_EXTS)})")
        return out

    def _pair_dir(self, sub: str, exts, size_of, what: str) -> dict[str, Path]:
        """stem -> file of ``DIR/sub`` for every image; one error per missing or orphan file."""
        d = self.root / sub
        if not d.is_dir():
            return {}
        found = _by_stem(d, exts, what)
        for stem, p in found.items():
            if stem not in self.images:
                raise DatasetError(f"{p}: no image for this {what} file "
                                   f"(expected {self.root / 'images' / stem}.png or .jpg)")
        for stem, img in self.images.items():
            if stem not in found:
                raise DatasetError(f"{img}: missing {what} for this image (expected "
                                   f"{d / stem}{' or '.join(exts)})")
            _check_size(what, found[stem], size_of(found[stem]), img, self.sizes[stem])
        return found

    def _read_labels(self) -> dict[str, Path]:
        if not (self.root / "labels").is_dir():
            return {}
        self.class_names = load_class_names(self.root / "classes.txt")
        k, ign = len(self.class_names), self.ignore_index
        if 0 <= ign < k:
            raise DatasetError(f"{self.root / 'classes.txt'}: ignore_index {ign} is also the index of "
                               f"class {self.class_names[ign]!r}")

        def size_and_values(p: Path) -> tuple[int, int]:
            lab = load_label_map(p)
            bad = (lab != ign) & ((lab < 0) | (lab >= k))
            if bad.any():
                raise DatasetError(f"{p}: label value(s) {np.unique(lab[bad])[:10].tolist()} outside "
                                   f"classes.txt (indices 0..{k - 1}, ignore index {ign})")
            return lab.shape

        return self._pair_dir("labels", (".png",), size_and_values, "label map")

    def _read_refer(self) -> None:
        p = self.root / "refer.json"
        if not p.is_file():
            return
        obj = _read_json(p)
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), list)
                                                for k in ("images", "annotations", "refs")):
            raise DatasetError(f"{p}: expected an object with lists 'images', 'annotations', 'refs'")
        by_id: dict[int, str] = {}
        for im in obj["images"]:
            try:
                iid, fname = int(im["id"]), str(im["file_name"])
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{p}: image entry {im!r} needs 'id' and 'file_name'") from None
            stem = Path(fname).stem
            if stem not in self.images or self.images[stem].name != Path(fname).name:
                raise DatasetError(f"{p}: image {iid} file_name {fname!r} is not in "
                                   f"{self.root / 'images'}")
            hw = self.sizes[stem]
            if "height" in im and "width" in im and (int(im["height"]), int(im["width"])) != hw:
                raise DatasetError(f"size mismatch: {p} says image {fname} is {im['height']}x"
                                   f"{im['width']} but {self.images[stem]} is {hw[0]}x{hw[1]}")
            by_id[iid] = stem
        for ann in obj["annotations"]:
            try:
                aid, iid, seg = int(ann["id"]), int(ann["image_id"]), ann["segmentation"]
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{p}: annotation needs 'id', 'image_id', 'segmentation': "
                                   f"{str(ann)[:80]}") from None
            if iid not in by_id:
                raise DatasetError(f"{p}: annotation {aid} refers to unknown image_id {iid}")
            stem = by_id[iid]
            try:
                m = decode_segmentation(seg, self.sizes[stem])
            except ValueError as e:
                raise DatasetError(f"{p}: annotation {aid} ({self.images[stem].name}): {e}") from None
            if not m.any():
                raise DatasetError(f"{p}: annotation {aid} ({self.images[stem].name}) has an empty mask")
            self._segmentations[aid] = (stem, seg)
        for ref in obj["refs"]:
            try:
                aid, sents = int(ref["ann_id"]), ref["sentences"]
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{p}: ref needs 'ann_id' and 'sentences': {str(ref)[:80]}") from None
            if aid not in self._segmentations:
                raise DatasetError(f"{p}: ref with unknown ann_id {aid}")
            for s in sents if isinstance(sents, list) else [None]:
                text = s.get("sent") if isinstance(s, dict) else s
                if not isinstance(text, str) or not text.strip():
                    raise DatasetError(f"{p}: ref of annotation {aid}: sentences must be non-empty "
                                       f"strings or {{\"sent\": ...}} objects, got {s!r}")
                self.expressions.append(Expression(self._segmentations[aid][0], aid, text.strip()))

    def _split(self, val_fraction: float) -> frozenset[str]:
        """Validation stems: the split file named in meta.json, else a fixed pseudo-random
        ``val_fraction`` of the stems (by hash, so it does not move with the training seed)."""
        name = self.meta["split"]
        if name is not None:
            p = self.root / str(name)
            if not p.is_file():
                raise DatasetError(f"{self.root / 'meta.json'}: split file {p} does not exist")
            val = set()
            for i, ln in enumerate(p.read_text().splitlines(), 1):
                s = ln.strip()
                if not s or s.startswith("#"):
                    continue
                if s not in self.images:
                    raise DatasetError(f"{p}:{i}: {s!r} is not an image stem of {self.root / 'images'}")
                val.add(s)
            return frozenset(val)
        if not 0 <= val_fraction < 1:
            raise DatasetError(f"val fraction must be in [0, 1), got {val_fraction}")
        stems = sorted(self.images, key=lambda s: hashlib.sha1(s.encode()).hexdigest())
        n = round(val_fraction * len(stems))
        if val_fraction > 0 and len(stems) > 1:
            n = min(max(n, 1), len(stems) - 1)
        return frozenset(stems[:n])

    # ---- items ----
    def items(self, split: str, tasks=("depth", "segment", "refer")) -> list[Item]:
        """Units of ``split`` ("train", "val" or "all") for the given tasks, in a fixed order."""
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be train, val or all, got {split!r}")

        def keep(stem: str) -> bool:
            return split == "all" or (stem in self.val) == (split == "val")

        out = []
        if "depth" in tasks:
            out += [Item("depth", s) for s in self.depth if keep(s)]
        if "segment" in tasks:
            out += [Item("segment", s) for s in self.labels if keep(s)]
        if "refer" in tasks:
            out += [Item("refer", e.stem, i) for i, e in enumerate(self.expressions) if keep(e.stem)]
        return out

    # ---- loading ----
    def depth_setting(self, stem: str) -> tuple[str, float | None]:
        """(depth preset, focal length px or None) of an image: per-image override, else the
        dataset's."""
        s = {**{k: self.meta[k] for k in PER_IMAGE_KEYS}, **self.meta["images"].get(stem, {})}
        return get_preset(s["depth_preset"]).name, s["focal"]

    def image(self, stem: str) -> np.ndarray:
        return load_image(self.images[stem])

    def depth_map(self, stem: str) -> np.ndarray:
        p = self.depth[stem]
        return load_depth(p, self.depth_scale if p.suffix.lower() == ".png" else None)

    def label_map(self, stem: str) -> np.ndarray:
        return load_label_map(self.labels[stem])

    def expression_mask(self, i: int) -> np.ndarray:
        e = self.expressions[i]
        stem, seg = self._segmentations[e.ann_id]
        return decode_segmentation(seg, self.sizes[stem])


def open_datasets(dirs, val_fraction: float) -> list[UserData]:
    return [UserData(d, val_fraction) for d in dirs]
