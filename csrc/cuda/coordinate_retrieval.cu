// CUDA kernel of pca_locality's coordinate softmax. Interface: coordinate_retrieval.cuh.
//
// Shape of one launch: grid = (ceil(D / 128), B, S), block = 128 threads; thread t of CTA (x, b, s) owns output
// coordinate m = 128 x + t of query b over split s. It scans the split's candidates in order: the direct-form
// distance over its stencil column (fp32 FMA, no expanded-form cancellation: exact at every σ up to rounding),
// then an online-softmax update of (m, l, o) in registers. All threads of a CTA read the same candidate image at
// the same time (its bytes stay in L1), and neighbouring coordinates have neighbouring stencils. Label filtering
// is uniform across the CTA (one query, one candidate). No shared memory, no barriers.
#include "coordinate_retrieval.cuh"

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

namespace ad_cuda {
namespace {

template <class KeyT>
struct CoordinateArgs {
  const float* x;
  const KeyT* images;
  const int32_t* stencil;
  const int32_t* value_index;
  const float* coef2;
  const int32_t* splits;
  const int64_t* image_labels;
  const int64_t* query_labels;
  float* m;
  float* l;
  float* o;
  int64_t B, D, nnz;
  float scale, shift;
};

__device__ __forceinline__ float coord_value(const uint8_t* img, int64_t off, float scale, float shift) {
  return fmaf(static_cast<float>(__ldg(img + off)), scale, shift);
}
__device__ __forceinline__ float coord_value(const float* img, int64_t off, float scale, float shift) {
  return fmaf(__ldg(img + off), scale, shift);
}

template <class KeyT>
__global__ void __launch_bounds__(kCoordinateThreads) coordinate_kernel(CoordinateArgs<KeyT> a) {
  const int64_t mo = int64_t(blockIdx.x) * kCoordinateThreads + threadIdx.x;
  const int64_t b = blockIdx.y, s = blockIdx.z;
  if (mo >= a.D) return;  // no barriers below: early exit is safe
  const float* xr = a.x + b * a.D;
  const float c2 = a.coef2[b];
  const int64_t vidx = a.value_index[mo];
  const int64_t j0 = a.splits[s], j1 = a.splits[s + 1];
  const bool labelled = a.image_labels != nullptr;
  const int64_t qlab = labelled ? a.query_labels[b] : 0;
  float run_m = -INFINITY, run_l = 0.0f, run_o = 0.0f;
  for (int64_t j = j0; j < j1; ++j) {
    if (labelled && a.image_labels[j] != qlab) continue;  // uniform across the CTA
    const KeyT* img = a.images + j * a.D;
    float d = 0.0f;
    for (int64_t t = 0; t < a.nnz; ++t) {
      const int32_t n = __ldg(a.stencil + t * a.D + mo);  // coalesced along m
      if (n < 0) continue;  // padding
      const float e = __ldg(xr + n) - coord_value(img, n, a.scale, a.shift);
      d = fmaf(e, e, d);
    }
    const float z = d > 0.0f ? -(c2 * d) : 0.0f;  // d == 0 gives 0 even for an infinite coefficient
    const float v = coord_value(img, vidx, a.scale, a.shift);
    if (z > run_m) {
      const float alpha = exp2f(run_m - z);  // 0 for run_m = -inf
      run_l = fmaf(run_l, alpha, 1.0f);
      run_o = fmaf(run_o, alpha, v);
      run_m = z;
    } else {
      const float w = exp2f(z - run_m);
      run_l += w;
      run_o = fmaf(w, v, run_o);
    }
  }
  const int64_t at = (s * a.B + b) * a.D + mo;
  a.m[at] = run_m;
  a.l[at] = run_l;
  a.o[at] = run_o;
}

template <class KeyT>
cudaError_t launch(const CoordinateProblem& p, float* m, float* l, float* o, cudaStream_t stream) {
  CoordinateArgs<KeyT> a;
  a.x = p.x;
  a.images = static_cast<const KeyT*>(p.images);
  a.stencil = p.stencil;
  a.value_index = p.value_index;
  a.coef2 = p.coef2;
  a.splits = p.splits;
  a.image_labels = p.image_labels;
  a.query_labels = p.query_labels;
  a.m = m;
  a.l = l;
  a.o = o;
  a.B = p.B;
  a.D = p.D;
  a.nnz = p.nnz;
  a.scale = p.scale;
  a.shift = p.shift;
  const dim3 grid(unsigned((p.D + kCoordinateThreads - 1) / kCoordinateThreads), unsigned(p.B), unsigned(p.S));
  coordinate_kernel<KeyT><<<grid, kCoordinateThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t coordinate_partials(const CoordinateProblem& p, float* m, float* l, float* o, cudaStream_t stream) {
  const bool ok = p.B >= 0 && p.D >= 0 && p.N >= 0 && p.nnz >= 0 && p.S >= 0 &&
                  (p.key_type == ad_patch::kPatchKeysU8 || p.key_type == ad_patch::kPatchKeysF32) &&
                  (p.image_labels == nullptr) == (p.query_labels == nullptr);
  if (!ok) return cudaErrorInvalidValue;
  if (p.B == 0 || p.D == 0 || p.S == 0) return cudaSuccess;
  if (p.B > 65535 || p.S > 65535 || (p.D + kCoordinateThreads - 1) / kCoordinateThreads > int64_t(INT32_MAX))
    return cudaErrorInvalidValue;
  if (!p.x || !p.images || !p.stencil || !p.value_index || !p.coef2 || !p.splits || !m || !l || !o)
    return cudaErrorInvalidValue;
  return p.key_type == ad_patch::kPatchKeysU8 ? launch<uint8_t>(p, m, l, o, stream)
                                               : launch<float>(p, m, l, o, stream);
}

}  // namespace ad_cuda
