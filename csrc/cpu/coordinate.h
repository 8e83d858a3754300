// C++ CPU kernel of pca_locality's per-coordinate softmax: the Wiener masks as sparse stencils, the same contract
// as the Triton kernel (kernels/coordinate_retrieval.py), so that one Python driver
// (analytic_diffusion/ops/fused_coordinate.py) runs both.
//
// Every output coordinate m has its own input support S(m) and its own softmax over the candidates j:
//
//   logit_jm = -coef2_b * sum_{n in S(m)} (x_b[n] - y_j[n])^2     (base 2),     value_jm = y_j[value_index[m]]
//
// with y_j = scale * images[j] + shift. Output per split s (candidates splits[s] .. splits[s+1] - 1), query b and
// coordinate m: m (base 2; -inf without a candidate), l = sum 2^(z - m), o = sum 2^(z - m) * value, each (S, B, D).
// With labels, candidate j counts for query b only when image_labels[j] == query_labels[b].
//
// Layout of the work: a task owns one split and a group of queries; it converts the split's candidates a block
// of kCoordinateBlock at a time into a transposed (D, block) fp32 buffer, so that for every output coordinate the
// stencil entries read contiguous vectors of candidates; the supports are compacted from the -1 padded table once
// per call. Direct-form distances (no cancellation: exact at every σ up to fp32 rounding); weights below 2^-63 of
// the running maximum dropped, as in the patch kernels. Results are bitwise independent of the thread count.
#pragma once

#include <cstdint>

#include "../common/patch_contract.h"

namespace ad_cpu {

struct CoordinateProblem {
  const float* x = nullptr;              // (B, D) queries
  const void* images = nullptr;          // (N, D) uint8 or fp32 (ad_patch::PatchKeys codes in key_type)
  int key_type = ad_patch::kPatchKeysU8;
  const int32_t* stencil = nullptr;      // (nnz, D): column m lists S(m), padded with -1
  int64_t nnz = 0;
  const int32_t* value_index = nullptr;     // (D,)
  const float* coef2 = nullptr;             // (B,) base-2 coefficients
  const int32_t* splits = nullptr;          // (S + 1,) candidate boundaries, non-decreasing, within [0, N]
  int64_t S = 0;
  const int64_t* image_labels = nullptr;  // (N,) or null
  const int64_t* query_labels = nullptr;  // (B,) or null (both or neither)
  int64_t B = 0, D = 0, N = 0;
  float scale = 1.0f, shift = 0.0f;
};

// Queries per task: the candidate block converted once serves all of them.
constexpr int64_t kCoordinateQueries = 8;

// The supports compacted: output m reads index[offset[m] .. offset[m + 1]).
struct CoordinateSupport {
  const int64_t* offset;  // (D + 1,)
  const int32_t* index;
};

// Task kernel (per instruction set): split s, queries [b0, b1); writes m, l, o at (s, b, :) completely. Scratch:
// coordinate_scratch_floats(D, lanes) floats.
using CoordinateTask = void (*)(const CoordinateProblem&, const CoordinateSupport&, int64_t s, int64_t b0,
                                int64_t b1, float* m, float* l, float* o, float* scratch);

// Candidates per block: four vectors (the distance loop keeps 4 accumulators per query, 8 for a query pair).
inline int coordinate_block(int lanes) { return 4 * lanes; }
inline int64_t coordinate_scratch_floats(int64_t D, int lanes) { return D * coordinate_block(lanes); }

// The partials (see above) into m, l, o (S, B, D); num_threads <= 0: OpenMP's default.
void coordinate_partials(const CoordinateProblem& p, int num_threads, float* m, float* l, float* o);

}  // namespace ad_cpu
