// CUDA kernels of the global retrieval primitive: split-N single-pass softmax retrieval and exact k-NN.
// Interface and conventions: global_retrieval.cuh. Design: docs/design.md §8.1 ("G1").
//
// Shape of one launch (both kernels):
//   grid  = S = num_splits(N) CTAs; CTA s owns the contiguous candidate range [s*N/S, (s+1)*N/S).
//           S depends on N only (never on the SM count), so the partials, their combine and hence the result
//           are the same on every GPU; S <= 256 ~ 2 CTAs on each of 132 (H100) / 108 (A100) SMs: one wave.
//   block = 256 threads (8 warps), __launch_bounds__(256, 2) so that two CTAs fit on an SM (16 warps to hide
//           the latency of the key stream) and the 256 CTAs run as one wave.
//   queries: BQ <= 16 per launch (query_block(D)); the host loops over query blocks. BQ shrinks with D so that
//           the queries (BQ x D fp32, shared memory) and the output accumulator (BQ x D fp32, registers: each
//           thread owns CPT columns, BQ*CPT <= 32 registers) stay on chip: BQ*D <= 8192.
// The CTA streams its keys in tiles of 16 rows:
//   phase 1  warp w computes the direct-form distances sum_d (q_bd - y_jd)^2 of keys 2w, 2w+1 of the tile to
//            all BQ queries: lanes stride over D (coalesced rows), fp32 FMA, then one warp "transpose"
//            reduction of the 2*BQ sums (31 shuffles for 32 sums). Direct form: no ||q||^2 - 2<q,y> + ||y||^2
//            cancellation, so the logit error is ~1e-7 relative at every sigma (exact fp32 mode, docs/design.md §5).
//   phase S  (softmax) 16 threads per query: masked base-2 logits z = -coef*log2(e)*dist, tile max, online
//            softmax update of (m, l, l2) and the tile weights p = 2^(z - m) into shared memory.
//            (k-NN) one warp per query keeps its k best (distance, index) sorted across the 32 lanes.
//   phase 2  (softmax) every thread rescales its O columns by 2^(m_old - m_new) and adds p_bt * y_t for the
//            tile's rows: the rows were just read in phase 1 and come back from L1/L2, so DRAM sees the keys
//            once. Rows whose weights are all exactly 0 (other class, or underflow at low sigma) are skipped.
// Then the CTA writes its partial (m, l, l2 in base 2, O) to scratch, and a combine kernel merges the S
// partials in split order (no float atomics): deterministic.
//
// Rows wider than 8192 values (BQ = 1 and still more columns than the 256 x 32 accumulator registers) run in
// column slabs of 8192: every slab recomputes the full distances (the keys are read once per slab) and
// accumulates its own columns; the queries are then read through L1 instead of shared memory.
#include "global_retrieval.cuh"

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace ad_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kKeysPerWarp = 2;                 // two rows share every query value read from shared memory
constexpr int kTile = kWarps * kKeysPerWarp;    // 16 key rows per tile
constexpr int kMaxCpt = 32;                     // accumulator columns per thread in the widest configuration
constexpr int64_t kSlab = int64_t(kThreads) * kMaxCpt;  // 8192 columns per slab
constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kNoIndex = INT_MAX;  // k-NN: an empty list entry (sorts after every real candidate)

static_assert(kTile == 16, "phase S maps 16 threads per query onto the 16 rows of a tile");

// ------------------------------------------------------------------------------------------ device helpers

// Candidate value y = scale * key + shift in fp32 (uint8 converts exactly; fp32 with the identity map is exact).
__device__ __forceinline__ float load_key(const uint8_t* row, int64_t c, float scale, float shift) {
  return fmaf(static_cast<float>(__ldg(row + c)), scale, shift);
}
__device__ __forceinline__ float load_key(const float* row, int64_t c, float scale, float shift) {
  return fmaf(__ldg(row + c), scale, shift);
}

// Sums V (a power of two, 2..32) per-lane values over the warp by recursive halving: at each step a lane
// keeps one half of its values and receives the partner's copy of that half, so 32 sums cost 16+8+4+2+1
// shuffles instead of 32*5. On return lane l holds the total of value index l >> (5 - log2 V). Fixed order:
// deterministic.
template <int V>
__device__ __forceinline__ float warp_transpose_reduce(float (&v)[V], int lane) {
  static_assert(V >= 1 && V <= 32 && (V & (V - 1)) == 0, "V must be a power of two <= 32");
  int o = 16;
#pragma unroll
  for (int h = V / 2; h >= 1; h /= 2, o /= 2) {
    const bool upper = (lane & o) != 0;
#pragma unroll
    for (int i = 0; i < h; ++i) {
      const float send = upper ? v[i] : v[i + h];
      const float keep = upper ? v[i + h] : v[i];
      v[i] = keep + __shfl_xor_sync(kFull, send, o);
    }
  }
#pragma unroll
  for (; o >= 1; o /= 2) v[0] += __shfl_xor_sync(kFull, v[0], o);
  return v[0];
}

template <int V>
struct Log2 {
  static constexpr int value = V <= 1 ? 0 : 1 + Log2<V / 2>::value;
};
template <>
struct Log2<1> {
  static constexpr int value = 0;
};

// Phase 1: distances of the tile's rows [jt, jt + 16) to the block's queries into dist_s[b][t], and the rows'
// labels into klab_s (when filtering). Rows past the split end or used by no query of the block are not read
// (their entries are left as they are; phase S masks them). q: BQ rows of D values (shared memory, or global
// memory for the wide-row configuration).
template <class K, int BQ>
__device__ __forceinline__ void tile_distances(const K* __restrict__ keys, int64_t D, int64_t jt, int64_t j1,
                                               float scale, float shift, const float* __restrict__ q, int nb,
                                               const int64_t* __restrict__ key_labels, const int64_t* qlab_s,
                                               float (*dist_s)[kTile], int64_t* klab_s, int warp, int lane) {
  constexpr int V = BQ * kKeysPerWarp;
  const int64_t ja = jt + kKeysPerWarp * warp, jb = ja + 1;
  bool use_a = ja < j1, use_b = jb < j1;
  if (key_labels != nullptr) {  // class filter: skip rows no query of the block may use (uniform in the warp)
    const int64_t la = use_a ? __ldg(key_labels + ja) : 0, lb = use_b ? __ldg(key_labels + jb) : 0;
    bool any_a = false, any_b = false;
    for (int b = 0; b < nb; ++b) {
      any_a |= qlab_s[b] == la;
      any_b |= qlab_s[b] == lb;
    }
    use_a &= any_a;
    use_b &= any_b;
    if (lane == 0) {
      klab_s[kKeysPerWarp * warp] = la;
      klab_s[kKeysPerWarp * warp + 1] = lb;
    }
  }
  if (!use_a && !use_b) return;
  // A row that is not used aliases the other one (valid memory, result ignored): no divergence in the loop.
  const K* ra = keys + (use_a ? ja : jb) * D;
  const K* rb = keys + (use_b ? jb : ja) * D;
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.0f;
#pragma unroll 4
  for (int64_t c = lane; c < D; c += 32) {
    const float ya = load_key(ra, c, scale, shift);
    const float yb = load_key(rb, c, scale, shift);
#pragma unroll
    for (int b = 0; b < BQ; ++b) {
      const float qv = q[b * D + c];
      const float ta = qv - ya, tb = qv - yb;
      acc[2 * b] = fmaf(ta, ta, acc[2 * b]);
      acc[2 * b + 1] = fmaf(tb, tb, acc[2 * b + 1]);
    }
  }
  const float total = warp_transpose_reduce<V>(acc, lane);
  constexpr int kShift = 5 - Log2<V>::value;
  if ((lane & ((1 << kShift) - 1)) == 0) {
    const int v = lane >> kShift;  // value index = 2 * b + r
    dist_s[v / 2][kKeysPerWarp * warp + (v & 1)] = total;
  }
}

// Stages the block's queries (rows b0 .. b0 + nb - 1, zero rows after) and per-query constants.
template <int BQ>
__device__ __forceinline__ void stage_queries(const float* __restrict__ queries, int nb, int64_t D, bool to_smem,
                                              float* q_s, const int64_t* __restrict__ query_labels,
                                              int64_t* qlab_s) {
  if (to_smem) {
    const int64_t total = int64_t(BQ) * D, valid = int64_t(nb) * D;
    for (int64_t i = threadIdx.x; i < total; i += kThreads) q_s[i] = i < valid ? __ldg(queries + i) : 0.0f;
  }
  if (threadIdx.x < BQ) qlab_s[threadIdx.x] = (query_labels != nullptr && int(threadIdx.x) < nb)
                                                  ? __ldg(query_labels + threadIdx.x) : 0;
}

// ----------------------------------------------------------------------------------------- softmax kernels

// What both split kernels scan: one block of nb queries against keys [0, N) cut into S splits.
struct ScanArgs {
  const float* queries;         // first query row of the block
  const void* keys;
  const int64_t* key_labels;    // null unless filtering
  const int64_t* query_labels;  // (nb,) or null
  int64_t N, D, S;
  float scale, shift;
  int nb;
};

ScanArgs scan_block(const Problem& p, int64_t b0, int64_t S, int nb) {
  return ScanArgs{p.queries + b0 * p.D, p.keys, p.key_labels,
                  p.query_labels != nullptr ? p.query_labels + b0 : nullptr, p.N, p.D, S, p.scale, p.shift, nb};
}

struct SoftmaxSplitArgs : ScanArgs {
  const float* coef;          // (nb,)
  int64_t col0, ncols;        // output columns accumulated by this launch
  int write_state;            // write m, l, l2 (the first slab)
  float* pm;                  // (S, BQ) base-2 max
  float* pl;                  // (S, BQ)
  float* pl2;                 // (S, BQ)
  float* po;                  // (S, BQ, D)
};

template <class K, int BQ, int CPT, bool QS>
__global__ void __launch_bounds__(kThreads, 2) softmax_split_kernel(const SoftmaxSplitArgs a) {
  static_assert(BQ * CPT <= 32, "output accumulators: at most 32 registers per thread");
  static_assert(QS || BQ == 1, "queries outside shared memory only in the one-query configuration");
  __shared__ float dist_s[BQ][kTile];
  __shared__ __align__(16) float p_s[kTile][BQ];
  __shared__ float alpha_s[BQ], c2_s[BQ], m_s[BQ], l_s[BQ], l2_s[BQ];
  __shared__ int64_t qlab_s[BQ], klab_s[kTile];
  extern __shared__ float dyn_smem[];  // BQ x D queries (QS)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t D = a.D, s = blockIdx.x;
  const int64_t j0 = s * a.N / a.S, j1 = (s + 1) * a.N / a.S;
  const K* keys = static_cast<const K*>(a.keys);
  const bool filt = a.key_labels != nullptr && a.query_labels != nullptr;
  const int64_t* key_labels = filt ? a.key_labels : nullptr;

  stage_queries<BQ>(a.queries, a.nb, D, QS, dyn_smem, a.query_labels, qlab_s);
  const float* q = QS ? dyn_smem : a.queries;
  if (tid < BQ) {
    c2_s[tid] = tid < a.nb ? __ldg(a.coef + tid) * kLog2e : 0.0f;  // base-2 logits: exp2 is one MUFU op
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.0f;
    l2_s[tid] = 0.0f;
  }
  __syncthreads();

  float acc[BQ][CPT];
#pragma unroll
  for (int b = 0; b < BQ; ++b)
#pragma unroll
    for (int i = 0; i < CPT; ++i) acc[b][i] = 0.0f;
  const int64_t cbeg = a.col0 + tid, cend = a.col0 + a.ncols;

  for (int64_t jt = j0; jt < j1; jt += kTile) {
    tile_distances<K, BQ>(keys, D, jt, j1, a.scale, a.shift, q, a.nb, key_labels, qlab_s, dist_s, klab_s, warp,
                          lane);
    __syncthreads();

    // Phase S: thread (b, t) = (tid / 16, tid % 16); whole warps take part in the shuffles.
    if (warp < (BQ * kTile + 31) / 32) {
      const int b = tid >> 4, t = tid & 15;
      const bool row = b < BQ;
      const int64_t j = jt + t;
      const bool ok = row && b < a.nb && j < j1 && (!filt || klab_s[t] == qlab_s[b]);
      float z = -INFINITY;
      if (ok) {
        const float d = dist_s[b][t];
        z = d > 0.0f ? -(c2_s[b] * d) : 0.0f;  // d == 0: logit 0 even if coef overflowed (no 0 * inf NaN)
      }
      float zmax = z;
#pragma unroll
      for (int o = 8; o >= 1; o /= 2) zmax = fmaxf(zmax, __shfl_xor_sync(kFull, zmax, o));
      const float mold = row ? m_s[b] : -INFINITY;
      const float mnew = fmaxf(mold, zmax);
      const bool any = mnew > -INFINITY;
      const float p = any ? exp2f(z - mnew) : 0.0f;          // z = -inf -> 0
      const float alpha = any ? exp2f(mold - mnew) : 1.0f;   // mold = -inf -> 0 (l, O are 0 then)
      float ps = p, p2s = p * p;
#pragma unroll
      for (int o = 8; o >= 1; o /= 2) {  // xor butterfly: every lane of the 16 gets the same bits
        ps += __shfl_xor_sync(kFull, ps, o);
        p2s += __shfl_xor_sync(kFull, p2s, o);
      }
      __syncwarp();  // every lane has read m_s[b] before lane t = 0 overwrites it
      if (row) {
        p_s[t][b] = p;
        if (t == 0) {
          m_s[b] = mnew;
          l_s[b] = fmaf(l_s[b], alpha, ps);
          l2_s[b] = fmaf(l2_s[b], alpha * alpha, p2s);
          alpha_s[b] = alpha;
        }
      }
    }
    __syncthreads();

    // Phase 2: O = alpha * O + sum_t p_t * y_t over this thread's columns.
#pragma unroll
    for (int b = 0; b < BQ; ++b) {
      const float al = alpha_s[b];
      if (al != 1.0f) {
#pragma unroll
        for (int i = 0; i < CPT; ++i) acc[b][i] *= al;
      }
    }
    const int64_t nt = j1 - jt < kTile ? j1 - jt : kTile;
    for (int t = 0; t < nt; ++t) {
      float pt[BQ];
      bool any = false;
#pragma unroll
      for (int b = 0; b < BQ; ++b) {
        pt[b] = p_s[t][b];
        any |= pt[b] != 0.0f;
      }
      if (!any) continue;  // the same decision in every thread (shared memory): no divergence
      const K* row = keys + (jt + t) * D;
#pragma unroll
      for (int i = 0; i < CPT; ++i) {
        const int64_t c = cbeg + int64_t(i) * kThreads;
        if (c < cend) {
          const float y = load_key(row, c, a.scale, a.shift);
#pragma unroll
          for (int b = 0; b < BQ; ++b) acc[b][i] = fmaf(pt[b], y, acc[b][i]);
        }
      }
    }
  }

  // The split's partial. Every valid row is written (an empty split writes m = -inf, l = l2 = 0, O = 0), so
  // the scratch needs no initialisation.
#pragma unroll
  for (int b = 0; b < BQ; ++b) {
    if (b < a.nb) {
      float* orow = a.po + (s * BQ + b) * D;
#pragma unroll
      for (int i = 0; i < CPT; ++i) {
        const int64_t c = cbeg + int64_t(i) * kThreads;
        if (c < cend) orow[c] = acc[b][i];
      }
    }
  }
  if (a.write_state && tid < a.nb) {
    a.pm[s * BQ + tid] = m_s[tid];
    a.pl[s * BQ + tid] = l_s[tid];
    a.pl2[s * BQ + tid] = l2_s[tid];
  }
}

struct SoftmaxCombineArgs {
  const float* pm;
  const float* pl;
  const float* pl2;
  const float* po;
  int64_t S, BQ, D;
  float* m;  // first row of the block
  float* l;
  float* l2;
  float* o;
};

// Deterministic block sum: butterfly in each warp, then the 8 warp sums in warp order.
__device__ __forceinline__ float block_sum(float v, float* red_s) {
#pragma unroll
  for (int o = 16; o >= 1; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // red_s may still be read from a previous call
  if (lane == 0) red_s[warp] = v;
  __syncthreads();
  float t = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t += red_s[w];
  return t;
}

// Grid (nb, ceil(D / 256)): query row blockIdx.x, output columns blockIdx.y * 256 + tid. Partials are merged
// against the global max M (one rescale factor w_s = 2^(m_s - M) per split), summed in split order.
__global__ void __launch_bounds__(kThreads) softmax_combine_kernel(const SoftmaxCombineArgs a) {
  __shared__ float w_s[kMaxSplits];
  __shared__ float red_s[kWarps];
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x, S = a.S;
  float mloc = -INFINITY;
  for (int64_t s = tid; s < S; s += kThreads) mloc = fmaxf(mloc, a.pm[s * a.BQ + b]);
#pragma unroll
  for (int o = 16; o >= 1; o /= 2) mloc = fmaxf(mloc, __shfl_xor_sync(kFull, mloc, o));
  if ((tid & 31) == 0) red_s[tid >> 5] = mloc;
  __syncthreads();
  float M = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) M = fmaxf(M, red_s[w]);  // max is exact: order does not matter
  float lw = 0.0f, l2w = 0.0f;
  for (int64_t s = tid; s < S; s += kThreads) {
    const float ms = a.pm[s * a.BQ + b];
    const float w = (M > -INFINITY && ms > -INFINITY) ? exp2f(ms - M) : 0.0f;
    w_s[s] = w;
    if (w != 0.0f) {
      lw = w * a.pl[s * a.BQ + b];
      l2w = (w * w) * a.pl2[s * a.BQ + b];
    }
  }
  // S <= 256 = kThreads: thread s held split s alone, so these are sums over splits in a fixed tree.
  const float L = block_sum(lw, red_s);
  const float L2 = block_sum(l2w, red_s);  // (its first __syncthreads also publishes w_s)
  if (blockIdx.y == 0 && tid == 0) {
    a.m[b] = M > -INFINITY ? M * kLn2 : -INFINITY;  // back to nats; l, l2, o are base-independent
    a.l[b] = L;
    a.l2[b] = L2;
  }
  const int64_t c = int64_t(blockIdx.y) * kThreads + tid;
  if (c < a.D) {
    float acc = 0.0f;
    for (int64_t s = 0; s < S; ++s) {
      const float w = w_s[s];
      if (w != 0.0f) acc = fmaf(w, a.po[(s * a.BQ + b) * a.D + c], acc);
    }
    a.o[b * a.D + c] = acc;
  }
}

// ---------------------------------------------------------------------------------------------- k-NN kernels

__device__ __forceinline__ bool knn_less(float da, int ia, float db, int ib) {
  return da < db || (da == db && ia < ib);
}

// Inserts (d, j) into the warp's sorted list (entry r in lane r, r < k) if it beats the current k-th entry.
__device__ __forceinline__ void knn_insert(float& ld, int& li, float& wd, int& wi, float d, int j, int k,
                                           int lane) {
  if (!knn_less(d, j, wd, wi)) return;  // uniform: d, j, wd, wi are the same in every lane
  const unsigned before = __ballot_sync(kFull, lane < k && knn_less(ld, li, d, j));
  const int pos = __popc(before);
  const float ud = __shfl_up_sync(kFull, ld, 1);
  const int ui = __shfl_up_sync(kFull, li, 1);
  if (lane < k) {
    if (lane == pos) {
      ld = d;
      li = j;
    } else if (lane > pos) {
      ld = ud;
      li = ui;
    }
  }
  wd = __shfl_sync(kFull, ld, k - 1);
  wi = __shfl_sync(kFull, li, k - 1);
}

struct KnnSplitArgs : ScanArgs {
  int k;
  float* pd;  // (S, BQ, k)
  int* pi;    // (S, BQ, k)
};

template <class K, int BQ, bool QS>
__global__ void __launch_bounds__(kThreads, 2) knn_split_kernel(const KnnSplitArgs a) {
  static_assert(QS || BQ == 1, "queries outside shared memory only in the one-query configuration");
  constexpr int kQPW = (BQ + kWarps - 1) / kWarps;  // lists per warp: query b belongs to warp b % 8
  __shared__ float dist_s[BQ][kTile];
  __shared__ int64_t qlab_s[BQ], klab_s[kTile];
  extern __shared__ float dyn_smem[];  // BQ x D queries (QS)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t D = a.D, s = blockIdx.x;
  const int64_t j0 = s * a.N / a.S, j1 = (s + 1) * a.N / a.S;
  const K* keys = static_cast<const K*>(a.keys);
  const bool filt = a.key_labels != nullptr && a.query_labels != nullptr;
  const int64_t* key_labels = filt ? a.key_labels : nullptr;
  const int k = a.k;

  stage_queries<BQ>(a.queries, a.nb, D, QS, dyn_smem, a.query_labels, qlab_s);
  const float* q = QS ? dyn_smem : a.queries;
  __syncthreads();

  float ld[kQPW], wd[kQPW];
  int li[kQPW], wi[kQPW];
#pragma unroll
  for (int r = 0; r < kQPW; ++r) {
    ld[r] = wd[r] = INFINITY;
    li[r] = wi[r] = kNoIndex;
  }
  for (int64_t jt = j0; jt < j1; jt += kTile) {
    tile_distances<K, BQ>(keys, D, jt, j1, a.scale, a.shift, q, a.nb, key_labels, qlab_s, dist_s, klab_s, warp,
                          lane);
    __syncthreads();
    const int nt = j1 - jt < kTile ? int(j1 - jt) : kTile;
#pragma unroll
    for (int r = 0; r < kQPW; ++r) {
      const int b = warp + r * kWarps;
      if (b < a.nb) {  // uniform in the warp
        for (int t = 0; t < nt; ++t) {
          if (filt && klab_s[t] != qlab_s[b]) continue;
          knn_insert(ld[r], li[r], wd[r], wi[r], dist_s[b][t], int(jt + t), k, lane);
        }
      }
    }
    __syncthreads();  // dist_s is rewritten by the next tile
  }
#pragma unroll
  for (int r = 0; r < kQPW; ++r) {
    const int b = warp + r * kWarps;
    if (b < a.nb && lane < k) {
      a.pd[(s * BQ + b) * k + lane] = ld[r];
      a.pi[(s * BQ + b) * k + lane] = li[r];
    }
  }
}

struct KnnCombineArgs {
  const float* pd;
  const int* pi;
  int64_t S, BQ;
  int nb, k;
  float* dist;     // first row of the block, (nb, k)
  int64_t* index;  // (nb, k)
};

// One warp per query row: merges the S sorted split lists in split order, each until its first entry that
// does not beat the current k-th (the rest of that list cannot either). The k smallest under the total order
// (distance, index) are unique, so the result does not depend on the merge order anyway.
__global__ void __launch_bounds__(kThreads) knn_combine_kernel(const KnnCombineArgs a) {
  const int lane = threadIdx.x & 31;
  const int b = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (b >= a.nb) return;  // whole warps leave together
  const int k = a.k;
  float ld = INFINITY, wd = INFINITY;
  int li = kNoIndex, wi = kNoIndex;
  for (int64_t s = 0; s < a.S; ++s) {
    const int64_t base = (s * a.BQ + b) * k;
    const float cd = lane < k ? a.pd[base + lane] : INFINITY;
    const int ci = lane < k ? a.pi[base + lane] : kNoIndex;
    for (int r = 0; r < k; ++r) {
      const float d = __shfl_sync(kFull, cd, r);
      const int j = __shfl_sync(kFull, ci, r);
      if (!knn_less(d, j, wd, wi)) break;
      knn_insert(ld, li, wd, wi, d, j, k, lane);
    }
  }
  if (lane < k) {
    const bool found = li != kNoIndex;
    a.dist[int64_t(b) * k + lane] = found ? ld : INFINITY;
    a.index[int64_t(b) * k + lane] = found ? int64_t(li) : int64_t(-1);
  }
}

// ------------------------------------------------------------------------------------------- host launchers

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Columns per thread of the softmax accumulator for rows of D values (D <= 256 * CPT), 32 beyond 8192.
int cpt_for(int64_t D) {
  if (D <= 512) return 2;
  if (D <= 1024) return 4;
  if (D <= 2048) return 8;
  if (D <= 4096) return 16;
  return 32;
}

bool queries_in_smem(int64_t D) { return D <= kSlab; }

bool valid_problem(const Problem& p) {
  return p.B >= 0 && p.N >= 1 && p.N < int64_t(INT_MAX) && p.D >= 1 && p.queries != nullptr &&
         p.keys != nullptr && (p.key_type == kKeysU8 || p.key_type == kKeysF32) &&
         (p.query_labels == nullptr || p.key_labels != nullptr);
}

template <class K, int BQ, int CPT, bool QS>
cudaError_t launch_softmax_split(const SoftmaxSplitArgs& a, cudaStream_t stream) {
  const size_t smem = QS ? size_t(BQ) * size_t(a.D) * sizeof(float) : 0;  // <= 32 KiB: no opt-in needed
  softmax_split_kernel<K, BQ, CPT, QS><<<unsigned(a.S), kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <class K>
cudaError_t softmax_split(SoftmaxSplitArgs a, cudaStream_t stream) {
  const int64_t D = a.D;
  a.col0 = 0;
  a.ncols = D;
  a.write_state = 1;
  switch (cpt_for(D)) {
    case 2: return launch_softmax_split<K, 16, 2, true>(a, stream);
    case 4: return launch_softmax_split<K, 8, 4, true>(a, stream);
    case 8: return launch_softmax_split<K, 4, 8, true>(a, stream);
    case 16: return launch_softmax_split<K, 2, 16, true>(a, stream);
    default: break;
  }
  if (queries_in_smem(D)) return launch_softmax_split<K, 1, 32, true>(a, stream);
  for (int64_t c0 = 0; c0 < D; c0 += kSlab) {
    a.col0 = c0;
    a.ncols = D - c0 < kSlab ? D - c0 : kSlab;
    a.write_state = c0 == 0;
    const cudaError_t e = launch_softmax_split<K, 1, 32, false>(a, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <class K, int BQ, bool QS>
cudaError_t launch_knn_split(const KnnSplitArgs& a, cudaStream_t stream) {
  const size_t smem = QS ? size_t(BQ) * size_t(a.D) * sizeof(float) : 0;
  knn_split_kernel<K, BQ, QS><<<unsigned(a.S), kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <class K>
cudaError_t knn_split(const KnnSplitArgs& a, cudaStream_t stream) {
  switch (query_block(a.D)) {
    case 16: return launch_knn_split<K, 16, true>(a, stream);
    case 8: return launch_knn_split<K, 8, true>(a, stream);
    case 4: return launch_knn_split<K, 4, true>(a, stream);
    case 2: return launch_knn_split<K, 2, true>(a, stream);
    default: break;
  }
  return queries_in_smem(a.D) ? launch_knn_split<K, 1, true>(a, stream) : launch_knn_split<K, 1, false>(a, stream);
}

}  // namespace

int64_t num_splits(int64_t N) {
  const int64_t s = ceil_div(N < 1 ? 1 : N, kMinKeysPerSplit);
  return s < kMaxSplits ? s : kMaxSplits;
}

// 16 queries for D <= 512, then halving with every doubling of D (BQ * D <= 8192: the queries fit in 32 KiB of
// shared memory and the accumulator in 32 registers per thread), 1 beyond 4096.
int query_block(int64_t D) { return 32 / cpt_for(D); }

size_t softmax_scratch_bytes(int64_t N, int64_t D) {
  return size_t(num_splits(N)) * size_t(query_block(D)) * size_t(D + 3) * sizeof(float);
}

size_t knn_scratch_bytes(int64_t N, int64_t D, int k) {
  return size_t(num_splits(N)) * size_t(query_block(D)) * size_t(k < 1 ? 1 : k) * (sizeof(float) + sizeof(int));
}

cudaError_t softmax_retrieval(const Problem& p, const float* coef, float* m, float* l, float* l2, float* o,
                              void* scratch, size_t scratch_bytes, cudaStream_t stream) {
  if (!valid_problem(p) || coef == nullptr || m == nullptr || l == nullptr || l2 == nullptr || o == nullptr)
    return cudaErrorInvalidValue;
  if (p.B == 0) return cudaSuccess;
  if (scratch == nullptr || scratch_bytes < softmax_scratch_bytes(p.N, p.D)) return cudaErrorInvalidValue;
  const int64_t S = num_splits(p.N), BQ = query_block(p.D), D = p.D;
  float* pm = static_cast<float*>(scratch);
  float* pl = pm + S * BQ;
  float* pl2 = pl + S * BQ;
  float* po = pl2 + S * BQ;
  for (int64_t b0 = 0; b0 < p.B; b0 += BQ) {
    const int nb = int(p.B - b0 < BQ ? p.B - b0 : BQ);
    SoftmaxSplitArgs a{};
    static_cast<ScanArgs&>(a) = scan_block(p, b0, S, nb);
    a.coef = coef + b0;
    a.pm = pm;
    a.pl = pl;
    a.pl2 = pl2;
    a.po = po;
    cudaError_t e = p.key_type == kKeysU8 ? softmax_split<uint8_t>(a, stream) : softmax_split<float>(a, stream);
    if (e != cudaSuccess) return e;
    SoftmaxCombineArgs c{pm, pl, pl2, po, S, BQ, D, m + b0, l + b0, l2 + b0, o + b0 * D};
    softmax_combine_kernel<<<dim3(unsigned(nb), unsigned(ceil_div(D, kThreads))), kThreads, 0, stream>>>(c);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

cudaError_t knn_search(const Problem& p, int k, float* dist, int64_t* index, void* scratch, size_t scratch_bytes,
                       cudaStream_t stream) {
  if (!valid_problem(p) || k < 1 || k > kMaxK || dist == nullptr || index == nullptr) return cudaErrorInvalidValue;
  if (p.B == 0) return cudaSuccess;
  if (scratch == nullptr || scratch_bytes < knn_scratch_bytes(p.N, p.D, k)) return cudaErrorInvalidValue;
  const int64_t S = num_splits(p.N), BQ = query_block(p.D);
  float* pd = static_cast<float*>(scratch);
  int* pi = reinterpret_cast<int*>(pd + S * BQ * k);
  for (int64_t b0 = 0; b0 < p.B; b0 += BQ) {
    const int nb = int(p.B - b0 < BQ ? p.B - b0 : BQ);
    KnnSplitArgs a{};
    static_cast<ScanArgs&>(a) = scan_block(p, b0, S, nb);
    a.k = k;
    a.pd = pd;
    a.pi = pi;
    cudaError_t e = p.key_type == kKeysU8 ? knn_split<uint8_t>(a, stream) : knn_split<float>(a, stream);
    if (e != cudaSuccess) return e;
    KnnCombineArgs c{pd, pi, S, BQ, nb, k, dist + b0 * k, index + b0 * k};
    knn_combine_kernel<<<unsigned(ceil_div(nb, kWarps)), kThreads, 0, stream>>>(c);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

int device_count(cudaError_t* err) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (err != nullptr) *err = e;
  return e == cudaSuccess ? n : 0;
}

const char* error_string(cudaError_t err) { return cudaGetErrorString(err); }

}  // namespace ad_cuda
