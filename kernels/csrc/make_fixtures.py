"""Write .bin fixtures for the C++/CUDA tail test from densert.kernels.dense_head.

Expected labels are the argmax of ``upsample_unfused``, the rounding contract of every fused tail
(each multiply and add separately rounded in fp32), so the native tails must match on every
pixel, ties included: the ``near-tie`` cases make channels differ by an ulp or two, where an FMA
or a different association would flip labels.

Layout per case (little-endian): int32 gh, gw, K, H, W; fp32 scores [gh*gw*K]; fp32 lut [K];
int64 labels [H*W]; fp32 depth [H*W]; uint8 checked [H*W] (all 1: every pixel is compared).
"""
import sys
from pathlib import Path

import numpy as np
import torch

from densert.kernels.dense_head import dense_scores, upsample_unfused

# (gh, gw, H, W, K, near_tie)
CASES = [(3, 5, 7, 11, 2, False), (1, 1, 4, 6, 3, False), (7, 9, 50, 33, 100, False),
         (6, 5, 3, 2, 7, False), (4, 3, 9, 10, 1000, False), (15, 20, 480, 640, 150, False),
         (5, 6, 37, 41, 2, True), (8, 7, 61, 53, 3, True)]


def scores_for(n: int, gh: int, gw: int, K: int, near_tie: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + n)
    if near_tie:
        base = torch.randn(gh * gw, 1, generator=g)
        ulps = torch.randint(-2, 3, (gh * gw, K), generator=g).float()
        return (base * (1 + ulps * 2.0 ** -23)).contiguous()
    h, w = torch.randn(gh * gw, 16, generator=g), torch.randn(K, 16, generator=g)
    return dense_scores(h, w)


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for n, (gh, gw, H, W, K, near_tie) in enumerate(CASES):
        s = scores_for(n, gh, gw, K, near_tie)
        lut = torch.linspace(0.5, 100.0, K)
        labels = upsample_unfused(s, gh, gw, H, W).argmax(0)
        depth = lut[labels]
        with open(out / f"case{n}.bin", "wb") as f:
            f.write(np.array([gh, gw, K, H, W], dtype="<i4").tobytes())
            f.write(s.numpy().astype("<f4").tobytes())
            f.write(lut.numpy().astype("<f4").tobytes())
            f.write(labels.numpy().astype("<i8").tobytes())
            f.write(depth.numpy().astype("<f4").tobytes())
            f.write(np.ones(H * W, dtype=np.uint8).tobytes())
    print(len(CASES))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
