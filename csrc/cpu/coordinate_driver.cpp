// Driver of the CPU coordinate kernel (coordinate.h): the supports compacted once, tasks (split x query group),
// the OpenMP loop. Every task writes its own output slots, so results do not depend on the thread count.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "coordinate.h"
#include "parallel.h"
#include "patch.h"

namespace ad_cpu {

void coordinate_partials(const CoordinateProblem& p, int num_threads, float* m, float* l, float* o) {
  if (p.B == 0 || p.S == 0 || p.D == 0) return;
  // column m of the -1 padded table, entries kept in table order
  std::vector<int64_t> offset(p.D + 1, 0);
  for (int64_t t = 0; t < p.nnz; ++t)
    for (int64_t c = 0; c < p.D; ++c) offset[c + 1] += p.stencil[t * p.D + c] >= 0;
  for (int64_t c = 0; c < p.D; ++c) offset[c + 1] += offset[c];
  std::vector<int32_t> index(std::max<int64_t>(1, offset[p.D]));
  std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
  for (int64_t t = 0; t < p.nnz; ++t)
    for (int64_t c = 0; c < p.D; ++c) {
      const int32_t n = p.stencil[t * p.D + c];
      if (n >= 0) index[fill[c]++] = n;
    }
  const CoordinateSupport sup{offset.data(), index.data()};
  const PatchKernelTable& kt = patch_kernels_selected();
  const int64_t groups = (p.B + kCoordinateQueries - 1) / kCoordinateQueries;
  const int64_t ntasks = groups * p.S;
  run_tasks(ntasks, num_threads, coordinate_scratch_floats(p.D, kt.lanes), [&](int64_t t, float* buf) {
    const int64_t s = t / groups, g = t % groups;
    const int64_t b0 = g * kCoordinateQueries, b1 = std::min(p.B, b0 + kCoordinateQueries);
    kt.coordinate(p, sup, s, b0, b1, m, l, o, buf);
  });
}

}  // namespace ad_cpu
