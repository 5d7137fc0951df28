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

import math
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from densert.checkpoint.files import check_checkpoint_dir, fingerprint, read_task_defaults
from densert.errors import ModelDirError
from densert.image import BLOCK
from densert.image.decode import probe
from densert.image.preprocess import Preprocessed, preprocess
from densert.model.generation import greedy_decode
from densert.model.vision_meta import build_vision_meta
from densert.resources import bundled_model_dir
from densert.tasks import depth_bins, grounding, prompts
from densert.tasks.classes import class_id_groups
from densert.text import tokens as T
from densert.text.chat import encode_chat, user_message

from .backends import lm_head_weight, make_backend
from .dense import align_hidden, depth_map, segment_labels
from .multitask import DenseResult, SharedPrefill
from .options import DenseOptions, PredictorOptions
from .results import ChatResult, DepthResult, ReferResult, SegResult

BACKGROUND_NAME = T.OTHERS


def check_model_dir(path) -> Path:
    """A checkpoint directory the runtime can use: the checks (and messages) of ``densert
    inspect``, and the tokenizer the prompts need."""
    p = check_checkpoint_dir(path)
    if not (p / "tokenizer.json").is_file():
        raise ModelDirError(f"{p}: no tokenizer.json; the runtime needs the checkpoint's tokenizer")
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


# The short side the open-world focal rescale may leave (two vision tokens): below it the request
# is a mistake (a focal length in the wrong unit), not a depth map.
MIN_RESCALED_SIDE = 2 * BLOCK


def depth_scale(preset: str, focal: float | None, original_hw: tuple[int, int] | None,
                upscale: float = 1.0) -> float:
    """The factor an image is scaled by before the processor's size search, for a depth request;
    checks the request (the CLI calls it for every input before loading the model)."""
    if focal is None:
        return upscale
    if depth_bins.get_preset(preset).focal is None:
        raise ValueError(f"--focal applies to the open-world preset only; {preset!r} is a "
                         "fixed-camera linear preset")
    if not (isinstance(focal, (int, float)) and math.isfinite(focal) and focal > 0):
        raise ValueError(f"focal length must be a positive number of pixels, got {focal!r}")
    factor = upscale * depth_bins.open_world_resize_factor(focal)
    if original_hw is not None and min(original_hw) * factor < MIN_RESCALED_SIDE:
        h, w = original_hw
        raise ValueError(f"focal length {focal:g} px rescales the {w}x{h} image by {factor:.3g} to "
                         f"the open world's {depth_bins.CANONICAL_FOCAL:g} px focal length, leaving "
                         f"a short side of {min(original_hw) * factor:.1f} px (the model needs "
                         f"{MIN_RESCALED_SIDE}); is the focal length in pixels of this image?")
    return factor


def _input_hw(image) -> tuple[int, int] | None:
    """(H, W) of an input without decoding it (None for encoded bytes)."""
    if isinstance(image, (str, Path)):
        return probe(image)
    if isinstance(image, np.ndarray):
        return image.shape[:2]
    if hasattr(image, "size") and hasattr(image, "mode"):  # a PIL image
        return image.size[::-1]
    return None


class DensePredictor:
    """``DensePredictor(model_dir=None, options=None, **settings)``: ``model_dir`` None = the
    bundled densert-tiny; ``options`` = ``DenseOptions`` (decoding); ``settings`` = the fields of
    ``PredictorOptions`` (backend, engine_dir, dtype, device, max_patches, upscale,
    max_new_tokens), with the defaults declared there."""

    def __init__(self, model_dir=None, options: DenseOptions | None = None, **settings):
        from densert.text.tokens import Vocab
        s = PredictorOptions(**settings)
        self.model_dir = check_model_dir(model_dir if model_dir is not None else bundled_model_dir())
        self.task_defaults = read_task_defaults(self.model_dir)
        be = make_backend(s.backend, self.model_dir, s.dtype, s.engine_dir, device=s.device)
        self._setup(be, Vocab.from_file(self.model_dir), options, s)

    @classmethod
    def from_backend(cls, backend, vocab, options: DenseOptions | None = None, model_dir=None,
                     **settings) -> "DensePredictor":
        self = cls.__new__(cls)
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.task_defaults = read_task_defaults(self.model_dir) if self.model_dir else {}
        self._setup(backend, vocab, options, PredictorOptions(**settings))
        return self

    def _setup(self, backend, vocab, options, settings: PredictorOptions):
        self.backend = backend
        self.vocab = vocab
        self.config = backend.config
        self.options = options or DenseOptions()
        self.settings = settings
        self._head = lm_head_weight(backend, self.model_dir)
        self._weights: dict[tuple, torch.Tensor] = {}
        self._metas: dict[tuple[int, int], object] = {}
        self._shared_prefill = SharedPrefill(backend, vocab)
        self._stop = {vocab.eos_id}
        self._control = {vocab.token_id(s) for s in T.CONTROL_TOKENS}
        self.info = self._run_info()

    @property
    def is_demo_model(self) -> bool:
        """True for the bundled densert-tiny: a small model trained on rendered scenes, whose maps
        of real photos are not meaningful."""
        try:
            return self.model_dir is not None and self.model_dir.resolve() == bundled_model_dir().resolve()
        except ModelDirError:
            return False

    def _run_info(self) -> dict:
        """Provenance every result carries into its sidecar: model, backend, device, dtype."""
        be = self.backend
        model = None
        if self.model_dir is not None:
            model = {"path": str(self.model_dir), "fingerprint": fingerprint(self.model_dir),
                     "demo": self.is_demo_model}
        dtype = getattr(be, "dtype", None) or getattr(be, "precision", None)
        return {"model": model, "backend": self.backend_name,
                "device": str(getattr(be, "device", None) or getattr(be, "_device", "cpu")),
                "dtype": str(dtype).removeprefix("torch.") if dtype is not None else "unknown",
                "options": self.options.to_dict()}

    def _result_info(self, image) -> dict:
        return {**self.info, "image": str(image) if isinstance(image, (str, Path)) else None}

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
        if isinstance(image, Preprocessed):  # prepared ahead (DensePredictor.stream)
            return image
        with tm.stage("preprocess"):
            return preprocess(image, self.settings.max_patches,
                              self.settings.upscale if upscale is None else upscale)

    # ---- tasks ----
    @property
    def default_depth_preset(self) -> str:
        """The preset the model directory declares (task_defaults.json), else open world."""
        return self.task_defaults.get("depth", {}).get("preset") or depth_bins.OPEN_WORLD

    def depth(self, image, preset: str | None = None, focal: float | None = None) -> DepthResult:
        """``preset`` None: the model's declared default (``default_depth_preset``)."""
        tm = Timings()
        preset = preset or self.default_depth_preset
        pre = self._depth_pre(image, preset, focal, tm)
        pf = self._run_prompt(pre, prompts.depth(preset), tm)
        return self._depth_result(image, pre, self._hidden(pf), preset, focal, tm)

    def _depth_pre(self, image, preset: str, focal: float | None, tm: Timings) -> Preprocessed:
        depth_bins.get_preset(preset)  # unknown presets fail here
        if isinstance(image, Preprocessed):
            return image
        scale = depth_scale(preset, focal, _input_hw(image), self.settings.upscale)
        return self._pre(image, tm, upscale=scale)

    def _depth_result(self, image, pre: Preprocessed, hidden: torch.Tensor, preset: str,
                      focal: float | None, tm: Timings) -> DepthResult:
        open_world = depth_bins.get_preset(preset).focal is not None
        eff = None
        if focal is not None:
            # The patch cap and 32-px rounding may keep the network input off 2000 px exactly;
            # the residual is corrected in dequantisation (canonical depth d * 2000 / fx).
            sy = pre.resized_hw[0] / pre.original_hw[0]
            sx = pre.resized_hw[1] / pre.original_hw[1]
            eff = float(focal) * (sx * sy) ** 0.5
        with tm.stage("dense_head"):
            dm = depth_map(hidden, self._depth_weight(), pre.merged_grid, pre.original_hw,
                           self.options, preset, fx=eff)
        return DepthResult(depth=dm.depth, bins=dm.bins, codes_grid=dm.codes_grid, preset=preset,
                           metric=not open_world or focal is not None, focal=focal,
                           effective_focal=eff, original_hw=pre.original_hw,
                           resized_hw=pre.resized_hw, timings=dict(tm),
                           info=self._result_info(image))

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
        for w in warn:
            warnings.warn(w, stacklevel=2)
        return self._seg_result(image, pre, self._hidden(pf), names, bg, text, warn, tm)

    def _seg_result(self, image, pre: Preprocessed, hidden: torch.Tensor, names: list[str],
                    bg: bool, text: str | None, warn: list[str], tm: Timings) -> SegResult:
        with tm.stage("dense_head"):
            if names:
                labels = segment_labels(hidden, self._subset(tuple(names)), pre.merged_grid,
                                        pre.original_hw, self.options, background=bg,
                                        image=self._image_at(pre) if self.options.crf else None)
            else:
                labels = np.zeros(pre.original_hw, dtype=np.int64)
        class_names = names + ([BACKGROUND_NAME] if (bg or not names) else [])
        return SegResult(labels=labels.astype(np.uint16), class_names=class_names,
                         generated_text=text, original_hw=pre.original_hw,
                         resized_hw=pre.resized_hw, timings=dict(tm), warnings=warn,
                         info=self._result_info(image), image=self._image_at(pre))

    def dense(self, image, depth: bool = True, classes: list[str] | None = None,
              preset: str | None = None, focal: float | None = None,
              background: bool = False) -> DenseResult:
        """The depth map and the closed-set segmentation of ``classes`` of one frame: the image is
        encoded once and, for image-first depth prompts (open world), one prefill cut at the last
        image pad serves both (``runtime.multitask``). The maps equal those of ``depth()`` and
        ``segment(classes=...)``. With ``focal``, segmentation reads the depth's rescaled input."""
        names = [c.strip() for c in classes or [] if c.strip()]
        if not depth and not names:
            raise ValueError("dense() needs depth=True or at least one class name")
        if names:
            prompts.semantic(names, background)  # the names' checks (empty, commas)
        tm = Timings()
        preset = preset or self.default_depth_preset
        pre = self._depth_pre(image, preset, focal, tm) if depth else self._pre(image, tm)
        with tm.stage("vision"):
            embeds = self.backend.encode_image(pre.pixel_values, self._meta(pre.grid))
        depth_prompt = prompts.depth(preset) if depth else None
        hidden, prefills, note = None, 0, None
        if names or (depth_prompt is not None and depth_prompt.image_first):
            with tm.stage("prefill"):
                hidden = self._hidden(self._shared_prefill(embeds, pre.num_image_tokens))
            prefills += 1
        out = {}
        if depth_prompt is not None:
            h = hidden
            if not depth_prompt.image_first:
                note = (f"the {preset} depth prompt precedes the image (paper D.3), so the vision "
                        "tokens depend on it: depth runs its own prefill")
                with tm.stage("prefill_depth"):
                    ids = encode_chat(self.vocab, [user_message(depth_prompt.text, image_first=False)],
                                      [pre.num_image_tokens])
                    h = self._hidden(self.backend.prefill(ids, embeds))
                prefills += 1
            td = Timings(tm)
            out["depth"] = self._depth_result(image, pre, h, preset, focal, td)
            tm["depth_head"] = td["dense_head"]
        if names:
            ts = Timings({k: v for k, v in tm.items() if k not in ("prefill_depth", "depth_head")})
            out["segmentation"] = self._seg_result(image, pre, hidden, names, background, None, [], ts)
            tm["segment_head"] = ts["dense_head"]
        return DenseResult(depth=out.get("depth"), segmentation=out.get("segmentation"),
                           prefills=prefills, timings=dict(tm), note=note)

    def stream(self, frames, task: str = "depth", drop: bool | None = None, **task_options):
        """A generator of ``StreamItem`` (frame, result, per-stage timings, frames dropped) over
        ``frames``: a ``--source`` spec (``runtime.sources.open_source``), a ``Source``, or any
        iterable of frames / arrays / paths. ``task``: depth, segment or dense, with that call's
        options (preset, focal, classes, background, depth). Decoding and preprocessing of the
        next frame overlap the model on this one; ``drop`` (default: live sources only) keeps
        the latest frame when the caller is slower than the source (``runtime.stream``)."""
        from .sources import open_source
        from .stream import TaskSpec, stream
        if isinstance(frames, (str, int, Path)):
            frames = open_source(frames)
        return stream(self, frames, TaskSpec(task, **task_options), drop)

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
                           original_hw=(H, W), timings=dict(tm), warnings=warn,
                           info=self._result_info(image), image=self._image_at(pre))

    def chat(self, image, prompt: str, max_new_tokens: int | None = None) -> ChatResult:
        tm = Timings()
        pre = self._pre(image, tm) if image is not None else None
        pf = self._run_prompt(pre, prompts.chat(prompt), tm)
        toks = self._generate(pf, tm, self._stop, max_new_tokens)
        return ChatResult(text=self._text(toks), token_ids=toks, timings=dict(tm),
                          info=self._result_info(image), prompt=prompt)

    @staticmethod
    def _image_at(pre: Preprocessed) -> np.ndarray:
        """The decoded image at the original size (drafted huge JPEGs are scaled back up)."""
        if pre.image.shape[:2] == tuple(pre.original_hw):
            return pre.image
        from densert.image.preprocess import resize_uint8
        return resize_uint8(pre.image, pre.original_hw)
