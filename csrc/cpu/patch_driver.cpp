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

int64_t patch_same_runs_per_task(const PatchProblem& p, int lanes) {
  // ~256 KiB of per-run state (an L2's worth), and at most 64 runs
  const int64_t per_run = patch_same_run_floats(p.C, p.k, p.rule, lanes);
  return std::max<int64_t>(1, std::min<int64_t>(64, (int64_t(64) << 10) / per_run));
}

int64_t patch_scratch_floats(const PatchProblem& p, int lanes) {
  // the padded image + one vector of slack, then per row (shared) or per run (same-position) state
  const int64_t pad = int64_t(p.C) * (p.H + p.k - 1) * (p.W + p.k - 1) + lanes;
  if (p.rule == kPatchShared) return pad + kPatchSharedRows * (1 + (2 + p.C) * lanes);
  return pad + patch_same_runs_per_task(p, lanes) * patch_same_run_floats(p.C, p.k, p.rule, lanes);
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
  // Shared rule: runs of the candidate list (any length: a task walks them in vectors), tasks of kPatchSharedRows
  // query rows; same-position rules: the query rows in runs of at most one vector, tasks of several runs.
  const std::vector<PatchRun> runs =
      shared ? make_runs(p.positions, p.n_pos, INT32_MAX) : make_runs(p.positions, R, kt.lanes);
  const int64_t n_runs = static_cast<int64_t>(runs.size());
  const int64_t per_task = shared ? kPatchSharedRows : patch_same_runs_per_task(p, kt.lanes);
  const int64_t units = ((shared ? R : n_runs) + per_task - 1) / per_task;
  const int64_t ntasks = units * S;
  run_tasks(ntasks, num_threads, patch_scratch_floats(p, kt.lanes), [&](int64_t t, float* buf) {
    // split-major: consecutive tasks scan the same images, which then stay in cache
    const int64_t s = t / units, u = t % units;
    const int64_t i0 = s * per, i1 = std::min(p.n_img, i0 + per);
    if (shared) {
      const int64_t r0 = u * per_task, r1 = std::min(R, r0 + per_task), slot = s * R + r0;
      kt.shared(p, runs.data(), n_runs, r0, r1, i0, i1, m + slot, l + slot, l2 + slot, o + slot * V, buf);
    } else {
      const int64_t g0 = u * per_task, g1 = std::min(n_runs, g0 + per_task), slot = s * R;
      (p.rule == kPatchSameWhole ? kt.same_whole : kt.same_centre)(p, runs.data() + g0, g1 - g0, i0, i1, m + slot,
                                                                   l + slot, l2 + slot, o + slot * V, buf);
    }
  });
}

}  // namespace ad_cpu
