// Dense-head tail: bilinear upsample (PyTorch align_corners=False, size= semantics) + argmax over
// K channels + optional depth dequantisation through a K-entry LUT. The K x H x W upsampled scores
// are never materialised: each output pixel keeps a running (max, index).
//
// scores: [gh*gw, K] row-major fp32 (the subset-head GEMM output, raster token order).
// Ties go to the lower channel index (torch.argmax).
//
// Both entry points return 0 on success. An empty map (H == 0 or W == 0) is a success that
// writes nothing. Invalid arguments (K <= 0: no channel to take an argmax over; gh or gw <= 0;
// a negative H or W; null labels; depth without a LUT) return DENSERT_INVALID_ARGUMENT, the
// value of cudaErrorInvalidValue, before touching any buffer.
#pragma once
#include <cstdint>

#define DENSERT_INVALID_ARGUMENT 1

#ifdef __cplusplus
extern "C" {
#endif

// labels: [H*W] int64. depth (may be null): [H*W] fp32 = lut[label]; lut may be null if depth is.
int densert_dense_tail_cpu(const float* scores, int gh, int gw, int K, int H, int W,
                           const float* lut, int64_t* labels, float* depth);

#ifdef DENSERT_WITH_CUDA
// Device pointers; the enqueue() body of a TensorRT IPluginV3 wrapping the tail.
// Returns 0 or a cudaError_t value (the launch's, checked right after it).
int densert_dense_tail_cuda(const float* scores, int gh, int gw, int K, int H, int W,
                            const float* lut, int64_t* labels, float* depth, void* stream);
#endif

#ifdef __cplusplus
}
#endif

// Shared argument check of both tails: 0, or DENSERT_INVALID_ARGUMENT.
inline int densert_check_tail_args(int gh, int gw, int K, int H, int W, const float* lut,
                                   const int64_t* labels, const float* depth) {
  if (K <= 0 || gh <= 0 || gw <= 0 || H < 0 || W < 0) return DENSERT_INVALID_ARGUMENT;
  if (labels == nullptr || (depth != nullptr && lut == nullptr)) return DENSERT_INVALID_ARGUMENT;
  return 0;
}
