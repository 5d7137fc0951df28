"""``DensePredictor``: the task flows (depth, segment, refer, chat) over any backend.

Load once, run many frames: the backend sessions, the vocabulary, the averaged lm_head rows per
class list and the vision metadata per patch grid are all kept between calls.

Flows:
- depth: one prefill; bin ids are known, no text is generated (paper D.3).
- segment(classes=[...]): closed-set fast path, one prefill, every given class scored.
- segment(): open set. The model names the classes (greedy, KV cache, stops at ``<mask>``),
  only those are scored, background by the ``<OTHERS>`` rule.
- refer: grounding answer (box or ``<ins>`` polygon) -> padded crop with the box drawn ->
  "Segment the core target." -> ``<BG>``/``<FG>`` map pasted back (paper D.2, demo).
- chat: greedy generation.
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from densert.errors import ModelDirError
from densert.image.preprocess import Preprocessed, preprocess
from densert.model.generation import greedy_decode
from densert.model.vision_meta import build_vision_meta
from densert.resources import bundled_model_dir
from densert.tasks import depth_bins, grounding, prompts
from densert.tasks.classes import class_id_groups
from densert.tasks.rle import encode_depth, encode_segmentation
from densert.text import tokens as T
from densert.text.chat import encode_chat, user_message

from .backends import lm_head_weight, make_backend
from .dense import align_hidden, depth_map, segment_labels
from .options import DenseOptions, PredictorOptions

BACKGROUND_NAME = T.OTHERS


def check_model_dir(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise ModelDirError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise ModelDirError(f"model path {p} is not a directory")
    for need in ("config.json", "tokenizer.json"):
        if not (p / need).is_file():
            raise ModelDirError(f"model directory {p} has no {need}; not a Youtu-VL checkpoint")
    return p


class Timings(dict):
    """stage -> seconds; a stage timed twice accumulates."""

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class DepthResult:
    depth: np.ndarray               # float32 [H, W] metres at the original image size (0 invalid)
    bins: np.ndarray                # uint16 [H, W] bin codes 1..1000
    codes_grid: np.ndarray          # uint16 (H//16, W//16) codes: the released RLE's grid
    preset: str
    metric: bool                    # False: open world without a focal length (relative depth)
    focal: float | None             # focal length given by the caller (px, original image)
    effective_focal: float | None   # focal length of the image the network saw
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    timings: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return encode_depth(self.codes_grid)


@dataclass
class SegResult:
    labels: np.ndarray              # uint16 [H, W]: index into class_names
    class_names: list[str]          # background, when present, is "<OTHERS>" (last)
    generated_text: str | None      # the model's own answer (open set), None on the fast path
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return encode_segmentation(self.labels, self.class_names)


@dataclass
class ReferResult:
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
    class_names: list[str] = field(default_factory=lambda: [T.BG, T.FG])

    @property
    def labels(self) -> np.ndarray:
        return self.mask.astype(np.uint16)

    @property
    def text(self) -> str:
        return encode_segmentation(self.labels, self.class_names)


@dataclass
class ChatResult:
    text: str
    token_ids: list[int]
    timings: dict = field(default_factory=dict)


class DensePredictor:
    """``DensePredictor(model_dir=None, options=None, **settings)``: ``model_dir`` None = the
    bundled densert-tiny, or, for an engine backend given an ``engine_dir``, that directory
    alone (it holds the tokenizer, config and weights: no checkpoint needed); ``options`` =
    ``DenseOptions`` (decoding); ``settings`` = the fields of ``PredictorOptions`` (backend,
    engine_dir, dtype, device, max_patches, upscale, max_new_tokens), with the defaults declared
    there. An engine's image budget caps ``max_patches`` (images are scaled to fit it)."""

    def __init__(self, model_dir=None, options: DenseOptions | None = None, **settings):
        from densert.text.tokens import Vocab
        s = PredictorOptions(**settings)
        if model_dir is None:
            model_dir = s.engine_dir if s.engine_dir and s.backend != "torch" else bundled_model_dir()
        self.model_dir = check_model_dir(model_dir)
        be = make_backend(s.backend, self.model_dir, s.dtype, s.engine_dir, device=s.device)
        self._setup(be, Vocab.from_file(self.model_dir), options, s)

    @classmethod
    def from_backend(cls, backend, vocab, options: DenseOptions | None = None, model_dir=None,
                     **settings) -> "DensePredictor":
        self = cls.__new__(cls)
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self._setup(backend, vocab, options, PredictorOptions(**settings))
        return self

    def _setup(self, backend, vocab, options, settings: PredictorOptions):
        self.backend = backend
        self.vocab = vocab
        self.config = backend.config
        self.options = options or DenseOptions()
        self.settings = settings
        self._head = lm_head_weight(backend, self.model_dir)
        self._max_patches = min(settings.max_patches, getattr(backend, "max_patches", settings.max_patches))
        self._weights: dict[tuple, torch.Tensor] = {}
        self._metas: dict[tuple[int, int], object] = {}
        self._stop = {vocab.eos_id}
        self._control = {vocab.token_id(s) for s in T.CONTROL_TOKENS}

    @property
    def backend_name(self) -> str:
        return getattr(self.backend, "name", type(self.backend).__name__)

    # ---- shared stages ----
    def _subset(self, names: tuple[str, ...]) -> torch.Tensor:
        key = (names, self.options.name_leading_space)
        if key not in self._weights:
            from densert.kernels.dense_head import subset_weight
            groups = class_id_groups(self.vocab, list(names), self.options.name_leading_space)
            self._weights[key] = subset_weight(self._head, groups)
        return self._weights[key]

    def _depth_weight(self) -> torch.Tensor:
        key = ("<depth-bins>",)
        if key not in self._weights:
            from densert.kernels.dense_head import subset_weight
            ids = self.vocab.depth_bin_ids().tolist()
            self._weights[key] = subset_weight(self._head, [[i] for i in ids])
        return self._weights[key]

    def _meta(self, grid):
        if grid not in self._metas:
            self._metas[grid] = build_vision_meta([grid], self.config.vision_config)
        return self._metas[grid]

    def _run_prompt(self, pre: Preprocessed | None, prompt: prompts.Prompt, tm: Timings):
        """Vision + prefill of one user turn -> PrefillResult."""
        embeds = None
        if pre is not None:
            with tm.stage("vision"):
                embeds = self.backend.encode_image(pre.pixel_values, self._meta(pre.grid))
            msg = user_message(prompt.text, image_first=prompt.image_first)
            ids = encode_chat(self.vocab, [msg], [pre.num_image_tokens])
        else:
            ids = encode_chat(self.vocab, [{"role": "user", "content": prompt.text}], [])
        with tm.stage("prefill"):
            return self.backend.prefill(ids, embeds)

    def _generate(self, pf, tm: Timings, stop: set[int], max_new_tokens: int | None = None):
        with tm.stage("decode"):
            toks, _ = greedy_decode(self.backend.decode, pf.last_logits, pf.cache,
                                    max_new_tokens or self.settings.max_new_tokens, stop)
        return toks

    def _text(self, toks: list[int]) -> str:
        return self.vocab.decode([t for t in toks if t not in self._control])

    def _hidden(self, pf) -> torch.Tensor:
        if pf.vision_hidden is None:
            raise RuntimeError("the backend returned no vision hidden states for an image prompt")
        return align_hidden(pf.vision_hidden, pf.pre_vision_hidden, self.options.alignment)

    def _pre(self, image, tm: Timings, upscale: float | None = None) -> Preprocessed:
        with tm.stage("preprocess"):
            return preprocess(image, self._max_patches,
                              self.settings.upscale if upscale is None else upscale)

    # ---- tasks ----
    def depth(self, image, preset: str = depth_bins.OPEN_WORLD, focal: float | None = None
              ) -> DepthResult:
        tm = Timings()
        open_world = depth_bins.get_preset(preset).focal is not None  # unknown presets fail here
        scale = self.settings.upscale
        if focal is not None:
            if not open_world:
                raise ValueError(f"--focal applies to the open-world preset only; {preset!r} is a "
                                 "fixed-camera linear preset")
            scale = scale * depth_bins.open_world_resize_factor(focal)
        pre = self._pre(image, tm, upscale=scale)
        eff = None
        if focal is not None:
            # The patch cap and 32-px rounding may keep the network input off 2000 px exactly;
            # the residual is corrected in dequantisation (canonical depth d * 2000 / fx).
            sy = pre.resized_hw[0] / pre.original_hw[0]
            sx = pre.resized_hw[1] / pre.original_hw[1]
            eff = float(focal) * (sx * sy) ** 0.5
        pf = self._run_prompt(pre, prompts.depth(preset), tm)
        with tm.stage("dense_head"):
            dm = depth_map(self._hidden(pf), self._depth_weight(), pre.merged_grid, pre.original_hw,
                           self.options, preset, fx=eff)
        return DepthResult(depth=dm.depth, bins=dm.bins, codes_grid=dm.codes_grid, preset=preset,
                           metric=not open_world or focal is not None, focal=focal,
                           effective_focal=eff, original_hw=pre.original_hw,
                           resized_hw=pre.resized_hw, timings=dict(tm))

    def segment(self, image, classes: list[str] | None = None,
                background: bool | None = None) -> SegResult:
        """``classes`` given: closed set, no generation (background off unless asked for).
        None: the model names the classes (open set, background on)."""
        tm = Timings()
        warn: list[str] = []
        pre = self._pre(image, tm)
        text = None
        if classes is not None:
            names = [c.strip() for c in classes if c.strip()]
            bg = bool(background)
            pf = self._run_prompt(pre, prompts.semantic(names, background=bg), tm)
        else:
            bg = True if background is None else background
            pf = self._run_prompt(pre, prompts.open_set(), tm)
            stop = self._stop | {self.vocab.token_id(T.MASK)}
            text = self._text(self._generate(pf, tm, stop))
            refs = grounding.parse_refs(text)
            bg = bg or T.OTHERS in refs
            names = [r for r in refs if r != T.OTHERS]
            if not names:
                warn.append(f"the model named no class (answer: {text[:80]!r}); every pixel is "
                            "background")
        with tm.stage("dense_head"):
            if names:
                labels = segment_labels(self._hidden(pf), self._subset(tuple(names)), pre.merged_grid,
                                        pre.original_hw, self.options, background=bg,
                                        image=self._image_at(pre) if self.options.crf else None)
            else:
                labels = np.zeros(pre.original_hw, dtype=np.int64)
        class_names = names + ([BACKGROUND_NAME] if (bg or not names) else [])
        for w in warn:
            warnings.warn(w, stacklevel=2)
        return SegResult(labels=labels.astype(np.uint16), class_names=class_names,
                         generated_text=text, original_hw=pre.original_hw,
                         resized_hw=pre.resized_hw, timings=dict(tm), warnings=warn)

    def refer(self, image, expression: str) -> ReferResult:
        tm = Timings()
        warn: list[str] = []
        pre = self._pre(image, tm)
        H, W = pre.original_hw
        pf = self._run_prompt(pre, prompts.referring(expression), tm)
        text = self._text(self._generate(pf, tm, self._stop))
        with tm.stage("postprocess"):
            polys = [grounding.to_original(p, pre.resized_hw, pre.original_hw)
                     for p in grounding.parse_polygons(text)]
            box = grounding.parse_box(text)
            if box is not None:
                (x0, y0), (x1, y1) = grounding.to_original([box[:2], box[2:]], pre.resized_hw,
                                                           pre.original_hw)
                box = (x0, y0, x1, y1)
            elif polys:
                box = grounding.box_of([pt for p in polys for pt in p])
            if box is not None:
                box = (min(max(box[0], 0), W), min(max(box[1], 0), H),
                       min(max(box[2], 0), W), min(max(box[3], 0), H))
            else:
                warn.append(f"no box or polygon in the grounding answer ({text[:80]!r}); "
                            "segmenting the whole image")
            poly_mask = grounding.rasterize_polygons(polys, (H, W)) if polys else None
            rng = np.random.default_rng(self.options.seed)
            crop = grounding.referring_crop(self._image_at(pre), box or (0, 0, W, H), rng,
                                            self.options.refer_padding,
                                            self.options.refer_short_side)
        cpre = self._pre(crop.image, tm, upscale=1.0)
        cpf = self._run_prompt(cpre, prompts.core_target(), tm)
        with tm.stage("dense_head"):
            lab = segment_labels(self._hidden(cpf), self._subset((T.BG, T.FG)), cpre.merged_grid,
                                 cpre.original_hw, self.options,
                                 image=cpre.image if self.options.crf else None)
        with tm.stage("postprocess"):
            mask = crop.paste(lab == 1, (H, W))
        for w in warn:
            warnings.warn(w, stacklevel=2)
        return ReferResult(mask=mask, expression=expression, box=box, polygons=polys,
                           polygon_mask=poly_mask, crop_box=crop.box, generated_text=text,
                           original_hw=(H, W), timings=dict(tm), warnings=warn)

    def chat(self, image, prompt: str, max_new_tokens: int | None = None) -> ChatResult:
        tm = Timings()
        pre = self._pre(image, tm) if image is not None else None
        pf = self._run_prompt(pre, prompts.chat(prompt), tm)
        toks = self._generate(pf, tm, self._stop, max_new_tokens)
        return ChatResult(text=self._text(toks), token_ids=toks, timings=dict(tm))

    @staticmethod
    def _image_at(pre: Preprocessed) -> np.ndarray:
        """The decoded image at the original size (drafted huge JPEGs are scaled back up)."""
        if pre.image.shape[:2] == tuple(pre.original_hw):
            return pre.image
        from densert.image.preprocess import resize_uint8
        return resize_uint8(pre.image, pre.original_hw)
