"""The release's flows: the demo's prompts, generation settings, closed-set naming, the open
set's detect-then-segment mode, referring crops as the demo sends them, depth's argmax grid,
detection / grounding / pose results. Flows run on the tiny random checkpoint with the model's
answers scripted where a random model could not produce them (every pass that reads the vision
tokens is real)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from densert.runtime.options import DenseOptions
from densert.runtime.predictor import DensePredictor
from densert.runtime.results import validate_sidecar
from densert.tasks import prompts
from densert.text import tokens

# The demo's prompts, verbatim (demo/demo.py of the official Youtu-VL repository).
DEMO_POSE = (
    "Detect all persons and their poses from the image within the class set of MPII Human Pose "
    "Dataset. The output format should be a JSON-like string, containing person instances. Each "
    "person instance is enclosed in <person>...</person> tags. Within each person instance, "
    "provide the bounding box using <box>...</box> tags and their 16 keypoints using "
    "<kpt>...</kpt> tags. The bounding box is defined by <x_x1><y_y1><x_x2><y_y2> tags, and each "
    "keypoint is defined by <x_...><y_...><v_...> tags, where x, y are coordinates and v is "
    "visibility. The joints must be in this specific order: (0) right_ankle, (1) right_knee, (2) "
    "right_hip, (3) left_hip, (4) left_knee, (5) left_ankle, (6) pelvis, (7) thorax, (8) "
    "upper_neck, (9) head_top, (10) right_wrist, (11) right_elbow, (12) right_shoulder, (13) "
    "left_shoulder, (14) left_elbow, (15) left_wrist. Please output all detected persons with "
    "their bounding boxes and keypoints.")


def test_prompts_are_the_demos():
    assert prompts.pose().text == DEMO_POSE
    assert prompts.grounding(" the a black and white cat ").text == (
        "Please provide the bounding box coordinate of the region this sentence describes: "
        "the a black and white cat")
    assert prompts.detect_all().text == "Detect all objects in the provided image."
    assert prompts.detect_categories(["cat", "dog"]).text == (
        "Detect every objects that belongs to the following categories: cat,dog")
    assert prompts.open_set().text == "Segment all objects in this image."
    assert prompts.core_target().text == "Segment the core target."
    with pytest.raises(ValueError, match="expression is empty"):
        prompts.grounding("  ")


# ---------------------------------------------------------------- generation settings
def _ckpt(tiny_checkpoint, tmp_path, gen: dict | None):
    d = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint, d)
    if gen is None:
        (d / "generation_config.json").unlink()
    else:
        (d / "generation_config.json").write_text(json.dumps(gen))
    return d


def test_generation_settings_come_from_option_then_config_then_release(tiny_checkpoint, tmp_path):
    d = _ckpt(tiny_checkpoint, tmp_path, {"max_new_tokens": 7, "repetition_penalty": 1.2,
                                          "eos_token_id": [3, 10**9], "temperature": 0.1})
    p = DensePredictor(d)
    assert p.generation == {"max_new_tokens": 7, "repetition_penalty": 1.2, "source": {
        "max_new_tokens": "generation_config.json", "repetition_penalty": "generation_config.json"}}
    assert p._stop == {p.vocab.eos_id, 3}        # ids beyond the vocabulary are dropped
    q = DensePredictor.from_backend(p.backend, p.vocab, max_new_tokens=9, repetition_penalty=1.0)
    assert q.generation["source"] == {"max_new_tokens": "option", "repetition_penalty": "option"}
    (d / "generation_config.json").unlink()
    r = DensePredictor(d)
    assert (r.generation["max_new_tokens"], r.generation["repetition_penalty"]) == (4096, 1.05)
    assert r.info["options"]["generation"]["source"]["max_new_tokens"] == "release"
    assert r.info["options"]["chat_template"].endswith("chat_template.json")
    (d / "generation_config.json").write_text(json.dumps({"repetition_penalty": -1}))
    from densert.errors import CheckpointError
    with pytest.raises(CheckpointError, match="repetition_penalty must be a number > 0"):
        DensePredictor(d)


def test_runtime_decoding_is_the_oracle_checked_generate(tiny_checkpoint):
    """The predictor's answers (backend steps, prompt ids from the chat template) equal
    ``densert.model.generation.generate`` with the same penalty, the function tested token for
    token against transformers' generate. The random model repeats one token, so a penalty
    strong enough to change the answer shows that the runtime applies it (and over the prompt)."""
    from densert.model.generation import generate
    from densert.text.chat import encode_chat
    ids = encode_chat(DensePredictor(tiny_checkpoint).vocab,
                      [{"role": "user", "content": "Describe the scene."}], [])
    answers = {}
    for penalty in (1.05, 3.0):
        p = DensePredictor(tiny_checkpoint, max_new_tokens=16, repetition_penalty=penalty)
        answers[penalty] = p.chat(None, "Describe the scene.").token_ids
        assert answers[penalty] == generate(p.backend.model, ids, max_new_tokens=16,
                                            stop_ids=[p.vocab.eos_id], repetition_penalty=penalty)
    assert answers[1.05] != answers[3.0]


# ---------------------------------------------------------------- scripted answers
class Script:
    """Stands in for the predictor's generation: returns the next scripted answer and records
    the stop ids and prompt lengths it was called with."""

    def __init__(self, p: DensePredictor, answers: list[str]):
        self.p, self.answers, self.calls = p, list(answers), []

    def __call__(self, pf, ids, tm, stop, n=None):
        self.calls.append({"stop": set(stop), "prompt_len": int(ids.shape[1])})
        return self.p.vocab.encode(self.answers.pop(0))


def _pred(tiny_checkpoint, **opts) -> DensePredictor:
    return DensePredictor(tiny_checkpoint, options=DenseOptions(crf=False, refer_short_side=64,
                                                                **opts), max_new_tokens=8)


IMG = np.random.default_rng(0).integers(0, 256, (60, 90, 3), np.uint8)   # resized to 64x96


def test_closed_set_scores_only_the_named_classes_in_their_order(tiny_checkpoint, monkeypatch):
    """Paper eq. 2 / D.1: the argmax runs over the classes the model names, indexed as it wrote
    them, <OTHERS> included; the one-prefill flow scores every given class."""
    p = _pred(tiny_checkpoint)
    s = Script(p, ["The target categories include <ref>wall</ref><ref><OTHERS></ref>"
                   "<ref>floor</ref><mask>"])
    monkeypatch.setattr(p, "_generate", s)
    r = p.segment(IMG, classes=["floor", "sky", "wall"], background=True)
    assert r.flow == "closed-set:name-then-argmax" and r.class_names == ["wall", "<OTHERS>", "floor"]
    assert p.vocab.token_id(tokens.MASK) in s.calls[0]["stop"] and r.prompt_classes == ["floor", "sky", "wall"]
    # the same map as the one-prefill flow over the named classes, labels in the written order
    q = _pred(tiny_checkpoint, fast=True)
    fast = q.segment(IMG, classes=["wall", "floor"], background=True)
    assert fast.flow == "closed-set:one-prefill" and fast.class_names == ["wall", "floor", "<OTHERS>"]
    assert np.array_equal(r.labels, np.array([0, 2, 1])[fast.labels])
    # a model that names nothing: every given class is scored, and the result says so
    monkeypatch.setattr(p, "_generate", Script(p, ["nothing here"]))
    with pytest.warns(UserWarning, match="named none of the classes"):
        r = p.segment(IMG, classes=["floor", "wall"])
    assert r.flow == "closed-set:one-prefill" and r.class_names == ["floor", "wall"]


def test_open_set_direct_background_only_when_named(tiny_checkpoint, monkeypatch):
    p = _pred(tiny_checkpoint, fast=True)
    monkeypatch.setattr(p, "_generate", Script(p, ["<ref>cat</ref><ref>dog</ref><mask>"]))
    r = p.segment(IMG)
    assert r.flow == "open-set:direct" and r.class_names == ["cat", "dog"] and r.labels.max() <= 1
    monkeypatch.setattr(p, "_generate", Script(p, ["<ref><OTHERS></ref><ref>dog</ref><mask>"]))
    r = p.segment(IMG)
    assert r.class_names == ["<OTHERS>", "dog"]
    from densert.runtime.dense import segment_labels
    from densert.runtime.speed import Timings
    pre = p._pre(IMG, Timings())
    pf, _ = p._prefill(pre, p._encode(pre, Timings()), prompts.open_set(), Timings())
    want = segment_labels(p._hidden(pf), p._subset(("dog",)), pre.merged_grid, pre.original_hw,
                          p.options, background=True)        # dog 0, background 1
    assert np.array_equal(r.labels, np.array([1, 0])[want]) and 0 < r.labels.mean() < 1


def test_open_set_detects_then_segments_each_box(tiny_checkpoint, monkeypatch):
    """The demo's openseg: names -> "Detect every objects ..." -> each box, largest first, cropped
    and segmented ("Segment the core target."), later boxes overwriting; class ids 1-based in the
    named order, unknown names 1; at most open_set_max_boxes."""
    from densert.runtime import predictor
    p = _pred(tiny_checkpoint)
    det = ("<ref>dog</ref><box><x_0><y_0><x_32><y_32></box>"
           "<ref>cat</ref><box><x_16><y_16><x_80><y_64></box>"
           "<ref>bird</ref><box><x_60><y_4><x_70><y_12></box>")
    s = Script(p, ["<ref>cat</ref><ref><OTHERS></ref><ref>dog</ref><mask>", det])
    monkeypatch.setattr(p, "_generate", s)
    asked = []
    real_prefill = p._prefill
    monkeypatch.setattr(p, "_prefill", lambda pre, emb, prompt, tm: asked.append(prompt.text)
                        or real_prefill(pre, emb, prompt, tm))
    crops = []
    real = predictor.jpeg_round_trip
    monkeypatch.setattr(predictor, "jpeg_round_trip", lambda img, q: crops.append((img, q)) or real(img, q))
    r = p.segment(IMG)
    assert r.flow == "open-set:detect-then-segment" and r.class_names == ["<BG>", "cat", "dog"]
    assert [(d["label"], d["class_index"]) for d in r.detections] == [
        ("cat", 1), ("dog", 2), ("bird", 1)]
    assert r.detections[0]["box"] == [15, 15, 75, 60]       # 16 * 90 / 96 = 15, 64 * 60 / 64
    assert len(crops) == 3 and all(q == 95 for _, q in crops)
    assert set(np.unique(r.labels)) <= {0, 1, 2}
    outside = np.ones(r.labels.shape, bool)
    for d in r.detections:
        a0, b0, a1, b1 = d["crop_box"]
        outside[b0:b1, a0:a1] = False
    assert not r.labels[outside].any()
    assert asked == ["Segment all objects in this image.",
                     "Detect every objects that belongs to the following categories: cat,dog"] + \
        ["Segment the core target."] * 3
    # at most open_set_max_boxes, and no box: the naming pass's map, as the demo
    q = _pred(tiny_checkpoint, open_set_max_boxes=1)
    monkeypatch.setattr(q, "_generate", Script(q, ["<ref>cat</ref><ref>dog</ref><mask>", det]))
    with pytest.warns(UserWarning, match="3 boxes detected; the 1 largest"):
        r = q.segment(IMG)
    assert [d["label"] for d in r.detections] == ["cat"]
    monkeypatch.setattr(q, "_generate", Script(q, ["<ref>cat</ref><mask>", "no boxes"]))
    with pytest.warns(UserWarning, match="no box of the named classes"):
        r = q.segment(IMG)
    assert r.flow == "open-set:direct" and r.class_names == ["cat"]


def test_refer_crops_the_polygon_box_and_sends_it_as_the_demo(tiny_checkpoint, monkeypatch):
    """An <ins> answer: the polygon's box (original pixels) is cropped; the crop reaches the model
    as the demo sends it, a JPEG written by OpenCV (quality 95) and decoded like a file."""
    import cv2

    from densert.runtime import predictor
    p = _pred(tiny_checkpoint)
    monkeypatch.setattr(p, "_generate", Script(p, [
        "<ins><poly><x_16><y_8><x_48><y_8><x_48><y_40></poly></ins>"]))
    seen = []
    real = predictor.preprocess
    monkeypatch.setattr(predictor, "preprocess", lambda img, *a: seen.append(img) or real(img, *a))
    r = p.refer(IMG, "thing")
    assert r.box == (15, 8, 45, 38) and r.polygons == [[(15, 8), (45, 8), (45, 38)]]
    crop = seen[1]
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(
        predictor.grounding.referring_crop(IMG, r.box, np.random.default_rng(0), 1.2, 64).image[..., ::-1]))
    import io
    assert np.array_equal(crop, np.asarray(Image.open(io.BytesIO(buf.tobytes())).convert("RGB")))
    assert r.mask.shape == (60, 90) and r.crop_box == (12, 5, 48, 41)


def test_depth_argmax_grid_follows_the_tokens_under_upscale(tiny_checkpoint):
    """96x128 at --upscale 3: the network sees 288x384 (tokens 9x12); the argmax runs on 18x24,
    not on the original image's 6x8 grid, which stays the released text's grid."""
    p = DensePredictor(tiny_checkpoint, upscale=3)
    r = p.depth(np.random.default_rng(1).integers(0, 256, (96, 128, 3), np.uint8), preset="nyuv2")
    assert r.resized_hw == (288, 384) and r.argmax_hw == (18, 24) and r.codes_grid.shape == (6, 8)
    doc = r.to_dict()
    validate_sidecar(doc)
    assert doc["result"]["argmax_shape"] == [18, 24] and doc["flow"] == "one-prefill"


# ---------------------------------------------------------------- detection, grounding, pose
def test_detect_ground_pose_results(tiny_checkpoint, monkeypatch, tmp_path):
    p = _pred(tiny_checkpoint)
    monkeypatch.setattr(p, "_generate", Script(p, [
        "<ref>cup</ref><box><x_16><y_8><x_48><y_40></box><ref>dog</ref>"
        "<box><x_0><y_0><x_96><y_64></box><box><x_1><y_1><x_2><y_2></box>"]))
    d = p.detect(IMG)
    assert [(x.label, x.box) for x in d.detections] == [
        ("dog", (0, 0, 90, 60)), ("cup", (15, 8, 45, 38)), ("dog", (1, 1, 2, 2))]   # largest first
    assert d.text.startswith("<ref>cup</ref><box><x_15><y_8><x_45><y_38></box>")  # original px
    files = d.save(tmp_path / "d", "img")
    assert sorted(f.name for f in files) == ["img.coco.json", "img.detect.png", "img.detect.txt",
                                             "img.json"]
    coco = json.loads((tmp_path / "d" / "img.coco.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["dog", "cup"]
    assert coco["annotations"][1]["bbox"] == [15, 8, 30, 30]
    pic = np.asarray(Image.open(tmp_path / "d" / "img.detect.png"))
    assert pic.shape == (60, 90, 3) and not np.array_equal(pic, IMG)
    validate_sidecar(json.loads((tmp_path / "d" / "img.json").read_text()))

    monkeypatch.setattr(p, "_generate", Script(p, ["<box><x_16><y_8><x_48><y_40></box>"]))
    g = p.ground(IMG, "the cup")
    assert g.box == (15, 8, 45, 38) and g.to_dict()["result"]["box"] == [15, 8, 45, 38]
    validate_sidecar(g.to_dict())

    kpt = "".join(f"<kpt><x_{2 * i}><y_{i}><v_{i % 3}></kpt>" for i in range(15))
    monkeypatch.setattr(p, "_generate", Script(p, [
        f"<person><box><x_0><y_0><x_32><y_64></box>{kpt}</person><person><kpt><x_96><y_64></kpt>"]))
    with pytest.warns(UserWarning, match=r"person \d has \d+ keypoints, not 16"):
        r = p.pose(IMG)
    assert len(r.persons) == 2 and r.persons[0].box == (0, 0, 30, 60)
    doc = r.to_dict()
    validate_sidecar(doc)
    k = doc["result"]["persons"][0]["keypoints"]
    assert [x["joint"] for x in k] == list(prompts.MPII_JOINTS)
    assert k[2] == {"joint": "right_hip", "x": 4, "y": 2, "v": 2, "visible": True}
    assert k[3]["visible"] is False and k[15] == {"joint": "left_wrist", "x": None, "y": None,
                                                  "v": None, "visible": False}
    assert r.keypoints().shape == (2, 16, 3) and np.isnan(r.keypoints()[0, 15]).all()
    files = r.save(tmp_path / "p", "img")
    coco = json.loads((tmp_path / "p" / "img.coco.json").read_text())
    a = coco["annotations"][0]
    assert a["keypoints"][6:9] == [4, 2, 2] and a["keypoints"][9:12] == [6, 3, 1]
    assert a["keypoints"][45:] == [0, 0, 0] and a["num_keypoints"] == 15
    assert coco["annotations"][1]["bbox"] == [90, 60, 0, 0]   # no box: the keypoints' extent
    assert (tmp_path / "p" / "img.pose.png").is_file() and len(files) == 4


def test_box_pictures_are_banded_exactly(monkeypatch):
    """Boxes, labels and skeletons drawn band by band equal the picture drawn whole."""
    import io

    from densert.runtime import writers
    from densert.tasks.grounding import PersonPose
    img = np.random.default_rng(2).integers(0, 256, (97, 131, 3), np.uint8)
    boxes = [((5, 20, 100, 90), "a long label", (255, 0, 0)), ((60, 0, 130, 40), "b", (0, 255, 0))]
    pose = [PersonPose((10, 10, 80, 95), [(10 + 4 * i, 15 + 5 * i, i % 3) for i in range(16)])]

    def draw(fn, arg):
        b = io.BytesIO()
        fn(b, img, arg)
        return np.asarray(Image.open(io.BytesIO(b.getvalue())))
    whole = [draw(writers.write_boxes_png, boxes), draw(writers.write_pose_png, pose)]
    monkeypatch.setattr(writers, "BAND_PIXELS", 7 * 131)
    banded = [draw(writers.write_boxes_png, boxes), draw(writers.write_pose_png, pose)]
    for w, b in zip(whole, banded):
        assert np.array_equal(w, b) and not np.array_equal(w, img)


def test_every_task_has_a_command_outputs_and_a_schema_entry():
    """The task names of densert.tasks are the runtime's commands, output tables and sidecar
    task names, all of them (tests/test_registry.py: all of these come from one registry)."""
    from densert.cli import COMMANDS
    from densert.runtime.cli import DENSE_FLAGS, OUTPUT_FLAGS
    from densert.runtime.options import FORMATS
    from densert.runtime.results import sidecar_schema
    from densert.tasks import TASKS
    assert set(FORMATS) == set(TASKS) and set(DENSE_FLAGS) == set(OUTPUT_FLAGS) == {*TASKS, "dense"}
    assert sidecar_schema()["properties"]["task"]["enum"] == list(TASKS)
    assert all(COMMANDS[t][0] == "densert.runtime.cli" for t in TASKS)
