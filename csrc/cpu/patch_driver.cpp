// Driver of the CPU patch kernels (patch.h): runs of consecutive centres, the task split (query rows x image
// split), the OpenMP loop. Every task writes its own output slots, so results do not depend on the thread count.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "patch.h"

namespace ad_cpu {

namespace {

// Maximal runs of consecutive centres in list order (same row, column + 1 each, or - 1 each), at most max_len
// long.
std::vector<PatchRun> make_runs(const int32_t* pos, int64_t n, int64_t max_len) {
  std::vector<PatchRun> runs;
  for (int64_t i = 0; i < n;) {
    const int32_t row = pos[2 * i], col = pos[2 * i + 1];
    int32_t step = 1;
    if (i + 1 < n && pos[2 * (i + 1)] == row && pos[2 * (i + 1) + 1] == col - 1) step = -1;
    int32_t len = 1;
    while (i + len < n && len < max_len && pos[2 * (i + len)] == row && pos[2 * (i + len) + 1] == col + step * len)
      ++len;
    runs.push_back(PatchRun{i, len, row, step > 0 ? col : col - (len - 1), step < 0});
    i += len;
  }
  return runs;
}

}  // namespace

int64_t patch_scratch_floats(const PatchProblem& p, int lanes) {
  const int64_t F = int64_t(p.C) * p.k * p.k;
  if (p.rule == kPatchShared)  // padded image + slack, then per row: the maximum and (2 + C) vectors of sums
    return int64_t(p.C) * (p.H + p.k - 1) * (p.W + p.k - 1) + lanes + kPatchSharedRows * (1 + (2 + p.C) * lanes);
  return int64_t(p.C) * p.k * (lanes + p.k - 1) + F * lanes + 3 * lanes +
         patch_value_width(p.rule, p.C, p.k) * lanes;
}

void patch_partials(const PatchProblem& p, int64_t splits, int num_threads, float* m, float* l, float* l2,
                    float* o) {
  const int64_t S = patch_num_splits(p.n_img, splits);
  if (p.R == 0 || S == 0) return;
  const PatchKernelTable& kt = patch_kernels_selected();
  const int64_t per = images_per_split(p.n_img, splits);
  const int64_t V = patch_value_width(p.rule, p.C, p.k);
  const int64_t R = p.R;
  const bool shared = p.rule == kPatchShared;
  // Shared rule: runs of the candidate list (any length: a task walks them in vectors); same-position rules: the
  // query rows in runs of at most one vector, one task each.
  const std::vector<PatchRun> runs =
      shared ? make_runs(p.positions, p.n_pos, INT32_MAX) : make_runs(p.positions, R, kt.lanes);
  const int64_t units = shared ? (R + kPatchSharedRows - 1) / kPatchSharedRows : static_cast<int64_t>(runs.size());
  const int64_t ntasks = units * S;
  const int nt = resolve_threads(num_threads, ntasks);
  const int64_t per_thread = patch_scratch_floats(p, kt.lanes);
  std::vector<float> scratch(static_cast<size_t>(nt) * per_thread);
#if AD_WITH_OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
#endif
  for (int64_t t = 0; t < ntasks; ++t) {
    const int64_t s = t % S, u = t / S;
    const int64_t i0 = s * per, i1 = std::min(p.n_img, i0 + per);
    float* buf = scratch.data() + static_cast<int64_t>(thread_id()) * per_thread;
    const int64_t r0 = shared ? u * kPatchSharedRows : runs[u].start;
    const int64_t r1 = shared ? std::min(R, r0 + kPatchSharedRows) : r0 + runs[u].len;
    const int64_t slot = s * R + r0;
    if (shared) {
      kt.shared(p, runs.data(), static_cast<int64_t>(runs.size()), r0, r1, i0, i1, m + slot, l + slot, l2 + slot,
                o + slot * V, buf);
    } else {
      (p.rule == kPatchSameWhole ? kt.same_whole : kt.same_centre)(p, runs[u], i0, i1, m + slot, l + slot,
                                                                   l2 + slot, o + slot * V, buf);
    }
  }
}

}  // namespace ad_cpu
