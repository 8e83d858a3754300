// OpenMP helpers shared by the CPU drivers (retrieval_driver.cpp, patch_driver.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

#if AD_WITH_OPENMP
#include <omp.h>
#endif

namespace ad_cpu {

// Threads for `ntasks` independent tasks: the request (<= 0: OpenMP's default), at most one per task.
inline int resolve_threads(int requested, int64_t ntasks) {
#if AD_WITH_OPENMP
  int nt = requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  int nt = 1;
#endif
  if (ntasks < nt) nt = static_cast<int>(std::max<int64_t>(1, ntasks));
  return std::max(1, nt);
}

inline int thread_id() {
#if AD_WITH_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace ad_cpu
