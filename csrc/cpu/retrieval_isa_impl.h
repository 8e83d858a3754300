// Per-task kernels, compiled once per instruction set. Include only from retrieval_isa_*.cpp, after the
// standard headers and after defining AD_ISA_NS (a namespace name) and AD_LANE_BYTES (bytes of independent
// accumulators per (query, row) pair in the distance loop: one vector register of the target).
//
// Everything here has internal linkage (anonymous namespace) so that code compiled for one instruction set
// can never be picked by the linker for another translation unit (the classic ODR trap of per-file targets).
//
// Numerics (docs/design.md §5): distances are direct, Σ_d (q_d − y_d)², accumulated in the query dtype T in a
// fixed lane order; logits are −coef·dist in nats; the online softmax rescales once per tile. Nothing
// depends on threads: a task's result depends only on (query rows, candidate range).
#if !defined(AD_ISA_NS) || !defined(AD_LANE_BYTES)
#error "define AD_ISA_NS and AD_LANE_BYTES before including retrieval_isa_impl.h"
#endif

namespace ad_cpu {
namespace AD_ISA_NS {
namespace {

#if defined(__GNUC__) || defined(__clang__)
#define AD_RESTRICT __restrict__
#define AD_INLINE inline __attribute__((always_inline))
#else
#define AD_RESTRICT
#define AD_INLINE inline
#endif

template <class T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// Softmax weights below 2^-63 (float) / 2^-511 (double) of the largest one are dropped. Their total share of
// the normaliser is at most N·2^-63 ≈ 1e-19·N (float) or N·1e-154 (double) — far below the dtype's epsilon
// for any dataset up to ~1e10 rows — while keeping them costs a slow libm underflow path per call and subnormal
// arithmetic (w², w·y) that runs ~100x slower on x86. Above the cutoff, w and w² are normal numbers.
template <class T>
struct WeightCutoff;
template <>
struct WeightCutoff<float> {
  static constexpr float log_min = -43.668272f;  // 63·ln 2
};
template <>
struct WeightCutoff<double> {
  static constexpr double log_min = -354.19764;  // 511·ln 2
};

// y = scale * key + shift, in T (as the torch reference: convert to T, then multiply-add in T).
template <class T, class K>
AD_INLINE void load_row(const K* AD_RESTRICT src, T* AD_RESTRICT dst, int64_t D, T s, T t) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]) * s + t;
}

// Sum of L lanes, pairwise in a fixed order (the distance of a pair is: lane-wise partial sums over D in
// steps of L, this reduction, then the scalar tail of D mod L elements).
template <class T>
AD_INLINE T reduce_lanes(T* acc, int L) {
  for (int w = L / 2; w > 0; w /= 2)
    for (int u = 0; u < w; ++u) acc[u] += acc[u + w];
  return acc[0];
}

template <class T>
AD_INLINE T sqdist_tail(const T* AD_RESTRICT q, const T* AD_RESTRICT y, int64_t d, int64_t D) {
  T tail = T(0);
  for (int64_t e = d; e < D; ++e) {
    const T t = q[e] - y[e];
    tail += t * t;
  }
  return tail;
}

// A vector of L = AD_LANE_BYTES / sizeof(T) lanes: GCC/Clang vector extensions (lowered to whatever the target
// has: one AVX register in the AVX2 build, one SSE/NEON register in the base build), or a plain array
// elsewhere. Explicit vectors make the code generation independent of the auto-vectoriser's mood.
#if defined(__GNUC__) || defined(__clang__)
template <class T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(AD_LANE_BYTES)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(AD_LANE_BYTES)));
};
template <class T>
using Vec = typename VecOf<T>::type;
template <class T>
AD_INLINE Vec<T> vzero() {
  return Vec<T>{};
}
template <class T>
AD_INLINE Vec<T> vload(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <class T>
AD_INLINE void vstore(T* p, const Vec<T>& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
#else
template <class T>
struct Vec {
  T x[AD_LANE_BYTES / sizeof(T)];
  friend Vec operator-(const Vec& a, const Vec& b) {
    Vec r;
    for (size_t u = 0; u < AD_LANE_BYTES / sizeof(T); ++u) r.x[u] = a.x[u] - b.x[u];
    return r;
  }
  friend Vec operator*(const Vec& a, const Vec& b) {
    Vec r;
    for (size_t u = 0; u < AD_LANE_BYTES / sizeof(T); ++u) r.x[u] = a.x[u] * b.x[u];
    return r;
  }
  friend Vec operator+(const Vec& a, const Vec& b) {
    Vec r;
    for (size_t u = 0; u < AD_LANE_BYTES / sizeof(T); ++u) r.x[u] = a.x[u] + b.x[u];
    return r;
  }
  friend Vec operator*(T a, const Vec& b) {
    Vec r;
    for (size_t u = 0; u < AD_LANE_BYTES / sizeof(T); ++u) r.x[u] = a * b.x[u];
    return r;
  }
  friend Vec operator*(const Vec& b, T a) { return a * b; }
  Vec& operator+=(const Vec& b) {
    for (size_t u = 0; u < AD_LANE_BYTES / sizeof(T); ++u) x[u] += b.x[u];
    return *this;
  }
};
template <class T>
AD_INLINE Vec<T> vzero() {
  Vec<T> v;
  for (auto& e : v.x) e = T(0);
  return v;
}
template <class T>
AD_INLINE Vec<T> vload(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class T>
AD_INLINE void vstore(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}
#endif

// Sum of a vector's lanes, pairwise in a fixed order.
template <class T>
AD_INLINE T vsum(const Vec<T>& v) {
  constexpr int L = AD_LANE_BYTES / static_cast<int>(sizeof(T));
  T a[L];
  vstore<T>(a, v);
  return reduce_lanes(a, L);
}

// QN (1 or 2) queries against RN (1 or 4) rows: QN·RN independent vector accumulators, each query vector and
// each row vector loaded once per step. Every (query, row) pair goes through exactly the same sequence of
// operations in every variant (same lanes, same reduction, same tail), so a distance does not depend on which
// variant computed it: results do not depend on how queries were paired or rows grouped.
template <class T, int QN, int RN>
AD_INLINE void sqdist_block(const T* AD_RESTRICT q0, const T* AD_RESTRICT q1, const T* AD_RESTRICT y0,
                            const T* AD_RESTRICT y1, const T* AD_RESTRICT y2, const T* AD_RESTRICT y3, int64_t D,
                            T* out0, T* out1) {
  constexpr int L = AD_LANE_BYTES / static_cast<int>(sizeof(T));
  using V = Vec<T>;
  V a00 = vzero<T>(), a01 = vzero<T>(), a02 = vzero<T>(), a03 = vzero<T>();
  V a10 = vzero<T>(), a11 = vzero<T>(), a12 = vzero<T>(), a13 = vzero<T>();
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    const V v0 = vload<T>(y0 + d);
    V v1 = v0, v2 = v0, v3 = v0;
    if constexpr (RN == 4) {
      v1 = vload<T>(y1 + d);
      v2 = vload<T>(y2 + d);
      v3 = vload<T>(y3 + d);
    }
    {
      const V qv = vload<T>(q0 + d);
      const V t0 = qv - v0;
      a00 += t0 * t0;
      if constexpr (RN == 4) {
        const V t1 = qv - v1, t2 = qv - v2, t3 = qv - v3;
        a01 += t1 * t1;
        a02 += t2 * t2;
        a03 += t3 * t3;
      }
    }
    if constexpr (QN == 2) {
      const V qv = vload<T>(q1 + d);
      const V t0 = qv - v0;
      a10 += t0 * t0;
      if constexpr (RN == 4) {
        const V t1 = qv - v1, t2 = qv - v2, t3 = qv - v3;
        a11 += t1 * t1;
        a12 += t2 * t2;
        a13 += t3 * t3;
      }
    }
  }
  out0[0] = vsum<T>(a00) + sqdist_tail(q0, y0, d, D);
  if constexpr (RN == 4) {
    out0[1] = vsum<T>(a01) + sqdist_tail(q0, y1, d, D);
    out0[2] = vsum<T>(a02) + sqdist_tail(q0, y2, d, D);
    out0[3] = vsum<T>(a03) + sqdist_tail(q0, y3, d, D);
  }
  if constexpr (QN == 2) {
    out1[0] = vsum<T>(a10) + sqdist_tail(q1, y0, d, D);
    if constexpr (RN == 4) {
      out1[1] = vsum<T>(a11) + sqdist_tail(q1, y1, d, D);
      out1[2] = vsum<T>(a12) + sqdist_tail(q1, y2, d, D);
      out1[3] = vsum<T>(a13) + sqdist_tail(q1, y3, d, D);
    }
  }
}

template <class T>
AD_INLINE void scale_row(T* AD_RESTRICT o, T a, int64_t D) {
  constexpr int L = AD_LANE_BYTES / static_cast<int>(sizeof(T));
  int64_t d = 0;
  for (; d + L <= D; d += L) vstore<T>(o + d, vload<T>(o + d) * a);
  for (; d < D; ++d) o[d] *= a;
}

template <class T>
AD_INLINE void axpy1(T* AD_RESTRICT o, T p0, const T* AD_RESTRICT y0, int64_t D) {
  constexpr int L = AD_LANE_BYTES / static_cast<int>(sizeof(T));
  int64_t d = 0;
  for (; d + L <= D; d += L) vstore<T>(o + d, vload<T>(o + d) + p0 * vload<T>(y0 + d));
  for (; d < D; ++d) o[d] += p0 * y0[d];
}

// o += p0 y0 + p1 y1 + p2 y2 + p3 y3 (o is loaded and stored once for four rows).
template <class T>
AD_INLINE void axpy4(T* AD_RESTRICT o, const T* p, const T* AD_RESTRICT y0, const T* AD_RESTRICT y1,
                     const T* AD_RESTRICT y2, const T* AD_RESTRICT y3, int64_t D) {
  constexpr int L = AD_LANE_BYTES / static_cast<int>(sizeof(T));
  const T p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
  int64_t d = 0;
  for (; d + L <= D; d += L)
    vstore<T>(o + d, vload<T>(o + d) + ((p0 * vload<T>(y0 + d) + p1 * vload<T>(y1 + d)) +
                                        (p2 * vload<T>(y2 + d) + p3 * vload<T>(y3 + d))));
  for (; d < D; ++d) o[d] += (p0 * y0[d] + p1 * y1[d]) + (p2 * y2[d] + p3 * y3[d]);
}

// The candidate rows of one tile as T rows: either straight into the key storage (float keys of the query
// dtype with the identity map) or converted into ybuf. need[r] == false leaves row r untouched.
template <class T, class K>
AD_INLINE void load_tile(const Problem& p, int64_t jt, int64_t nt, const bool* need, T* ybuf,
                         const T** rows) {
  const K* keys = static_cast<const K*>(p.keys);
  const int64_t D = p.D;
  const bool direct = std::is_same<T, K>::value && p.scale == 1.0 && p.shift == 0.0;
  const T s = static_cast<T>(p.scale), t = static_cast<T>(p.shift);
  for (int64_t r = 0; r < nt; ++r) {
    if (!need[r]) continue;
    const K* src = keys + (jt + r) * D;
    if (direct) {
      rows[r] = reinterpret_cast<const T*>(src);
    } else {
      load_row<T, K>(src, ybuf + r * D, D, s, t);
      rows[r] = ybuf + r * D;
    }
  }
}

// Which rows of the tile are allowed for at least one query of the block (class filter).
AD_INLINE void tile_needed(const Problem& p, int64_t b0, int64_t b1, int64_t jt, int64_t nt, bool* need) {
  const bool filt = p.key_labels != nullptr && p.query_labels != nullptr;
  for (int64_t r = 0; r < nt; ++r) {
    bool any = !filt;
    for (int64_t b = b0; b < b1 && !any; ++b) any = p.key_labels[jt + r] == p.query_labels[b];
    need[r] = any;
  }
}

// Allowed rows of the tile for query b: their tile offsets into idx, returns how many.
AD_INLINE int allowed_rows(const Problem& p, int64_t b, int64_t jt, int64_t nt, const bool* need, int* idx) {
  const bool filt = p.key_labels != nullptr && p.query_labels != nullptr;
  int n = 0;
  for (int64_t r = 0; r < nt; ++r)
    if (need[r] && (!filt || p.key_labels[jt + r] == p.query_labels[b])) idx[n++] = static_cast<int>(r);
  return n;
}

// Distances from query rows q0 (and q1 when QN == 2) to the tile rows listed in idx.
template <class T, int QN>
AD_INLINE void tile_distances(const T* q0, const T* q1, const T* const* rows, const int* idx, int n, int64_t D,
                              T* dist0, T* dist1) {
  int i = 0;
  for (; i + 4 <= n; i += 4)
    sqdist_block<T, QN, 4>(q0, q1, rows[idx[i]], rows[idx[i + 1]], rows[idx[i + 2]], rows[idx[i + 3]], D,
                           dist0 + i, dist1 + i);
  for (; i < n; ++i)
    sqdist_block<T, QN, 1>(q0, q1, rows[idx[i]], nullptr, nullptr, nullptr, D, dist0 + i, dist1 + i);
}

// Walks the tile's queries: two at a time when they share the candidate list (no class filter, or the same
// class), else one; calls visit(b, idx, n, dist) for every query with at least one allowed row.
template <class T, class Visit>
AD_INLINE void tile_queries(const Problem& p, int64_t b0, int64_t b1, int64_t jt, int64_t nt, const bool* need,
                            const T* const* rows, Visit&& visit) {
  const T* Q = static_cast<const T*>(p.queries);
  const int64_t D = p.D;
  const bool filt = p.key_labels != nullptr && p.query_labels != nullptr;
  int idx[kTileRows];
  T dist0[kTileRows], dist1[kTileRows];
  for (int64_t b = b0; b < b1;) {
    const int n = allowed_rows(p, b, jt, nt, need, idx);
    const bool pair = b + 1 < b1 && (!filt || p.query_labels[b] == p.query_labels[b + 1]);
    if (n > 0) {
      if (pair) {
        tile_distances<T, 2>(Q + b * D, Q + (b + 1) * D, rows, idx, n, D, dist0, dist1);
        visit(b, idx, n, dist0);
        visit(b + 1, idx, n, dist1);
      } else {
        tile_distances<T, 1>(Q + b * D, nullptr, rows, idx, n, D, dist0, dist1);
        visit(b, idx, n, dist0);
      }
    }
    b += pair ? 2 : 1;
  }
}

template <class T, class K>
void softmax_task_tk(const Problem& p, int64_t b0, int64_t b1, int64_t j0, int64_t j1, T* m, T* l, T* l2,
                     T* o, T* ybuf) {
  const T* coef = static_cast<const T*>(p.coef);
  const int64_t D = p.D;
  const T* rows[kTileRows];
  bool need[kTileRows];
  for (int64_t jt = j0; jt < j1; jt += kTileRows) {
    const int64_t nt = std::min<int64_t>(kTileRows, j1 - jt);
    tile_needed(p, b0, b1, jt, nt, need);
    load_tile<T, K>(p, jt, nt, need, ybuf, rows);
    tile_queries<T>(p, b0, b1, jt, nt, need, rows, [&](int64_t b, const int* idx, int n, const T* dist) {
      const T c = coef[b];
      T z[kTileRows], w[kTileRows];
      const T* wy[kTileRows];
      T zmax = neg_inf<T>();
      for (int i = 0; i < n; ++i) {
        // dist == 0 gives logit 0 even for an infinite coef (σ → 0): no 0·inf NaN.
        z[i] = dist[i] > T(0) ? -(c * dist[i]) : T(0);
        if (z[i] > zmax) zmax = z[i];
      }
      if (!(zmax > neg_inf<T>())) return;  // every logit −inf (coef overflowed): nothing to add
      const int64_t bb = b - b0;
      T* ob = o + bb * D;
      if (zmax > m[bb]) {  // one rescale per tile, only when the running max grows
        if (m[bb] > neg_inf<T>()) {
          const T a = std::exp(m[bb] - zmax);
          l[bb] *= a;
          l2[bb] *= a * a;
          scale_row<T>(ob, a, D);
        }
        m[bb] = zmax;
      }
      T lb = l[bb], l2b = l2[bb];
      int nw = 0;
      for (int i = 0; i < n; ++i) {
        const T x = z[i] - m[bb];
        if (!(x >= WeightCutoff<T>::log_min)) continue;  // negligible weight (see WeightCutoff): skip its row
        const T e = std::exp(x);
        lb += e;
        l2b += e * e;
        w[nw] = e;
        wy[nw] = rows[idx[i]];
        ++nw;
      }
      l[bb] = lb;
      l2[bb] = l2b;
      int i = 0;
      for (; i + 4 <= nw; i += 4) axpy4<T>(ob, w + i, wy[i], wy[i + 1], wy[i + 2], wy[i + 3], D);
      for (; i < nw; ++i) axpy1<T>(ob, w[i], wy[i], D);
    });
  }
}

// (d, i) lexicographic order: ascending distance, ties by the smaller index.
template <class T>
AD_INLINE bool knn_less(T da, int64_t ia, T db, int64_t ib) {
  return da < db || (da == db && ia < ib);
}

// Per query: a buffer of up to 2·cap candidates; when it fills, nth_element keeps the best cap and the worst of
// them becomes a threshold that rejects most later rows with one comparison (amortised O(1) per candidate, where
// a heap of a cap close to the segment size paid a sift for nearly every row). The kept set is the exact best
// min(cap, allowed) by (dist, index) whatever the order of the scan.
template <class T>
struct KnnEntry {
  T d;
  int64_t i;
};

// Not always_inline: std::nth_element was compiled for the default target (headers come before the pragma).
struct KnnEntryLess {
  template <class T>
  bool operator()(const KnnEntry<T>& a, const KnnEntry<T>& b) const {
    return a.d < b.d || (a.d == b.d && a.i < b.i);
  }
};

template <class T, class K>
void knn_task_tk(const Problem& p, int64_t b0, int64_t b1, int64_t j0, int64_t j1, int64_t cap, T* dist_out,
                 int64_t* index_out, int64_t stride, int64_t* count, T* ybuf) {
  const T* rows[kTileRows];
  bool need[kTileRows];
  for (int64_t b = b0; b < b1; ++b) count[b - b0] = 0;
  if (cap <= 0) return;
  const int64_t nq = b1 - b0;
  // A segment no longer than 2·cap needs no compaction: its buffer holds every row.
  const int64_t room = std::min<int64_t>(2 * cap, j1 - j0);
  std::vector<KnnEntry<T>> buf(static_cast<size_t>(nq * room));
  std::vector<int64_t> fill(static_cast<size_t>(nq), 0);
  std::vector<KnnEntry<T>> thr(static_cast<size_t>(nq), KnnEntry<T>{std::numeric_limits<T>::infinity(),
                                                                    std::numeric_limits<int64_t>::max()});
  // Tiles of at most ~24 KiB of converted rows (4 rows at least, for the 2x4 distance blocks): the tile stays in
  // L1 between its conversion and its use, which is most of the cost when few queries share it. A distance does
  // not depend on the tiling (every pair takes the same operations), and the selection is exact.
  const int64_t tile = std::max<int64_t>(4, std::min<int64_t>(kTileRows, (24 << 10) / std::max<int64_t>(1, p.D *
                                                                                   static_cast<int64_t>(sizeof(T)))));
  for (int64_t jt = j0; jt < j1; jt += tile) {
    const int64_t nt = std::min<int64_t>(tile, j1 - jt);
    tile_needed(p, b0, b1, jt, nt, need);
    load_tile<T, K>(p, jt, nt, need, ybuf, rows);
    tile_queries<T>(p, b0, b1, jt, nt, need, rows, [&](int64_t b, const int* idx, int n, const T* dist) {
      const int64_t bb = b - b0;
      KnnEntry<T>* e = buf.data() + bb * room;
      int64_t f = fill[bb];
      KnnEntry<T>& t = thr[bb];
      for (int i = 0; i < n; ++i) {
        const int64_t j = jt + idx[i];
        // Rows come in increasing j: a distance equal to the threshold's loses the tie-break.
        if (!(dist[i] < t.d)) continue;
        e[f++] = KnnEntry<T>{dist[i], j};
        if (f == room && room > cap) {
          std::nth_element(e, e + (cap - 1), e + f, KnnEntryLess());
          t = e[cap - 1];
          f = cap;
        }
      }
      fill[bb] = f;
    });
  }
  for (int64_t bb = 0; bb < nq; ++bb) {
    KnnEntry<T>* e = buf.data() + bb * room;
    int64_t f = fill[bb];
    if (f > cap) {
      std::nth_element(e, e + (cap - 1), e + f, KnnEntryLess());
      f = cap;
    }
    for (int64_t u = 0; u < f; ++u) {
      dist_out[bb * stride + u] = e[u].d;
      index_out[bb * stride + u] = e[u].i;
    }
    count[bb] = f;
  }
}

template <class T>
void softmax_task(const Problem& p, int64_t b0, int64_t b1, int64_t j0, int64_t j1, T* m, T* l, T* l2, T* o,
                  T* ybuf) {
  switch (p.key_type) {
    case KeyType::U8: return softmax_task_tk<T, uint8_t>(p, b0, b1, j0, j1, m, l, l2, o, ybuf);
    case KeyType::F32: return softmax_task_tk<T, float>(p, b0, b1, j0, j1, m, l, l2, o, ybuf);
    case KeyType::F64: return softmax_task_tk<T, double>(p, b0, b1, j0, j1, m, l, l2, o, ybuf);
  }
}

template <class T>
void knn_task(const Problem& p, int64_t b0, int64_t b1, int64_t j0, int64_t j1, int64_t cap, T* dist,
              int64_t* index, int64_t stride, int64_t* count, T* ybuf) {
  switch (p.key_type) {
    case KeyType::U8: return knn_task_tk<T, uint8_t>(p, b0, b1, j0, j1, cap, dist, index, stride, count, ybuf);
    case KeyType::F32: return knn_task_tk<T, float>(p, b0, b1, j0, j1, cap, dist, index, stride, count, ybuf);
    case KeyType::F64: return knn_task_tk<T, double>(p, b0, b1, j0, j1, cap, dist, index, stride, count, ybuf);
  }
}

}  // namespace
}  // namespace AD_ISA_NS
}  // namespace ad_cpu
