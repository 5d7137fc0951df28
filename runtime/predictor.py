"""``DensePredictor``: the release's task flows over any backend.

Load once, run many frames: the backend sessions, the vocabulary, the averaged lm_head rows per
class list and the vision metadata per patch grid are all kept between calls.

Flows, the release's by default (``DenseOptions.fast`` trades segmentation's for one pass each);
every result records the one that ran (``flow``):
- depth ("one-prefill"): bin ids are known, no text is generated; argmax on twice the token grid
  (paper D.3).
- segment(classes=[...]), closed set. "closed-set:name-then-argmax" (paper eq. 2, D.1): the
  model names the classes present (generation stops at ``<mask>``), the argmax runs over those
  only, with the ``<OTHERS>`` background rule where it names ``<OTHERS>``. Fast,
  "closed-set:one-prefill": every given class scored, no generation.
- segment(), open set. "open-set:detect-then-segment" (the demo's openseg mode): the model names
  the classes, then detects their boxes ("Detect every objects that belongs to the following
  categories: ..."); each box, largest first, at most ``open_set_max_boxes``, is cropped and
  segmented ("Segment the core target."), later boxes overwriting earlier ones. Without a named
  class or a box (as the demo) and with fast: "open-set:direct", the naming pass's own map.
- refer ("ground-then-segment"): grounding answer (``<ins>`` polygon or box) -> padded crop with
  the box drawn -> "Segment the core target." -> ``<BG>``/``<FG>`` map pasted back (paper D.2).
- detect, ground, pose, chat ("generate"): one answer, parsed into boxes and keypoints in
  original-image pixels.

Generation is greedy with the release's repetition penalty (1.05) and token budget (4096), unless
the caller or the checkpoint's ``generation_config.json`` says otherwise; prompts are rendered
with the checkpoint's own chat template when it has one.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from densert.backend import Backend
from densert.checkpoint.model_dir import (
    GENERATION_CONFIG_FILE,
    check_checkpoint_dir,
    fingerprint,
    read_chat_template,
    read_generation_config,
    read_task_defaults,
)
from densert.errors import ModelDirError, OptionError, SourceError
from densert.image import BLOCK
from densert.image.decode import jpeg_round_trip, probe
from densert.image.preprocess import Preprocessed, preprocess
from densert.model.generation import (
    RELEASE_MAX_NEW_TOKENS,
    RELEASE_REPETITION_PENALTY,
    greedy_decode,
)
from densert.model.vision_meta import build_vision_meta
from densert.resources import bundled_model_dir
from densert.tasks import depth_bins, grounding, prompts
from densert.tasks.classes import class_id_groups
from densert.text import tokens as T
from densert.text.chat import BUILTIN_TEMPLATE, encode_chat, user_message

from .backends import make_backend
from .dense import align_hidden, depth_map, segment_labels
from .multitask import DenseResult, SharedPrefill
from .options import DenseOptions, PredictorOptions
from .registry import REGISTRY
from .results import (
    ChatResult,
    DepthResult,
    DetectResult,
    GroundResult,
    PoseResult,
    ReferResult,
    SegResult,
)
from .speed import Timings

BACKGROUND_NAME = T.OTHERS
# ``_plain_prefills``: the dense tasks' shared prefill (runtime.multitask), as opposed to a prompt.
SHARED = "shared-prefill"
# What a front end (the CLI, the ROS node) says when it runs the bundled model.
DEMO_MODEL_NOTICE = ("using the bundled demo model densert-tiny (small, trained on rendered scenes; "
                     "its maps of real photos mean little): pass --model DIR with a Youtu-VL "
                     "checkpoint for real results")


def check_model_dir(path) -> Path:
    """A checkpoint directory the runtime can use: the checks (and messages) of ``densert
    inspect``, and the tokenizer the prompts need."""
    p = check_checkpoint_dir(path)
    if not (p / "tokenizer.json").is_file():
        raise ModelDirError(f"{p}: no tokenizer.json; the runtime needs the checkpoint's tokenizer")
    return p


# What a self-contained engine directory holds for the runtime besides its graphs (``densert
# export`` copies the checkpoint's tokenizer and config next to its manifest).
ENGINE_DIR_FILES = ("manifest.json", "config.json", "tokenizer.json")


def runtime_dir(model_dir, backend: str, engine_dir) -> Path:
    """Where the runtime reads its tokenizer, config and task defaults: ``model_dir``; without
    one, an engine backend's ``engine_dir`` (it stands alone: no checkpoint on the device), else
    the bundled densert-tiny."""
    if model_dir is not None:
        return check_model_dir(model_dir)
    if engine_dir is None or backend == "torch":
        return check_model_dir(bundled_model_dir())
    d = Path(engine_dir)
    missing = [f for f in ENGINE_DIR_FILES if not (d / f).is_file()]
    if missing:
        raise ModelDirError(f"engine dir {d}: no {', '.join(missing)}; re-run `densert export` "
                            "(it writes a self-contained directory) or pass --model CHECKPOINT")
    return d


# The short side the open-world focal rescale may leave (two vision tokens): below it the request
# is a mistake (a focal length in the wrong unit), not a depth map.
MIN_RESCALED_SIDE = 2 * BLOCK


def depth_scale(preset: str, focal: float | None, original_hw: tuple[int, int] | None,
                upscale: float = 1.0) -> float:
    """The factor an image is scaled by before the processor's size search, for a depth request;
    checks the request (the CLI calls it for every input before loading the model)."""
    if focal is None:
        return upscale
    if not (isinstance(focal, (int, float)) and not isinstance(focal, bool)
            and math.isfinite(focal) and focal > 0):
        raise OptionError(f"focal: the focal length must be a positive number of pixels, got "
                          f"{focal!r}")
    if depth_bins.get_preset(preset).focal is None:
        raise OptionError(f"focal: --focal applies to the open-world preset only; {preset!r} is "
                          "a fixed-camera linear preset (drop --focal, or pass --preset "
                          "open-world)")
    factor = upscale * depth_bins.open_world_resize_factor(focal)
    if original_hw is not None and min(original_hw) * factor < MIN_RESCALED_SIDE:
        h, w = original_hw
        raise OptionError(f"focal length {focal:g} px rescales the {w}x{h} image by {factor:.3g} to "
                         f"the open world's {depth_bins.CANONICAL_FOCAL:g} px focal length, leaving "
                         f"a short side of {min(original_hw) * factor:.1f} px (the model needs "
                         f"{MIN_RESCALED_SIDE}); is the focal length in pixels of this image?")
    return factor


def class_names(classes, arg: str = "classes") -> list[str] | None:
    """``classes`` as the task calls take it: None, or a list of distinct non-empty names (the
    prompt's checks: no comma). A single string is refused, not split into its letters."""
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)):
        raise OptionError(f"{arg} must be a list of class names, got the string {classes!r}; "
                          f"pass [{classes!r}]")
    try:
        items = list(classes)
    except TypeError:
        raise OptionError(f"{arg} must be a list of class names, got "
                          f"{type(classes).__name__}") from None
    names = [prompts.check_name(c, arg) for c in items if not (isinstance(c, str) and not c.strip())]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise OptionError(f"{arg}: {', '.join(map(repr, dup))} given more than once; each name is "
                          "one class with its own label and colour")
    return names


def flag(value, arg: str, none_ok: bool = False):
    """A True / False argument (None too with ``none_ok``); 0, 1 and strings are refused."""
    if isinstance(value, bool) or (none_ok and value is None):
        return value
    raise OptionError(f"{arg} must be True or False{' or None' if none_ok else ''}, got {value!r}")


def _input_hw(image) -> tuple[int, int] | None:
    """(H, W) of an input without decoding it (None for encoded bytes)."""
    if isinstance(image, (str, Path)):
        return probe(image)
    if isinstance(image, np.ndarray):
        return image.shape[:2] if image.ndim in (2, 3) else None
    if hasattr(image, "size") and hasattr(image, "mode"):  # a PIL image
        return image.size[::-1]
    return None


def _source(frames, arg: str):
    """A ``stream`` source: a ``--source`` spec opened, a ``Source`` or iterable as is."""
    from .sources import Source, open_source
    if isinstance(frames, bool) or frames is None:
        raise SourceError(f"{arg}: expected a source (path, glob, camera index, URL, bag), a "
                          f"Source or an iterable of frames, got {frames!r}")
    if isinstance(frames, (str, int, Path)):
        return open_source(frames)
    if not isinstance(frames, Source) and not hasattr(frames, "__iter__"):
        raise SourceError(f"{arg}: expected a source or an iterable of frames, got "
                          f"{type(frames).__name__}")
    return frames


def _key(ids: torch.Tensor) -> bytes:
    """A prompt's ids as a dict key."""
    return ids.numpy().tobytes()


def _settings(settings: dict) -> PredictorOptions:
    """``**settings`` of ``DensePredictor``: the fields of ``PredictorOptions`` only."""
    names = set(PredictorOptions.__dataclass_fields__)
    bad = sorted(set(settings) - names)
    if bad:
        raise OptionError(f"unknown setting(s) {', '.join(bad)}; DensePredictor takes "
                          f"{', '.join(sorted(names))}")
    return PredictorOptions(**settings)


class DensePredictor:
    """``DensePredictor(model_dir=None, options=None, **settings)``: ``model_dir`` None = the
    bundled densert-tiny, or, for an engine backend given an ``engine_dir``, that directory
    alone (it holds the tokenizer, config and weights: no checkpoint needed); ``options`` =
    ``DenseOptions`` (decoding); ``settings`` = the fields of ``PredictorOptions`` (backend,
    engine_dir, dtype, device, max_patches, upscale, max_new_tokens, repetition_penalty), with
    the defaults declared there. An engine's image budget caps ``max_patches`` (images are
    scaled to fit it)."""

    def __init__(self, model_dir=None, options: DenseOptions | None = None, **settings):
        from densert.text.tokens import Vocab
        if model_dir is not None and not isinstance(model_dir, (str, Path)):
            raise OptionError(f"model_dir must be a checkpoint directory path or None, got "
                              f"{type(model_dir).__name__}")
        s = _settings(settings)
        self.model_dir = runtime_dir(model_dir, s.backend, s.engine_dir)
        self.task_defaults = read_task_defaults(self.model_dir)
        t0 = time.perf_counter()
        be = make_backend(s.backend, self.model_dir, s.dtype, s.engine_dir, device=s.device,
                          max_patches=s.max_patches)
        self.load_seconds = time.perf_counter() - t0
        self._setup(be, Vocab.from_file(self.model_dir), options, s)

    @classmethod
    def from_backend(cls, backend, vocab, options: DenseOptions | None = None, model_dir=None,
                     **settings) -> "DensePredictor":
        self = cls.__new__(cls)
        self.load_seconds = None
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.task_defaults = read_task_defaults(self.model_dir) if self.model_dir else {}
        self._setup(backend, vocab, options, _settings(settings))
        return self

    def _setup(self, backend, vocab, options, settings: PredictorOptions):
        if not isinstance(backend, Backend):
            raise OptionError(f"backend must implement densert.backend.Backend (see its members and "
                              f"docs/architecture.md), got {type(backend).__name__}")
        self.backend = backend
        self.vocab = vocab
        self.config = backend.config
        if options is not None and not isinstance(options, DenseOptions):
            raise OptionError(f"options must be a DenseOptions (densert.runtime.options), got "
                              f"{type(options).__name__}")
        self.options = options or DenseOptions()
        self.settings = settings
        self._head = backend.head_weight()
        self._max_patches = settings.max_patches if backend.max_patches is None else \
            min(settings.max_patches, backend.max_patches)
        self._weights: dict[tuple, torch.Tensor] = {}
        self._metas: dict[tuple, object] = {}
        # Stage outputs computed for a batch of frames (``_batch``): key -> (output, seconds of
        # it), each taken once by the frame's own call.
        self._ahead: dict[tuple, tuple] = {}
        self.chat_template = (read_chat_template(self.model_dir) if self.model_dir else None) \
            or BUILTIN_TEMPLATE
        gen = read_generation_config(self.model_dir) if self.model_dir else {}
        self.generation = self._generation(settings, gen)
        self._stop = {vocab.eos_id} | {i for i in gen.get("eos_token_id", ()) if i < len(vocab)}
        self._shared_prefill = SharedPrefill(backend, vocab, self.chat_template)
        self._control = {vocab.token_id(s) for s in T.CONTROL_TOKENS}
        self.info = self._run_info()

    @staticmethod
    def _generation(settings: PredictorOptions, gen: dict) -> dict:
        """Decoding settings and where each came from: the caller, the checkpoint's
        generation_config.json, or the release's own call."""
        out, source = {}, {}
        for name, release in (("max_new_tokens", RELEASE_MAX_NEW_TOKENS),
                              ("repetition_penalty", RELEASE_REPETITION_PENALTY)):
            if getattr(settings, name) is not None:
                out[name], source[name] = getattr(settings, name), "option"
            elif name in gen:
                out[name], source[name] = gen[name], GENERATION_CONFIG_FILE
            else:
                out[name], source[name] = release, "release"
        return {**out, "source": source}

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
        model = None
        engine = self.backend.engine_source()
        if self.model_dir is not None and engine is not None and \
                self.model_dir.resolve() == Path(engine["dir"]).resolve():
            # An engine directory standing alone: its identity is the checkpoint it came from.
            model = {"path": str(self.model_dir), "demo": False,
                     "fingerprint": engine["checkpoint_id"], "exported_from": engine["exported_from"]}
        elif self.model_dir is not None:
            model = {"path": str(self.model_dir), "fingerprint": fingerprint(self.model_dir),
                     "demo": self.is_demo_model}
        return {"model": model, **self.backend.provenance(),
                **({"load_s": round(self.load_seconds, 3)} if self.load_seconds is not None else {}),
                "options": {**self.options.to_dict(), "generation": self.generation,
                            "chat_template": self.chat_template.source}}

    def _result_info(self, image) -> dict:
        return {**self.info, "image": str(image) if isinstance(image, (str, Path)) else None}

    @property
    def backend_name(self) -> str:
        return self.backend.name

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

    def _meta(self, grid, images: int = 1):
        key = grid if images == 1 else (grid, images)
        if key not in self._metas:
            self._metas[key] = build_vision_meta([grid] * images, self.config.vision_config)
        return self._metas[key]

    def _take(self, key: tuple, tm: Timings, stage: str):
        """A stage output ``_batch`` computed ahead for this frame (its share of the batch's time
        goes to ``stage``), or None."""
        ahead = self._ahead.pop(key, None)
        if ahead is None:
            return None
        tm[stage] = tm.get(stage, 0.0) + ahead[1]
        return ahead[0]

    def _encode(self, pre: Preprocessed, tm: Timings) -> torch.Tensor:
        emb = self._take(("vision", id(pre)), tm, "vision")
        if emb is not None:
            return emb
        with tm.stage("vision"):
            return self.backend.encode_image(pre.pixel_values, self._meta(pre.grid))

    def _prompt_ids(self, pre: Preprocessed | None, prompt: prompts.Prompt) -> torch.Tensor:
        if pre is not None:
            msg = user_message(prompt.text, image_first=prompt.image_first)
            return encode_chat(self.vocab, [msg], [pre.num_image_tokens], template=self.chat_template)
        return encode_chat(self.vocab, [{"role": "user", "content": prompt.text}], [],
                           template=self.chat_template)

    def _prefill(self, pre: Preprocessed | None, embeds, prompt: prompts.Prompt, tm: Timings):
        """Prefill of one user turn (the image's ``embeds`` from ``_encode``) -> (PrefillResult,
        the prompt ids)."""
        ids = self._prompt_ids(pre, prompt)
        pf = None if pre is None else self._take(("prefill", id(pre), _key(ids)), tm, "prefill")
        if pf is not None:
            return pf, ids
        with tm.stage("prefill"):
            return self.backend.prefill(ids, embeds), ids

    def _shared(self, pre: Preprocessed, embeds, tm: Timings):
        """The dense tasks' shared prefill (``runtime.multitask``) of one frame."""
        pf = self._take(("shared", id(pre)), tm, "prefill")
        if pf is not None:
            return pf
        with tm.stage("prefill"):
            return self._shared_prefill(embeds, pre.num_image_tokens)

    # ---- several frames at once (a camera rig)
    def _plain_prefills(self, task: str, o: dict) -> list:
        """The prefills ``task``'s flow runs with the call options ``o`` that no generation
        follows, so a batch may run them (a batched prefill keeps no cache): ``SHARED`` (the
        dense tasks' shared prefill) or a prompt. The flows themselves are the reference:
        ``tests/test_rig.py`` checks that a batch leaves none of these to its frames' calls."""
        preset = o.get("preset") or self.default_depth_preset
        if task == "depth":
            return [prompts.depth(preset)]
        if task == "dense":
            dp = prompts.depth(preset) if o.get("depth", True) else None
            shared = bool(o.get("classes")) or (dp is not None and dp.image_first)
            return ([SHARED] if shared else []) + ([dp] if dp is not None and not dp.image_first else [])
        if task == "segment" and o.get("classes") and self.options.fast:
            return [prompts.semantic(list(o["classes"]), bool(o.get("background")))]
        return []

    def _batch(self, task: str, calls: list[tuple[Preprocessed, dict]]) -> list[tuple[object, int]]:
        """``task``'s call on each prepared frame with its options; frames of one size share the
        stages the backend batches: the vision encoder (``supports_image_batch``) and the
        prefills no generation follows (``supports_prefill_batch``). Each frame's result equals
        its own call's (the same stages on its rows); the time of a batched stage is split
        evenly over its frames. Per call: (its result or the exception it raised, the frames
        that shared its batched stages: 1 when none ran). An error of a batched stage is raised."""
        method = getattr(self, REGISTRY[task].method)
        groups: dict[tuple, list] = {}
        for pre, o in calls:
            plan = self._plain_prefills(task, o)
            key = (pre.grid, tuple(p if p is SHARED else (p.text, p.image_first) for p in plan))
            groups.setdefault(key, []).append((pre, plan))
        shared = {}
        try:
            for members in groups.values():
                if len(members) > 1 and self._ahead_of([m[0] for m in members], members[0][1]):
                    shared.update((id(m[0]), len(members)) for m in members)
            out = []
            for pre, o in calls:
                try:
                    r = method(pre, **{k: v for k, v in o.items() if v is not None})
                except Exception as e:  # one frame's failure is that frame's
                    r = e
                out.append((r, shared.get(id(pre), 1)))
            return out
        finally:
            self._ahead.clear()

    def _ahead_of(self, pres: list[Preprocessed], plan: list) -> bool:
        """The batched stages of frames of one grid, kept for their calls (``_take``); False
        when the backend batches none of them."""
        be, b = self.backend, len(pres)
        prefill = be.supports_prefill_batch and bool(plan)
        if not (be.supports_image_batch or prefill):
            return False
        if be.supports_image_batch:
            t0 = time.perf_counter()
            emb = be.encode_image(torch.cat([p.pixel_values for p in pres]), self._meta(pres[0].grid, b))
            embeds = list(emb.split(pres[0].num_image_tokens))
            share = (time.perf_counter() - t0) / b
            for p, e in zip(pres, embeds):
                self._ahead[("vision", id(p))] = (e, share)
        else:   # one by one, kept for the calls as the batched prefill needs them now
            embeds = []
            for p in pres:
                tm = Timings()
                embeds.append(self._encode(p, tm))
                self._ahead[("vision", id(p))] = (embeds[-1], tm["vision"])
        if not prefill:
            return True
        rows = torch.cat(embeds)
        for kind in plan:
            t0 = time.perf_counter()
            if kind is SHARED:
                results = self._shared_prefill.batch(rows, pres[0].num_image_tokens, b)
                keys = [("shared", id(p)) for p in pres]
            else:
                ids = self._prompt_ids(pres[0], kind)
                results = be.prefill_batch(ids.expand(b, -1), rows)
                keys = [("prefill", id(p), _key(ids)) for p in pres]
            share = (time.perf_counter() - t0) / b
            for k, r in zip(keys, results):
                self._ahead[k] = (r, share)
        return True

    def batch(self, images, task: str = "depth", **task_options) -> list:
        """``task`` (one that streams: depth, segment, dense) on several images at once, with
        that call's keyword options: a camera rig's frames. Frames of one size run the vision
        encoder and the prefills that no generation follows as one batch where the backend
        declares it (``Backend.supports_image_batch`` / ``supports_prefill_batch``); others run
        one by one. Each result equals the image's own call (docs/streaming.md, "Several
        cameras"). Images may be anything a task call takes, or ``prepare``'s result; the first
        image that fails raises its error."""
        from .sources import Frame, frame_name
        from .stream import call_options, prepare_frame
        spec = self._stream_spec(task, task_options)
        if isinstance(images, (str, bytes, Path, np.ndarray)) or not hasattr(images, "__iter__"):
            raise OptionError(f"images must be a list of images, got {type(images).__name__}")
        frames = [im if isinstance(im, Frame) else Frame(i, im, frame_name(i))
                  for i, im in enumerate(images)]
        calls = [(prepare_frame(self, spec, f, Timings()), call_options(spec, f)) for f in frames]
        results = [r for r, _ in self._batch(spec.task, calls)]
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results

    def _generate(self, pf, ids, tm: Timings, stop: set[int],
                  max_new_tokens: int | None = None) -> list[int]:
        """The release's decoding: greedy over repetition-penalised logits (prompt ids included)."""
        with tm.stage("decode"):
            toks, _ = greedy_decode(self.backend.decode, pf.last_logits, pf.cache,
                                    max_new_tokens or self.generation["max_new_tokens"], stop,
                                    self.generation["repetition_penalty"], ids)
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
            return preprocess(image, self._max_patches,
                              self.settings.upscale if upscale is None else upscale)

    def _answer(self, image, prompt: prompts.Prompt, tm: Timings):
        """One image, one prompt, one generated answer -> (Preprocessed, answer text)."""
        pre = self._pre(image, tm)
        pf, ids = self._prefill(pre, self._encode(pre, tm), prompt, tm)
        return pre, self._text(self._generate(pf, ids, tm, self._stop))

    def _labels(self, hidden: torch.Tensor, pre: Preprocessed, class_list: list[str], tm: Timings
                ) -> np.ndarray:
        """Label map over ``class_list`` as written: its names scored, ``<OTHERS>`` (wherever it
        stands) the background rule."""
        names = [c for c in class_list if c != BACKGROUND_NAME]
        if not names:
            return np.zeros(pre.original_hw, dtype=np.uint16)
        bg = BACKGROUND_NAME in class_list
        with tm.stage("dense_head"):
            return segment_labels(hidden, self._subset(tuple(names)), pre.merged_grid,
                                  pre.original_hw, self.options, background=bg,
                                  image=self._image_at(pre) if self.options.crf else None,
                                  background_index=class_list.index(BACKGROUND_NAME) if bg else None)

    def _core_target(self, image: np.ndarray, box, rng: np.random.Generator, tm: Timings):
        """The demo's second pass: ``box`` (original pixels) cropped with padding, drawn, resized,
        sent as the demo sends it (JPEG), "Segment the core target." -> (full-size bool FG mask,
        the Crop)."""
        with tm.stage("postprocess"):
            crop = grounding.referring_crop(image, box, rng, self.options.refer_padding,
                                            self.options.refer_short_side)
            q = self.options.crop_jpeg_quality
            pixels = crop.image if q is None else jpeg_round_trip(crop.image, q)
        cpre = self._pre(pixels, tm, upscale=1.0)
        cpf, _ = self._prefill(cpre, self._encode(cpre, tm), prompts.core_target(), tm)
        with tm.stage("dense_head"):
            lab = segment_labels(self._hidden(cpf), self._subset((T.BG, T.FG)), cpre.merged_grid,
                                 cpre.original_hw, self.options,
                                 image=cpre.image if self.options.crf else None)
        with tm.stage("postprocess"):
            return crop.paste(lab == 1, image.shape[:2]), crop

    # ---- tasks ----
    @property
    def default_depth_preset(self) -> str:
        """The preset the model directory declares (task_defaults.json), else open world."""
        return depth_bins.default_preset(self.task_defaults)

    def prepare(self, image, focal: float | None = None, preset: str | None = None,
                timings: Timings | None = None) -> Preprocessed:
        """``image`` decoded and preprocessed once, as a task call does it; with ``focal`` (open
        world) rescaled to the canonical focal length as ``depth(image, preset, focal)`` does.
        Every task call takes the result in place of the image (``stream`` prepares the next
        frame this way on a thread). ``timings`` (a ``speed.Timings``) gets the preprocess stage."""
        if timings is not None and not isinstance(timings, Timings):
            raise OptionError(f"timings must be a densert.runtime.speed.Timings or None, got "
                              f"{type(timings).__name__}")
        tm = Timings() if timings is None else timings
        if focal is None and preset is None:
            return self._pre(image, tm)
        return self._depth_pre(image, self.default_depth_preset if preset is None else preset,
                               focal, tm)

    def depth(self, image, preset: str | None = None, focal: float | None = None) -> DepthResult:
        """``preset`` None: the model's declared default (``default_depth_preset``)."""
        tm = Timings()
        preset = self.default_depth_preset if preset is None else preset
        pre = self._depth_pre(image, preset, focal, tm)
        pf, _ = self._prefill(pre, self._encode(pre, tm), prompts.depth(preset), tm)
        return self._depth_result(image, pre, self._hidden(pf), preset, focal, tm)

    def _depth_pre(self, image, preset: str, focal: float | None, tm: Timings) -> Preprocessed:
        depth_bins.get_preset(preset)  # unknown presets fail here
        if isinstance(image, Preprocessed):
            depth_scale(preset, focal, None)  # the request's own checks
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
                           resized_hw=pre.resized_hw, argmax_hw=dm.argmax_hw, timings=dict(tm),
                           info=self._result_info(image))

    def segment(self, image, classes: list[str] | None = None,
                background: bool | None = None) -> SegResult:
        """``classes`` given: the closed set. ``background`` True asks for a background class
        (the prompt omits "without the background class"); the ``<OTHERS>`` rule then applies
        where the model names ``<OTHERS>`` (always, with ``fast``).
        ``classes`` None: the open set; ``background`` None lets the model decide (``<OTHERS>``
        in its answer), True / False force the rule on / off for the direct map."""
        asked = class_names(classes)
        flag(background, "background", none_ok=True)
        tm = Timings()
        warn: list[str] = []
        pre = self._pre(image, tm)
        emb = self._encode(pre, tm)
        prompt = prompts.open_set() if asked is None else prompts.semantic(asked, bool(background))
        pf, ids = self._prefill(pre, emb, prompt, tm)
        seg = dict(generated_text=None, prompt_classes=asked)
        if asked is not None and self.options.fast:
            flow = "closed-set:one-prefill"
            class_list = asked + ([BACKGROUND_NAME] if background else [])
        else:
            toks = self._generate(pf, ids, tm, self._stop | {self.vocab.token_id(T.MASK)})
            text = seg["generated_text"] = self._text(toks)
            refs = grounding.parse_refs(text)
            named = [r for r in refs if r != BACKGROUND_NAME]
            if asked is not None:
                flow, class_list = "closed-set:name-then-argmax", refs
                if not refs:
                    warn.append(f"the model named none of the classes (answer: {text[:80]!r}); "
                                f"scored all {len(asked)} given classes (the --fast flow)")
                    flow = "closed-set:one-prefill"
                    class_list = asked + ([BACKGROUND_NAME] if background else [])
                elif [n for n in named if n not in asked]:
                    warn.append("the model named classes that are not in the given list: "
                                + ", ".join(n for n in named if n not in asked))
            else:
                if named and T.MASK in text and not self.options.fast:
                    two = self._open_set_boxes(pre, emb, named, tm, warn)
                    if two is not None:
                        labels, dets, det_text = two
                        return self._seg_result(image, pre, labels, [T.BG] + named,
                                                "open-set:detect-then-segment", tm, warn,
                                                detections=dets, detection_text=det_text, **seg)
                flow, class_list = "open-set:direct", refs
                if background is True and BACKGROUND_NAME not in refs:
                    class_list = refs + [BACKGROUND_NAME]
                elif background is False:
                    class_list = named
                if not named:
                    warn.append(f"the model named no class (answer: {text[:80]!r}); every pixel "
                                "is background")
                    class_list = [BACKGROUND_NAME]
        labels = self._labels(self._hidden(pf), pre, class_list, tm)
        return self._seg_result(image, pre, labels, class_list, flow, tm, warn, **seg)

    def _open_set_boxes(self, pre: Preprocessed, emb, names: list[str], tm: Timings,
                        warn: list[str]):
        """The demo's openseg stages 2 and 3 -> (labels over [<BG>] + names, detections, the
        detection answer), or None when no box of the named classes came back."""
        pf, ids = self._prefill(pre, emb, prompts.detect_categories(names), tm)
        text = self._text(self._generate(pf, ids, tm, self._stop))
        found = [d for d in grounding.parse_detections(text) if d.label is not None]
        dets = grounding.largest_first(found, self.options.open_set_max_boxes)
        if not dets:
            warn.append(f"no box of the named classes was detected (answer: {text[:80]!r}); "
                        "the naming pass's map instead, as the demo does")
            return None
        if len(found) > len(dets):
            warn.append(f"{len(found)} boxes detected; the {len(dets)} largest were segmented "
                        "(open_set_max_boxes)")
        image = self._image_at(pre)
        labels = np.zeros(pre.original_hw, dtype=np.uint16)
        rng = np.random.default_rng(self.options.seed)
        out = []
        for d in dets:
            box = grounding.box_to_original(d.box, pre.resized_hw, pre.original_hw)
            # the demo's class ids: 1-based in the named order, an unknown name gets 1
            cid = names.index(d.label) + 1 if d.label in names else 1
            fg, crop = self._core_target(image, box, rng, tm)
            labels[fg] = cid
            out.append({"label": d.label, "class_index": cid, "box": list(box),
                        "crop_box": list(crop.box), "pixels": int(fg.sum())})
        return labels, out, text

    def _seg_result(self, image, pre, labels, class_names, flow, tm, warn, **kw) -> SegResult:
        for w in warn:
            warnings.warn(w, stacklevel=3)
        return SegResult(labels=labels.astype(np.uint16), class_names=list(class_names),
                         original_hw=pre.original_hw, resized_hw=pre.resized_hw,
                         timings=dict(tm), warnings=warn, info=self._result_info(image),
                         image=self._image_at(pre), flow=flow, **kw)

    def dense(self, image, depth: bool = True, classes: list[str] | None = None,
              preset: str | None = None, focal: float | None = None,
              background: bool = False) -> DenseResult:
        """The depth map and the closed-set segmentation of ``classes`` of one frame: the image is
        encoded once and, for image-first depth prompts (open world), one prefill cut at the last
        image pad serves both (``runtime.multitask``). The maps equal those of ``depth()`` and of
        ``segment(classes=...)`` in its one-prefill flow (``DenseOptions.fast``: every given class
        scored; the release's default flow first generates the names present, which a shared
        prefill cannot do). With ``focal``, segmentation reads the depth's rescaled input."""
        names = class_names(classes) or []
        flag(depth, "depth")
        flag(background, "background")
        if not depth and not names:
            raise OptionError("dense() needs depth=True or at least one class name")
        if names:
            prompts.semantic(names, background)  # the names' checks (empty, commas)
        tm = Timings()
        preset = self.default_depth_preset if preset is None else preset
        pre = self._depth_pre(image, preset, focal, tm) if depth else self._pre(image, tm)
        embeds = self._encode(pre, tm)
        depth_prompt = prompts.depth(preset) if depth else None
        hidden, prefills, note = None, 0, None
        if names or (depth_prompt is not None and depth_prompt.image_first):
            hidden = self._hidden(self._shared(pre, embeds, tm))
            prefills += 1
        out = {}
        if depth_prompt is not None:
            h = hidden
            if not depth_prompt.image_first:
                note = (f"the {preset} depth prompt precedes the image (paper D.3), so the vision "
                        "tokens depend on it: depth runs its own prefill")
                own = Timings()
                h = self._hidden(self._prefill(pre, embeds, depth_prompt, own)[0])
                tm["prefill_depth"] = own["prefill"]
                prefills += 1
            td = Timings(tm)
            out["depth"] = self._depth_result(image, pre, h, preset, focal, td)
            tm["depth_head"] = td["dense_head"]
        if names:
            ts = Timings({k: v for k, v in tm.items() if k not in ("prefill_depth", "depth_head")})
            class_list = names + ([BACKGROUND_NAME] if background else [])
            labels = self._labels(hidden, pre, class_list, ts)
            out["segmentation"] = self._seg_result(image, pre, labels, class_list,
                                                   "closed-set:one-prefill", ts, [],
                                                   generated_text=None, prompt_classes=names)
            tm["segment_head"] = ts["dense_head"]
        return DenseResult(depth=out.get("depth"), segmentation=out.get("segmentation"),
                           prefills=prefills, timings=dict(tm), note=note)

    def stream(self, frames, task: str = "depth", drop: bool | None = None, **task_options):
        """A generator of ``StreamItem`` (frame, result, per-stage timings, frames dropped) over
        ``frames``: a ``--source`` spec (``runtime.sources.open_source``), a ``Source``, or any
        iterable of frames / arrays / paths; or a dict camera name -> any of those, for a camera
        rig (items tagged with their ``camera``; frames of one size batched where the backend
        declares it; see ``runtime.stream`` for the round-robin that keeps every camera served).
        ``task``: one that streams (``runtime.stream.TASKS``: depth, segment, dense), with that
        call's keyword options (depth: preset, focal; segment: classes, background; dense: those
        and depth). Decoding and preprocessing of the next frame overlap the model on this one;
        ``drop`` (default: live sources only) keeps the latest frame when the caller is slower
        than the source (``runtime.stream``)."""
        from .stream import stream
        spec = self._stream_spec(task, task_options)
        flag(drop, "drop", none_ok=True)
        if isinstance(frames, dict):
            from .sources import check_camera_name
            if not frames:
                raise SourceError("frames: an empty dict of cameras; give name -> source")
            names = [check_camera_name(k) for k in frames]
            frames = {k: _source(v, f"frames[{k!r}]") for k, v in zip(names, frames.values())}
        else:
            frames = _source(frames, "frames")
        return stream(self, frames, spec, drop)

    def _stream_spec(self, task, options: dict):
        """``stream``'s task and options, checked as the task's call checks them, before any
        frame is read."""
        from .stream import TaskSpec
        spec = TaskSpec.of(task, options)
        o = spec.options
        if "classes" in o:
            o["classes"] = class_names(o["classes"])
        if "background" in o:
            flag(o["background"], "background", none_ok=True)
        if "depth" in o:
            flag(o["depth"], "depth")
        if o.get("preset") is not None:
            depth_bins.get_preset(o["preset"])
        if o.get("focal") is not None:
            depth_scale(o.get("preset") or self.default_depth_preset, o["focal"], None)
        if spec.task == "dense" and not o.get("depth", True) and not o.get("classes"):
            raise OptionError("a dense stream needs depth or classes: pass depth=True or "
                              "classes=[...]")
        return spec

    def refer(self, image, expression: str) -> ReferResult:
        tm = Timings()
        warn: list[str] = []
        pre, text = self._answer(image, prompts.referring(expression), tm)
        H, W = pre.original_hw
        with tm.stage("postprocess"):
            polys = [grounding.to_original(p, pre.resized_hw, pre.original_hw)
                     for p in grounding.parse_polygons(text)]
            box = grounding.parse_box(text)
            if polys:  # the demo crops the polygon's bounding box
                box = grounding.box_of([pt for p in polys for pt in p])
            elif box is not None:  # the paper's grounding-then-segmentation answer
                box = grounding.box_to_original(box, pre.resized_hw, pre.original_hw)
            else:
                warn.append(f"no box or polygon in the grounding answer ({text[:80]!r}); "
                            "segmenting the whole image")
            poly_mask = grounding.rasterize_polygons(polys, (H, W)) if polys else None
        rng = np.random.default_rng(self.options.seed)
        mask, crop = self._core_target(self._image_at(pre), box or (0, 0, W, H), rng, tm)
        for w in warn:
            warnings.warn(w, stacklevel=2)
        return ReferResult(mask=mask, expression=expression, box=box, polygons=polys,
                           polygon_mask=poly_mask, crop_box=crop.box, generated_text=text,
                           original_hw=(H, W), timings=dict(tm), warnings=warn,
                           info=self._result_info(image), image=self._image_at(pre))

    def _boxes(self, text: str, pre: Preprocessed) -> list[grounding.Detection]:
        return [grounding.Detection(d.label, grounding.box_to_original(d.box, pre.resized_hw,
                                                                       pre.original_hw))
                for d in grounding.parse_detections(text)]

    def _answer_result(self, cls, image, pre: Preprocessed, text: str, tm: Timings,
                       warn: list[str], **fields):
        for w in warn:
            warnings.warn(w, stacklevel=3)
        return cls(generated_text=text, original_hw=pre.original_hw, resized_hw=pre.resized_hw,
                   timings=dict(tm), warnings=warn, info=self._result_info(image),
                   image=self._image_at(pre), **fields)

    def detect(self, image, classes: list[str] | None = None) -> DetectResult:
        """Object detection: every object ("Detect all objects in the provided image."), or the
        given categories (the open set's detection prompt); boxes largest first, as the demo
        lists them."""
        tm = Timings()
        asked = class_names(classes)
        prompt = prompts.detect_all() if asked is None else prompts.detect_categories(asked)
        pre, text = self._answer(image, prompt, tm)
        with tm.stage("postprocess"):
            dets = grounding.largest_first(self._boxes(text, pre))
        warn = [] if dets else [f"no box in the answer ({text[:80]!r})"]
        return self._answer_result(DetectResult, image, pre, text, tm, warn, detections=dets,
                                   classes=asked)

    def ground(self, image, expression: str) -> GroundResult:
        """Grounding: the box(es) of the region an expression describes."""
        tm = Timings()
        pre, text = self._answer(image, prompts.grounding(expression), tm)
        with tm.stage("postprocess"):
            dets = self._boxes(text, pre)
        warn = [] if dets else [f"no box in the answer ({text[:80]!r})"]
        return self._answer_result(GroundResult, image, pre, text, tm, warn, detections=dets,
                                   expression=expression)

    def pose(self, image) -> PoseResult:
        """Pose estimation: persons with a box and the 16 MPII keypoints, in the prompt's order."""
        tm = Timings()
        pre, text = self._answer(image, prompts.pose(), tm)
        n = len(prompts.MPII_JOINTS)
        warn: list[str] = []
        persons = []
        with tm.stage("postprocess"):
            for k, p in enumerate(grounding.parse_poses(text)):
                box = None if p.box is None else grounding.box_to_original(
                    p.box, pre.resized_hw, pre.original_hw)
                kpts = []
                for x, y, v in (p.keypoints + [(None, None, None)] * n)[:n]:
                    if x is not None:
                        (x, y), = grounding.to_original([(x, y)], pre.resized_hw, pre.original_hw)
                    kpts.append((x, y, v))
                if len(p.keypoints) != n:
                    warn.append(f"person {k} has {len(p.keypoints)} keypoints, not {n}")
                persons.append(grounding.PersonPose(box, kpts))
        if not persons:
            warn.append(f"no <person> in the answer ({text[:80]!r})")
        return self._answer_result(PoseResult, image, pre, text, tm, warn, persons=persons)

    def chat(self, image, prompt: str, max_new_tokens: int | None = None) -> ChatResult:
        """VQA / chat: the answer to ``prompt`` about ``image`` (None: text only)."""
        if max_new_tokens is not None:
            from densert.options import check_range
            check_range("chat", "max_new_tokens", max_new_tokens, 1, integer=True)
        prompts.chat(prompt)  # a string, before any work
        tm = Timings()
        pre = self._pre(image, tm) if image is not None else None
        emb = self._encode(pre, tm) if pre is not None else None
        pf, ids = self._prefill(pre, emb, prompts.chat(prompt), tm)
        toks = self._generate(pf, ids, tm, self._stop, max_new_tokens)
        return ChatResult(text=self._text(toks), token_ids=toks, timings=dict(tm),
                          info=self._result_info(image), prompt=prompt)

    @staticmethod
    def _image_at(pre: Preprocessed) -> np.ndarray:
        """The decoded image at the original size (drafted huge JPEGs are scaled back up)."""
        if pre.image.shape[:2] == tuple(pre.original_hw):
            return pre.image
        from densert.image.preprocess import resize_uint8
        return resize_uint8(pre.image, pre.original_hw)
