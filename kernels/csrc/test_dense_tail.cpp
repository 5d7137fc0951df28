// ctest: C++ CPU tail (and the CUDA tail when a device exists) vs the unfused-rounding reference
// (fixtures from kernels/csrc/make_fixtures.py, every pixel compared), plus the
// edge cases both must handle: an empty map (nothing written, success) and K = 0 (refused).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "dense_tail.h"
#ifdef DENSERT_WITH_CUDA
#include <cuda_runtime.h>

// Every CUDA call is checked: a failure names the call and the error and fails the test.
#define CUDA_CHECK(call)                                                                   \
  do {                                                                                     \
    const cudaError_t err_ = (call);                                                       \
    if (err_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call,            \
                   cudaGetErrorString(err_));                                              \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)
#endif

template <typename T>
static bool rd(std::ifstream& f, std::vector<T>& v, size_t n) {
  v.resize(n);
  return static_cast<bool>(f.read(reinterpret_cast<char*>(v.data()), n * sizeof(T)));
}

static int check(const char* what, const std::vector<int64_t>& lab, const std::vector<float>& dep,
                 const std::vector<int64_t>& elab, const std::vector<float>& edep,
                 const std::vector<uint8_t>& ok) {
  size_t bad = 0, n_ok = 0;
  for (size_t i = 0; i < lab.size(); ++i) {
    if (!ok[i]) continue;
    ++n_ok;
    if (lab[i] != elab[i] || dep[i] != edep[i]) ++bad;
  }
  std::printf("  %s: %zu mismatches on %zu checked pixels (of %zu)\n", what, bad, n_ok, lab.size());
  return bad == 0 && n_ok * 2 > lab.size() ? 0 : 1;
}

// Empty maps write nothing and succeed; K = 0 and other bad arguments are refused untouched.
static int edge_cases() {
  int fails = 0;
  const float scores[4] = {1.f, 2.f, 3.f, 4.f}, lut[2] = {5.f, 6.f};
  int64_t lab[4] = {-7, -7, -7, -7};
  float dep[4] = {-7.f, -7.f, -7.f, -7.f};
  auto untouched = [&]() { return lab[0] == -7 && dep[0] == -7.f; };
  struct Case { const char* name; int gh, gw, K, H, W, expect; };
  const Case cases[] = {{"empty map H=0", 1, 2, 2, 0, 5, 0}, {"empty map W=0", 1, 2, 2, 3, 0, 0},
                        {"K=0", 1, 2, 0, 2, 2, DENSERT_INVALID_ARGUMENT},
                        {"gh=0", 0, 2, 2, 2, 2, DENSERT_INVALID_ARGUMENT}};
  for (const Case& c : cases) {
    const int rc = densert_dense_tail_cpu(scores, c.gh, c.gw, c.K, c.H, c.W, lut, lab, dep);
    const bool ok = rc == c.expect && untouched();
    std::printf("  cpu %s: rc %d (%s)\n", c.name, rc, ok ? "ok" : "WRONG");
    fails += !ok;
#ifdef DENSERT_WITH_CUDA
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) == cudaSuccess && ndev > 0) {
      float *ds, *dl, *dd;
      int64_t* dlab;
      CUDA_CHECK(cudaMalloc(&ds, sizeof scores));
      CUDA_CHECK(cudaMalloc(&dl, sizeof lut));
      CUDA_CHECK(cudaMalloc(&dd, sizeof dep));
      CUDA_CHECK(cudaMalloc(&dlab, sizeof lab));
      CUDA_CHECK(cudaMemcpy(ds, scores, sizeof scores, cudaMemcpyHostToDevice));
      CUDA_CHECK(cudaMemcpy(dl, lut, sizeof lut, cudaMemcpyHostToDevice));
      CUDA_CHECK(cudaMemcpy(dlab, lab, sizeof lab, cudaMemcpyHostToDevice));
      CUDA_CHECK(cudaMemcpy(dd, dep, sizeof dep, cudaMemcpyHostToDevice));
      const int crc = densert_dense_tail_cuda(ds, c.gh, c.gw, c.K, c.H, c.W, dl, dlab, dd, nullptr);
      CUDA_CHECK(cudaDeviceSynchronize());
      CUDA_CHECK(cudaMemcpy(lab, dlab, sizeof lab, cudaMemcpyDeviceToHost));
      CUDA_CHECK(cudaMemcpy(dep, dd, sizeof dep, cudaMemcpyDeviceToHost));
      CUDA_CHECK(cudaFree(ds));
      CUDA_CHECK(cudaFree(dl));
      CUDA_CHECK(cudaFree(dd));
      CUDA_CHECK(cudaFree(dlab));
      const bool cok = crc == c.expect && untouched();
      std::printf("  cuda %s: rc %d (%s)\n", c.name, crc, cok ? "ok" : "WRONG");
      fails += !cok;
    }
#endif
  }
  return fails;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s FIXTURE_DIR N_CASES\n", argv[0]);
    return 2;
  }
  const int n_cases = std::stoi(argv[2]);
  std::printf("edge cases:\n");
  int fails = edge_cases();
  for (int c = 0; c < n_cases; ++c) {
    std::ifstream f(std::string(argv[1]) + "/case" + std::to_string(c) + ".bin", std::ios::binary);
    std::vector<int32_t> hdr;
    if (!f || !rd(f, hdr, 5)) {
      std::fprintf(stderr, "cannot read fixture %d\n", c);
      return 2;
    }
    const int gh = hdr[0], gw = hdr[1], K = hdr[2], H = hdr[3], W = hdr[4];
    const size_t L = static_cast<size_t>(gh) * gw, P = static_cast<size_t>(H) * W;
    std::vector<float> scores, lut, edep;
    std::vector<int64_t> elab;
    std::vector<uint8_t> ok;
    if (!rd(f, scores, L * K) || !rd(f, lut, K) || !rd(f, elab, P) || !rd(f, edep, P) ||
        !rd(f, ok, P)) {
      std::fprintf(stderr, "truncated fixture %d\n", c);
      return 2;
    }
    std::printf("case %d: grid %dx%d -> %dx%d, K=%d\n", c, gh, gw, H, W, K);
    std::vector<int64_t> lab(P);
    std::vector<float> dep(P);
    if (densert_dense_tail_cpu(scores.data(), gh, gw, K, H, W, lut.data(), lab.data(),
                               dep.data()) != 0) {
      std::printf("  cpu: refused valid arguments\n");
      ++fails;
      continue;
    }
    fails += check("cpu", lab, dep, elab, edep, ok);
#ifdef DENSERT_WITH_CUDA
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) == cudaSuccess && ndev > 0) {
      float *ds, *dl, *dd;
      int64_t* dlab;
      CUDA_CHECK(cudaMalloc(&ds, L * K * 4));
      CUDA_CHECK(cudaMalloc(&dl, K * 4));
      CUDA_CHECK(cudaMalloc(&dd, P * 4));
      CUDA_CHECK(cudaMalloc(&dlab, P * 8));
      CUDA_CHECK(cudaMemcpy(ds, scores.data(), L * K * 4, cudaMemcpyHostToDevice));
      CUDA_CHECK(cudaMemcpy(dl, lut.data(), K * 4, cudaMemcpyHostToDevice));
      const int rc = densert_dense_tail_cuda(ds, gh, gw, K, H, W, dl, dlab, dd, nullptr);
      CUDA_CHECK(cudaDeviceSynchronize());
      CUDA_CHECK(cudaMemcpy(lab.data(), dlab, P * 8, cudaMemcpyDeviceToHost));
      CUDA_CHECK(cudaMemcpy(dep.data(), dd, P * 4, cudaMemcpyDeviceToHost));
      CUDA_CHECK(cudaFree(ds));
      CUDA_CHECK(cudaFree(dl));
      CUDA_CHECK(cudaFree(dd));
      CUDA_CHECK(cudaFree(dlab));
      if (rc != 0) std::printf("  cuda: densert_dense_tail_cuda returned %d\n", rc);
      fails += rc != 0 ? 1 : check("cuda", lab, dep, elab, edep, ok);
    } else if (c == 0) {
      std::printf("  (no CUDA device: CUDA tail compiled but not run)\n");
    }
#endif
  }
  return fails == 0 ? 0 : 1;
}
