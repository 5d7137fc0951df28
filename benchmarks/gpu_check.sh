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
#   ort_cuda       ONNX Runtime's CUDA provider (densert[gpu]) on an exported engine: `densert
#                  verify` on CUDA against torch, `depth --backend onnxruntime --device cuda`
#                  with no CPU fallback line, every session on CUDAExecutionProvider, the KV
#                  cache / vision tokens / dense-head inputs left on the GPU, and frame times
#                  beside ORT CPU and torch (ort_cuda.json). Engine from $ORT_MODEL (default:
#                  the bundled densert-tiny) at $ORT_PRECISION (default fp32). Without a GPU the
#                  same script runs on CPU as ort_cpu (its code checked, no GPU claim made).
# Without a CUDA device visible to torch (or with --dry-run) every GPU step is reported as
# SKIPPED with the reason, and the script exits 0 if the rest passed.
#
# Setup on the GPU machine: python3 -m venv .venv && .venv/bin/pip install -e '.[all]', then a
# CUDA build of the pinned torch (.venv/bin/pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cu128) and densert[gpu] for the ORT CUDA backend: pip install
# -e '.[gpu]' && pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1 (export/README.md,
# GPU: the CPU onnxruntime wheel shares its module).
set -u
cd "$(dirname "$0")/.."

DRY=0
OUT=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
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
export OUT PY  # read by the step functions, which run in a child bash
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
  if declare -F "$1" > /dev/null; then
    # timeout runs programs, not shell functions: a step function runs in a child bash
    export -f "$1"
    timeout "$limit" bash -c '"$@"' "$1" "$@" > "$OUT/$name.log" 2>&1
  else
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  fi
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
export BUILD
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

export ORT_MODEL=${ORT_MODEL:-densert/assets/densert-tiny}
export ORT_PRECISION=${ORT_PRECISION:-fp32}
ort_check() {  # device frames
  local dev=$1 frames=$2 eng="$BUILD/ort_engine"
  rm -rf "$eng"
  "$PY" -m densert export --model "$ORT_MODEL" --out "$eng" --precision "$ORT_PRECISION" \
    --tasks depth --quiet || return
  if [ "$dev" != cpu ]; then
    "$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
      || { echo "onnxruntime has no CUDAExecutionProvider: install densert[gpu] (export/README.md, GPU)"; return 1; }
    # The parity gate, on the provider a plain run gets (auto: CUDA with densert[gpu]).
    "$PY" -m densert verify "$eng" --model "$ORT_MODEL" > "$OUT/ort_verify.txt" 2>&1
    local vrc=$?
    cat "$OUT/ort_verify.txt"
    if grep -q "running on CPUExecutionProvider" "$OUT/ort_verify.txt"; then
      echo "densert verify ran on CPU, not $dev"
      return 1
    fi
    [ $vrc -eq 0 ] || { echo "densert verify failed on $dev (ort_verify.txt)"; return 1; }
    # The command a user types: no fallback line on stderr.
    "$PY" -m densert depth samples/scene_0.png --backend onnxruntime --engine-dir "$eng" \
      --device "$dev" --out "$BUILD/ort_depth" 2> "$BUILD/ort_depth.err" \
      || { cat "$BUILD/ort_depth.err"; return 1; }
    cat "$BUILD/ort_depth.err"
    if grep -q "running on CPUExecutionProvider" "$BUILD/ort_depth.err"; then
      echo "densert depth --device $dev fell back to CPU"
      return 1
    fi
  fi
  "$PY" - "$OUT/ort_$dev.json" "$eng" "$ORT_MODEL" "$dev" "$frames" <<'EOF'
import json, statistics, sys
import numpy as np
import onnxruntime as ort
import torch
from densert.export.ort_backend import CUDA_EP
from densert.runtime.predictor import DensePredictor

out, eng, model, dev, frames = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
image = "samples/scene_0.png"
on_gpu = dev.startswith("cuda")
rep = {"device": dev, "onnxruntime": ort.__version__, "available": ort.get_available_providers(),
       "torch": torch.__version__, "torch_cuda": torch.cuda.is_available(), "model": model,
       "image": image, "frames": frames, "runs": {}}
problems = []


def timed(name, pred):
    pred.depth(image)  # warm-up: kernels, arenas
    runs = [pred.depth(image) for _ in range(frames)]
    rep["runs"][name] = {
        "frame_ms": round(1e3 * statistics.median(sum(r.timings.values()) for r in runs), 2),
        "stages_ms": {k: round(1e3 * statistics.median(r.timings[k] for r in runs), 2)
                      for k in runs[0].timings}}
    return runs[-1]


ortp = DensePredictor(model, backend="onnxruntime", engine_dir=eng, device=dev)
be = ortp.backend
rep["providers"] = be.providers
rep["session_providers"] = {g: s.get_providers() for g, s in be.sessions.items()}
if on_gpu and any(p[0] != CUDA_EP for p in rep["session_providers"].values()):
    problems.append(f"a session is not on {CUDA_EP}: {rep['session_providers']}")
# Where each output of the vision graph and of the image prefill was left.
where, run = {}, be._run


def spy(graph, feeds, keep_on_device=()):
    got = run(graph, feeds, keep_on_device)
    if graph == "vision" or len(feeds.get("image_positions", ())):
        where.update({k: v.device_name().lower() for k, v in got.items()})
    return got


be._run = spy
got = timed(f"onnxruntime {dev}", ortp)
be._run = run
rep["output_devices"] = where
want = {k: "cpu" for k in where}
if on_gpu:
    want.update({k: "cuda" for k in where if k.startswith("present_")})
    if torch.cuda.is_available():  # the dense head reads them on the GPU
        want.update({k: "cuda" for k in where if k.startswith("scores_")
                     or k in ("image_embeds", "vision_hidden", "pre_vision_hidden")})
bad = {k: (where[k], w) for k, w in want.items() if where[k] != w}
if bad:
    problems.append(f"outputs left in the wrong place (got, want): {bad}")
if on_gpu:
    timed("onnxruntime cpu", DensePredictor(model, backend="onnxruntime", engine_dir=eng, device="cpu"))
tdev = dev if (not on_gpu or torch.cuda.is_available()) else "cpu"
ref = timed(f"torch {tdev} float32", DensePredictor(model, backend="torch", device=tdev, dtype="float32"))
valid = (ref.depth > 0) & (got.depth > 0)
rep["parity_vs_torch"] = {
    "bin_agreement": round(float((got.bins == ref.bins).mean()), 5),
    "depth_absrel": round(float((np.abs(got.depth - ref.depth)[valid] / ref.depth[valid]).mean()), 6),
    "pixels": int(valid.sum())}
rep["problems"] = problems
json.dump(rep, open(out, "w"), indent=1)
print(json.dumps(rep, indent=1))
for p in problems:
    print("FAIL:", p)
sys.exit(1 if problems else 0)
EOF
}
if [ -n "$NO_GPU" ]; then
  record ort_cuda SKIPPED 0 "$NO_GPU"
  run_step ort_cpu 0 300 ort_check cpu 1
else
  run_step ort_cuda 1 420 ort_check cuda 20
fi

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
