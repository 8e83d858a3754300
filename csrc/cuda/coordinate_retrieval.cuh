// CUDA kernel of pca_locality's per-coordinate softmax: the Wiener masks as sparse stencils. The contract of the
// Triton kernel (kernels/coordinate_retrieval.py) and the C++ one (csrc/cpu/coordinate.h), so that one Python
// driver (analytic_diffusion/ops/fused_coordinate.py) combines all three.
//
// Every output coordinate m has its own input support S(m) (column m of the (nnz, D) stencil table, -1 = padding)
// and its own softmax over the candidates j:
//
//   logit_jm = -coef2_b * sum_{n in S(m)} (x_b[n] - y_j[n])^2     (base 2),     value_jm = y_j[value_index[m]]
//
// with y_j = scale * images[j] + shift. Output per split s (candidates splits[s] .. splits[s+1] - 1), query b and
// coordinate m: m (base 2; -inf without a candidate), l = sum 2^(z - m), o = sum 2^(z - m) * value, each (S, B, D).
// With labels (int64), candidate j counts for query b only when image_labels[j] == query_labels[b].
//
// Torch-free (docs/design.md §7): raw device pointers, a cudaStream_t, cudaError_t return codes, no allocation.
// Deterministic: each thread owns one (split, query, coordinate) and scans its candidates in order; no atomics.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../common/patch_contract.h"

namespace ad_cuda {

// Threads per CTA = output coordinates per CTA (one per thread).
constexpr int kCoordinateThreads = 128;

struct CoordinateProblem {
  const float* x = nullptr;              // (B, D)
  const void* images = nullptr;          // (N, D) uint8 or fp32 (ad_patch::PatchKeys codes in key_type)
  int key_type = ad_patch::kPatchKeysU8;
  const int32_t* stencil = nullptr;      // (nnz, D)
  int64_t nnz = 0;
  const int32_t* value_index = nullptr;  // (D,)
  const float* coef2 = nullptr;          // (B,)
  const int32_t* splits = nullptr;       // (S + 1,) non-decreasing candidate boundaries within [0, N]
  int64_t S = 0;
  const int64_t* image_labels = nullptr;  // (N,) or null
  const int64_t* query_labels = nullptr;  // (B,) or null (both or neither)
  int64_t B = 0, D = 0, N = 0;
  float scale = 1.0f, shift = 0.0f;
};

// Enqueue the partials on `stream` (device pointers m, l, o: (S, B, D)). Returns cudaErrorInvalidValue for
// invalid arguments, else the launch error; never synchronises.
cudaError_t coordinate_partials(const CoordinateProblem& p, float* m, float* l, float* o, cudaStream_t stream);

}  // namespace ad_cuda
