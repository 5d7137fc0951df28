"""Dense-prediction scores with the standard definitions (method spec sec. 5).

* mIoU: per-class intersection and union **accumulated over the whole evaluation set**, then the
  mean over classes whose union is non-zero (classes absent from both prediction and ground truth
  are skipped); the ignore label is excluded from both.
* Depth: per image over valid pixels (gt > 0 and finite), delta1 = share with
  max(pred/gt, gt/pred) < 1.25, AbsRel = mean |pred - gt| / gt, RMSE; the set score is the mean
  over images (the NYUv2 convention). Predictions are clamped to a small positive floor so a zero
  prediction counts as a miss rather than a division by zero.
* cIoU (referring): total intersection / total union over the split.
"""
from __future__ import annotations

import numpy as np


class SegmentationMeter:
    def __init__(self, num_classes: int, ignore_label: int = 255):
        self.num_classes = num_classes
        self.ignore = ignore_label
        self.inter = np.zeros(num_classes, dtype=np.int64)
        self.union = np.zeros(num_classes, dtype=np.int64)

    def update(self, pred, gt) -> None:
        pred, gt = np.asarray(pred).reshape(-1), np.asarray(gt).reshape(-1)
        ok = (gt != self.ignore) & (gt >= 0) & (gt < self.num_classes)
        p, g = pred[ok].astype(np.int64), gt[ok].astype(np.int64)
        n = self.num_classes
        p = np.where((p >= 0) & (p < n), p, n)  # out-of-range predictions: a miss for every class
        conf = np.bincount(g * (n + 1) + p, minlength=n * (n + 1)).reshape(n, n + 1)
        tp = np.diag(conf[:, :n])
        self.inter += tp
        self.union += conf.sum(1) + conf[:, :n].sum(0) - tp

    def per_class_iou(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.union > 0, self.inter / np.maximum(self.union, 1), np.nan)

    def miou(self) -> float:
        iou = self.per_class_iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def depth_errors(pred, gt, min_pred: float = 1e-3) -> dict[str, float] | None:
    """One image; None when it has no valid pixel."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1)
    ok = np.isfinite(gt) & (gt > 0)
    if not ok.any():
        return None
    p, g = np.maximum(pred[ok], min_pred), gt[ok]
    ratio = np.maximum(p / g, g / p)
    return {"delta1": float((ratio < 1.25).mean()), "delta2": float((ratio < 1.25**2).mean()),
            "abs_rel": float((np.abs(p - g) / g).mean()), "rmse": float(np.sqrt(((p - g) ** 2).mean()))}


class DepthMeter:
    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def update(self, pred, gt) -> None:
        e = depth_errors(pred, gt)
        if e is not None:
            self.rows.append(e)

    def result(self) -> dict[str, float]:
        if not self.rows:
            return {"delta1": float("nan"), "delta2": float("nan"), "abs_rel": float("nan"),
                    "rmse": float("nan"), "images": 0}
        out = {k: float(np.mean([r[k] for r in self.rows])) for k in self.rows[0]}
        out["images"] = len(self.rows)
        return out


class CIoUMeter:
    def __init__(self):
        self.inter = 0
        self.union = 0

    def update(self, pred, gt) -> None:
        p, g = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
        self.inter += int((p & g).sum())
        self.union += int((p | g).sum())

    def ciou(self) -> float:
        return self.inter / self.union if self.union else float("nan")
