// Per-row kernels over an explicit subset of candidates (the exact rescoring and weighted mean of the k-NN
// denoisers: topk, knn), compiled once per instruction set like retrieval_isa_impl.h, which must be included
// first (Vec, vload, vsum, AD_INLINE). Include only from retrieval_isa_*.cpp, inside their target pragmas.
//
// Everything is float64 and row by row: a query's values depend only on its own indices, never on the batch.
// Candidate rows are converted (and mirrored for an index >= N) into a float64 buffer, then reduced with two
// vector accumulators in a fixed order. (Converting in registers instead measured 2x slower: GCC scalarises a
// uint8 -> double vector conversion, while the whole-row loop vectorises.)
#if !defined(AD_ISA_NS)
#error "include retrieval_isa_impl.h (with AD_ISA_NS defined) before subset_isa_impl.h"
#endif

namespace ad_cpu {
namespace AD_ISA_NS {
namespace {

// Row i of the candidate set as float64 (scale * key + shift); i >= N is row i - N mirrored within rows of W.
template <class KT>
AD_INLINE void subset_row(const SubsetProblem& p, int64_t i, double* AD_RESTRICT dst) {
  const int64_t D = p.D, W = p.width;
  const bool mirror = i >= p.N;
  const KT* AD_RESTRICT src = static_cast<const KT*>(p.keys) + (mirror ? i - p.N : i) * D;
  const double s = p.scale, t = p.shift;
  if (!mirror) {
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<double>(src[d]) * s + t;
    return;
  }
  for (int64_t r = 0; r < D; r += W)
    for (int64_t w = 0; w < W; ++w) dst[r + w] = static_cast<double>(src[r + W - 1 - w]) * s + t;
}

// Σ_d (y_d − r_d)(y_d + c_d) with c = r − 2q: ‖q − y‖² − ‖q − r‖² without the ‖q‖² term (no cancellation
// however far the query), exactly 0 for y = r.
AD_INLINE double subset_rel_dot(const double* AD_RESTRICT y, const double* AD_RESTRICT r,
                                const double* AD_RESTRICT c, int64_t D) {
  constexpr int L = AD_LANE_BYTES / static_cast<int>(sizeof(double));
  using V = Vec<double>;
  V a0 = vzero<double>(), a1 = vzero<double>();
  int64_t d = 0;
  for (; d + 2 * L <= D; d += 2 * L) {
    const V y0 = vload<double>(y + d), y1 = vload<double>(y + d + L);
    a0 += (y0 - vload<double>(r + d)) * (y0 + vload<double>(c + d));
    a1 += (y1 - vload<double>(r + d + L)) * (y1 + vload<double>(c + d + L));
  }
  double tail = 0.0;
  for (; d < D; ++d) tail += (y[d] - r[d]) * (y[d] + c[d]);
  return (vsum<double>(a0) + vsum<double>(a1)) + tail;
}


// out[j] = ‖q − y_idx[j]‖² − ‖q − y_ref‖² for one query (+inf where idx[j] < 0). buf: 3·D doubles.
template <class KT>
void subset_rel_row_tk(const SubsetProblem& p, const double* q, const int64_t* idx, int64_t K, int64_t ref,
                       double* out, double* buf) {
  const int64_t D = p.D;
  double *r = buf, *c = buf + D, *y = buf + 2 * D;
  subset_row<KT>(p, ref, r);
  for (int64_t d = 0; d < D; ++d) c[d] = r[d] - 2.0 * q[d];
  for (int64_t j = 0; j < K; ++j) {
    const int64_t i = idx[j];
    if (i < 0) {
      out[j] = std::numeric_limits<double>::infinity();
      continue;
    }
    subset_row<KT>(p, i, y);
    out[j] = subset_rel_dot(y, r, c, D);
  }
}

// out = Σ_j w[j] y_idx[j] over idx[j] >= 0 and w[j] != 0, in index-list order. buf: D doubles.
template <class KT>
void subset_sum_row_tk(const SubsetProblem& p, const int64_t* idx, const double* w, int64_t K, double* out,
                       double* buf) {
  const int64_t D = p.D;
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    if (idx[j] < 0 || w[j] == 0.0) continue;
    subset_row<KT>(p, idx[j], buf);
    axpy1<double>(out, w[j], buf, D);
  }
}

void subset_rel_row(const SubsetProblem& p, const double* q, const int64_t* idx, int64_t K, int64_t ref,
                    double* out, double* buf) {
  switch (p.key_type) {
    case KeyType::U8: return subset_rel_row_tk<uint8_t>(p, q, idx, K, ref, out, buf);
    case KeyType::F32: return subset_rel_row_tk<float>(p, q, idx, K, ref, out, buf);
    case KeyType::F64: return subset_rel_row_tk<double>(p, q, idx, K, ref, out, buf);
  }
}

void subset_sum_row(const SubsetProblem& p, const int64_t* idx, const double* w, int64_t K, double* out,
                    double* buf) {
  switch (p.key_type) {
    case KeyType::U8: return subset_sum_row_tk<uint8_t>(p, idx, w, K, out, buf);
    case KeyType::F32: return subset_sum_row_tk<float>(p, idx, w, K, out, buf);
    case KeyType::F64: return subset_sum_row_tk<double>(p, idx, w, K, out, buf);
  }
}

}  // namespace
}  // namespace AD_ISA_NS
}  // namespace ad_cpu
