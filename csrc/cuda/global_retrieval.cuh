// CUDA kernels of the global retrieval primitive (docs/design.md §3, docs/design.md §8.1):
//
//   logit_bj = -coef_b * sum_d (q_bd - y_jd)^2      (nats),   y_j = scale * keys[j] + shift
//
// * softmax_retrieval: the partial state (m, l, l2, o) of analytic_diffusion.ops.partial.PartialState in fp32
//   (m in nats, -inf for a row with no allowed candidate; l = sum 2^(z-m), l2 = sum 2^(2(z-m)), o = sum 2^(z-m) y).
// * knn_search: the k <= 32 nearest candidates by exact squared distance, ascending, ties to the lower index,
//   rows with fewer than k allowed candidates padded with (inf, -1).
//
// Torch-free on purpose (docs/design.md §7): raw device pointers, a cudaStream_t, cudaError_t return codes, no
// allocation (the caller passes a scratch buffer of the size the *_scratch_bytes functions give), so that nvcc
// compiles this file anywhere and any framework can call it. Only the CUDA runtime API header is needed, which
// is plain C/C++: the pybind11 bindings include this header with the host C++ compiler.
//
// Determinism: the candidate split depends on N only (never on the device or its SM count), every reduction
// runs in a fixed order and no floating-point atomics are used, so two calls give identical bits on any GPU
// that runs the same code (the same compiled architecture).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace ad_cuda {

// Storage of the candidate rows. The numeric values are part of the Python binding's interface.
enum KeyType : int { kKeysU8 = 0, kKeysF32 = 1 };

// Largest k of knn_search (one warp lane per kept neighbour).
constexpr int kMaxK = 32;
// Largest number of candidate splits (CTAs along N): ~2 x the SM count of an H100 (132) or A100 (108), so
// that one wave of two CTAs per SM covers the grid. Fixed (not read from the device) for determinism.
constexpr int64_t kMaxSplits = 256;
// Fewest candidates per split: below this the per-split partial (B x D floats) costs more than the keys.
constexpr int64_t kMinKeysPerSplit = 32;

// One retrieval problem. All pointers are device pointers; queries are (B, D) fp32 row-major, keys (N, D)
// row-major uint8 or fp32 (any alignment), labels int64. Candidate j is excluded for query b when both label
// arrays are given and key_labels[j] != query_labels[b].
struct Problem {
  const float* queries = nullptr;
  const void* keys = nullptr;
  int key_type = kKeysU8;
  int64_t B = 0, N = 0, D = 0;
  float scale = 1.0f, shift = 0.0f;
  const int64_t* key_labels = nullptr;    // (N,) or null
  const int64_t* query_labels = nullptr;  // (B,) or null
};

// Number of candidate splits S for N candidates: min(kMaxSplits, ceil(N / kMinKeysPerSplit)), >= 1.
int64_t num_splits(int64_t N);
// Queries per launch of the split kernel for rows of D values (16, 8, 4, 2 or 1; see the .cu).
int query_block(int64_t D);

// Scratch bytes softmax_retrieval needs (per-split partials of one query block).
size_t softmax_scratch_bytes(int64_t N, int64_t D);
// m, l, l2: (B,) fp32; o: (B, D) fp32; coef: (B,) fp32 device pointers. Enqueued on `stream`; returns the
// launch error (cudaErrorInvalidValue for invalid arguments), never synchronises.
cudaError_t softmax_retrieval(const Problem& p, const float* coef, float* m, float* l, float* l2, float* o,
                              void* scratch, size_t scratch_bytes, cudaStream_t stream);

// Scratch bytes knn_search needs.
size_t knn_scratch_bytes(int64_t N, int64_t D, int k);
// dist: (B, k) fp32, index: (B, k) int64 device pointers; 1 <= k <= kMaxK.
cudaError_t knn_search(const Problem& p, int k, float* dist, int64_t* index, void* scratch, size_t scratch_bytes,
                       cudaStream_t stream);

// Number of CUDA devices visible to the runtime (0 when none or no driver); error code in *err when non-null.
int device_count(cudaError_t* err);
// Human-readable name of an error code (cudaGetErrorString).
const char* error_string(cudaError_t err);

}  // namespace ad_cuda
