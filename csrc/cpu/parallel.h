// OpenMP helpers shared by the CPU drivers (retrieval_driver.cpp, patch_driver.cpp, coordinate_driver.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

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

// Runs task(t, scratch) for t in [0, ntasks) on the threads (dynamic schedule: tasks may differ in cost), each
// thread with its own `scratch_size` elements of scratch of type S. Tasks must write disjoint outputs.
template <class S = float, class Task>
void run_tasks(int64_t ntasks, int num_threads, int64_t scratch_size, const Task& task) {
  const int nt = resolve_threads(num_threads, ntasks);
  std::vector<S> scratch(static_cast<size_t>(nt) * scratch_size);
#if AD_WITH_OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
#endif
  for (int64_t t = 0; t < ntasks; ++t) task(t, scratch.data() + static_cast<int64_t>(thread_id()) * scratch_size);
}

}  // namespace ad_cpu
