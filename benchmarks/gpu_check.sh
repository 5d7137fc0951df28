#!/usr/bin/env bash
# The first-GPU check of densert's kernels: one prepared script, under 10 minutes on an NVIDIA GPU
# (H100/H200 or Jetson AGX Orin), writing JSON and Markdown to one folder.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#   (default OUT_DIR: benchmarks/results/gpu_check/<host>-<time>; commit it with the command)
#
# Steps (each logged to OUT_DIR/<step>.log, summarised in OUT_DIR/summary.{json,md}):
#   env            GPU, driver, torch / triton / onnxruntime versions and providers
#   aot            every Triton kernel compiled for sm_87 and sm_90, zero register spills
#                  (python -m densert.kernels.aot; no GPU needed; the dry run checks a small set)
#   kernels_gpu    compiled Triton kernels vs their torch references on the device
#                  (tests/test_kernels_gpu.py: bit-exact tail, probs past 2^31 elements, NTP-M
#                  for fp32 / bf16 / autocast / fp16 vs float64, bounded backward memory)
#   ctest_cuda     the CUDA tail (kernels/csrc) built for this GPU and run by ctest on the device
#   timing_dense   dense head (subset GEMM + fused tail) vs the kernel-anchors bounds
#   timing_ntpm    NTP-M forward / backward / memory vs the kernel-anchors bounds
#   bench_cuda     `densert bench` with the torch CUDA and ONNX Runtime CUDA backends
# Without a CUDA device visible to torch (or with --dry-run) every GPU step is reported as
# SKIPPED with the reason, and the script exits 0 if the rest passed.
#
# Setup on the GPU machine: python3 -m venv .venv && .venv/bin/pip install -e '.[all]', then a
# CUDA build of the pinned torch (.venv/bin/pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu128) and onnxruntime-gpu==1.31.1 for the ORT CUDA backend.
set -u
cd "$(dirname "$0")/.."

DRY=0
OUT=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) OUT="$a" ;;
  esac
done
OUT=${OUT:-benchmarks/results/gpu_check/$(hostname)-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3); fi
fi
START=$(date +%s)
: > "$OUT/steps.tsv"

record() {  # name status seconds detail
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/steps.tsv"
  printf '%-13s %-8s %5ss  %s\n' "$1" "$2" "$3" "$4"
}

run_step() {  # name needs_gpu timeout_s command...
  local name=$1 needs_gpu=$2 limit=$3
  shift 3
  if [ "$needs_gpu" = 1 ] && [ -n "$NO_GPU" ]; then
    record "$name" SKIPPED 0 "$NO_GPU"
    return 0
  fi
  local t0=$(date +%s) rc
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    record "$name" pass "$dt" "$name.log"
  elif [ $rc -eq 124 ]; then
    record "$name" FAIL "$dt" "timed out after ${limit}s ($name.log)"
  else
    record "$name" FAIL "$dt" "exit $rc ($name.log: $(tail -n 1 "$OUT/$name.log" | cut -c1-120))"
  fi
}

# ---- what this machine has ----
NO_GPU=""
GPU_PROBE=$("$PY" - <<'EOF' 2>&1
import shutil, subprocess, torch
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "sm_%d%d" % torch.cuda.get_device_capability(0))
elif shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
    print(f"nogpu torch {torch.__version__} is a CPU build or sees no device although nvidia-smi does: install a CUDA torch")
else:
    print("nogpu no NVIDIA GPU visible (torch.cuda.is_available() is False, no nvidia-smi)")
EOF
)
case "$GPU_PROBE" in
  gpu*) GPU=${GPU_PROBE#gpu } ;;
  nogpu*) NO_GPU="no GPU: ${GPU_PROBE#nogpu }" ;;
  *) NO_GPU="no GPU: torch probe failed: $(echo "$GPU_PROBE" | tail -n 1)" ;;
esac
if [ $DRY = 1 ]; then
  NO_GPU="dry run${NO_GPU:+ ($NO_GPU)}"
fi
echo "densert gpu_check -> $OUT"
echo "device: ${GPU:-none}${NO_GPU:+  [GPU steps skipped: $NO_GPU]}"

run_step env 0 60 "$PY" - "$OUT/env.json" <<'EOF'
import importlib, json, platform, shutil, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available()}
for mod in ("triton", "onnxruntime"):
    try:
        m = importlib.import_module(mod)
        info[mod] = m.__version__
        if mod == "onnxruntime":
            info["ort_providers"] = m.get_available_providers()
    except ImportError:
        info[mod] = None
if torch.cuda.is_available():
    info["gpu"] = torch.cuda.get_device_name(0)
    info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
if shutil.which("nvidia-smi"):
    r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                        "--format=csv,noheader"], capture_output=True, text=True)
    info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF

if [ $DRY = 1 ] || [ -n "$NO_GPU" ]; then
  # Without a GPU machine's cores: the cheap kernels only (the full table takes minutes here).
  run_step aot 0 300 "$PY" -m densert.kernels.aot --kernel dense_tail ntpm_dh ntpm_dw --json "$OUT/aot.json"
else
  run_step aot 0 240 "$PY" -m densert.kernels.aot --json "$OUT/aot.json"
fi

run_step kernels_gpu 1 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py \
  --junitxml "$OUT/kernels_gpu.xml"

BUILD=$(mktemp -d)  # build tree outside OUT, so OUT holds only reports
trap 'rm -rf "$BUILD"' EXIT
ctest_cuda() {
  cmake -S . -B "$BUILD" -DDENSERT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native \
        -DDENSERT_PYTHON="$PY" && cmake --build "$BUILD" -j 8 \
    && ctest --test-dir "$BUILD" --output-on-failure -V > "$OUT/ctest_output.txt" 2>&1
  local rc=$?
  cat "$OUT/ctest_output.txt"
  # The CUDA tail must have run on the device, not only compiled.
  [ $rc -eq 0 ] && grep -q "cuda: 0 mismatches" "$OUT/ctest_output.txt"
}
run_step ctest_cuda 1 180 ctest_cuda

run_step timing_dense 1 120 "$PY" -m densert.benchmarks.bench_dense_head --gpu --reps 100 \
  --out "$OUT/kernels_gpu_dense_head"
run_step timing_ntpm 1 150 "$PY" -m densert.benchmarks.bench_ntpm --gpu --reps 20 \
  --out "$OUT/kernels_gpu_ntpm"

bench_cuda() {
  local backends="torch"
  if "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    backends="torch onnxruntime"
  else
    echo "ONNX Runtime has no CUDAExecutionProvider (pip install onnxruntime-gpu==1.31.1): torch CUDA only"
  fi
  "$PY" -m densert bench --backend $backends --device cuda --label "gpu_check" \
    --json "$OUT/bench_cuda.json" --md "$OUT/bench_cuda.md" \
    && grep -q onnxruntime <<< "$backends"
}
run_step bench_cuda 1 200 bench_cuda

# ---- summary ----
"$PY" - "$OUT" "$(( $(date +%s) - START ))" "${GPU:-none}" "$@" <<'EOF'
import json, sys
from pathlib import Path
out, total, gpu = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, secs, detail = line.split("\t", 3)
    steps.append({"step": name, "status": status, "seconds": int(secs), "detail": detail})
summary = {"device": gpu, "total_seconds": total, "steps": steps,
           "ok": all(s["status"] != "FAIL" for s in steps)}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
md = [f"# densert gpu_check: {gpu}", "", f"Command: `benchmarks/gpu_check.sh {' '.join(sys.argv[4:])}`"
      f" ({total} s). Per-step logs and reports are beside this file.", "",
      "| step | status | seconds | detail |", "|---|---|---:|---|"]
md += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['detail']} |" for s in steps]
(out / "summary.md").write_text("\n".join(md) + "\n")
print(f"\n{sum(s['status'] == 'pass' for s in steps)} passed, "
      f"{sum(s['status'] == 'SKIPPED' for s in steps)} skipped, "
      f"{sum(s['status'] == 'FAIL' for s in steps)} failed in {total} s -> {out}/summary.md")
sys.exit(0 if summary["ok"] else 1)
EOF
