// Drivers of the CPU retrieval kernels: the deterministic split into tasks, the OpenMP loop, and the in-order
// combine of the per-segment partials (docs/design.md §6: split-N partials combined in a fixed order, no atomics).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"
#include "patch.h"
#include "retrieval.h"

namespace ad_cpu {

namespace {

// Bytes of per-segment partial state per query chunk: queries are processed in chunks so that nseg partial
// (B, D) states never take more than this (the chunk size depends on N, D, B only, not on threads).
constexpr int64_t kPartialBudget = int64_t(64) << 20;

int64_t seg_begin(int64_t s, int64_t nseg, int64_t N) { return s * N / nseg; }

int64_t query_chunk(int64_t B, int64_t per_row_bytes) {
  int64_t qc = kPartialBudget / std::max<int64_t>(1, per_row_bytes);
  qc = std::max<int64_t>(kQueryBlock, qc / kQueryBlock * kQueryBlock);
  return std::min<int64_t>(std::max<int64_t>(B, 1), qc);
}

template <class T>
struct Tasks;
template <>
struct Tasks<float> {
  static SoftmaxTaskF softmax(const KernelTable& k) { return k.softmax_f; }
  static KnnTaskF knn(const KernelTable& k) { return k.knn_f; }
};
template <>
struct Tasks<double> {
  static SoftmaxTaskD softmax(const KernelTable& k) { return k.softmax_d; }
  static KnnTaskD knn(const KernelTable& k) { return k.knn_d; }
};

template <class T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

template <class T>
bool knn_less(T da, int64_t ia, T db, int64_t ib) {
  return da < db || (da == db && ia < ib);
}

bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

}  // namespace

int64_t num_segments(int64_t N) {
  if (N <= 0) return 1;
  return std::min<int64_t>(64, (N + 255) / 256);
}

namespace {

// The instruction sets, narrowest first; AD_CPU_ISA names one of them as a cap (unset: no cap). An unknown name is
// an error rather than the widest set, so that a typo in a CI matrix cannot test the default path twice.
constexpr const char* kIsaNames[] = {"base", "avx2", "avx512"};
constexpr int kIsaCount = 3;

int isa_cap() {
  const char* env = std::getenv("AD_CPU_ISA");
  if (env == nullptr || *env == '\0') return kIsaCount - 1;
  for (int i = 0; i < kIsaCount; ++i)
    if (std::strcmp(env, kIsaNames[i]) == 0) return i;
  throw std::invalid_argument(std::string("AD_CPU_ISA: expected one of base, avx2, avx512 (or unset), got '") + env +
                              "'");
}

// The widest compiled table the CPU can run, within the cap.
template <class Table>
const Table& widest(const Table& base, const Table* avx2, const Table* avx512) {
  const int cap = isa_cap();
  if (cap >= 2 && avx512 != nullptr && cpu_has_avx512()) return *avx512;
  if (cap >= 1 && avx2 != nullptr && cpu_has_avx2()) return *avx2;
  return base;
}

}  // namespace

std::vector<std::string> runnable_isas() {
  std::vector<std::string> out{kIsaNames[0]};
  if (kernels_avx2() != nullptr && patch_kernels_avx2() != nullptr && cpu_has_avx2()) out.emplace_back(kIsaNames[1]);
  if (kernels_avx512() != nullptr && patch_kernels_avx512() != nullptr && cpu_has_avx512())
    out.emplace_back(kIsaNames[2]);
  return out;
}

const KernelTable& kernels_selected() { return widest(kernels_base(), kernels_avx2(), kernels_avx512()); }

const PatchKernelTable& patch_kernels_selected() {
  return widest(patch_kernels_base(), patch_kernels_avx2(), patch_kernels_avx512());
}

template <class T>
void softmax_retrieval(const Problem& p, int num_threads, T* m, T* l, T* l2, T* o) {
  const int64_t B = p.B, N = p.N, D = p.D;
  if (B == 0) return;
  const auto task = Tasks<T>::softmax(kernels_selected());
  const int64_t nseg = num_segments(N);
  const int64_t qc = query_chunk(B, nseg * (D + 3) * static_cast<int64_t>(sizeof(T)));
  std::vector<T> pm(nseg * qc), pl(nseg * qc), pl2(nseg * qc), po(nseg * qc * D);
  for (int64_t c0 = 0; c0 < B; c0 += qc) {
    const int64_t c1 = std::min(B, c0 + qc), nc = c1 - c0;
    const int64_t nqb = (nc + kQueryBlock - 1) / kQueryBlock;
    run_tasks<T>(nqb * nseg, num_threads, kTileRows * std::max<int64_t>(D, 1), [&](int64_t t, T* ybuf) {
      const int64_t s = t % nseg, qb = t / nseg;
      const int64_t b0 = c0 + qb * kQueryBlock, b1 = std::min(c1, b0 + kQueryBlock);
      const int64_t off = s * nc + (b0 - c0);
      for (int64_t b = 0; b < b1 - b0; ++b) {
        pm[off + b] = neg_inf<T>();
        pl[off + b] = T(0);
        pl2[off + b] = T(0);
      }
      std::fill(po.begin() + off * D, po.begin() + (off + (b1 - b0)) * D, T(0));
      task(p, b0, b1, seg_begin(s, nseg, N), seg_begin(s + 1, nseg, N), pm.data() + off, pl.data() + off,
           pl2.data() + off, po.data() + off * D, ybuf);
    });
    // Combine the segments of every row in segment order (rows are independent: any thread may take them).
    const int ntc = resolve_threads(num_threads, nc);
    (void)ntc;  // unused without OpenMP
#if AD_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(ntc) if (ntc > 1)
#endif
    for (int64_t bb = 0; bb < nc; ++bb) {
      const int64_t b = c0 + bb;
      T M = neg_inf<T>(), L = T(0), L2 = T(0);
      T* O = o + b * D;
      std::fill(O, O + D, T(0));
      for (int64_t s = 0; s < nseg; ++s) {
        const int64_t i = s * nc + bb;
        const T ms = pm[i];
        if (!(ms > neg_inf<T>())) continue;  // empty segment for this row: contributes nothing (no -inf - -inf)
        const T* os = po.data() + i * D;
        if (!(M > neg_inf<T>())) {
          M = ms;
          L = pl[i];
          L2 = pl2[i];
          std::copy(os, os + D, O);
        } else if (ms > M) {
          const T a = std::exp(M - ms);
          L = L * a + pl[i];
          L2 = L2 * (a * a) + pl2[i];
          for (int64_t d = 0; d < D; ++d) O[d] = O[d] * a + os[d];
          M = ms;
        } else {
          const T a = std::exp(ms - M);
          L = L + pl[i] * a;
          L2 = L2 + pl2[i] * (a * a);
          for (int64_t d = 0; d < D; ++d) O[d] = O[d] + os[d] * a;
        }
      }
      m[b] = M;
      l[b] = L;
      l2[b] = L2;
    }
  }
}

template <class T>
void knn_search(const Problem& p, int64_t k, int num_threads, T* dist, int64_t* index) {
  const int64_t B = p.B, N = p.N;
  if (B == 0 || k <= 0) return;
  const auto task = Tasks<T>::knn(kernels_selected());
  // Segments of at least ~4k rows where N allows (but no fewer than 8, or num_segments(N) if smaller): each
  // segment keeps up to k survivors per row for the merge, so a k close to the segment size would hand nearly
  // every row to the merge. Depends on (N, k) only, never on the thread count.
  const int64_t nseg = std::min(num_segments(N), std::max<int64_t>(8, N / std::max<int64_t>(1, 4 * k)));
  // Segment s keeps its best min(k, |s|) candidates per row, at offset off[s] of the row's candidate list.
  std::vector<int64_t> cap(nseg), off(nseg + 1, 0);
  for (int64_t s = 0; s < nseg; ++s) {
    cap[s] = std::min(k, seg_begin(s + 1, nseg, N) - seg_begin(s, nseg, N));
    off[s + 1] = off[s] + cap[s];
  }
  const int64_t total = std::max<int64_t>(off[nseg], 1);
  const int64_t qc = query_chunk(B, total * static_cast<int64_t>(sizeof(T) + sizeof(int64_t)) +
                                        nseg * static_cast<int64_t>(sizeof(int64_t)));
  std::vector<T> cd(qc * total);
  std::vector<int64_t> ci(qc * total), cnt(nseg * qc);
  for (int64_t c0 = 0; c0 < B; c0 += qc) {
    const int64_t c1 = std::min(B, c0 + qc), nc = c1 - c0;
    const int64_t nqb = (nc + kQueryBlock - 1) / kQueryBlock;
    run_tasks<T>(nqb * nseg, num_threads, kTileRows * std::max<int64_t>(p.D, 1), [&](int64_t t, T* ybuf) {
      const int64_t s = t % nseg, qb = t / nseg;
      const int64_t b0 = c0 + qb * kQueryBlock, b1 = std::min(c1, b0 + kQueryBlock);
      const int64_t row0 = (b0 - c0) * total + off[s];
      task(p, b0, b1, seg_begin(s, nseg, N), seg_begin(s + 1, nseg, N), cap[s], cd.data() + row0,
           ci.data() + row0, total, cnt.data() + s * nc + (b0 - c0), ybuf);
    });
    // Merge per row: the union of the segments' survivors, sorted by (distance, index); pad to k.
    const int ntc = resolve_threads(num_threads, nc);
    (void)ntc;  // unused without OpenMP
#if AD_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(ntc) if (ntc > 1)
#endif
    for (int64_t bb = 0; bb < nc; ++bb) {
      std::vector<std::pair<T, int64_t>> cand;
      cand.reserve(static_cast<size_t>(total));
      for (int64_t s = 0; s < nseg; ++s) {
        const int64_t base = bb * total + off[s];
        for (int64_t e = 0; e < cnt[s * nc + bb]; ++e) cand.emplace_back(cd[base + e], ci[base + e]);
      }
      const int64_t keep = std::min<int64_t>(k, static_cast<int64_t>(cand.size()));
      const auto less = [](const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
        return knn_less(a.first, a.second, b.first, b.second);
      };
      // Select, then sort only the kept (a total order: the result does not depend on the algorithm).
      if (keep > 0 && keep < static_cast<int64_t>(cand.size()))
        std::nth_element(cand.begin(), cand.begin() + (keep - 1), cand.end(), less);
      std::sort(cand.begin(), cand.begin() + keep, less);
      const int64_t b = c0 + bb;
      for (int64_t e = 0; e < k; ++e) {
        dist[b * k + e] = e < keep ? cand[e].first : std::numeric_limits<T>::infinity();
        index[b * k + e] = e < keep ? cand[e].second : int64_t(-1);
      }
    }
  }
}

template void softmax_retrieval<float>(const Problem&, int, float*, float*, float*, float*);
template void softmax_retrieval<double>(const Problem&, int, double*, double*, double*, double*);
template void knn_search<float>(const Problem&, int64_t, int, float*, int64_t*);
template void knn_search<double>(const Problem&, int64_t, int, double*, int64_t*);

}  // namespace ad_cpu
