// Source index and weights exactly as ATen's area_pixel_compute_source_index +
// guard_index_and_lambda for align_corners=False with an explicit output size.
//
// Rounding: every multiply and add is a separately rounded IEEE op, never an FMA, so the CPU and
// CUDA tails and the torch reference compute bit-identical coordinates and weights. On the
// device that is explicit (__fmul_rn and friends cannot be contracted); host code must be
// compiled with -ffp-contract=off (CMakeLists.txt does, for every target including this).
#pragma once
#if defined(__CUDACC__)
#define DENSERT_HD __host__ __device__ inline
#else
#define DENSERT_HD inline
#endif

DENSERT_HD float densert_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

DENSERT_HD float densert_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

DENSERT_HD float densert_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// ATen CPU association: height-weighted sum of the two width-interpolated rows.
DENSERT_HD float densert_bilerp(float x00, float x01, float x10, float x11, float lw0, float lw1,
                                float lh0, float lh1) {
  const float top = densert_add(densert_mul(x00, lw0), densert_mul(x01, lw1));
  const float bot = densert_add(densert_mul(x10, lw0), densert_mul(x11, lw1));
  return densert_add(densert_mul(top, lh0), densert_mul(bot, lh1));
}

DENSERT_HD void densert_src_coord(int dst, int in_size, int out_size, int* i0, int* i1, float* l0,
                                  float* l1) {
  const float scale = densert_div(static_cast<float>(in_size), static_cast<float>(out_size));
  float src = densert_add(densert_mul(scale, densert_add(static_cast<float>(dst), 0.5f)), -0.5f);
  if (src < 0.f) src = 0.f;
  int i = static_cast<int>(src);  // src >= 0: truncation == floor
  if (i > in_size - 1) i = in_size - 1;
  float lam = densert_add(src, -static_cast<float>(i));
  lam = lam < 0.f ? 0.f : (lam > 1.f ? 1.f : lam);
  *i0 = i;
  *i1 = i < in_size - 1 ? i + 1 : i;
  *l1 = lam;
  *l0 = densert_add(1.f, -lam);
}
