// The per-task kernel of pca_locality's coordinate softmax (coordinate.h), compiled once per instruction set.
// Include only from retrieval_isa_*.cpp, after patch_isa_impl.h (whose vector helpers it uses), inside the same
// target pragma; internal linkage, as there.
#if !defined(AD_ISA_NS) || !defined(AD_LANE_BYTES)
#error "include coordinate_isa_impl.h from retrieval_isa_*.cpp after patch_isa_impl.h"
#endif

namespace ad_cpu {
namespace AD_ISA_NS {
namespace {

constexpr int kCoordVecs = 4;  // vectors of candidates per block (coordinate_block)

// Distances of QN (1 or 2) queries to the block's candidates over one support: QN x 4 independent accumulators,
// each candidate vector loaded once per stencil entry. A query's sequence of operations is the same for QN = 1
// and 2, so its distances do not depend on how queries were paired.
template <int QN>
AD_INLINE void coordinate_distances(const float* const* x, const int32_t* AD_RESTRICT idx, int64_t cnt,
                                    const float* AD_RESTRICT yt, VF (*acc)[kCoordVecs]) {
  constexpr int L = kPatchLanes;
  for (int q = 0; q < QN; ++q)
    for (int v = 0; v < kCoordVecs; ++v) acc[q][v] = vzero<float>();
  for (int64_t t = 0; t < cnt; ++t) {
    const int64_t n = idx[t];
    const float* row = yt + n * (kCoordVecs * L);
    VF y[kCoordVecs];
    for (int v = 0; v < kCoordVecs; ++v) y[v] = vload<float>(row + v * L);
    for (int q = 0; q < QN; ++q) {
      const VF xb = vbroadcast(x[q][n]);
      for (int v = 0; v < kCoordVecs; ++v) {
        const VF e = xb - y[v];
        acc[q][v] += e * e;
      }
    }
  }
}

// Folds one block into the state (m, l, o) of one (query, coordinate): logits from the distances, `bias` 0 for
// the valid lanes and -inf for the others, values at `val`.
AD_INLINE void coordinate_fold(float c2, const VF* dist, const VF* bias, const float* AD_RESTRICT val, float* m,
                               float* l, float* o) {
  constexpr int L = kPatchLanes;
  VF z[kCoordVecs];
  for (int v = 0; v < kCoordVecs; ++v) z[v] = vlogits(dist[v], vbroadcast(c2)) + bias[v];
  const float zmax = vmax_lanes(vmaxv(vmaxv(z[0], z[1]), vmaxv(z[2], z[3])));
  float mm = *m;
  if (!(zmax > neg_inf<float>()) || !(zmax >= mm - kPatchCutoff)) return;  // no valid lane, or none passes
  float ll = *l, oo = *o;
  if (zmax > mm) {
    const float a = exp2_scalar(mm - zmax);  // 0 for mm = -inf
    ll *= a;
    oo *= a;
    mm = zmax;
  }
  VF ws = vzero<float>(), wv = vzero<float>();
  for (int v = 0; v < kCoordVecs; ++v) {
    const VF w = vexp2_cut(z[v] - mm);  // invalid lanes: -inf -> 0 (their values are finite)
    ws += w;
    wv += w * vload<float>(val + v * L);
  }
  *m = mm;
  *l = ll + vsum<float>(ws);
  *o = oo + vsum<float>(wv);
}

// Split s x queries [b0, b1). Scratch: the transposed block, D rows of coordinate_block(L) floats.
void coordinate_task(const CoordinateProblem& p, const CoordinateSupport& sup, int64_t s, int64_t b0, int64_t b1,
                     float* m, float* l, float* o, float* scratch) {
  constexpr int L = kPatchLanes;
  constexpr int J = kCoordVecs * L;
  const int64_t D = p.D, nq = b1 - b0;
  const int64_t j0 = p.splits[s], j1 = p.splits[s + 1];
  float* yt = scratch;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = (s * p.B + b) * D;
    std::fill(m + row, m + row + D, neg_inf<float>());
    std::fill(l + row, l + row + D, 0.0f);
    std::fill(o + row, o + row + D, 0.0f);
  }
  float tile[J];
  VF bias[kCoordinateQueries][kCoordVecs];
  for (int64_t jb = j0; jb < j1; jb += J) {
    const int nj = static_cast<int>(std::min<int64_t>(J, j1 - jb));
    // the block's candidates, transposed: yt[n * J + u] = value of coordinate n of candidate jb + u (0 past nj)
    if (nj < J) std::fill(yt, yt + D * J, 0.0f);  // lanes past the split's end: finite values, weight 0
    for (int u = 0; u < nj; ++u) {
      float* dst = yt + u;
      if (p.key_type == kPatchKeysU8) {
        const uint8_t* src = static_cast<const uint8_t*>(p.images) + (jb + u) * D;
        for (int64_t n = 0; n < D; ++n) dst[n * J] = static_cast<float>(src[n]) * p.scale + p.shift;
      } else {
        const float* src = static_cast<const float*>(p.images) + (jb + u) * D;
        for (int64_t n = 0; n < D; ++n) dst[n * J] = src[n] * p.scale + p.shift;
      }
    }
    bool any = false;
    for (int64_t q = 0; q < nq; ++q) {
      for (int u = 0; u < J; ++u) {
        const bool ok = u < nj && (p.query_labels == nullptr || p.image_labels[jb + u] == p.query_labels[b0 + q]);
        tile[u] = ok ? 0.0f : neg_inf<float>();
        any = any || ok;
      }
      for (int v = 0; v < kCoordVecs; ++v) bias[q][v] = vload<float>(tile + v * L);
    }
    if (!any) continue;  // no candidate of any of these queries' classes in the block
    for (int64_t mo = 0; mo < D; ++mo) {
      const int32_t* idx = sup.index + sup.offset[mo];
      const int64_t cnt = sup.offset[mo + 1] - sup.offset[mo];
      const float* val = yt + static_cast<int64_t>(p.value_index[mo]) * J;
      for (int64_t q = 0; q < nq; q += 2) {
        const int64_t b = b0 + q;
        const float* x[2] = {p.x + b * D, p.x + std::min(b + 1, b1 - 1) * D};
        VF acc[2][kCoordVecs];
        const int pair = q + 1 < nq ? 2 : 1;
        if (pair == 2) coordinate_distances<2>(x, idx, cnt, yt, acc);
        else coordinate_distances<1>(x, idx, cnt, yt, acc);
        for (int r = 0; r < pair; ++r) {
          const int64_t at = (s * p.B + b + r) * D + mo;
          coordinate_fold(p.coef2[b + r], acc[r], bias[q + r], val, m + at, l + at, o + at);
        }
      }
    }
  }
}

}  // namespace
}  // namespace AD_ISA_NS
}  // namespace ad_cpu
