#include "dense_tail.h"

#include <limits>
#include <vector>

#include "bilinear.h"

extern "C" int densert_dense_tail_cpu(const float* scores, int gh, int gw, int K, int H, int W,
                                      const float* lut, int64_t* labels, float* depth) {
  if (const int rc = densert_check_tail_args(gh, gw, K, H, W, lut, labels, depth)) return rc;
  std::vector<int> w0(W), w1(W);
  std::vector<float> lw0(W), lw1(W);
  for (int x = 0; x < W; ++x) densert_src_coord(x, gw, W, &w0[x], &w1[x], &lw0[x], &lw1[x]);
  for (int y = 0; y < H; ++y) {
    int h0, h1;
    float lh0, lh1;
    densert_src_coord(y, gh, H, &h0, &h1, &lh0, &lh1);
    for (int x = 0; x < W; ++x) {
      const float* a = scores + (static_cast<int64_t>(h0) * gw + w0[x]) * K;
      const float* b = scores + (static_cast<int64_t>(h0) * gw + w1[x]) * K;
      const float* c = scores + (static_cast<int64_t>(h1) * gw + w0[x]) * K;
      const float* d = scores + (static_cast<int64_t>(h1) * gw + w1[x]) * K;
      float best = -std::numeric_limits<float>::infinity();
      int arg = 0;
      for (int k = 0; k < K; ++k) {
        const float v = densert_bilerp(a[k], b[k], c[k], d[k], lw0[x], lw1[x], lh0, lh1);
        if (v > best) {  // strict: equal later channels keep the lower index
          best = v;
          arg = k;
        }
      }
      const int64_t p = static_cast<int64_t>(y) * W + x;
      labels[p] = arg;
      if (depth) depth[p] = lut[arg];
    }
  }
  return 0;
}
