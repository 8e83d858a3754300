// Drivers of the subset kernels (subset_isa_impl.h): one query row per iteration, rows independent, so the
// result of a row never depends on the batch or on the thread count.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "retrieval.h"

namespace ad_cpu {

void subset_relative_d2(const SubsetProblem& p, const double* q, int64_t B, const int64_t* index, int64_t K,
                        const int64_t* ref, int num_threads, double* out) {
  if (B == 0 || K == 0) return;
  const auto row = kernels_selected().subset_rel;
  const int64_t D = p.D;
  run_tasks<double>(B, num_threads, 3 * std::max<int64_t>(D, 1), [&](int64_t b, double* buf) {
    row(p, q + b * D, index + b * K, K, ref[b], out + b * K, buf);
  });
}

void subset_weighted_sum(const SubsetProblem& p, int64_t B, const int64_t* index, const double* weight, int64_t K,
                         int num_threads, double* out) {
  if (B == 0) return;
  const auto row = kernels_selected().subset_sum;
  const int64_t D = p.D;
  run_tasks<double>(B, num_threads, std::max<int64_t>(D, 1), [&](int64_t b, double* buf) {
    row(p, index + b * K, weight + b * K, K, out + b * D, buf);
  });
}

}  // namespace ad_cpu
