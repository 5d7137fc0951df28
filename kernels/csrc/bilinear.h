// Source index and weights exactly as ATen's area_pixel_compute_source_index +
// guard_index_and_lambda for align_corners=False with an explicit output size.
#pragma once
#if defined(__CUDACC__)
#define DENSERT_HD __host__ __device__ inline
#else
#define DENSERT_HD inline
#endif

DENSERT_HD void densert_src_coord(int dst, int in_size, int out_size, int* i0, int* i1, float* l0,
                                  float* l1) {
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  float src = scale * (static_cast<float>(dst) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  int i = static_cast<int>(src);  // src >= 0: truncation == floor
  if (i > in_size - 1) i = in_size - 1;
  float lam = src - static_cast<float>(i);
  lam = lam < 0.f ? 0.f : (lam > 1.f ? 1.f : lam);
  *i0 = i;
  *i1 = i < in_size - 1 ? i + 1 : i;
  *l1 = lam;
  *l0 = 1.f - lam;
}
