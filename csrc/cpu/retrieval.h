// Shared declarations of the C++ CPU retrieval kernels (analytic_diffusion._cpu). No torch, no Python here.
//
// The work of one call is split into tasks (query block x candidate segment). A task streams its candidate
// rows in tiles and writes its own partial result; the driver (retrieval_driver.cpp) combines the partials in
// segment order. The split depends only on N and B, never on the thread count, so results are bitwise
// identical for any number of threads.
//
// The per-task kernels are compiled once per instruction set (retrieval_isa_base.cpp, and on x86-64
// retrieval_isa_avx2.cpp / retrieval_isa_avx512.cpp), chosen at run time: the module stays portable (no -march).
// Results are bitwise reproducible for a given instruction set; different instruction sets sum the lanes in
// a different order (and with or without FMA), so they agree to rounding, not bitwise.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ad_cpu {

enum class KeyType : int { U8 = 0, F32 = 1, F64 = 2 };

// Candidate row j is y_j = scale * keys[j] + shift, computed in the query dtype T.
struct Problem {
  const void* queries = nullptr;  // (B, D) T
  const void* keys = nullptr;     // (N, D) uint8 / float / double
  KeyType key_type = KeyType::F32;
  int64_t B = 0, N = 0, D = 0;
  double scale = 1.0, shift = 0.0;
  const void* coef = nullptr;             // (B,) T (softmax only)
  const int64_t* key_labels = nullptr;    // (N,) or null
  const int64_t* query_labels = nullptr;  // (B,) or null; both non-null => class filter
};

// Rows of candidates per tile: one tile is converted to T once and used for every query of the task.
constexpr int64_t kTileRows = 16;
// Queries per task: the tile is reused from cache across these.
constexpr int64_t kQueryBlock = 32;

// Softmax partial of queries [b0, b1) over candidates [j0, j1). Outputs are indexed by b - b0 (o row stride
// D) and must be initialised to m = -inf, l = l2 = 0, o = 0. ybuf: scratch of kTileRows * D values of T.
using SoftmaxTaskF = void (*)(const Problem&, int64_t b0, int64_t b1, int64_t j0, int64_t j1, float* m,
                              float* l, float* l2, float* o, float* ybuf);
using SoftmaxTaskD = void (*)(const Problem&, int64_t b0, int64_t b1, int64_t j0, int64_t j1, double* m,
                              double* l, double* l2, double* o, double* ybuf);
// k-nearest of queries [b0, b1) over candidates [j0, j1): for each row, up to cap = min(k, j1 - j0) entries
// (dist, index) in any order at dist + (b - b0) * stride; count[b - b0] = how many were written.
using KnnTaskF = void (*)(const Problem&, int64_t b0, int64_t b1, int64_t j0, int64_t j1, int64_t cap,
                          float* dist, int64_t* index, int64_t stride, int64_t* count, float* ybuf);
using KnnTaskD = void (*)(const Problem&, int64_t b0, int64_t b1, int64_t j0, int64_t j1, int64_t cap,
                          double* dist, int64_t* index, int64_t stride, int64_t* count, double* ybuf);

// An explicit subset of candidates (the k-NN denoisers' exact float64 rescoring and weighted mean): row i of
// keys (N, D) as scale * keys[i] + shift in float64; i >= N is row i - N mirrored left-right within rows of
// `width` values (the image width; 0 when the caller allows no mirrored index).
struct SubsetProblem {
  const void* keys = nullptr;
  KeyType key_type = KeyType::U8;
  int64_t N = 0, D = 0, width = 0;
  double scale = 1.0, shift = 0.0;
};

// One query row: out[j] = ||q - y_idx[j]||^2 - ||q - y_ref||^2 (+inf where idx[j] < 0); buf: 3 D doubles.
using SubsetRelRow = void (*)(const SubsetProblem&, const double* q, const int64_t* idx, int64_t K, int64_t ref,
                              double* out, double* buf);
// One query row: out (D) = sum_j w[j] y_idx[j] over idx[j] >= 0, w[j] != 0, in list order; buf: D doubles.
using SubsetSumRow = void (*)(const SubsetProblem&, const int64_t* idx, const double* w, int64_t K, double* out,
                              double* buf);

struct KernelTable {
  const char* isa;
  SoftmaxTaskF softmax_f;
  SoftmaxTaskD softmax_d;
  KnnTaskF knn_f;
  KnnTaskD knn_d;
  SubsetRelRow subset_rel;
  SubsetSumRow subset_sum;
};

// Baseline kernels (whatever the compiler targets by default: SSE2 on x86-64, NEON on arm64).
const KernelTable& kernels_base();
// AVX2+FMA and AVX-512 kernels, or nullptr where they were not compiled.
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
// The table used by the driver: the widest compiled instruction set the CPU has, capped by the environment
// variable AD_CPU_ISA ("base", "avx2" or "avx512"; tests and debugging; any other value throws
// std::invalid_argument).
const KernelTable& kernels_selected();
// The instruction sets this build can run on this CPU, narrowest first (each one's global and patch tables exist).
std::vector<std::string> runnable_isas();

// Drivers (retrieval_driver.cpp). Plain C++; the caller has validated the arguments and released the GIL.
template <class T>
void softmax_retrieval(const Problem& p, int num_threads, T* m, T* l, T* l2, T* o);
template <class T>
void knn_search(const Problem& p, int64_t k, int num_threads, T* dist, int64_t* index);

// Subset drivers (subset_driver.cpp): rows of (B, K) index lists, parallel over query rows.
void subset_relative_d2(const SubsetProblem& p, const double* q, int64_t B, const int64_t* index, int64_t K,
                        const int64_t* ref, int num_threads, double* out);
void subset_weighted_sum(const SubsetProblem& p, int64_t B, const int64_t* index, const double* weight, int64_t K,
                         int num_threads, double* out);

// Number of candidate segments: depends only on N (determinism across thread counts).
int64_t num_segments(int64_t N);

}  // namespace ad_cpu
