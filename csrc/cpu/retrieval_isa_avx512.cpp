// Per-task kernels for x86-64 with AVX-512 (F, VL, BW, DQ) + FMA, selected at run time (retrieval_driver.cpp),
// so that the module itself needs no -march flag and runs on any x86-64. Elsewhere: a null table.
//
// Every standard header is included BEFORE the target pragma, and the kernels have internal linkage: no inline
// function that another translation unit could pick up is ever compiled for AVX-512.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "patch.h"
#include "retrieval.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(AD_NO_AVX512)
#define AD_HAVE_AVX512_KERNELS 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), apply_to = function)
#endif
#define AD_ISA_NS isa_avx512
#define AD_LANE_BYTES 64  // one AVX-512 register per (query, row) pair: 8 of the 32 registers in the 2x4 block
#include "retrieval_isa_impl.h"
#include "subset_isa_impl.h"
#include "patch_isa_impl.h"
#include "coordinate_isa_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
#pragma GCC pop_options
#else
#define AD_HAVE_AVX512_KERNELS 0
#endif

namespace ad_cpu {

const KernelTable* kernels_avx512() {
#if AD_HAVE_AVX512_KERNELS
  static const KernelTable table{"avx512", &isa_avx512::softmax_task<float>, &isa_avx512::softmax_task<double>,
                                 &isa_avx512::knn_task<float>, &isa_avx512::knn_task<double>,
                                 &isa_avx512::subset_rel_row, &isa_avx512::subset_sum_row};
  return &table;
#else
  return nullptr;
#endif
}

const PatchKernelTable* patch_kernels_avx512() {
#if AD_HAVE_AVX512_KERNELS
  static const PatchKernelTable table{"avx512", isa_avx512::kPatchLanes, &isa_avx512::patch_shared_task,
                                      &isa_avx512::patch_same_task<false>, &isa_avx512::patch_same_task<true>,
                                      &isa_avx512::coordinate_task};
  return &table;
#else
  return nullptr;
#endif
}

}  // namespace ad_cpu
