// CUDA tail, shaped as the kernel a TensorRT IPluginV3 (enqueue) would launch on Jetson, where
// Triton does not run. One thread per output pixel, running (max, index) over K channels.
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
    // __fmul_rn/__fadd_rn forbid FMA contraction: same rounding as the CPU/ATen formula.
    const float top = __fadd_rn(__fmul_rn(a[k], lw0), __fmul_rn(b[k], lw1));
    const float bot = __fadd_rn(__fmul_rn(c[k], lw0), __fmul_rn(d[k], lw1));
    const float v = __fadd_rn(__fmul_rn(top, lh0), __fmul_rn(bot, lh1));
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
  const int64_t n = static_cast<int64_t>(H) * W;
  const int threads = 256;
  const int blocks = static_cast<int>((n + threads - 1) / threads);
  densert_dense_tail_kernel<<<blocks, threads, 0, static_cast<cudaStream_t>(stream)>>>(
      scores, gh, gw, K, H, W, lut, labels, depth);
  return static_cast<int>(cudaGetLastError());
}
