// Dense-head tail: bilinear upsample (PyTorch align_corners=False, size= semantics) + argmax over
// K channels + optional depth dequantisation through a K-entry LUT. The K x H x W upsampled scores
// are never materialised: each output pixel keeps a running (max, index).
//
// scores: [gh*gw, K] row-major fp32 (the subset-head GEMM output, raster token order).
// Ties go to the lower channel index (torch.argmax).
#pragma once
#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

// labels: [H*W] int64. depth (may be null): [H*W] fp32 = lut[label]; lut may be null if depth is.
void densert_dense_tail_cpu(const float* scores, int gh, int gw, int K, int H, int W,
                            const float* lut, int64_t* labels, float* depth);

#ifdef DENSERT_WITH_CUDA
// Device pointers; the enqueue() body of a TensorRT IPluginV3 wrapping the tail.
// Returns 0 or a cudaError_t value.
int densert_dense_tail_cuda(const float* scores, int gh, int gw, int K, int H, int W,
                            const float* lut, int64_t* labels, float* depth, void* stream);
#endif

#ifdef __cplusplus
}
#endif
