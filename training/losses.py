"""Vision-token losses: NTP-M (the paper's, sec. 3.2) and the ablation baselines it is measured against.

Every loss here has the same shape contract, so the trainer and the ablation can swap them:

    loss(hidden [L, d], weight [V, d], positives [L, P] (vocab ids, -1 = padding),
         token_mask [L] bool | None, vocab_mask [V] bool | None, ...) -> scalar

and returns the **sum over valid tokens of a per-token loss** (the trainer divides by the number of
valid tokens). A token is valid when ``token_mask`` allows it *and* it has at least one positive:
a token whose labels are all ignored (depth 0, void class) carries no signal in any of the losses
below, and for the means-based losses its per-token loss would be undefined. ``vocab_mask`` is the
validity set M of the paper: ids outside it are neither positives nor negatives (a segmentation
sample says nothing about depth-bin ids, and vice versa).

Per token, with P the positives in M, C = M \\ P the candidate negatives, p = sigmoid(z):

=========  ==================================================================================
ntpm       -(1/|P|) sum_P log p - (1/k) sum_{top-k of C by p} log(1-p)        (eq. 5; kernel)
indep      -(1/|P|) sum_P log p - (1/|C|) sum_C log(1-p)       (independent means, no sampling)
bce        (1/|M|) sum_M BCE(z, y)                                   (plain BCE, mean over vocab)
balanced   (1/|M|) [ -b sum_P log p - (1-b) sum_C log(1-p) ],  b = |C|/|M|      (HED-style)
focal      (1/|P|) sum_M FL(z, y),  alpha 0.25, gamma 2                       (RetinaNet-style)
ohem       the ``indep`` per-token loss, kept only on the hardest ``ohem_ratio`` of valid tokens
           (hard examples along the *spatial* axis, which the paper contrasts with NTP-M's
           vocabulary-axis sampling), rescaled by n_valid / n_kept
softmax    -sum_v q_v log softmax_M(z)_v, q uniform over the ids of ONE label per token (the
           single-label NTP baseline; ``positives`` then holds the ids of that one label)
=========  ==================================================================================

NTP-M is the only one whose memory matters at a real vocabulary (283k ids); it runs through
``densert.kernels.ntpm.ntpm_loss`` (chunked over the vocabulary, exact sparse backward) and is not
reimplemented here. The baselines materialise the [L, V] logits, which is fine at the ablation's
scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .config import LOSSES


def _valid_tokens(positives: torch.Tensor, token_mask: torch.Tensor | None,
                  vocab_mask: torch.Tensor | None) -> torch.Tensor:
    pos_ok = positives >= 0
    if vocab_mask is not None:
        pos_ok = pos_ok & vocab_mask[positives.clamp(min=0)]
    ok = pos_ok.any(dim=1)
    if token_mask is not None:
        ok = ok & token_mask.to(torch.bool)
    return ok


def multi_hot(positives: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[L, P] ids (-1 pad) -> [L, V] bool."""
    y = torch.zeros(positives.shape[0], vocab_size + 1, dtype=torch.bool, device=positives.device)
    idx = torch.where(positives >= 0, positives, torch.full_like(positives, vocab_size))
    y.scatter_(1, idx, True)
    return y[:, :vocab_size]


def _dense(hidden, weight, positives, token_mask, vocab_mask):
    """Logits, targets and the (token, id) validity of the valid tokens only."""
    ok = _valid_tokens(positives, token_mask, vocab_mask)
    dt = torch.promote_types(hidden.dtype, torch.float32)
    z = hidden[ok].to(dt) @ weight.to(dt).t()
    y = multi_hot(positives[ok], weight.shape[0])
    m = torch.ones_like(y) if vocab_mask is None else vocab_mask.to(torch.bool)[None].expand_as(y)
    return z, y & m, m


# Vocabulary ids per streamed chunk of NTP-M logits (training.memory counts its working set).
NTPM_CHUNK = 8192


def ntpm(hidden, weight, positives, token_mask=None, vocab_mask=None, k: int = 32,
         chunk_size: int = NTPM_CHUNK) -> torch.Tensor:
    from densert.kernels.ntpm import ntpm_loss
    ok = _valid_tokens(positives, token_mask, vocab_mask)
    return ntpm_loss(hidden, weight, positives, k=k, token_mask=ok, vocab_mask=vocab_mask,
                     chunk_size=chunk_size, reduction="sum")


def _pos_neg_sums(z, y, m):
    """Per-token sums of -log p over positives and -log(1-p) over candidate negatives, and counts."""
    neg = m & ~y
    # -log sigmoid(z) = softplus(-z); -log(1 - sigmoid(z)) = softplus(z): stable at any |z|.
    lp = torch.where(y, F.softplus(-z), z.new_zeros(()))
    ln = torch.where(neg, F.softplus(z), z.new_zeros(()))
    return lp.sum(1), ln.sum(1), y.sum(1), neg.sum(1)


def _indep_per_token(z, y, m):
    sp, sn, npos, nneg = _pos_neg_sums(z, y, m)
    return sp / npos.clamp(min=1) + sn / nneg.clamp(min=1)


def indep(hidden, weight, positives, token_mask=None, vocab_mask=None, **_) -> torch.Tensor:
    z, y, m = _dense(hidden, weight, positives, token_mask, vocab_mask)
    return _indep_per_token(z, y, m).sum()


def bce(hidden, weight, positives, token_mask=None, vocab_mask=None, **_) -> torch.Tensor:
    z, y, m = _dense(hidden, weight, positives, token_mask, vocab_mask)
    sp, sn, _, _ = _pos_neg_sums(z, y, m)
    return ((sp + sn) / m.sum(1).clamp(min=1)).sum()


def balanced(hidden, weight, positives, token_mask=None, vocab_mask=None, **_) -> torch.Tensor:
    z, y, m = _dense(hidden, weight, positives, token_mask, vocab_mask)
    sp, sn, npos, nneg = _pos_neg_sums(z, y, m)
    nm = m.sum(1).clamp(min=1).to(z.dtype)
    b = nneg.to(z.dtype) / nm
    return ((b * sp + (1 - b) * sn) / nm).sum()


def focal(hidden, weight, positives, token_mask=None, vocab_mask=None, alpha: float = 0.25,
          gamma: float = 2.0, **_) -> torch.Tensor:
    z, y, m = _dense(hidden, weight, positives, token_mask, vocab_mask)
    p = torch.sigmoid(z)
    pt = torch.where(y, p, 1 - p)
    ce = torch.where(y, F.softplus(-z), F.softplus(z))
    a = torch.where(y, z.new_tensor(alpha), z.new_tensor(1 - alpha))
    fl = torch.where(m, a * (1 - pt).pow(gamma) * ce, z.new_zeros(()))
    return (fl.sum(1) / y.sum(1).clamp(min=1)).sum()


def ohem(hidden, weight, positives, token_mask=None, vocab_mask=None, ohem_ratio: float = 0.25,
         **_) -> torch.Tensor:
    z, y, m = _dense(hidden, weight, positives, token_mask, vocab_mask)
    per = _indep_per_token(z, y, m)
    n = per.shape[0]
    if n == 0:
        return per.sum()
    keep = max(1, int(round(ohem_ratio * n)))
    top = torch.topk(per.detach(), keep).indices
    return per[top].sum() * (n / keep)


def softmax(hidden, weight, positives, token_mask=None, vocab_mask=None, **_) -> torch.Tensor:
    z, y, m = _dense(hidden, weight, positives, token_mask, vocab_mask)
    logp = torch.log_softmax(z.masked_fill(~m, float("-inf")), dim=1)
    q = y.to(z.dtype) / y.sum(1, keepdim=True).clamp(min=1)
    return -(torch.where(y, q * logp, z.new_zeros(()))).sum()


_FNS = {"ntpm": ntpm, "indep": indep, "bce": bce, "balanced": balanced, "focal": focal,
        "ohem": ohem, "softmax": softmax}


def vision_loss(kind: str, hidden, weight, positives, token_mask=None, vocab_mask=None,
                **kw) -> torch.Tensor:
    """Dispatch by name (one of ``LOSSES``); see the module docstring for the definitions."""
    try:
        fn = _FNS[kind]
    except KeyError:
        raise ValueError(f"unknown vision loss {kind!r}; expected one of {LOSSES}") from None
    if kind != "ntpm":
        kw.pop("chunk_size", None)
    if kind not in ("ntpm",):
        kw.pop("k", None)
    # Losses run in fp32 (or fp64 in tests) even inside a bf16 autocast region: log-sigmoid
    # of a bf16 logit loses the small-probability tail that the negative terms live on.
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return fn(hidden, weight, positives, token_mask=token_mask, vocab_mask=vocab_mask, **kw)


# ---------------------------------------------------------------------------------------------
# Targets -> vocabulary ids
# ---------------------------------------------------------------------------------------------
def _dedupe_rows(ids: torch.Tensor) -> torch.Tensor:
    """Rows of ids (-1 pad) with repeats replaced by -1, so |P| counts each id once."""
    if ids.shape[1] == 0:
        return ids
    s, _ = torch.sort(ids, dim=1, descending=True)
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    return torch.where(dup, torch.full_like(s, -1), s)


@dataclass
class LabelSpace:
    """How per-token labels become vocabulary ids.

    ``class_ids[c]``: every sub-word id of class c's name (all are positives where c occurs; the
    runtime averages their logits); ``depth_ids[b]``: the id of ``<custom_b>`` (index 0 unused:
    bin 0 = invalid); ``fg_id`` / ``bg_id``: ``<FG>`` / ``<BG>``; ``class_names[c]``: the name
    whose ids ``class_ids[c]`` are (the prompts spell it).
    """

    class_ids: list[list[int]]
    depth_ids: list[int]
    fg_id: int
    bg_id: int
    class_names: tuple[str, ...] = ()

    def __post_init__(self):
        width = max(len(s) for s in self.class_ids)
        self.class_table = torch.tensor([s + [-1] * (width - len(s)) for s in self.class_ids],
                                        dtype=torch.long)
        self.depth_table = torch.tensor([-1] + list(self.depth_ids[1:]), dtype=torch.long)
        self.fgbg_table = torch.tensor([self.bg_id, self.fg_id], dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    def family_mask(self, family: str, vocab_size: int) -> torch.Tensor:
        """[V] bool: the ids of one label family ("class", "depth", "fgbg")."""
        m = torch.zeros(vocab_size, dtype=torch.bool)
        ids = {"class": self.class_table, "depth": self.depth_table, "fgbg": self.fgbg_table}[family]
        ids = ids[ids >= 0]
        m[ids] = True
        return m

    def _lookup(self, table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        table = table.to(labels.device)
        if table.dim() == 1:
            table = table[:, None]
        ok = (labels >= 0) & (labels < table.shape[0])
        ids = table[labels.clamp(0, table.shape[0] - 1)]            # [L, P, S]
        ids = torch.where(ok[..., None], ids, torch.full_like(ids, -1))
        return _dedupe_rows(ids.reshape(labels.shape[0], -1))

    def class_positives(self, labels: torch.Tensor) -> torch.Tensor:
        """[L, P] class indices (-1 pad) -> [L, P*S] ids (-1 pad)."""
        return self._lookup(self.class_table, labels)

    def depth_positives(self, bins: torch.Tensor) -> torch.Tensor:
        """[L, P] depth bins 1..N (0 or -1 = ignore) -> [L, P] ids."""
        return self._lookup(self.depth_table, bins)

    def fgbg_positives(self, labels: torch.Tensor) -> torch.Tensor:
        """[L, P] 0 = background, 1 = foreground (-1 pad) -> [L, P] ids."""
        return self._lookup(self.fgbg_table, labels)


def pad_cat(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate [Li, Pi] id tables along tokens, padding the label axis with -1."""
    width = max((r.shape[1] for r in rows), default=0)
    return torch.cat([F.pad(r, (0, width - r.shape[1]), value=-1) for r in rows], dim=0)
