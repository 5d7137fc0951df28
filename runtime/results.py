"""What a task returns: arrays at the original image size, what produced them, and how to keep
them (``save``: an all-or-nothing set of files), show them (``plot``: a PIL image) or describe them
(``to_json``: the sidecar, schema ``sidecar.schema.json``)."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from densert import __version__
from densert.tasks.grounding import rewrite_coordinates
from densert.tasks.prompts import MPII_JOINTS
from densert.tasks.rle import encode_depth, encode_segmentation
from densert.text import tokens

from . import colours, writers
from .filesets import Artifact, check_writable, write_set
from .options import OutputOptions

SIDECAR_SCHEMA = "densert-result"
SIDECAR_VERSION = 1


def sidecar_schema() -> dict:
    return json.loads((resources.files("densert.runtime") / "sidecar.schema.json").read_text())


def validate_sidecar(doc: dict) -> None:
    """Raise ValueError listing every way ``doc`` breaks the sidecar schema."""
    from densert.extras import require
    jsonschema = require("jsonschema", "validating a result sidecar")
    errors = sorted(jsonschema.Draft202012Validator(sidecar_schema()).iter_errors(doc),
                    key=lambda e: list(e.absolute_path))
    if errors:
        raise ValueError("sidecar does not match runtime/sidecar.schema.json: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}" for e in errors[:10]))


class _Result:
    """Shared by every result: the run's provenance, timings and the files it writes."""

    task: str = ""
    flow: str = "generate"          # which of the task's flows ran (predictor module docstring)
    timings: dict
    info: dict

    # -- per task
    def _block(self) -> dict:
        raise NotImplementedError

    def _artifacts(self, stem: str, formats: tuple[str, ...], o: OutputOptions) -> list:
        raise NotImplementedError

    # -- shared
    def to_dict(self, stem: str | None = None, files: list[str] | None = None) -> dict:
        t = {k: round(float(v) * 1e3, 3) for k, v in self.timings.items()}
        info = self.info or {}
        return {
            "schema": SIDECAR_SCHEMA, "schema_version": SIDECAR_VERSION,
            "densert_version": __version__, "task": self.task,
            "image": info.get("image"), "stem": stem,
            "original_hw": list(getattr(self, "original_hw", None) or []) or None,
            "resized_hw": list(getattr(self, "resized_hw", None) or []) or None,
            "model": info.get("model"), "backend": info.get("backend"),
            "device": info.get("device"), "dtype": info.get("dtype"),
            **({"load_s": info["load_s"]} if "load_s" in info else {}),
            "options": info.get("options", {}), "flow": self.flow,
            "timings_ms": t, "total_ms": round(sum(t.values()), 3),
            "files": files or [],
            "result": self._block(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=writers.jsonable)

    def artifacts(self, stem: str, options: OutputOptions | None = None) -> list:
        o = options or OutputOptions()
        arts = self._artifacts(stem, o.formats_for(self.task), o)
        side_name = f"{stem}.json"
        files = [a.name for a in arts] + [side_name]
        arts.append(Artifact(side_name, lambda f: writers.json_file(self.to_dict(stem, files))(f)))
        return arts

    def save(self, out_dir: str | Path, stem: str = "result",
             options: OutputOptions | None = None) -> list[Path]:
        """Write this result's files into ``out_dir`` as ``<stem>.*``, all or none."""
        return write_set(check_writable(out_dir), self.artifacts(stem, options))

    def print_line(self, label: str) -> str:
        """The console line: what ran and its per-stage milliseconds."""
        t = self.timings
        stages = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in t.items())
        hw = getattr(self, "original_hw", None)
        size = f" {hw[1]}x{hw[0]}" if hw else ""
        return f"{label}{size} {self.task}: {stages} ms; total {sum(t.values()) * 1e3:.1f} ms"


def _png(write, *args) -> writers.Writer:
    return lambda f: write(f, *args)


def _to_image(write, *args) -> Image.Image:
    buf = io.BytesIO()
    write(buf, *args)
    im = Image.open(io.BytesIO(buf.getvalue()))
    im.load()
    return im


@dataclass
class DepthResult(_Result):
    depth: np.ndarray               # float32 [H, W] at the original image size (0 invalid)
    bins: np.ndarray                # uint16 [H, W] bin codes 1..1000 (0 invalid)
    codes_grid: np.ndarray          # uint16 (H//16, W//16) codes: the released RLE's grid
    preset: str
    metric: bool                    # False: open world without a focal length (relative depth)
    focal: float | None             # focal length given by the caller (px, original image)
    effective_focal: float | None   # focal length of the image the network saw
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    argmax_hw: tuple[int, int] | None = None  # the grid the bin argmax ran on
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    task = "depth"
    flow = "one-prefill"

    @property
    def text(self) -> str:
        return encode_depth(self.codes_grid)

    @property
    def units(self) -> str:
        """"m" for metric depth; "relative" for open-world depth without a focal length (the
        values are canonical depths at a 2000 px focal length, not metres)."""
        return "m" if self.metric else "relative"

    def _colouring(self, o: OutputOptions) -> colours.DepthColouring:
        return colours.DepthColouring(range=o.range, legend=o.legend)

    def _legend(self, c: colours.DepthColouring):
        if not c.legend:
            return None
        return colours.depth_legend(self.preset, self.units, self.effective_focal, c, *self.depth.shape)

    def plot(self, range: tuple[float, float] | None = None, legend: bool = False) -> Image.Image:
        c = colours.DepthColouring(range=range, legend=legend)
        return _to_image(writers.write_depth_png, self.depth, self.bins, c, self._legend(c))

    def invalid_as(self, invalid: str) -> np.ndarray:
        return self.depth if invalid == "zero" else np.where(self.bins > 0, self.depth, np.nan).astype(np.float32)

    def _block(self) -> dict:
        valid = self.depth[self.bins > 0]
        return {"preset": self.preset, "metric": self.metric, "units": self.units,
                "focal": self.focal, "effective_focal": self.effective_focal,
                "depth_range": [float(valid.min()), float(valid.max())] if valid.size else None,
                "codes_grid_shape": list(self.codes_grid.shape),
                "argmax_shape": list(self.argmax_hw) if self.argmax_hw else None,
                # the 16-bit millimetre PNG holds at most 65.535 m
                "mm_png_clipped_pixels":
                    int((self.depth > writers.MM_PNG_MAX_M).sum()) if self.metric else None}

    def _artifacts(self, stem, formats, o):
        c = self._colouring(o)
        arts = []
        for f in formats:
            if f == "npy":
                arts.append(Artifact(f"{stem}.depth.npy", writers.npy(self.invalid_as(o.invalid))))
            elif f == "png":
                arts.append(Artifact(f"{stem}.depth.png", _png(writers.write_depth_png, self.depth,
                                                                self.bins, c, self._legend(c))))
            elif f == "png16" and self.metric:  # millimetres only mean something for metric depth
                arts.append(Artifact(f"{stem}.depth.mm.png", _png(writers.write_depth_mm_png, self.depth)))
            elif f == "txt":
                arts.append(Artifact(f"{stem}.depth.txt", writers.text(self.text + "\n")))
            elif f == "tiff":
                arts.append(Artifact(f"{stem}.depth.tiff",
                                     lambda fh: writers.tiff(self.invalid_as(o.invalid))(fh)))
        return arts


class _LabelMap(_Result):
    """Shared by segmentation and referring results: a label map over ``class_names``."""

    image: np.ndarray | None
    class_names: list[str]

    def _labels(self) -> np.ndarray:
        raise NotImplementedError

    def plot(self, image: np.ndarray | None = None) -> Image.Image:
        """The overlay on ``image`` (default: the input the result was made from), or the label
        colours alone when there is no image."""
        image = self.image if image is None else image
        labels = self._labels()
        if image is None:
            return _to_image(writers.write_label_png, labels, self.class_names).convert("RGB")
        return _to_image(writers.write_overlay_png, image, labels, self.class_names)

    def _colours(self) -> dict:
        return {n: list(colours.class_colour(n)) for n in self.class_names}

    def _map_artifacts(self, stem, formats, overlay_name: str) -> list:
        labels = self._labels()
        arts = []
        for f in formats:
            if f == "png":
                arts.append(Artifact(f"{stem}.labels.png",
                                     _png(writers.write_label_png, labels, self.class_names)))
            elif f == "overlay" and self.image is not None:
                arts.append(Artifact(f"{stem}.{overlay_name}.png",
                                     _png(writers.write_overlay_png, self.image, labels, self.class_names)))
            elif f == "coco":
                arts.append(Artifact(f"{stem}.coco.json", writers.json_file(
                    {"image_size": list(labels.shape),
                     "segments": writers.coco_segments(labels, self.class_names)})))
        return arts


@dataclass
class SegResult(_LabelMap):
    labels: np.ndarray              # uint16 [H, W]: index into class_names
    # As the model listed them: background is "<OTHERS>" where it named it (the one-pass flows)
    # or "<BG>" first (the open set's detect-then-segment flow).
    class_names: list[str]
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    generated_text: str | None = None   # the naming pass's answer; None on the one-prefill flow
    flow: str = "closed-set:one-prefill"
    prompt_classes: list[str] | None = None   # the closed set's given classes (None: open set)
    detections: list[dict] = field(default_factory=list)  # boxes the open set segmented
    detection_text: str | None = None   # the open set's detection answer
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    image: np.ndarray | None = field(default=None, repr=False)  # the input, original size
    task = "segment"

    @property
    def text(self) -> str:
        return encode_segmentation(self.labels, self.class_names)

    def _labels(self):
        return self.labels

    def _block(self) -> dict:
        return {"mode": "closed-set" if self.prompt_classes is not None else "open-set",
                "prompt_classes": self.prompt_classes,
                "class_names": self.class_names, "class_colours": self._colours(),
                "labels_dtype": "uint16", "generated_text": self.generated_text,
                "detections": self.detections, "detection_text": self.detection_text,
                "warnings": self.warnings}

    def _artifacts(self, stem, formats, o):
        arts = []
        if "npy" in formats:
            arts.append(Artifact(f"{stem}.labels.npy", writers.npy(self.labels)))
        arts += self._map_artifacts(stem, formats, "overlay")
        if "txt" in formats:
            arts.append(Artifact(f"{stem}.seg.txt", writers.text(self.text + "\n")))
        return arts


@dataclass
class ReferResult(_LabelMap):
    mask: np.ndarray                # bool [H, W] foreground at the original size
    expression: str
    box: tuple[float, float, float, float] | None   # grounding box, original px (None: whole image)
    polygons: list                  # <ins> polygons, original px
    polygon_mask: np.ndarray | None  # bool [H, W] rasterised polygons (None without polygons)
    crop_box: tuple[int, int, int, int]
    generated_text: str
    original_hw: tuple[int, int]
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    class_names: list[str] = field(default_factory=lambda: [tokens.BG, tokens.FG])
    info: dict = field(default_factory=dict)
    image: np.ndarray | None = field(default=None, repr=False)
    task = "refer"
    flow = "ground-then-segment"

    @property
    def labels(self) -> np.ndarray:
        return self.mask.astype(np.uint16)

    @property
    def text(self) -> str:
        return encode_segmentation(self.labels, self.class_names)

    def _labels(self):
        return self.labels

    def _block(self) -> dict:
        return {"expression": self.expression, "box": self.box, "crop_box": self.crop_box,
                "polygons": self.polygons, "foreground_pixels": int(self.mask.sum()),
                "generated_text": self.generated_text, "warnings": self.warnings}

    def _artifacts(self, stem, formats, o):
        arts = []
        if "npy" in formats:
            arts.append(Artifact(f"{stem}.mask.npy", writers.npy(self.mask.astype(np.uint8))))
        arts += self._map_artifacts(stem, formats, "refer")
        if "txt" in formats:
            arts.append(Artifact(f"{stem}.refer.txt", writers.text(self.text + "\n")))
        return arts


@dataclass
class ChatResult(_Result):
    text: str
    token_ids: list[int]
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    prompt: str = ""
    task = "chat"
    flow = "generate"

    def plot(self):
        raise TypeError("a chat result is text: print result.text")

    def _block(self) -> dict:
        return {"prompt": self.prompt, "answer": self.text, "tokens": len(self.token_ids)}

    def _artifacts(self, stem, formats, o):
        return [Artifact(f"{stem}.chat.txt", writers.text(self.text + "\n"))] if "txt" in formats else []


def _box(b) -> list | None:
    return None if b is None else [int(v) for v in b]


@dataclass(kw_only=True)
class _Answer(_Result):
    """Shared by the tasks read from one generated answer (detect, ground, pose): the answer, the
    image geometry it is mapped through, and the input image."""

    generated_text: str             # the model's answer (coordinates in resized pixels)
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    image: np.ndarray | None = field(default=None, repr=False)

    @property
    def text(self) -> str:
        """The answer as the release's ``generate`` returns it: coordinates in original pixels."""
        return rewrite_coordinates(self.generated_text, self.resized_hw, self.original_hw)

    def _image(self, image: np.ndarray | None) -> np.ndarray:
        image = self.image if image is None else image
        if image is None:
            raise ValueError("no image to draw on: pass plot(image)")
        return image


@dataclass(kw_only=True)
class _Boxes(_Answer):
    """Shared by detection and grounding: labelled boxes in original-image pixels."""

    detections: list                # grounding.Detection, original px

    def _boxes_json(self) -> list[dict]:
        return [{"label": d.label, "box": _box(d.box)} for d in self.detections]

    def _draw(self) -> list:
        return [(d.box, d.label or "", colours.class_colour(d.label or self.task)) for d in self.detections]

    def plot(self, image: np.ndarray | None = None) -> Image.Image:
        return _to_image(writers.write_boxes_png, self._image(image), self._draw())

    def _artifacts(self, stem, formats, o):
        arts = []
        if "overlay" in formats and self.image is not None:
            arts.append(Artifact(f"{stem}.{self.task}.png",
                                 _png(writers.write_boxes_png, self.image, self._draw())))
        if "txt" in formats:
            arts.append(Artifact(f"{stem}.{self.task}.txt", writers.text(self.text + "\n")))
        if "coco" in formats:
            arts.append(Artifact(f"{stem}.coco.json", writers.json_file(writers.coco_detections(
                self.original_hw, [(d.label, d.box) for d in self.detections]))))
        return arts


@dataclass(kw_only=True)
class DetectResult(_Boxes):
    classes: list[str] | None       # the categories asked for (None: every object)
    task = "detect"                 # detections: largest first, as the demo lists them

    def _block(self) -> dict:
        return {"classes": self.classes, "detections": self._boxes_json(),
                "generated_text": self.generated_text, "warnings": self.warnings}


@dataclass(kw_only=True)
class GroundResult(_Boxes):
    expression: str
    task = "ground"                 # detections: in the answer's order

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """The first box of the answer (None without one)."""
        return self.detections[0].box if self.detections else None

    def _draw(self) -> list:
        return [(d.box, self.expression, colours.class_colour(self.expression)) for d in self.detections]

    def _block(self) -> dict:
        return {"expression": self.expression, "box": _box(self.box),
                "boxes": self._boxes_json(), "generated_text": self.generated_text,
                "warnings": self.warnings}


@dataclass(kw_only=True)
class PoseResult(_Answer):
    persons: list                   # grounding.PersonPose: box and 16 (x, y, v), original px
    task = "pose"

    def keypoints(self) -> np.ndarray:
        """float32 [persons, 16, 3]: x, y, v per MPII joint (NaN where missing)."""
        a = np.full((len(self.persons), len(MPII_JOINTS), 3), np.nan, np.float32)
        for i, p in enumerate(self.persons):
            for j, k in enumerate(p.keypoints):
                a[i, j] = [np.nan if c is None else c for c in k]
        return a

    def plot(self, image: np.ndarray | None = None) -> Image.Image:
        return _to_image(writers.write_pose_png, self._image(image), self.persons)

    def _block(self) -> dict:
        return {"joints": list(MPII_JOINTS), "persons": [
            {"box": _box(p.box), "keypoints": [
                {"joint": j, "x": x, "y": y, "v": v, "visible": writers.keypoint_visible(v)}
                for j, (x, y, v) in zip(MPII_JOINTS, p.keypoints)]} for p in self.persons],
            "generated_text": self.generated_text, "warnings": self.warnings}

    def _artifacts(self, stem, formats, o):
        arts = []
        if "overlay" in formats and self.image is not None:
            arts.append(Artifact(f"{stem}.pose.png", _png(writers.write_pose_png, self.image, self.persons)))
        if "txt" in formats:
            arts.append(Artifact(f"{stem}.pose.txt", writers.text(self.text + "\n")))
        if "coco" in formats:
            arts.append(Artifact(f"{stem}.coco.json",
                                 writers.json_file(writers.coco_keypoints(self.original_hw, self.persons))))
        return arts
