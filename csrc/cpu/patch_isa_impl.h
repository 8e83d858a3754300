// Per-task kernels of the patch softmax (patch.h), compiled once per instruction set. Include only from
// retrieval_isa_*.cpp, right after retrieval_isa_impl.h (whose Vec / vload / vstore / AD_INLINE it uses), inside
// the same target pragma. Everything here has internal linkage, as there.
//
// Layout of the work. Images are scanned one at a time; each is converted once per task into a zero-bordered
// float buffer (value space), so that the k x k window of any centre is plain strided memory and the zero
// padding costs nothing. A vector holds L = AD_LANE_BYTES / 4 lanes:
// * shared rule (ELS / bbELS): lanes = L consecutive candidate centres of one run (neighbouring windows are
//   neighbouring columns), rows = kPatchRowBlock query rows at a time (each window load serves them all);
// * same-position rules (LS / PSPC): lanes = L query rows whose own centres are consecutive, each lane with its
//   own online-softmax state; the queries are transposed to (feature, lane) once per task.
// Distances: per lane, sum over features in (c, a, b) order of (q - y)^2, one fused multiply-add each.
#if !defined(AD_ISA_NS) || !defined(AD_LANE_BYTES)
#error "include patch_isa_impl.h from retrieval_isa_*.cpp after retrieval_isa_impl.h"
#endif

namespace ad_cpu {
namespace AD_ISA_NS {
namespace {

constexpr int kPatchLanes = AD_LANE_BYTES / static_cast<int>(sizeof(float));
// Query rows sharing each window load (shared rule): 8 independent accumulator chains keep both FMA ports busy
// through the 4-cycle FMA latency.
constexpr int kPatchRowBlock = 8;
constexpr float kPatchCutoff = 63.0f;  // base-2: weights below 2^-63 of the running maximum are dropped
using VF = Vec<float>;

#if defined(__GNUC__) || defined(__clang__)
AD_INLINE VF vbroadcast(float s) { return s - vzero<float>(); }  // s - 0 folds to s: one broadcast
#else
AD_INLINE VF vbroadcast(float s) {
  float a[kPatchLanes];
  for (int u = 0; u < kPatchLanes; ++u) a[u] = s;
  return vload<float>(a);
}
#endif

AD_INLINE float vmax_lanes(const VF& v) {  // a tree: log2(L) dependent steps
  float a[kPatchLanes];
  vstore<float>(a, v);
  for (int w = kPatchLanes / 2; w > 0; w /= 2)
    for (int u = 0; u < w; ++u) a[u] = a[u + w] > a[u] ? a[u + w] : a[u];
  return a[0];
}

// Degree-7 Taylor polynomial of 2^f on f in [-1/2, 1/2] (truncation error < 6e-9 relative, under fp32 rounding).
constexpr float kExp2Poly[8] = {1.5252734e-05f, 1.5403530e-04f, 1.3333558e-03f, 9.6181291e-03f,
                                5.5504109e-02f, 2.4022651e-01f, 6.9314718e-01f, 1.0f};

#if defined(__GNUC__) || defined(__clang__)
// Explicit vector code: the lane arithmetic below (selects, float <-> int, horizontal sums in a fixed order) is
// what the auto-vectoriser will not do for reductions without -ffast-math.
typedef int32_t VI __attribute__((vector_size(AD_LANE_BYTES)));

AD_INLINE VF vselect(const VI& mask, const VF& a, const VF& b) {
  return reinterpret_cast<VF>((mask & reinterpret_cast<VI>(a)) | (~mask & reinterpret_cast<VI>(b)));
}

AD_INLINE VI lane_index() {
  int32_t a[kPatchLanes];
  for (int u = 0; u < kPatchLanes; ++u) a[u] = u;
  VI v;
  __builtin_memcpy(&v, a, sizeof(v));
  return v;
}

// 2^x per lane for x <= 0; 0 where x < -kPatchCutoff, -inf or NaN: 2^n (exponent bits) times the polynomial.
AD_INLINE VF vexp2_cut(const VF& x) {
  const VF lo = vbroadcast(-kPatchCutoff);
  const VI keep = x >= lo;
  const VF xc = vselect(keep, x, lo);
  const VF t = xc + 0.5f;
  VI n = __builtin_convertvector(t, VI);  // toward zero; make it floor(t)
  n += __builtin_convertvector(n, VF) > t;  // the comparison is -1 where true
  const VF f = xc - __builtin_convertvector(n, VF);
  VF p = vbroadcast(kExp2Poly[0]);
  for (int i = 1; i < 8; ++i) p = p * f + kExp2Poly[i];
  const VF scale = reinterpret_cast<VF>((n + 127) << 23);
  return vselect(keep, p * scale, vzero<float>());
}

// Logits -coef2 * dist of the first nl lanes (dist == 0 gives 0 even for an infinite coefficient, σ → 0: no
// 0 · inf NaN), -inf in the others.
AD_INLINE VF vlogits(const VF& dist, float c2, int nl) {
  const VF z = vselect(dist > 0.0f, -c2 * dist, vzero<float>());
  return vselect(lane_index() < nl, z, vbroadcast(neg_inf<float>()));
}

AD_INLINE VF vlogits(const VF& dist, const VF& c2) {
  return vselect(dist > 0.0f, -(c2 * dist), vzero<float>());
}

AD_INLINE VF vmaxv(const VF& a, const VF& b) { return vselect(a > b, a, b); }

// Any of the first nl lanes with x >= -kPatchCutoff.
AD_INLINE bool any_kept(const VF& x, int nl) {
  const VI k = (x >= -kPatchCutoff) & (lane_index() < nl);
  int32_t a[kPatchLanes];
  __builtin_memcpy(a, &k, sizeof(a));
  int32_t r = 0;
  for (int u = 0; u < kPatchLanes; ++u) r |= a[u];
  return r != 0;
}

// Any lane with a > b.
AD_INLINE bool any_greater(const VF& a, const VF& b) {
  const VI k = a > b;
  int32_t v[kPatchLanes];
  __builtin_memcpy(v, &k, sizeof(v));
  int32_t r = 0;
  for (int u = 0; u < kPatchLanes; ++u) r |= v[u];
  return r != 0;
}
#else
// Portable lane loops with the same results.
AD_INLINE VF vexp2_cut(const VF& xv) {
  float x[kPatchLanes], out[kPatchLanes];
  vstore<float>(x, xv);
  for (int u = 0; u < kPatchLanes; ++u) {
    const bool keep = x[u] >= -kPatchCutoff;
    const float xc = keep ? x[u] : -kPatchCutoff;
    const float t = xc + 0.5f;
    int32_t n = static_cast<int32_t>(t);
    n -= static_cast<float>(n) > t ? 1 : 0;
    const float f = xc - static_cast<float>(n);
    float p = kExp2Poly[0];
    for (int i = 1; i < 8; ++i) p = p * f + kExp2Poly[i];
    const int32_t bits = (n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    out[u] = keep ? p * scale : 0.0f;
  }
  return vload<float>(out);
}

AD_INLINE VF vlogits(const VF& dv, float c2, int nl) {
  float d[kPatchLanes], z[kPatchLanes];
  vstore<float>(d, dv);
  for (int u = 0; u < kPatchLanes; ++u)
    z[u] = u < nl ? (d[u] > 0.0f ? -(c2 * d[u]) : 0.0f) : neg_inf<float>();
  return vload<float>(z);
}

AD_INLINE VF vlogits(const VF& dv, const VF& cv) {
  float d[kPatchLanes], c[kPatchLanes], z[kPatchLanes];
  vstore<float>(d, dv);
  vstore<float>(c, cv);
  for (int u = 0; u < kPatchLanes; ++u) z[u] = d[u] > 0.0f ? -(c[u] * d[u]) : 0.0f;
  return vload<float>(z);
}

AD_INLINE VF vmaxv(const VF& av, const VF& bv) {
  float a[kPatchLanes], b[kPatchLanes];
  vstore<float>(a, av);
  vstore<float>(b, bv);
  for (int u = 0; u < kPatchLanes; ++u) a[u] = a[u] > b[u] ? a[u] : b[u];
  return vload<float>(a);
}

AD_INLINE bool any_kept(const VF& xv, int nl) {
  float x[kPatchLanes];
  vstore<float>(x, xv);
  bool r = false;
  for (int u = 0; u < nl; ++u) r |= x[u] >= -kPatchCutoff;
  return r;
}

AD_INLINE bool any_greater(const VF& av, const VF& bv) {
  float a[kPatchLanes], b[kPatchLanes];
  vstore<float>(a, av);
  vstore<float>(b, bv);
  bool r = false;
  for (int u = 0; u < kPatchLanes; ++u) r |= a[u] > b[u];
  return r;
}
#endif

AD_INLINE float exp2_scalar(float x) {
  float a[kPatchLanes];
  vstore<float>(a, vexp2_cut(vbroadcast(x)));
  return a[0];
}

// One image row segment into value space: dst[x] = scale * src[x] + shift (restrict pointers and local constants,
// so that the loop vectorises).
template <class K>
AD_INLINE void convert_row(const K* AD_RESTRICT src, float* AD_RESTRICT dst, int n, float scale, float shift) {
  for (int x = 0; x < n; ++x) dst[x] = static_cast<float>(src[x]) * scale + shift;
}

AD_INLINE void convert_row(const PatchProblem& p, int64_t offset, float* AD_RESTRICT dst, int n) {
  if (p.key_type == kPatchKeysU8)
    convert_row(static_cast<const uint8_t*>(p.images) + offset, dst, n, p.scale, p.shift);
  else
    convert_row(static_cast<const float*>(p.images) + offset, dst, n, p.scale, p.shift);
}

// Image n into the interior of a zero-bordered (C, Hp, Wp) buffer whose borders are already zero: pixel (y, x) at
// (y + d, x + d). Values are scale * u + shift in fp32, as the other kernels convert them.
AD_INLINE void fill_padded(const PatchProblem& p, int64_t n, float* AD_RESTRICT pad, int Hp, int Wp, int d) {
  const int64_t hw = static_cast<int64_t>(p.H) * p.W;
  for (int c = 0; c < p.C; ++c)
    for (int y = 0; y < p.H; ++y)
      convert_row(p, (n * p.C + c) * hw + static_cast<int64_t>(y) * p.W,
                  pad + (static_cast<int64_t>(c) * Hp + y + d) * Wp + d, p.W);
}

// Online-softmax state of one query row in the shared rule: the running maximum, and the sums as vectors of
// per-lane partial sums (horizontal sums happen once per task, not once per block of candidates).
struct SharedRowState {
  float* m;   // the running maximum (scalar)
  float* lv;  // (L) partial sums of 2^(z - m)
  float* l2v;  // (L) partial sums of 2^(2(z - m))
  float* ov;  // (C, L) partial sums of 2^(z - m) * value
};

// Folds one vector of candidates (lanes < nl valid) into a row's state with distances `dist`; centre values of lane
// u and channel c at centre[c * plane + u].
AD_INLINE void fold_shared(float c2, const VF& dist, int nl, const float* AD_RESTRICT centre, int64_t plane, int C,
                           const SharedRowState& st) {
  const VF z = vlogits(dist, c2, nl);
  const float zmax = vmax_lanes(z);
  float m = *st.m;
  if (!(zmax >= m - kPatchCutoff)) return;  // no weight passes the cutoff (or no finite logit): skip the block
  if (zmax > m) {
    if (m > neg_inf<float>()) {
      const float a = exp2_scalar(m - zmax);
      vstore<float>(st.lv, vload<float>(st.lv) * a);
      vstore<float>(st.l2v, vload<float>(st.l2v) * (a * a));
      for (int c = 0; c < C; ++c) vstore<float>(st.ov + c * kPatchLanes, vload<float>(st.ov + c * kPatchLanes) * a);
    }
    m = zmax;
    *st.m = m;
  }
  const VF e = vexp2_cut(z - m);  // invalid lanes: -inf -> 0
  vstore<float>(st.lv, vload<float>(st.lv) + e);
  vstore<float>(st.l2v, vload<float>(st.l2v) + e * e);
  for (int c = 0; c < C; ++c)  // invalid lanes add 0 times a finite value
    vstore<float>(st.ov + c * kPatchLanes, vload<float>(st.ov + c * kPatchLanes) + e * vload<float>(centre + c * plane));
}

// Shared rule: rows [r0, r1) (at most kPatchSharedRows) x runs x images [i0, i1). Scratch: the padded image
// (C·Hp·Wp floats + one vector of slack, so that the lanes past a run's end read finite memory), then the rows'
// states.
void patch_shared_task(const PatchProblem& p, const PatchRun* runs, int64_t n_runs, int64_t r0, int64_t r1,
                       int64_t i0, int64_t i1, float* m, float* l, float* l2, float* o, float* scratch) {
  constexpr int L = kPatchLanes;
  const int C = p.C, k = p.k, d = k / 2;
  const int Hp = p.H + k - 1, Wp = p.W + k - 1;
  const int64_t plane = static_cast<int64_t>(Hp) * Wp;
  const int64_t F = static_cast<int64_t>(C) * k * k;
  const int64_t nrows = r1 - r0;
  float* pad = scratch;
  std::fill(pad, pad + C * plane + L, 0.0f);
  float* state = pad + C * plane + L;  // m (nrows), then per row (2 + C) vectors
  std::fill(state, state + nrows * (1 + (2 + C) * L), 0.0f);
  std::fill(state, state + nrows, neg_inf<float>());
  auto row_state = [&](int64_t r) {
    float* v = state + nrows + r * (2 + C) * L;
    return SharedRowState{state + r, v, v + L, v + 2 * L};
  };
  for (int64_t i = i0; i < i1; ++i) {
    fill_padded(p, p.image_index[i], pad, Hp, Wp, d);
    for (int64_t g = 0; g < n_runs; ++g) {
      const PatchRun& run = runs[g];
      for (int32_t s0 = 0; s0 < run.len; s0 += L) {
        const int nl = std::min<int32_t>(L, run.len - s0);
        // top-left of lane 0's window: centre (row, col) minus (d, d), plus the border d
        const float* win = pad + static_cast<int64_t>(run.row) * Wp + run.col0 + s0;
        for (int64_t rb = r0; rb < r1; rb += kPatchRowBlock) {
          const int nr = static_cast<int>(std::min<int64_t>(kPatchRowBlock, r1 - rb));
          const float* q[kPatchRowBlock];
          for (int j = 0; j < kPatchRowBlock; ++j) q[j] = p.queries + (rb + std::min(j, nr - 1)) * F;
          VF dist[kPatchRowBlock];
          for (int j = 0; j < kPatchRowBlock; ++j) dist[j] = vzero<float>();
          int64_t f = 0;
          for (int c = 0; c < C; ++c) {
            for (int a = 0; a < k; ++a) {
              const float* src = win + c * plane + static_cast<int64_t>(a) * Wp;
              for (int b = 0; b < k; ++b, ++f) {
                const VF v = vload<float>(src + b);
                for (int j = 0; j < kPatchRowBlock; ++j) {
                  const VF t = vbroadcast(q[j][f]) - v;
                  dist[j] += t * t;
                }
              }
            }
          }
          const float* centre = win + static_cast<int64_t>(d) * Wp + d;
          for (int j = 0; j < nr; ++j)
            fold_shared(p.coef2[rb + j], dist[j], nl, centre, plane, C, row_state(rb + j - r0));
        }
      }
    }
  }
  for (int64_t r = 0; r < nrows; ++r) {
    const SharedRowState st = row_state(r);
    m[r] = *st.m;
    l[r] = vsum<float>(vload<float>(st.lv));
    l2[r] = vsum<float>(vload<float>(st.l2v));
    for (int c = 0; c < C; ++c) o[r * C + c] = vsum<float>(vload<float>(st.ov + c * L));
  }
}

// Adds e (per lane) times each lane's value into the (V, L) sums: the whole window (WHOLE) or its centre pixel;
// lane u's window has its top-left at win + u in the padded (C, Hp, Wp) image.
template <bool WHOLE>
AD_INLINE void accumulate_values(float* AD_RESTRICT so, const VF& e, const float* AD_RESTRICT win, int C, int k,
                                 int64_t plane, int Wp) {
  constexpr int L = kPatchLanes;
  const int d = k / 2;
  if (WHOLE) {
    int64_t f = 0;
    for (int c = 0; c < C; ++c) {
      for (int a = 0; a < k; ++a) {
        const float* src = win + c * plane + static_cast<int64_t>(a) * Wp;
        for (int b = 0; b < k; ++b, ++f) vstore<float>(so + f * L, vload<float>(so + f * L) + e * vload<float>(src + b));
      }
    }
  } else {
    for (int c = 0; c < C; ++c) {
      const float* src = win + c * plane + static_cast<int64_t>(d) * Wp + d;  // centre pixel of lane u at u
      vstore<float>(so + c * L, vload<float>(so + c * L) + e * vload<float>(src));
    }
  }
}

// Scratch of one run of a same-position task (patch_same_run_floats): transposed queries (F, L), coefficients
// (L), running max, the two sums (L each) and the value sums (V, L).
struct SameRunState {
  float* qt;
  float* c2;
  float* m;
  float* l;
  float* l2;
  float* o;
};

AD_INLINE SameRunState same_run_state(float* base, int64_t F) {
  constexpr int L = kPatchLanes;
  float* c2 = base + F * L;
  return SameRunState{base, c2, c2 + L, c2 + 2 * L, c2 + 3 * L, c2 + 4 * L};
}

// Same-position rules: lanes = the query rows of one run (len <= kPatchLanes), lane u at centre (row, col0 + u)
// (rows in either direction, see PatchRun). A task takes several runs and images [i0, i1); each image is converted
// once into the zero-bordered buffer (as the shared rule) and serves every run of the task. Scratch: the padded
// image, then per run the transposed queries (F, L), the coefficients (L) and the per-lane state (3 + V) x L.
// Outputs are indexed by query row (m, l, l2: R; o: R x V) for this split.
template <bool WHOLE>
void patch_same_task(const PatchProblem& p, const PatchRun* runs, int64_t n_runs, int64_t i0, int64_t i1, float* m,
                     float* l, float* l2, float* o, float* scratch) {
  constexpr int L = kPatchLanes;
  const int C = p.C, k = p.k, d = k / 2;
  const int Hp = p.H + k - 1, Wp = p.W + k - 1;
  const int64_t plane = static_cast<int64_t>(Hp) * Wp;
  const int64_t F = static_cast<int64_t>(C) * k * k;
  const int64_t V = WHOLE ? F : C;
  const int64_t per_run = patch_same_run_floats(C, k, WHOLE ? kPatchSameWhole : kPatchSameCentre, L);
  float* pad = scratch;
  std::fill(pad, pad + C * plane + L, 0.0f);
  float* runs_scratch = pad + C * plane + L;
  for (int64_t g = 0; g < n_runs; ++g) {
    const PatchRun& run = runs[g];
    const SameRunState st = same_run_state(runs_scratch + g * per_run, F);
    for (int u = 0; u < L; ++u) {  // lanes past the run repeat its last row (their results are discarded)
      const int64_t r = run.start + patch_run_slot(run, std::min(u, run.len - 1));
      st.c2[u] = p.coef2[r];
      for (int64_t f = 0; f < F; ++f) st.qt[f * L + u] = p.queries[r * F + f];
      st.m[u] = neg_inf<float>();
      st.l[u] = 0.0f;
      st.l2[u] = 0.0f;
    }
    std::fill(st.o, st.o + V * L, 0.0f);
  }
  for (int64_t i = i0; i < i1; ++i) {
    fill_padded(p, p.image_index[i], pad, Hp, Wp, d);
    for (int64_t g = 0; g < n_runs; ++g) {
      const PatchRun& run = runs[g];
      const int nl = run.len;
      const SameRunState st = same_run_state(runs_scratch + g * per_run, F);
      // top-left of lane 0's window: centre (row, col0) minus (d, d), plus the border d
      const float* win = pad + static_cast<int64_t>(run.row) * Wp + run.col0;
      VF acc = vzero<float>();
      int64_t f = 0;
      for (int c = 0; c < C; ++c) {
        for (int a = 0; a < k; ++a) {
          const float* src = win + c * plane + static_cast<int64_t>(a) * Wp;
          for (int b = 0; b < k; ++b, ++f) {
            const VF t = vload<float>(st.qt + f * L) - vload<float>(src + b);
            acc += t * t;
          }
        }
      }
      const VF old_m = vload<float>(st.m);
      const VF z = vlogits(acc, vload<float>(st.c2));
      const VF mn = vmaxv(z, old_m);
      const VF x = z - mn;
      if (!any_kept(x, nl)) continue;  // no lane gains a weight above the cutoff from this image
      const VF e = vexp2_cut(x);
      if (any_greater(z, old_m)) {  // some lane's maximum grows: rescale its sums
        // a = 2^(m_old - m_new): 1 where the max holds, 0 from an empty state (-inf - finite = -inf -> 0)
        const VF al = vexp2_cut(old_m - mn);
        vstore<float>(st.l, vload<float>(st.l) * al);
        vstore<float>(st.l2, vload<float>(st.l2) * (al * al));
        vstore<float>(st.m, mn);
        for (int64_t v = 0; v < V; ++v) vstore<float>(st.o + v * L, vload<float>(st.o + v * L) * al);
      }
      vstore<float>(st.l, vload<float>(st.l) + e);
      vstore<float>(st.l2, vload<float>(st.l2) + e * e);
      accumulate_values<WHOLE>(st.o, e, win, C, k, plane, Wp);
    }
  }
  for (int64_t g = 0; g < n_runs; ++g) {
    const PatchRun& run = runs[g];
    const SameRunState st = same_run_state(runs_scratch + g * per_run, F);
    for (int u = 0; u < run.len; ++u) {
      const int64_t r = run.start + patch_run_slot(run, u);
      m[r] = st.m[u];
      l[r] = st.l[u];
      l2[r] = st.l2[u];
      for (int64_t v = 0; v < V; ++v) o[r * V + v] = st.o[v * L + u];
    }
  }
}

}  // namespace
}  // namespace AD_ISA_NS
}  // namespace ad_cpu
