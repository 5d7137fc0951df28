"""Build ``tokenizer.json`` for test and small models: a byte-level BPE trained in code.

Two layouts:

``tiny``         the trained base vocabulary (ids 0..n-1), then every special token, contiguous.
``youtu-vl-4b``  vocab_size 283386 with the verified ids of spec ``youtu-vl-checkpoint.md`` sec. 6:
                 bos 128000, eos 128001, vision_start..video_pad 128262..128265,
                 ``<x_k>`` = 278267 + 2k, ``<y_k>`` = 278268 + 2k.
                 OUR CHOICE (the real ids are unknown, spec sec. 11): the tag tokens (``<ref>`` ...),
                 ``<v_0..2>`` and ``<custom_1..1000>`` sit in 282363..283385 in ``TAG_TOKENS`` order.
                 Every other id is a placeholder string that text never encodes to.

Every token is in the BPE model vocabulary at its final id, and the special ones are also listed in
``added_tokens`` (so text containing them splits on them). The ``tokenizers`` loader assigns
added-token ids from the model vocabulary when the string is there, which is what pins the ids.
Output is deterministic: the trainer is deterministic for a fixed corpus (checked in tests) and
the JSON is written with a fixed key order.
"""
from __future__ import annotations

import json

from densert.model.config import MODEL_SIZES, YoutuVLConfig

from . import tokens

YOUTU_VOCAB_SIZE = 283386
YOUTU_IDS = {tokens.BOS: 128000, tokens.EOS: 128001, tokens.VISION_START: 128262, tokens.VISION_END: 128263,
             tokens.IMAGE_PAD: 128264, tokens.VIDEO_PAD: 128265}
YOUTU_COORD_BASE = 278267      # <x_k> = base + 2k, <y_k> = base + 2k + 1 (spec sec. 6, ncnn)
YOUTU_TAG_BASE = 282363        # ours: first id after <y_2047>
YOUTU_CODEBOOK = (128266, 278266)  # visual codebook ids [start, stop) (spec sec. 6, [I])

BASE_VOCAB_SIZE = 1536
# GPT-4o style word pattern with single-digit numbers (spec sec. 6 describes the released one;
# the CJK pre-split is omitted because our corpus is English).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CLASS_NAMES = (
    "floor", "wall", "ceiling", "sky", "ground", "road", "grass", "table", "chair", "sofa", "bed",
    "lamp", "box", "ball", "tree", "car", "person", "plant", "cabinet", "door", "window", "shelf",
    "cylinder", "sphere", "cube", "cone", "torus", "pillar", "stairs", "rug", "curtain", "mirror",
    "painting", "desk", "computer", "monitor", "keyboard", "book", "bottle", "cup", "vase", "sink",
    "toilet", "bathtub", "counter", "refrigerator", "oven", "television", "fence", "building",
    "mountain", "water", "sand", "snow", "rock", "bush", "flower", "sidewalk", "bicycle", "truck",
    "bus", "train", "boat", "airplane", "traffic light", "street sign", "pole", "bench", "cat",
    "dog", "bird", "horse", "background", "foreground", "pillow", "blanket", "clock", "light",
)
WORDS = (
    "the a an of and or to in on at for with from by is are was were be been it this that these "
    "those there here what which who how why where when can could would should will may might do "
    "does did not no yes all any each every some many more most other such only own same so than "
    "too very just image picture photo scene object objects class classes category categories "
    "segment segmentation depth estimate map mask box boxes detect detection point points target "
    "core left right top bottom front back near far large small big tiny red green blue yellow "
    "white black gray brown orange purple pink color colour shape room kitchen bedroom office "
    "street outdoor indoor dataset metre metres meter meters distance camera focal length pixel "
    "pixels please describe answer question help helpful assistant user system you your I me my "
    "we our they their he she his her one two three four five six seven eight nine ten hundred "
    "thousand first second third next last new old good bad high low long short wide narrow"
).split()
def _prompts(a: str, b: str, c: str, d: str, n: int) -> list[str]:
    """The task prompts (from their one definition) and a few chat lines, filled with names."""
    from densert.tasks import prompts
    from densert.tasks.depth_bins import PRESETS

    from .chat import DEFAULT_SYSTEM_PROMPT
    return [DEFAULT_SYSTEM_PROMPT, prompts.semantic([a, b, c]).text,
            prompts.semantic([a, b], background=True).text, prompts.open_set().text, prompts.core_target().text,
            *(prompts.depth(k).text for k in PRESETS), prompts.referring(f"the {a} next to the {b}").text,
            prompts.detect_categories([a, b, c]).text, "Describe this image.",
            f"What is on the {a}? There is a {b} on the {a} and a {c} near the {d}.",
            f"How far is the {a} from the camera? About {n} metres."]


def training_corpus() -> list[str]:
    """A small deterministic corpus: prompts filled with class names, words and numbers."""
    names = CLASS_NAMES
    out: list[str] = []
    for i in range(len(names)):
        a, b, c, d = (names[(i * k + j) % len(names)] for k, j in ((1, 0), (3, 1), (7, 2), (11, 3)))
        out += _prompts(a, b, c, d, i * 7 % 100)
        out.append(" ".join(names[i:] + names[:i]))
        out.append(", ".join(n.capitalize() for n in names[i::5]))
    for i in range(0, len(WORDS), 12):
        out.append(" ".join(WORDS[i:i + 12]).capitalize() + ".")
    out += [" ".join(WORDS[i::7]) for i in range(7)] * 4
    out += [f"{i} {i * 13 % 997}.{i % 10} ({i},{i * 3})" for i in range(200)]
    return out


def _train_base() -> dict:
    """Train the BPE and return its JSON dict (vocab ids 0..n-1, merges)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer)
    return json.loads(tok.to_str())


def _added(content: str, i: int, special: bool) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def _special_layout(layout: str, n_base: int) -> tuple[dict[str, int], set[str], int]:
    """(token -> id for every non-base token, the added-token set, vocab_size)."""
    coords = [t for k in range(tokens.N_COORDS) for t in (tokens.x_token(k), tokens.y_token(k))]
    tags = list(tokens.TAG_TOKENS) + [tokens.visibility_token(k) for k in range(tokens.N_VISIBILITY)]
    customs = [tokens.custom_token(k) for k in range(1, tokens.N_DEPTH_BINS + 1)]
    added = set(tokens.CONTROL_TOKENS) | set(coords) | set(tags) | set(customs)
    if layout == "tiny":
        ordered = list(tokens.CONTROL_TOKENS) + tags + coords + customs
        return {s: n_base + j for j, s in enumerate(ordered)}, added, n_base + len(ordered)
    if layout != "youtu-vl-4b":
        raise ValueError(f"unknown tokenizer layout {layout!r}; expected one of {MODEL_SIZES}")
    ids = dict(YOUTU_IDS)
    ids.update({s: YOUTU_COORD_BASE + j for j, s in enumerate(coords)})
    ids.update({s: YOUTU_TAG_BASE + j for j, s in enumerate(tags + customs)})
    assert max(ids.values()) < YOUTU_VOCAB_SIZE
    taken = set(ids.values())
    # Placeholders keep the id space dense (HF tokenizers need contiguous ids) but are unreachable:
    # the split pattern never yields a whole "<|...|>" piece, so BPE never emits them.
    for i in range(n_base, YOUTU_VOCAB_SIZE):
        if i in taken:
            continue
        if YOUTU_CODEBOOK[0] <= i < YOUTU_CODEBOOK[1]:
            ids[f"<|visual_{i - YOUTU_CODEBOOK[0]}|>"] = i
        elif 128000 <= i < 128262:
            ids[f"<|reserved_special_token_{i - 128000}|>"] = i
        else:
            ids[f"<|unused_{i}|>"] = i
    return ids, added, YOUTU_VOCAB_SIZE


_CACHE: dict[str, str] = {}


def build_tokenizer_json(layout: str = "tiny") -> str:
    """The tokenizer.json text for ``layout`` (deterministic; cached per process)."""
    if layout in _CACHE:
        return _CACHE[layout]
    d = _train_base()
    vocab: dict[str, int] = d["model"]["vocab"]
    n_base = len(vocab)
    if sorted(vocab.values()) != list(range(n_base)):
        raise RuntimeError("trained BPE vocabulary ids are not contiguous")
    extra, added, size = _special_layout(layout, n_base)
    clash = set(extra) & set(vocab)
    if clash:
        raise RuntimeError(f"special tokens collide with trained tokens: {sorted(clash)[:5]}")
    vocab = dict(vocab)
    vocab.update(extra)
    d["model"]["vocab"] = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    specials = set(tokens.CONTROL_TOKENS)
    d["added_tokens"] = [_added(s, extra[s], s in specials)
                         for s in sorted(added, key=lambda s: extra[s])]
    text = json.dumps(d, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n"
    _verify(text, extra, size)
    _CACHE[layout] = text
    return text


def _verify(text: str, ids: dict[str, int], size: int) -> None:
    """Load what we wrote and check the loader kept every pinned id (it would renumber silently)."""
    v = tokens.Vocab.from_str(text, "<built tokenizer.json>")
    if len(v) != size:
        raise RuntimeError(f"built tokenizer has {len(v)} ids, expected {size}")
    samples = (tokens.x_token(0), tokens.y_token(2047), tokens.custom_token(1000))
    for s in tokens.CONTROL_TOKENS + tokens.TAG_TOKENS + samples:
        if v.token_id(s) != ids[s]:
            raise RuntimeError(f"{s} got id {v.token_id(s)}, expected {ids[s]}")


def apply_token_ids(cfg: YoutuVLConfig, vocab: tokens.Vocab) -> YoutuVLConfig:
    """Set the config's token ids and vocab_size from the tokenizer (in place; returns cfg)."""
    cfg.vocab_size = len(vocab)
    cfg.bos_token_id = vocab.token_id(tokens.BOS)
    cfg.eos_token_id = vocab.token_id(tokens.EOS)
    cfg.pad_token_id = vocab.token_id(tokens.EOS)
    cfg.image_token_id = vocab.token_id(tokens.IMAGE_PAD)
    cfg.video_token_id = vocab.token_id(tokens.VIDEO_PAD)
    cfg.vision_start_token_id = vocab.token_id(tokens.VISION_START)
    cfg.vision_end_token_id = vocab.token_id(tokens.VISION_END)
    return cfg
