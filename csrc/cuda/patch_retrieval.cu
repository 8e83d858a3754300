// CUDA kernels of the local family's patch softmax with implicit im2col. Interface: patch_retrieval.cuh.
// Design: docs/design.md §8.4; the same computation as kernels/patch_retrieval.py (Triton).
//
// Shape of one launch:
//   grid  = (ceil(R / TQ), S): CTA (x, s) owns query rows [x*TQ, x*TQ + TQ) and split s of the image list.
//   block = 128 threads = one tile of 128 candidates (image, centre); TQ in {8, 4, 2, 1} query rows per CTA,
//           the most whose shared memory (queries, accumulators, tile weights, tile values) fits 48 KiB.
// Per tile of candidates:
//   phase 1  thread j gathers its candidate's key patch feature by feature straight from the resident images
//            (bounds-checked: zero padding in value space) and accumulates the direct-form distances
//            sum_f (q_rf - y_f)^2 to all TQ rows in registers (fp32 FMA; no expanded-form cancellation, exact at
//            every sigma). The queries sit in shared memory as [feature][row], so one feature's TQ values are one
//            broadcast (float4) read for the whole warp. Base-2 logits go to shared memory, and so do the
//            candidate's centre values (centre rules).
//   phase 2  warp w owns rows w, w + 4, ...: tile max by shuffles; (shared rule) the tile is skipped when every
//            row's best weight is below 2^-skip_bits of its running max; else online-softmax update of (m, l, l2)
//            and the weights p = 2^(z - m) written over the logits.
//   phase 3  the accumulators o (shared memory) are rescaled by 2^(m_old - m_new) and get sum_j p_rj * value_j:
//            centre values from shared memory, or (whole-patch rule) the candidates' patches gathered again from
//            L1/L2 by threads striding over (row, feature), coalesced along the patch rows.
// Then the CTA writes its partial (m, l, l2 in base 2, o); the Python driver combines the S partials in split
// order (deterministic: no atomics anywhere).
#include "patch_retrieval.cuh"

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "global_retrieval.cuh"

namespace ad_cuda {
namespace {

constexpr int kThreads = kPatchTile;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
constexpr float kNoMax = -3.0e38f;  // stands for a running max of -inf in the skip test (no -inf - -inf)
constexpr size_t kStaticSmem = 2048;  // bound on the kernel's static shared arrays (row state, image offsets)

template <class KeyT>
struct PatchArgs {
  const float* q;
  const KeyT* images;
  const int32_t* image_index;
  const int32_t* positions;
  const float* coef2;
  float* m;
  float* l;
  float* l2;
  float* o;
  int64_t R, n_img, n_pos, per;
  int C, H, W, k, F, V;
  float scale, shift, skip_bits;
};

__device__ __forceinline__ float key_value(const uint8_t* img, int64_t off, float scale, float shift) {
  return fmaf(static_cast<float>(__ldg(img + off)), scale, shift);
}
__device__ __forceinline__ float key_value(const float* img, int64_t off, float scale, float shift) {
  return fmaf(__ldg(img + off), scale, shift);
}

// Value of channel ch at (r, c) of the image at `img`: scale * u + shift inside, 0 outside (zero padding).
template <class KeyT>
__device__ __forceinline__ float pixel(const KeyT* img, int ch, int r, int c, int H, int W, float scale,
                                       float shift) {
  return (r >= 0 && r < H && c >= 0 && c < W) ? key_value(img, (int64_t(ch) * H + r) * W + c, scale, shift)
                                               : 0.0f;
}

// d[t] += (q[t] - y)^2 for the TQ rows of one feature (q: the feature's TQ query values, 16-byte aligned).
template <int TQ>
__device__ __forceinline__ void add_sq_diff(const float* q, float y, float (&d)[TQ]) {
  if constexpr (TQ % 4 == 0) {
#pragma unroll
    for (int t = 0; t < TQ; t += 4) {
      const float4 v = *reinterpret_cast<const float4*>(q + t);
      const float e0 = v.x - y, e1 = v.y - y, e2 = v.z - y, e3 = v.w - y;
      d[t] = fmaf(e0, e0, d[t]);
      d[t + 1] = fmaf(e1, e1, d[t + 1]);
      d[t + 2] = fmaf(e2, e2, d[t + 2]);
      d[t + 3] = fmaf(e3, e3, d[t + 3]);
    }
  } else {
#pragma unroll
    for (int t = 0; t < TQ; ++t) {
      const float e = q[t] - y;
      d[t] = fmaf(e, e, d[t]);
    }
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Squared distance of query row t (queries qs as [feature][TQ]) to the k x k patch of `img` centred at (pr, pc).
template <int TQ, class KeyT>
__device__ __forceinline__ float row_distance(const float* qs, int t, const KeyT* img, int pr, int pc,
                                              const PatchArgs<KeyT>& a) {
  const int half = a.k / 2;
  float d = 0.0f;
  int f = 0;
  for (int ch = 0; ch < a.C; ++ch)
    for (int dr = 0; dr < a.k; ++dr) {
      const int r = pr + dr - half;
      for (int dc = 0; dc < a.k; ++dc, ++f) {
        const float e = qs[f * TQ + t] - pixel(img, ch, r, pc + dc - half, a.H, a.W, a.scale, a.shift);
        d = fmaf(e, e, d);
      }
    }
  return d;
}

template <int TQ, int RULE, class KeyT>
__global__ void __launch_bounds__(kThreads) patch_kernel(const PatchArgs<KeyT> a) {
  extern __shared__ float dyn_smem[];
  float* qs = dyn_smem;              // [F][TQ] queries
  float* os = qs + TQ * a.F;         // [TQ][V] accumulators
  float* lg = os + TQ * a.V;         // [TQ][kThreads] logits, then weights
  float* vs = lg + TQ * kThreads;    // centre values: [kThreads][C] (shared rule) or [TQ][kThreads][C]
  __shared__ float ms[TQ], ls[TQ], l2s[TQ], als[TQ], cs[TQ], gs[TQ];
  __shared__ int prs[TQ], pcs[TQ];
  __shared__ int64_t bases[kThreads];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t row0 = int64_t(blockIdx.x) * TQ;
  const int64_t split = blockIdx.y;
  const int nrows = int(a.R - row0 < TQ ? a.R - row0 : TQ);
  const int F = a.F, V = a.V, C = a.C;
  const int64_t chw = int64_t(C) * a.H * a.W;

  for (int i = tid; i < TQ * F; i += kThreads) {
    const int f = i / TQ, t = i - f * TQ;
    qs[i] = t < nrows ? a.q[(row0 + t) * F + f] : 0.0f;
  }
  for (int i = tid; i < TQ * V; i += kThreads) os[i] = 0.0f;
  if (tid < TQ) {
    ms[tid] = -INFINITY;
    ls[tid] = 0.0f;
    l2s[tid] = 0.0f;
    cs[tid] = tid < nrows ? a.coef2[row0 + tid] : 0.0f;
    prs[tid] = (RULE != kPatchShared && tid < nrows) ? a.positions[2 * (row0 + tid)] : 0;
    pcs[tid] = (RULE != kPatchShared && tid < nrows) ? a.positions[2 * (row0 + tid) + 1] : 0;
  }
  __syncthreads();

  const int64_t i_start = split * a.per;
  const int64_t i_stop = i_start + a.per < a.n_img ? i_start + a.per : a.n_img;
  const int64_t n_pos = RULE == kPatchShared ? a.n_pos : 1;
  const int64_t n_cand = (i_stop - i_start) * n_pos;
  for (int64_t j0 = 0; j0 < n_cand; j0 += kThreads) {
    // ---- phase 1: this thread's candidate, its distances to the TQ rows, its centre values
    const int64_t cand = j0 + tid;
    const bool valid = cand < n_cand;
    int64_t base = 0;
    int pr = 0, pc = 0;
    if (valid) {
      base = int64_t(__ldg(a.image_index + i_start + cand / n_pos)) * chw;
      if (RULE == kPatchShared) {
        const int64_t pi = cand % n_pos;
        pr = __ldg(a.positions + 2 * pi);
        pc = __ldg(a.positions + 2 * pi + 1);
      }
    }
    bases[tid] = base;
    const KeyT* img = a.images + base;
    if (RULE == kPatchShared) {
      float d[TQ];
#pragma unroll
      for (int t = 0; t < TQ; ++t) d[t] = 0.0f;
      if (valid) {
        const int half = a.k / 2;
        int f = 0;
        for (int ch = 0; ch < C; ++ch)
          for (int dr = 0; dr < a.k; ++dr) {
            const int r = pr + dr - half;
            for (int dc = 0; dc < a.k; ++dc, ++f)
              add_sq_diff<TQ>(qs + f * TQ, pixel(img, ch, r, pc + dc - half, a.H, a.W, a.scale, a.shift), d);
          }
      }
#pragma unroll
      for (int t = 0; t < TQ; ++t) lg[t * kThreads + tid] = (valid && t < nrows) ? -cs[t] * d[t] : -INFINITY;
      for (int ch = 0; ch < C; ++ch)
        vs[tid * C + ch] = valid ? pixel(img, ch, pr, pc, a.H, a.W, a.scale, a.shift) : 0.0f;
    } else {
      for (int t = 0; t < TQ; ++t) {
        const bool ok = valid && t < nrows;
        lg[t * kThreads + tid] = ok ? -cs[t] * row_distance<TQ>(qs, t, img, prs[t], pcs[t], a) : -INFINITY;
        if (RULE == kPatchSameCentre)
          for (int ch = 0; ch < C; ++ch)
            vs[(t * kThreads + tid) * C + ch] = ok ? pixel(img, ch, prs[t], pcs[t], a.H, a.W, a.scale, a.shift)
                                                   : 0.0f;
      }
    }
    __syncthreads();

    // ---- phase 2: tile maxima, skip test, online softmax
    for (int t = warp; t < TQ; t += kWarps) {
      float mx = -INFINITY;
      for (int j = lane; j < kThreads; j += 32) mx = fmaxf(mx, lg[t * kThreads + j]);
      mx = warp_max(mx);
      if (lane == 0) gs[t] = mx;
    }
    __syncthreads();
    // The skip decision: every thread reads the same gs and ms, and a barrier separates these reads from the update
    // below, where lane 0 of the warp owning row t writes ms[t]. Without that barrier a fast warp's update could
    // change what a slow warp reads (a data race; with skip_bits <= 0 a different answer per warp, hence a
    // divergent __syncthreads). The emulator's default round-robin schedule hides such races (all warps reach a
    // point before any passes its next warp shuffle); tests/test_fused_patch.py also runs this kernel under the
    // emulator's warp-serial schedule (tests/cuda_emu/emu.h), which exposes them.
    bool update = true;
    if (RULE == kPatchShared) {
      float gap = -INFINITY;
      for (int t = 0; t < nrows; ++t) gap = fmaxf(gap, gs[t] - fmaxf(ms[t], kNoMax));
      update = gap > -a.skip_bits;  // block-uniform: the same shared values in every thread
      __syncthreads();              // every thread has read ms before any lane 0 writes it
    }
    if (update) {
      for (int t = warp; t < TQ; t += kWarps) {
        const float m_old = ms[t];
        const float m_new = fmaxf(m_old, gs[t]);
        const float m_safe = m_new == -INFINITY ? 0.0f : m_new;  // no candidate yet: avoid -inf - -inf
        float s1 = 0.0f, s2 = 0.0f;
        for (int j = lane; j < kThreads; j += 32) {
          const float p = exp2f(lg[t * kThreads + j] - m_safe);
          lg[t * kThreads + j] = p;
          s1 += p;
          s2 += p * p;
        }
        s1 = warp_sum(s1);
        s2 = warp_sum(s2);
        if (lane == 0) {
          const float alpha = exp2f(m_old - m_safe);
          ms[t] = m_new;
          ls[t] = ls[t] * alpha + s1;
          l2s[t] = l2s[t] * alpha * alpha + s2;
          als[t] = alpha;
        }
      }
      __syncthreads();

      // ---- phase 3: rescale the accumulators and add the tile's weighted values
      if (RULE != kPatchSameWhole) {
        for (int i = tid; i < TQ * C; i += kThreads) {
          const int t = i / C, ch = i - t * C;
          const float* p = lg + t * kThreads;
          const float* v = vs + (RULE == kPatchShared ? 0 : t * kThreads * C) + ch;
          float acc = 0.0f;
          for (int j = 0; j < kThreads; ++j) acc = fmaf(p[j], v[j * C], acc);
          os[i] = os[i] * als[t] + acc;
        }
      } else {
        const int kk = a.k * a.k, half = a.k / 2;
        const int nvalid = int(n_cand - j0 < kThreads ? n_cand - j0 : kThreads);
        for (int i = tid; i < TQ * F; i += kThreads) {
          const int t = i / F, f = i - t * F;
          const int ch = f / kk, rem = f - ch * kk, dr = rem / a.k, dc = rem - dr * a.k;
          const int r = prs[t] + dr - half, c = pcs[t] + dc - half;
          float acc = 0.0f;
          if (t < nrows && r >= 0 && r < a.H && c >= 0 && c < a.W) {
            const int64_t off = (int64_t(ch) * a.H + r) * a.W + c;
            const float* p = lg + t * kThreads;
            for (int j = 0; j < nvalid; ++j) acc = fmaf(p[j], key_value(a.images + bases[j], off, a.scale, a.shift), acc);
          }
          os[i] = os[i] * als[t] + acc;
        }
      }
    }
    __syncthreads();  // the next tile overwrites lg, vs and bases
  }

  const int64_t part = split * a.R + row0;
  if (tid < nrows) {
    a.m[part + tid] = ms[tid];
    a.l[part + tid] = ls[tid];
    a.l2[part + tid] = l2s[tid];
  }
  for (int i = tid; i < nrows * V; i += kThreads) a.o[part * V + i] = os[i];
}

size_t dynamic_smem(int rule, int C, int k, int tq) {
  const size_t F = size_t(C) * k * k;
  const size_t V = size_t(patch_value_width(rule, C, k));
  const size_t values = rule == kPatchShared ? size_t(kThreads) * C
                                             : rule == kPatchSameCentre ? size_t(tq) * kThreads * C : 0;
  return sizeof(float) * (tq * F + tq * V + size_t(tq) * kThreads + values);
}

template <int RULE, class KeyT>
cudaError_t launch(const PatchArgs<KeyT>& a, int tq, int64_t S, cudaStream_t stream) {
  const size_t smem = dynamic_smem(RULE, a.C, a.k, tq);
  const dim3 grid(unsigned((a.R + tq - 1) / tq), unsigned(S));
  switch (tq) {
    case 8: patch_kernel<8, RULE, KeyT><<<grid, kThreads, smem, stream>>>(a); break;
    case 4: patch_kernel<4, RULE, KeyT><<<grid, kThreads, smem, stream>>>(a); break;
    case 2: patch_kernel<2, RULE, KeyT><<<grid, kThreads, smem, stream>>>(a); break;
    default: patch_kernel<1, RULE, KeyT><<<grid, kThreads, smem, stream>>>(a); break;
  }
  return cudaGetLastError();
}

template <class KeyT>
cudaError_t dispatch(const PatchProblem& p, int64_t S, int64_t per, float* m, float* l, float* l2, float* o, cudaStream_t stream) {
  PatchArgs<KeyT> a;
  a.q = p.queries;
  a.images = static_cast<const KeyT*>(p.images);
  a.image_index = p.image_index;
  a.positions = p.positions;
  a.coef2 = p.coef2;
  a.m = m;
  a.l = l;
  a.l2 = l2;
  a.o = o;
  a.R = p.R;
  a.n_img = p.n_img;
  a.n_pos = p.n_pos;
  a.per = per;
  a.C = p.C;
  a.H = p.H;
  a.W = p.W;
  a.k = p.k;
  a.F = p.C * p.k * p.k;
  a.V = int(patch_value_width(p.rule, p.C, p.k));
  a.scale = p.scale;
  a.shift = p.shift;
  a.skip_bits = p.skip_bits;
  const int tq = patch_query_block(p.rule, p.C, p.k);
  switch (p.rule) {
    case kPatchShared: return launch<kPatchShared>(a, tq, S, stream);
    case kPatchSameCentre: return launch<kPatchSameCentre>(a, tq, S, stream);
    default: return launch<kPatchSameWhole>(a, tq, S, stream);
  }
}

}  // namespace

int patch_query_block(int rule, int C, int k) {
  for (int tq = 8; tq >= 1; tq /= 2)
    if (dynamic_smem(rule, C, k, tq) + kStaticSmem <= kPatchSmemLimit) return tq;
  return 0;
}

cudaError_t patch_partials(const PatchProblem& p, int64_t splits, float* m, float* l, float* l2, float* o,
                           cudaStream_t stream) {
  const bool shape_ok = p.R >= 0 && p.n_img >= 0 && p.C >= 1 && p.H >= 1 && p.W >= 1 && p.k >= 1 &&
                        (p.rule != kPatchShared || p.n_pos >= 1) &&
                        (p.rule == kPatchShared || p.rule == kPatchSameCentre || p.rule == kPatchSameWhole) &&
                        (p.key_type == kPatchKeysU8 || p.key_type == kPatchKeysF32);
  if (!shape_ok || patch_query_block(p.rule, p.C, p.k) == 0) return cudaErrorInvalidValue;
  const int64_t S = patch_num_splits(p.n_img, splits);
  if (p.R == 0 || S == 0) return cudaSuccess;
  if (S > 65535 || (p.R + 7) / 8 > int64_t(INT32_MAX)) return cudaErrorInvalidValue;
  if (!p.queries || !p.images || !p.image_index || !p.positions || !p.coef2 || !m || !l || !l2 || !o)
    return cudaErrorInvalidValue;
  const int64_t per = images_per_split(p.n_img, splits);
  return p.key_type == kPatchKeysU8 ? dispatch<uint8_t>(p, S, per, m, l, l2, o, stream)
                               : dispatch<float>(p, S, per, m, l, l2, o, stream);
}

}  // namespace ad_cuda
