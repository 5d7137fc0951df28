"""Special-token strings of Youtu-VL / DenseMLLM (the one place they are spelled) and ``Vocab``.

Strings follow spec ``youtu-vl-checkpoint.md`` sec. 6-9 and ``densemllm-method.md`` sec. 2. Ids are
never hard-coded here: they are read from the checkpoint's ``tokenizer.json`` through ``Vocab``,
because the released ids of the tag and depth-bin tokens are unknown (spec sec. 6, 11).
Torch-free at import: the CLI reads these strings to declare its options.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from densert.errors import TokenizerError

if TYPE_CHECKING:
    import torch

BOS = "<|begin_of_text|>"     # also opens every role block of the chat template
EOS = "<|end_of_text|>"       # eos and pad; closes every message
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

REF, REF_END = "<ref>", "</ref>"
MASK, MASK_END = "<mask>", "</mask>"
BOX, BOX_END = "<box>", "</box>"
INS, INS_END = "<ins>", "</ins>"
POLY, POLY_END = "<poly>", "</poly>"
PERSON, PERSON_END = "<person>", "</person>"
KPT, KPT_END = "<kpt>", "</kpt>"
FG, BG, OTHERS = "<FG>", "<BG>", "<OTHERS>"
DEPTH = "<depth>"
# Keypoint visibility flags of the pose output (spec sec. 7); the values 0..2 are our assumption.
N_VISIBILITY = 3

N_COORDS = 2048          # <x_0>..<x_2047>, <y_0>..<y_2047>
N_DEPTH_BINS = 1000      # <custom_1>..<custom_1000>; bin 0 = invalid depth has no token

# Tag tokens in the order our tokenizer builder assigns them ids.
TAG_TOKENS: tuple[str, ...] = (
    REF, REF_END, MASK, MASK_END, BOX, BOX_END, INS, INS_END, POLY, POLY_END,
    PERSON, PERSON_END, KPT, KPT_END, FG, BG, OTHERS, DEPTH,
)
CONTROL_TOKENS: tuple[str, ...] = (BOS, EOS, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)


def x_token(k: int) -> str:
    _check_range("x coordinate", k, 0, N_COORDS - 1)
    return f"<x_{k}>"


def y_token(k: int) -> str:
    _check_range("y coordinate", k, 0, N_COORDS - 1)
    return f"<y_{k}>"


def custom_token(k: int) -> str:
    """Depth bin k (1-based, as in the paper): ``<custom_k>``."""
    _check_range("depth bin", k, 1, N_DEPTH_BINS)
    return f"<custom_{k}>"


def visibility_token(k: int) -> str:
    _check_range("keypoint visibility", k, 0, N_VISIBILITY - 1)
    return f"<v_{k}>"


def _check_range(what: str, k: int, lo: int, hi: int) -> None:
    if not isinstance(k, int) or not lo <= k <= hi:
        raise ValueError(f"{what} {k!r} out of range {lo}..{hi}")


class Vocab:
    """A checkpoint's ``tokenizer.json`` plus the id look-ups the runtime needs.

    ``encode`` never adds a bos: the chat template writes every ``<|begin_of_text|>`` itself.
    """

    def __init__(self, tokenizer, source: str = "<memory>"):
        self.tok = tokenizer
        self.source = source

    @classmethod
    def from_file(cls, path: str | Path) -> "Vocab":
        from tokenizers import Tokenizer
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: no such file (a checkpoint needs tokenizer.json)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: not a valid tokenizers JSON file ({e})") from None
        return cls(tok, str(path))

    @classmethod
    def from_str(cls, text: str, source: str = "<memory>") -> "Vocab":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_str(text), source)

    # ---- basic ----
    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "reshape"):  # a tensor or array of ids
            ids = ids.reshape(-1).tolist()
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary of {self.source}")
        return i

    def id_to_token(self, i: int) -> str:
        s = self.tok.id_to_token(int(i))
        if s is None:
            raise TokenizerError(f"id {i} is not in the vocabulary of {self.source} (size {len(self)})")
        return s

    # ---- named ids ----
    @property
    def bos_id(self) -> int:
        return self.token_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS)

    @property
    def image_pad_id(self) -> int:
        return self.token_id(IMAGE_PAD)

    def depth_bin_ids(self) -> "torch.Tensor":
        """LongTensor[1000]: entry k-1 is the id of ``<custom_k>``."""
        import torch
        return torch.tensor([self.token_id(custom_token(k)) for k in range(1, N_DEPTH_BINS + 1)],
                            dtype=torch.long)

    @cached_property
    def _coord_table(self) -> dict[int, tuple[str, int]]:
        table = {}
        for axis, fn in (("x", x_token), ("y", y_token)):
            for k in range(N_COORDS):
                i = self.tok.token_to_id(fn(k))
                if i is not None:
                    table[i] = (axis, k)
        return table

    def coord_value(self, token_id: int) -> tuple[str, int] | None:
        """``("x", k)`` / ``("y", k)`` for a coordinate token id, None for any other id."""
        return self._coord_table.get(int(token_id))

    def special_ids(self) -> dict[str, int]:
        """Every densert-known special/tag token present in this vocabulary (string -> id)."""
        out = {}
        for s in CONTROL_TOKENS + TAG_TOKENS:
            i = self.tok.token_to_id(s)
            if i is not None:
                out[s] = i
        return out
