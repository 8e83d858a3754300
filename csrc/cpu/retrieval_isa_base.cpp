// Per-task kernels for the compiler's default target (SSE2 on x86-64, NEON on arm64): always built.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "patch.h"
#include "retrieval.h"

#define AD_ISA_NS isa_base
#define AD_LANE_BYTES 16  // one SSE / NEON register per (query, row) pair: 8 accumulators in the 2x4 block
#include "retrieval_isa_impl.h"
#include "subset_isa_impl.h"
#include "patch_isa_impl.h"
#include "coordinate_isa_impl.h"

namespace ad_cpu {

const KernelTable& kernels_base() {
  static const KernelTable table{"base", &isa_base::softmax_task<float>, &isa_base::softmax_task<double>,
                                 &isa_base::knn_task<float>, &isa_base::knn_task<double>,
                                 &isa_base::subset_rel_row, &isa_base::subset_sum_row};
  return table;
}

const PatchKernelTable& patch_kernels_base() {
  static const PatchKernelTable table{"base", isa_base::kPatchLanes, &isa_base::patch_shared_task,
                                      &isa_base::patch_same_task<false>, &isa_base::patch_same_task<true>,
                                      &isa_base::coordinate_task};
  return table;
}

}  // namespace ad_cpu
