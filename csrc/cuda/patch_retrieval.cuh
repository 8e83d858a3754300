// CUDA kernels of the local family's patch softmax (ELS / bbELS, LS, PSPC-Square): implicit im2col.
//
// Query row r is a C*k*k patch (fp32, (C, k, k) layout). Its candidates are k x k patches of the listed uint8 /
// fp32 training images, cut on chip from the resident images (never materialised), zero outside the image in
// value space (candidate value = scale * u + shift inside, 0.0 outside):
//
//   logit_rj = -coef2_r * sum_f (q_rf - patch_f(image n_j, centre p_j))^2        (base 2: coef2 = coef * log2 e)
//
// Rules (PatchRule):
//   kPatchShared      candidates = every listed image x every centre of one shared position list (ELS / bbELS);
//                     value = the C centre pixels. Key tiles whose best weight is below 2^-skip_bits of every
//                     row's running maximum are skipped (as the Triton kernel; the neglected mass is below
//                     (#candidates) * 2^-skip_bits of the total).
//   kPatchSameCentre  candidates = every listed image at row r's own centre positions[r] (LS); value = the C
//                     centre pixels.
//   kPatchSameWhole   as kPatchSameCentre, value = the whole C*k*k patch (PSPC-Square crop means).
// A centre is the window's top-left corner + k / 2 (also for an even k).
//
// Output: per-split partial states, exactly the layout of kernels/patch_retrieval.py (the Python driver
// combines both backends' partials the same way): m (base 2; -inf for a row without candidates), l = sum
// 2^(z - m), l2 = sum 2^(2(z - m)) as (S, R) and o = sum 2^(z - m) * value as (S, R, V), V = C or C*k*k. Split s
// scans the listed images [s * per, min((s + 1) * per, n_img)), per = ceil(n_img / splits).
//
// Torch-free (docs/design.md §7): raw device pointers, a cudaStream_t, cudaError_t return codes, no allocation.
// Deterministic: fixed reduction orders, no atomics.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/patch_contract.h"

namespace ad_cuda {

using namespace ad_patch;  // PatchProblem, PatchRule, PatchKeys, images_per_split, patch_num_splits, patch_value_width

// Candidates per tile = threads per CTA of the patch kernel (one candidate per thread in the distance phase).
constexpr int kPatchTile = 128;
// Shared memory one CTA may use (the default limit without an opt-in attribute).
constexpr size_t kPatchSmemLimit = 48 * 1024;

// Query rows per CTA (8, 4, 2 or 1: the most whose shared memory fits kPatchSmemLimit), 0 if even 1 does not.
int patch_query_block(int rule, int C, int k);

// Enqueue the partials on `stream` (device pointers m, l, l2: (S, R); o: (S, R, V)). Returns
// cudaErrorInvalidValue for invalid arguments, else the launch error; never synchronises.
cudaError_t patch_partials(const PatchProblem& p, int64_t splits, float* m, float* l, float* l2, float* o,
                           cudaStream_t stream);

}  // namespace ad_cuda
