"""Every vision loss against a straightforward float64 per-token loop (loss and gradients), masks."""
import math

import pytest
import torch

from densert.training import losses as Lo

L, D, V, P = 7, 5, 23, 4


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(L, D, generator=g, dtype=torch.float64) * 2
    w = torch.randn(V, D, generator=g, dtype=torch.float64)
    pos = torch.randint(0, V, (L, P), generator=g)
    pos[torch.rand(L, P, generator=g) < 0.4] = -1
    pos[0, :] = -1                      # a token with no labels: ignored by every loss
    pos[1, :] = torch.tensor([3, 3, 5, -1])  # duplicates count once
    tmask = torch.ones(L, dtype=torch.bool)
    tmask[2] = False
    vmask = torch.ones(V, dtype=torch.bool)
    vmask[[5, 11, 17]] = False          # 5 is a positive of token 1: dropped, not a negative
    return h, w, pos, tmask, vmask


def lsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _reference(kind, h, w, pos, tmask, vmask, k=4, ohem_ratio=0.25):
    """Per-token float64 loops over Python scalars: the definitions, with no vectorisation."""
    z = (h @ w.t()).tolist()
    per = {}
    for i in range(L):
        if not tmask[i]:
            continue
        M = [v for v in range(V) if vmask[v]]
        Pi = sorted({int(v) for v in pos[i] if v >= 0 and vmask[int(v)]})
        if not Pi:
            continue
        C = [v for v in M if v not in Pi]
        zi = z[i]
        lp = [-lsig(zi[v]) for v in Pi]              # -log p
        ln = {v: -lsig(-zi[v]) for v in C}          # -log(1-p)
        if kind == "ntpm":
            top = sorted(C, key=lambda v: (-zi[v], v))[:k]
            per[i] = sum(lp) / len(Pi) + sum(ln[v] for v in top) / k
        elif kind in ("indep", "ohem"):
            per[i] = sum(lp) / len(Pi) + sum(ln.values()) / len(C)
        elif kind == "bce":
            per[i] = (sum(lp) + sum(ln.values())) / len(M)
        elif kind == "balanced":
            b = len(C) / len(M)
            per[i] = (b * sum(lp) + (1 - b) * sum(ln.values())) / len(M)
        elif kind == "focal":
            s = 0.0
            for v in M:
                p = 1 / (1 + math.exp(-zi[v]))
                if v in Pi:
                    s += 0.25 * (1 - p) ** 2 * -math.log(p)
                else:
                    s += 0.75 * p ** 2 * -math.log(1 - p)
            per[i] = s / len(Pi)
        elif kind == "softmax":
            mx = max(zi[v] for v in M)
            lse = mx + math.log(sum(math.exp(zi[v] - mx) for v in M))
            per[i] = -sum((zi[v] - lse) / len(Pi) for v in Pi)
    if kind == "ohem":
        n = len(per)
        keep = max(1, int(round(ohem_ratio * n)))
        kept = sorted(per, key=lambda i: -per[i])[:keep]
        return sum(per[i] for i in kept) * n / keep
    return sum(per.values())


def _reference_torch(kind, h, w, pos, tmask, vmask, **kw):
    """The same definitions with autograd in float64 (for the gradient check), via the loop's
    scalar structure replicated on tensors, so gradients are those of the definition."""
    z = h @ w.t()
    per = []
    for i in range(L):
        if not tmask[i]:
            continue
        M = [v for v in range(V) if vmask[v]]
        Pi = sorted({int(v) for v in pos[i] if v >= 0 and vmask[int(v)]})
        if not Pi:
            continue
        C = [v for v in M if v not in Pi]
        zi = z[i]
        lp = -torch.nn.functional.logsigmoid(zi[Pi])
        ln = -torch.nn.functional.logsigmoid(-zi[C])
        if kind == "ntpm":
            top = sorted(C, key=lambda v: (-float(zi[v]), v))[:kw.get("k", 4)]
            t = lp.mean() + (-torch.nn.functional.logsigmoid(-zi[top])).sum() / kw.get("k", 4)
        elif kind in ("indep", "ohem"):
            t = lp.mean() + ln.mean()
        elif kind == "bce":
            t = (lp.sum() + ln.sum()) / len(M)
        elif kind == "balanced":
            b = len(C) / len(M)
            t = (b * lp.sum() + (1 - b) * ln.sum()) / len(M)
        elif kind == "focal":
            pp, pn = torch.sigmoid(zi[Pi]), torch.sigmoid(zi[C])
            t = ((0.25 * (1 - pp) ** 2 * lp).sum() + (0.75 * pn ** 2 * ln).sum()) / len(Pi)
        elif kind == "softmax":
            logp = torch.log_softmax(zi[M], 0)
            t = -sum(logp[M.index(v)] for v in Pi) / len(Pi)
        per.append(t)
    if kind == "ohem":
        vals = torch.stack(per)
        n = len(per)
        keep = max(1, int(round(0.25 * n)))
        idx = torch.argsort(vals.detach(), descending=True)[:keep]
        return vals[idx].sum() * n / keep
    return torch.stack(per).sum()


@pytest.mark.parametrize("kind", Lo.LOSSES)
def test_loss_and_grad_match_float64_reference(kind):
    h, w, pos, tmask, vmask = _case()
    kw = {"k": 4} if kind == "ntpm" else {}
    want = _reference(kind, h, w, pos, tmask, vmask, k=4)
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = Lo.vision_loss(kind, hg, wg, pos, tmask, vmask, **kw)
    assert abs(float(got.detach()) - want) < 1e-9 * max(1.0, abs(want)), (kind, float(got.detach()), want)
    got.backward()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    _reference_torch(kind, hr, wr, pos, tmask, vmask, k=4).backward()
    torch.testing.assert_close(hg.grad, hr.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(wg.grad, wr.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", Lo.LOSSES)
def test_float32_close_to_float64(kind):
    h, w, pos, tmask, vmask = _case(1)
    want = Lo.vision_loss(kind, h, w, pos, tmask, vmask, k=4)
    got = Lo.vision_loss(kind, h.float(), w.float(), pos, tmask, vmask, k=4)
    assert abs(float(got) - float(want)) < 1e-4 * max(1.0, abs(float(want)))


@pytest.mark.parametrize("kind", Lo.LOSSES)
def test_ignored_tokens_and_ids_carry_no_gradient(kind):
    h, w, pos, tmask, vmask = _case(2)
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    Lo.vision_loss(kind, hg, wg, pos, tmask, vmask, k=4).backward()
    assert float(hg.grad[0].abs().sum()) == 0.0    # no labels
    assert float(hg.grad[2].abs().sum()) == 0.0    # token_mask False
    assert float(wg.grad[~vmask].abs().sum()) == 0.0  # ids outside the validity set


def test_ntpm_ignores_far_negatives_unlike_indep():
    # Only the k highest-scoring negatives move under NTP-M; independent means move all of them.
    h, w, pos, tmask, vmask = _case(3)
    wg = w.clone().requires_grad_()
    Lo.vision_loss("ntpm", h, wg, pos, None, None, k=2).backward()
    touched = (wg.grad.abs().sum(1) > 0).sum()
    wi = w.clone().requires_grad_()
    Lo.vision_loss("indep", h, wi, pos, None, None).backward()
    assert int(touched) < int((wi.grad.abs().sum(1) > 0).sum()) == V


def test_label_space_mapping():
    ls = Lo.LabelSpace(class_ids=[[10, 11], [12], [11, 13]], depth_ids=[-1, 100, 101, 102],
                       fg_id=7, bg_id=8)
    cls = torch.tensor([[0, 2, -1], [1, -1, -1], [-1, -1, -1]])
    got = ls.class_positives(cls)
    rows = [sorted(int(v) for v in r if v >= 0) for r in got]
    assert rows == [[10, 11, 13], [12], []]         # 11 shared by classes 0 and 2: once
    d = ls.depth_positives(torch.tensor([[1, 3, 0], [2, -1, -1]]))
    assert [sorted(int(v) for v in r if v >= 0) for r in d] == [[100, 102], [101]]
    f = ls.fgbg_positives(torch.tensor([[0, 1], [1, -1]]))
    assert [sorted(int(v) for v in r if v >= 0) for r in f] == [[7, 8], [7]]
    m = ls.family_mask("class", 20)
    assert m.nonzero().flatten().tolist() == [10, 11, 12, 13]


def test_bf16_autocast_still_runs_losses_in_fp32():
    h, w, pos, tmask, vmask = _case(4)
    want = Lo.vision_loss("indep", h.float(), w.float(), pos, tmask, vmask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = Lo.vision_loss("indep", h.float(), w.float(), pos, tmask, vmask)
    assert got.dtype == torch.float32
    assert abs(float(got) - float(want)) < 1e-5 * abs(float(want))
