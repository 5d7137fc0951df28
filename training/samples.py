"""Training samples: one chat sequence + its image + the labels of its vision tokens, built the
same way from rendered scenes and from datasets on disk, and the padded batch the forward takes.

==========  =====================================================  ================================
task        user turn                                              assistant answer (text CE)
==========  =====================================================  ================================
depth       "Please estimate the depth of this image from the      ``<depth>``
            <Dataset> dataset." BEFORE the image (open world:
            image, then "Estimate the depth.")
segment     image, then "Segment: a, b, c, without the             ``<ref>a</ref><ref>b</ref>...``
            background class." (present classes + 0-3 absent       (the present ones, prompt order)
            distractors, shuffled)
refer       the referring crop (``densert.tasks.grounding``: a     ``<ref><FG></ref><ref><BG></ref>``
            1.2x-padded window around one object, its box drawn    (the demo's two-class contract,
            in a random colour), then "Segment the core target."   FG first)
ground      image, then 'Can you segment "<expression>" in this    ``<box><x_a><y_b><x_c><y_d></box>``
            image?' (the first pass of referring segmentation;     (pixels of the image the vision
            datasets on disk only: rendered scenes have no         tower saw)
            expressions)
==========  =====================================================  ================================

Every answer ends with ``<|end_of_text|>``. Vision labels per merged cell (32x32 px) are multi-hot
over ONE label family per task (NTP-M, method spec sec. 3): depth -> the ``<custom_b>`` ids of
every bin in the cell; segment -> every sub-word id of every class in the cell (names tokenised
as the runtime does, ``densert.tasks.classes``); refer -> ``<FG>`` / ``<BG>``. A "ground" sample
has text labels only. The validity set M of a token is the vocabulary minus the other families.

Images on disk reach the vision tower as the runtime's processor would hand them over
(``densert.image.preprocess``: aspect kept, sides rounded up to 32, at most ``cap`` 16x16
patches, antialiased resize), so a model is trained at the geometry it is served at; rendered
scenes are drawn at the training size directly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from densert.image import PATCH
from densert.image.preprocess import normalize, patchify, resize_uint8, target_size
from densert.tasks import DENSE_TASKS, classes, grounding, prompts, rle
from densert.tasks.depth_bins import get_preset, open_world_resize_factor
from densert.text import tokens
from densert.text.chat import encode_chat, user_message

from . import data
from .classes import CLASS_NAMES
from .data import CELL, resize_array
from .losses import LabelSpace

# Label family read off the vision tokens of each dense task.
FAMILY = {"depth": "depth", "segment": "class", "refer": "fgbg"}
GROUND = "ground"   # sample kind of the grounding pass (text labels only)


@dataclass
class Sample:
    task: str                      # a dense task, or GROUND
    ids: list[int]
    answer_start: int              # first answer token index in ids (CE targets from here on)
    image: np.ndarray              # uint8 [H, W, 3] as the vision tower sees it (sides % 32 == 0)
    positives: torch.Tensor        # [L, P] vocabulary ids per vision token, -1 pad (NTP-M)
    single: torch.Tensor           # [L, S] ids of the one label per token (softmax baseline)
    gt: dict = field(default_factory=dict)

    @property
    def num_image_tokens(self) -> int:
        return (self.image.shape[0] // CELL) * (self.image.shape[1] // CELL)


# ---------------------------------------------------------------------------------------------
# Label spaces
# ---------------------------------------------------------------------------------------------
def label_space(vocab: tokens.Vocab, class_names=CLASS_NAMES) -> LabelSpace:
    return LabelSpace(class_ids=[classes.name_ids(vocab, n) for n in class_names],
                      depth_ids=[-1] + vocab.depth_bin_ids().tolist(),
                      fg_id=vocab.token_id(tokens.FG), bg_id=vocab.token_id(tokens.BG),
                      class_names=tuple(class_names))


def family_masks(spaces: list[LabelSpace], vocab_size: int) -> dict[str, torch.Tensor]:
    """Task -> validity set M: everything except the label families the task does not label.
    The class family is every class id of every class list in the run."""
    fam = {f: torch.stack([s.family_mask(f, vocab_size) for s in spaces]).any(0)
           for f in ("class", "depth", "fgbg")}
    return {t: ~torch.stack([m for f, m in fam.items() if f != FAMILY[t]]).any(0)
            for t in DENSE_TASKS}


# ---------------------------------------------------------------------------------------------
# One sample per task, from arrays at network size
# ---------------------------------------------------------------------------------------------
def chat_ids(vocab: tokens.Vocab, prompt: prompts.Prompt, n_img: int, answer: str | None
             ) -> tuple[list[int], int]:
    ids = encode_chat(vocab, [user_message(prompt.text, prompt.image_first)], [n_img])[0].tolist()
    start = len(ids)
    if answer is not None:
        ids += vocab.encode(answer) + [vocab.eos_id]
    return ids, start


def _n_img(image: np.ndarray) -> int:
    return (image.shape[0] // CELL) * (image.shape[1] // CELL)


def depth_sample(vocab: tokens.Vocab, space: LabelSpace, image: np.ndarray, depth: np.ndarray,
                 preset: str, fx: float | None = None, gt: dict | None = None) -> Sample:
    ids, start = chat_ids(vocab, prompts.depth(preset), _n_img(image), tokens.DEPTH)
    t = data.depth_targets(depth, preset, fx)
    # The softmax baseline's single label is the cell's median bin (-1 where none).
    single = torch.where(t.median > 0, t.median, -1)[:, None]
    return Sample("depth", ids, start, np.ascontiguousarray(image), space.depth_positives(t.indices),
                  space.depth_positives(single), gt if gt is not None else {"depth": depth})


def segment_sample(vocab: tokens.Vocab, space: LabelSpace, image: np.ndarray, labels: np.ndarray,
                   rng: random.Random, ignore_index: int = data.IGNORE_LABEL) -> Sample:
    """Prompt: the classes present plus 0-3 absent ones, shuffled; answer: the present ones."""
    names = space.class_names
    present = sorted(set(np.unique(labels).tolist()) & set(range(len(names))))
    absent = [c for c in range(len(names)) if c not in present]
    asked = present + rng.sample(absent, min(len(absent), rng.randint(0, 3)))
    rng.shuffle(asked)
    answer = rle.ref_tags(names[c] for c in asked if c in present)
    ids, start = chat_ids(vocab, prompts.semantic([names[c] for c in asked]), _n_img(image), answer)
    t = data.segmentation_targets(labels, len(names), ignore_index=ignore_index)
    return Sample("segment", ids, start, np.ascontiguousarray(image), space.class_positives(t.indices),
                  space.class_positives(t.majority[:, None]), {"labels": np.ascontiguousarray(labels)})


def refer_sample(vocab: tokens.Vocab, space: LabelSpace, crop: np.ndarray, fg: np.ndarray) -> Sample:
    ids, start = chat_ids(vocab, prompts.core_target(), _n_img(crop),
                          rle.ref_tags(prompts.CORE_TARGET_CLASSES))
    t = data.fgbg_targets(fg)
    return Sample("refer", ids, start, np.ascontiguousarray(crop), space.fgbg_positives(t.indices),
                  space.fgbg_positives(t.majority[:, None]), {"fg": fg})


def box_answer(box) -> str:
    """``<box><x_a><y_b><x_c><y_d></box>``: the grounding answer ``grounding.parse_box`` reads,
    in integer pixels of the image the vision tower saw."""
    x0, y0, x1, y1 = (min(max(int(round(v)), 0), tokens.N_COORDS - 1) for v in box)
    return (tokens.BOX + tokens.x_token(x0) + tokens.y_token(y0) + tokens.x_token(x1) + tokens.y_token(y1)
            + tokens.BOX_END)


def ground_sample(vocab: tokens.Vocab, image: np.ndarray, box, expression: str) -> Sample:
    ids, start = chat_ids(vocab, prompts.referring(expression), _n_img(image), box_answer(box))
    none = torch.full((_n_img(image), 0), -1, dtype=torch.long)
    return Sample(GROUND, ids, start, np.ascontiguousarray(image), none, none, {"box": tuple(box)})


# ---------------------------------------------------------------------------------------------
# Rendered scenes
# ---------------------------------------------------------------------------------------------
class SceneCache:
    """Training scenes rendered on first use and kept (the renderer is ~0.1 s per 256x256 scene)."""

    def __init__(self, size: tuple[int, int], n: int, seed: int):
        self.size, self.n, self.seed = size, n, seed
        self._d: dict[int, object] = {}

    def get(self, i: int):
        from .scenes import render_scene
        j = i % self.n
        if j not in self._d:
            self._d[j] = render_scene(self.seed * 1_000_003 + j, *self.size)
        return self._d[j]


class _Flipped:
    def __init__(self, s):
        self.image, self.labels = s.image[:, ::-1], s.labels[:, ::-1]
        self.instances, self.depth, self.intrinsics = s.instances[:, ::-1], s.depth[:, ::-1], s.intrinsics


def _crop_refer(scene, rng: random.Random, size: tuple[int, int]):
    """The runtime's referring crop (``densert.tasks.grounding``) of a random object, resized to
    the batch's fixed ``size``, and its fg mask; no object visible: the whole image is fg."""
    nrng = np.random.default_rng(rng.getrandbits(63))
    inst = data.pick_instance(scene, nrng)
    if inst is None:
        return scene.image, np.ones(scene.instances.shape, dtype=bool)
    crop = grounding.referring_crop(scene.image, data.instance_box(scene.instances, inst), nrng,
                                    size=size)
    return crop.image, crop.take(scene.instances == inst)


def scene_sample(task: str, scene, vocab: tokens.Vocab, space: LabelSpace, size: tuple[int, int],
                 depth_preset: str, rng: random.Random, augment: bool = True) -> Sample:
    if augment and task != "depth" and rng.random() < 0.5:   # no flip for depth (paper sec. 3)
        scene = _Flipped(scene)
    image = np.ascontiguousarray(scene.image)
    if task == "depth":
        return depth_sample(vocab, space, image, scene.depth, depth_preset,
                            gt={"depth": scene.depth, "fx": scene.intrinsics.fx})
    if task == "segment":
        return segment_sample(vocab, space, image, np.ascontiguousarray(scene.labels), rng)
    crop, fg = _crop_refer(scene, rng, size)
    return refer_sample(vocab, space, crop, fg)


# ---------------------------------------------------------------------------------------------
# Datasets on disk
# ---------------------------------------------------------------------------------------------
def network_size(hw: tuple[int, int], cap: int, scale: float = 1.0) -> tuple[int, int]:
    """The processor's size for an image of ``hw`` under a cap of ``cap`` 16x16 patches."""
    return target_size(hw[0], hw[1], cap, scale)


def user_sample(item, ds, vocab: tokens.Vocab, space: LabelSpace, cap: int, rng: random.Random,
                augment: bool = True) -> Sample:
    """A sample of a ``userdata.Item``; ``space`` holds the dataset's class names."""
    image = ds.image(item.stem)
    hw = image.shape[:2]
    if item.task == "depth":
        preset, focal = ds.depth_setting(item.stem)
        open_world = get_preset(preset).focal is not None
        scale = open_world_resize_factor(focal) if open_world and focal else 1.0
        size = network_size(hw, cap, scale)
        fx = None
        if open_world and focal:
            # The focal length of the resized image, as the runtime corrects it (DensePredictor.depth).
            fx = float(focal) * ((size[0] / hw[0]) * (size[1] / hw[1])) ** 0.5
        return depth_sample(vocab, space, resize_uint8(image, size),
                            resize_array(ds.depth_map(item.stem), size, True), preset, fx)
    if item.task == "segment":
        size = network_size(hw, cap)
        img, lab = resize_uint8(image, size), resize_array(ds.label_map(item.stem), size, True)
        if augment and rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        return segment_sample(vocab, space, np.ascontiguousarray(img), np.ascontiguousarray(lab), rng,
                              ds.ignore_index)
    from .userdata import mask_box
    expr = ds.expressions[item.expr]
    mask = ds.expression_mask(item.expr)
    box = mask_box(mask)
    if rng.random() < 0.5:   # the grounding pass or the crop pass, one per draw
        size = network_size(hw, cap)
        sy, sx = size[0] / hw[0], size[1] / hw[1]
        return ground_sample(vocab, resize_uint8(image, size),
                             (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), expr.text)
    crop = grounding.referring_crop(image, box, np.random.default_rng(rng.getrandbits(63)))
    size = network_size(crop.image.shape[:2], cap)
    return refer_sample(vocab, space, resize_uint8(crop.image, size),
                        resize_array(crop.take(mask), size, True))


# ---------------------------------------------------------------------------------------------
# Batch
# ---------------------------------------------------------------------------------------------
def pixel_patches(image: np.ndarray) -> torch.Tensor:
    return patchify(normalize(np.ascontiguousarray(image)))


class Batch:
    """Samples padded into one forward: patches of every image packed along the patch axis (each
    at its own grid), ids right-padded, text targets -100 outside the answers."""

    def __init__(self, samples: list[Sample], pad_id: int):
        self.grids = [(s.image.shape[0] // PATCH, s.image.shape[1] // PATCH) for s in samples]
        self.pixel_values = torch.cat([pixel_patches(s.image) for s in samples])
        Tm = max(len(s.ids) for s in samples)
        ids = torch.full((len(samples), Tm), pad_id, dtype=torch.long)
        tgt = torch.full((len(samples), Tm), -100, dtype=torch.long)
        for b, s in enumerate(samples):
            ids[b, : len(s.ids)] = torch.tensor(s.ids)
            # position t predicts token t+1: answer tokens are predicted from start-1 .. end-2
            tgt[b, s.answer_start - 1: len(s.ids) - 1] = torch.tensor(s.ids[s.answer_start:])
        self.input_ids, self.text_targets = ids, tgt
        self.tasks = [s.task for s in samples]
        self.positives = [s.positives for s in samples]
        self.single = [s.single for s in samples]
        self.counts = [s.num_image_tokens for s in samples]
