// C++ CPU kernels of the local family's patch softmax (ELS / bbELS, LS, PSPC-Square): implicit im2col, the same
// contract as the Triton (kernels/patch_retrieval.py) and CUDA (csrc/cuda/patch_retrieval.cuh) kernels, so that
// one Python driver (analytic_diffusion/ops/fused_patch.py) runs all three.
//
// Query row r is a C*k*k patch (fp32, (C, k, k) layout). Its candidates are k x k patches of the listed uint8 /
// fp32 training images, cut from the images as they are scanned (never materialised), zero outside the image in
// value space (candidate value = scale * u + shift inside, 0.0 outside):
//
//   logit_rj = -coef2_r * sum_f (q_rf - patch_f(image n_j, centre p_j))^2        (base 2: coef2 = coef * log2 e)
//
// Rules: kPatchShared (every listed image x every centre of one shared list; value = the C centre pixels; ELS /
// bbELS), kPatchSameCentre (every listed image at row r's own centre; LS), kPatchSameWhole (as SameCentre, value =
// the whole C*k*k patch; PSPC). A centre is the window's top-left corner + k / 2 (also for an even k).
//
// Output: per-split partial states, the Triton / CUDA layout: m (base 2; -inf for a row without candidates),
// l = sum 2^(z - m), l2 = sum 2^(2(z - m)) as (S, R), o = sum 2^(z - m) * value as (S, R, V). Split s scans the
// listed images [s * per, min((s + 1) * per, n_img)), per = ceil(n_img / splits).
//
// Numerics: direct distances in fp32 (no cancellation, exact at every σ up to fp32 rounding), fixed summation
// orders. Weights below 2^-63 of the running maximum are dropped (the CPU global kernel's rule: the neglected mass
// is below (#candidates) * 2^-63 of the total) and a block of candidates none of whose weights passes that bar is
// skipped whole: at low noise most of the scan costs distances only. The work is split into tasks (query rows x
// image split) that each write their own slots; results are bitwise independent of the thread count.
#pragma once

#include <cstdint>

#include "../common/patch_contract.h"
#include "coordinate.h"

namespace ad_cpu {

using namespace ad_patch;  // PatchProblem, PatchRule, PatchKeys, images_per_split, patch_num_splits, patch_value_width

// Entries start .. start + len - 1 of the position list (kPatchShared) or query rows start .. start + len - 1
// (same-position rules) whose centres are the consecutive columns col0 .. col0 + len - 1 of one image row, left
// to right, or right to left when `reversed` (the mirrored positions of a flips pass): lane u (column col0 + u) is
// entry start + u, or start + len - 1 - u. Candidates (or rows) of one run are one vector of lanes: their windows
// are neighbouring columns of the same image rows.
struct PatchRun {
  int64_t start;
  int32_t len, row, col0;
  bool reversed;
};

// Lane u of a run: its entry offset from run.start.
inline int32_t patch_run_slot(const PatchRun& run, int32_t u) { return run.reversed ? run.len - 1 - u : u; }

// Scratch floats per run of a same-position task: transposed queries (F, L), coefficients, running max, the two
// sums and the value sums (V, L).
inline int64_t patch_same_run_floats(int C, int k, int rule, int lanes) {
  return (int64_t(C) * k * k + 4 + patch_value_width(rule, C, k)) * lanes;
}

// Task kernels (per instruction set). Both write the slots of their rows completely, initialisation included;
// `scratch` holds patch_scratch_floats(...) floats.
// Shared rule: query rows [r0, r1) against the runs of the shared list, images [i0, i1) of image_index; m, l, l2
// indexed by row - r0, o with row stride C.
using PatchSharedTask = void (*)(const PatchProblem&, const PatchRun* runs, int64_t n_runs, int64_t r0,
                                 int64_t r1, int64_t i0, int64_t i1, float* m, float* l, float* l2, float* o,
                                 float* scratch);
// Same-position rules: the query rows of n_runs runs (each len <= lanes of the instruction set), images [i0, i1);
// m, l, l2 indexed by query row, o with row stride V.
using PatchSameTask = void (*)(const PatchProblem&, const PatchRun* runs, int64_t n_runs, int64_t i0, int64_t i1,
                               float* m, float* l, float* l2, float* o, float* scratch);

// Query rows per shared-rule task: each image buffer is built once per task and serves this many rows.
constexpr int64_t kPatchSharedRows = 32;

// The local family's task kernels of one instruction set (the patch rules, and pca_locality's coordinate softmax).
struct PatchKernelTable {
  const char* isa;
  int lanes;  // fp32 lanes of one vector: the longest run a same-position task takes
  PatchSharedTask shared;
  PatchSameTask same_centre;
  PatchSameTask same_whole;
  CoordinateTask coordinate;
};

const PatchKernelTable& patch_kernels_base();
const PatchKernelTable* patch_kernels_avx2();
const PatchKernelTable* patch_kernels_avx512();
// The widest compiled instruction set the CPU has, capped by AD_CPU_ISA like the global kernels.
const PatchKernelTable& patch_kernels_selected();

// Runs per same-position task (their state must stay in cache while each image streams by), at least 1.
int64_t patch_same_runs_per_task(const PatchProblem& p, int lanes);
// Scratch floats one task needs (per thread).
int64_t patch_scratch_floats(const PatchProblem& p, int lanes);
// The whole call (driver: patch_driver.cpp). m, l, l2: (S, R); o: (S, R, V). Plain C++; the caller validated
// the arguments and released the GIL.
void patch_partials(const PatchProblem& p, int64_t splits, int num_threads, float* m, float* l, float* l2,
                    float* o);

}  // namespace ad_cpu
