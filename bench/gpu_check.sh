#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR            one prepared GPU run: install, correctness, compact benchmark, tables
# bench/gpu_check.sh --dry-run OUTDIR  the same steps on the CPU at tiny sizes (Triton interpreter, CUDA emulator);
#                                      tests/test_gpu_kit.py runs it in CI so that the kit cannot rot
#
# No network. Needs what the GPU machines have: torch, triton, nvcc, numpy, pillow, tqdm, pybind11, pytest.
# Every section runs in its own process under its own time budget (a sticky CUDA error such as an illegal address
# ends that section only, and its log names it), capped by what is left of the 8-minute total; a section that
# cannot start in time is reported as skipped. Correctness failures stop the run before the benchmark (a test
# section that only runs out of time does not: each benchmark row also checks its result against float64).
# Output under OUTDIR: logs/<section>.log, <section>/table.md + results.json, summary.md (the status of every
# section and all tables, ready to paste into bench/RESULTS.md).
#
# Expected GPU time per section (H100 / H200), from the roofline floor (bench floors: analytic_diffusion/
# benchmark/roofline.py; H200 4.8 TB/s, fp32 SIMT 60, bf16 790 TFLOP/s, exp 3.9e12/s) plus compile and
# launch overhead, which dominates where the floor is small:
#   env          print GPU, driver, torch, triton, nvcc                                        floor 0       ~5 s
#   install      pip install --no-build-isolation --no-deps -e . (nvcc: 3 .cu in parallel, one arch) ~60 s
#   tests        CUDA + compiled-Triton correctness vs float64 (every kernel family)            ~90 s (JIT)
#   global50k    N=50k D=3072 B=1,64,1024 exact+bf16; naive/chunked/SDPA PyTorch, torch/triton/cuda:
#                floors 0.03 ms (B=1, 154 MB of keys) .. 10.5 ms (B=1024 fp32), 0.8 ms bf16     ~40 s
#   local_els    ELS, bbELS k=3,7 over 10k 3x32x32, B=8: 8.6e10 pairs per call, exp floor 22 ms, SIMT floor
#                0.12 s (k=3) / 0.63 s (k=7); torch reference beside the Triton and CUDA kernels  ~45 s
#   local_base   ELS k=3,7 over 500, B=1 with the naive (unfold + cdist) and studio-style (conv2d per chunk)
#                PyTorch baselines, which cannot run at 10k within the budget (studio: ~4e15 FLOP per
#                call at k=3): per image per step the ratios carry over (both scale with N)   ~30 s
#   local_ls     LS, PSPC k=3,7 over 50k, B=64: 3.3e9 pairs, SIMT floor <= 24 ms                ~30 s
#   pca          pca_locality over 10k CIFAR-shaped, B=64 (kernels) and B=1 (dense-mask torch
#                reference: 1.9e14 FLOP, 3 s at fp32 peak)                                     ~30 s
#   e2e          1000 CIFAR-shaped optimal samples over 50k, 18 Heun steps (35 calls, B=1000):
#                fp32 floor 10 ms per call, 0.36 s in all                                       ~30 s
#   in64         ImageNet-64 scale N=1.28M D=12288 B=256, exact+bf16, keys made on the GPU (15.7 GB):
#                floors 0.27 s fp32, 20 ms bf16 (3.3 ms HBM); float baselines do not fit        ~60 s
#   total (install included)                                                                  ~7.75 min
# Last, so that the total budget cuts it first: in64 (the largest single section).
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ $# -ne 1 ]; then
  echo "usage: bench/gpu_check.sh [--dry-run] OUTDIR" >&2
  exit 2
fi
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
TOTAL=${AD_GPU_CHECK_TOTAL_S:-480}  # the whole run, install included
START=$(date +%s)
SUMMARY="$OUT/summary.md"
STATUS="$OUT/status.tsv"
: > "$STATUS"
if [ $DRY = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEV=cpu
else
  export TRITON_INTERPRET=0
  DEV=cuda
fi

# section NAME BUDGET_S COMMAND: runs COMMAND in its own bash process under min(BUDGET_S, time left).
section() {
  local name=$1 budget=$2 cmd=$3
  local left=$(( TOTAL - ($(date +%s) - START) ))
  if [ $left -lt 15 ]; then
    printf '%s\tskipped\t0\t%s\ttotal budget of %ss spent\n' "$name" "$budget" "$TOTAL" >> "$STATUS"
    echo "== $name: SKIPPED (total budget spent)"
    return 0
  fi
  [ $budget -gt $left ] && budget=$left
  echo "== $name (budget ${budget}s): $cmd"
  local t0=$(date +%s)
  timeout --kill-after=10 "$budget" bash -c "$cmd" > "$OUT/logs/$name.log" 2>&1
  local rc=$? dt=$(( $(date +%s) - t0 ))
  local st=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then st=timeout; elif [ $rc -ne 0 ]; then st="failed (rc $rc)"; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$st" "$dt" "$budget" "logs/$name.log" >> "$STATUS"
  echo "   $st in ${dt}s; log: $OUT/logs/$name.log"
  [ "$st" = ok ]
}

report() {
  {
    echo "## GPU check ($( [ $DRY = 1 ] && echo 'DRY RUN on the CPU: no timing is meaningful' || echo "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"), $(date -u +%Y-%m-%d))"
    echo
    echo "Command: \`bench/gpu_check.sh $( [ $DRY = 1 ] && echo '--dry-run ')OUTDIR\`; total $(( $(date +%s) - START )) s of a ${TOTAL} s budget."
    echo
    echo "| section | status | seconds | budget s | log |"
    echo "|---|---|---|---|---|"
    awk -F'\t' '{printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5}' "$STATUS"
    for s in global50k in64 local_els local_base local_ls pca_b64 pca_b1; do
      if [ -f "$OUT/$s/table.md" ]; then echo; echo "### $s"; echo; cat "$OUT/$s/table.md"; fi
    done
    if [ -f "$OUT/e2e.json" ]; then echo; echo "### e2e"; echo; echo '```json'; cat "$OUT/e2e.json"; echo; echo '```'; fi
    if [ -f "$OUT/logs/env.log" ]; then echo; echo "### environment"; echo; echo '```'; cat "$OUT/logs/env.log"; echo '```'; fi
  } > "$SUMMARY"
  echo "summary: $SUMMARY"
}

# ---- 1. environment and install
section env 30 "nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo 'nvidia-smi: none';
  $PY -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); print(\"triton\", triton.__version__)';
  nvcc --version 2>&1 | tail -2 || echo 'nvcc: none'"
if [ $DRY = 1 ]; then  # no reinstall on the CPU (CI already built this tree): check that the import is this tree
  section install 60 "echo 'dry run: would run: $PY -m pip install --no-build-isolation --no-deps -e .';
    $PY -c 'import analytic_diffusion, os, sys; p = analytic_diffusion.__file__; print(p); sys.exit(0 if p.startswith(os.getcwd()) else \"analytic_diffusion is not imported from this tree\")'"
else
  section install 240 "$PY -m pip install --no-build-isolation --no-deps -e . && $PY -c 'from analytic_diffusion.ops import cuda_backend as c; r = c.unavailable_reason(); print(\"backend cuda:\", r or \"available\"); raise SystemExit(1 if r else 0)'"
fi || { report; echo "STOP: install failed (see $OUT/logs/install.log)"; exit 1; }

# ---- 2. correctness of every kernel family against the float64 reference
if [ $DRY = 1 ]; then
  TESTS="$PY -m pytest -q -x -p no:cacheprovider tests/test_index_width.py tests/test_triton_kernels.py -k 'bitwise or past_2_31 or widened'"
  if [ "${AD_GPU_CHECK_NO_EMU:-0}" != 1 ]; then  # CI runs the emulator tests in the suite itself
    TESTS="$TESTS && $PY -m pytest -q -x -p no:cacheprovider tests/test_fused_patch.py -k cuda_patch_kernel_contract"
  fi
else
  TESTS="$PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_backend.py -m gpu &&
    $PY -m pytest -q -x -p no:cacheprovider tests/test_triton_kernels.py -k 'not real_mnist and not ahead_of_time' &&
    $PY -m pytest -q -x -p no:cacheprovider tests/test_fused_patch.py -k 'cuda or triton'"
fi
if ! section tests 200 "$TESTS"; then
  if awk -F'\t' '$1 == "tests" && $2 == "timeout" {found = 1} END {exit !found}' "$STATUS"; then  # no failure so far (-x): go on, every benchmark row has its own check
    echo "WARNING: correctness tests ran out of time before failing; benchmark rows carry their own float64 check (rel. err)"
  else
    report
    echo "STOP: correctness tests failed: no benchmark on wrong kernels (see $OUT/logs/tests.log)"
    exit 1
  fi
fi

# ---- 3. compact benchmark, one process per section
B="$PY -m analytic_diffusion bench"
if [ $DRY = 1 ]; then
  section global50k 60 "$B global --device cpu --dims 48 --n 257 --batches 1,3 --precisions exact,bf16 --repeats 1 --out $OUT/global50k"
  section local_els 60 "$B local --device cpu --methods els,bbels --patch 3 --n-train 6 --shape 1,8,8 --batch 2 --paths torch,cpu,triton,cuda --out $OUT/local_els"
  section local_base 60 "$B local --device cpu --methods els --patch 3 --n-train 4 --shape 1,8,8 --batch 1 --paths naive,studio,torch,cpu,triton,cuda --out $OUT/local_base"
  section local_ls 60 "$B local --device cpu --methods ls,pspc --patch 3 --n-train 6 --shape 1,8,8 --batch 2 --paths torch,cpu,triton,cuda --out $OUT/local_ls"
  section pca 60 "$B local --device cpu --methods pca_locality --n-train 40 --shape 1,8,8 --batch 2 --paths torch,cpu,triton,cuda --out $OUT/pca_b64"
  section e2e 60 "$B e2e --device cpu --n-train 50 --shape 1,8,8 --samples 3 --steps 2 --out $OUT/e2e.json"
  section in64 60 "$B global --device cpu --dims 96 --n 300 --batches 2 --precisions exact,bf16 --paths naive,chunked,torch,triton,cuda --repeats 1 --out $OUT/in64"
else
  section global50k 90 "$B global --device cuda --dims 3072 --n 50000 --batches 1,64,1024 --precisions exact,bf16 --paths naive,chunked,sdpa,torch,triton,cuda --repeats 5 --out $OUT/global50k"
  section local_els 90 "$B local --device cuda --methods els,bbels --patch 3,7 --n-train 10000 --shape 3,32,32 --batch 8 --paths torch,triton,cuda --repeats 1 --out $OUT/local_els"
  section local_base 60 "$B local --device cuda --methods els --patch 3,7 --n-train 500 --shape 3,32,32 --batch 1 --paths naive,studio,torch,triton,cuda --repeats 1 --out $OUT/local_base"
  section local_ls 60 "$B local --device cuda --methods ls,pspc --patch 3,7 --n-train 50000 --shape 3,32,32 --batch 64 --paths torch,triton,cuda --repeats 3 --out $OUT/local_ls"
  section pca 60 "$B local --device cuda --methods pca_locality --n-train 10000 --shape 3,32,32 --batch 64 --paths triton,cuda --repeats 3 --out $OUT/pca_b64 &&
    $B local --device cuda --methods pca_locality --n-train 10000 --shape 3,32,32 --batch 1 --paths torch,triton,cuda --repeats 1 --out $OUT/pca_b1"
  section e2e 60 "$B e2e --device cuda --n-train 50000 --shape 3,32,32 --samples 1000 --steps 18 --out $OUT/e2e.json"
  section in64 120 "$B global --device cuda --dims 12288 --n 1280000 --batches 256 --precisions exact,bf16 --paths naive,chunked,torch,triton,cuda --repeats 1 --out $OUT/in64"
fi
report
FAILED=$(awk -F'\t' '$2 != "ok" {print $1 " (" $2 ")"}' "$STATUS" | paste -sd, -)
if [ -n "$FAILED" ]; then
  echo "sections not ok: $FAILED"
  exit 1
fi
echo "all sections ok"
