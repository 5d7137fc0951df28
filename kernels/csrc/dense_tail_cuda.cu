// CUDA tail, shaped as the kernel a TensorRT IPluginV3 (enqueue) would launch on Jetson, where
// Triton does not run. One thread per output pixel, running (max, index) over K channels.
// Built with --fmad=false as well: bilinear.h's arithmetic is explicitly unfused either way.
#include <cuda_runtime.h>

#include "bilinear.h"
#include "dense_tail.h"

__global__ void densert_dense_tail_kernel(const float* __restrict__ scores, int gh, int gw, int K,
                                          int H, int W, const float* __restrict__ lut,
                                          int64_t* __restrict__ labels, float* __restrict__ depth) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= static_cast<int64_t>(H) * W) return;
  const int y = static_cast<int>(p / W), x = static_cast<int>(p % W);
  int h0, h1, w0, w1;
  float lh0, lh1, lw0, lw1;
  densert_src_coord(y, gh, H, &h0, &h1, &lh0, &lh1);
  densert_src_coord(x, gw, W, &w0, &w1, &lw0, &lw1);
  const float* a = scores + (static_cast<int64_t>(h0) * gw + w0) * K;
  const float* b = scores + (static_cast<int64_t>(h0) * gw + w1) * K;
  const float* c = scores + (static_cast<int64_t>(h1) * gw + w0) * K;
  const float* d = scores + (static_cast<int64_t>(h1) * gw + w1) * K;
  float best = -INFINITY;
  int arg = 0;
  for (int k = 0; k < K; ++k) {
    const float v = densert_bilerp(a[k], b[k], c[k], d[k], lw0, lw1, lh0, lh1);
    if (v > best) {
      best = v;
      arg = k;
    }
  }
  labels[p] = arg;
  if (depth) depth[p] = lut[arg];
}

extern "C" int densert_dense_tail_cuda(const float* scores, int gh, int gw, int K, int H, int W,
                                       const float* lut, int64_t* labels, float* depth,
                                       void* stream) {
  if (const int rc = densert_check_tail_args(gh, gw, K, H, W, lut, labels, depth)) return rc;
  const int64_t n = static_cast<int64_t>(H) * W;
  if (n == 0) return 0;  // a launch of 0 blocks is itself an error (invalid configuration)
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  if (blocks > 2147483647) return DENSERT_INVALID_ARGUMENT;
  densert_dense_tail_kernel<<<static_cast<unsigned>(blocks), threads, 0,
                              static_cast<cudaStream_t>(stream)>>>(scores, gh, gw, K, H, W, lut,
                                                                   labels, depth);
  return static_cast<int>(cudaGetLastError());
}
