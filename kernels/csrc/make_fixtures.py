"""Write .bin fixtures for the C++ tail test from the torch path of densert.kernels.dense_head.

Layout per case (little-endian): int32 gh, gw, K, H, W; fp32 scores [gh*gw*K]; fp32 lut [K];
int64 labels [H*W]; fp32 depth [H*W]; uint8 checked [H*W] (pixels whose top-2 margin exceeds
1e-5 relative: elsewhere fp association may legitimately flip the label).
"""
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from densert.kernels.dense_head import dense_head, dense_scores

CASES = [(3, 5, 7, 11, 2), (1, 1, 4, 6, 3), (7, 9, 50, 33, 100), (6, 5, 3, 2, 7),
         (4, 3, 9, 10, 1000), (15, 20, 480, 640, 150)]


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for n, (gh, gw, H, W, K) in enumerate(CASES):
        g = torch.Generator().manual_seed(100 + n)
        h, w = torch.randn(gh * gw, 16, generator=g), torch.randn(K, 16, generator=g)
        lut = torch.linspace(0.5, 100.0, K)
        s = dense_scores(h, w)
        labels = dense_head(h, w, (gh, gw), (H, W), "argmax")
        depth = dense_head(h, w, (gh, gw), (H, W), "depth", depth_values=lut)
        up = F.interpolate(s.t().reshape(1, K, gh, gw), size=(H, W), mode="bilinear",
                           align_corners=False)[0]
        t2 = torch.topk(up, 2, dim=0).values
        checked = (t2[0] - t2[1]) > 1e-5 * up.abs().amax(0).clamp(min=1e-30)
        with open(out / f"case{n}.bin", "wb") as f:
            f.write(np.array([gh, gw, K, H, W], dtype="<i4").tobytes())
            f.write(s.numpy().astype("<f4").tobytes())
            f.write(lut.numpy().astype("<f4").tobytes())
            f.write(labels.numpy().astype("<i8").tobytes())
            f.write(depth.numpy().astype("<f4").tobytes())
            f.write(checked.numpy().astype(np.uint8).tobytes())
    print(len(CASES))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
