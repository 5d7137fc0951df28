// ctest: C++ CPU tail (and the CUDA tail when a device exists) vs torch-path fixtures.
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "dense_tail.h"
#ifdef DENSERT_WITH_CUDA
#include <cuda_runtime.h>
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

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s FIXTURE_DIR N_CASES\n", argv[0]);
    return 2;
  }
  const int n_cases = std::stoi(argv[2]);
  int fails = 0;
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
    densert_dense_tail_cpu(scores.data(), gh, gw, K, H, W, lut.data(), lab.data(), dep.data());
    fails += check("cpu", lab, dep, elab, edep, ok);
#ifdef DENSERT_WITH_CUDA
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) == cudaSuccess && ndev > 0) {
      float *ds, *dl, *dd;
      int64_t* dlab;
      cudaMalloc(&ds, L * K * 4);
      cudaMalloc(&dl, K * 4);
      cudaMalloc(&dd, P * 4);
      cudaMalloc(&dlab, P * 8);
      cudaMemcpy(ds, scores.data(), L * K * 4, cudaMemcpyHostToDevice);
      cudaMemcpy(dl, lut.data(), K * 4, cudaMemcpyHostToDevice);
      int rc = densert_dense_tail_cuda(ds, gh, gw, K, H, W, dl, dlab, dd, nullptr);
      cudaMemcpy(lab.data(), dlab, P * 8, cudaMemcpyDeviceToHost);
      cudaMemcpy(dep.data(), dd, P * 4, cudaMemcpyDeviceToHost);
      cudaFree(ds); cudaFree(dl); cudaFree(dd); cudaFree(dlab);
      fails += rc != 0 ? 1 : check("cuda", lab, dep, elab, edep, ok);
    } else if (c == 0) {
      std::printf("  (no CUDA device: CUDA tail compiled but not run)\n");
    }
#endif
  }
  return fails == 0 ? 0 : 1;
}
