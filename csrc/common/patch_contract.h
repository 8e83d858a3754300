// The partial-state contract every patch-softmax kernel shares (csrc/cpu/patch.h, csrc/cuda/patch_retrieval.cuh;
// kernels/patch_retrieval.py computes the same split in Python): the rule codes, how the image list is split, and
// the value width. Plain C++ (host only), included by both the C++ and the nvcc builds.
#pragma once

#include <cstdint>

namespace ad_patch {

// The numeric values are part of the Python bindings' interface.
enum PatchRule : int { kPatchShared = 0, kPatchSameCentre = 1, kPatchSameWhole = 2 };

// Images per split: ceil(n_img / splits), splits clamped to [1, n_img].
inline int64_t images_per_split(int64_t n_img, int64_t splits) {
  const int64_t s = splits < 1 ? 1 : (splits > n_img ? n_img : splits);
  return s < 1 ? 1 : (n_img + s - 1) / s;
}

// Number of splits S for n_img images asked to run in `splits` pieces: split s scans the listed images
// [s * per, min((s + 1) * per, n_img)), per = images_per_split(n_img, splits). 0 when there are no images.
inline int64_t patch_num_splits(int64_t n_img, int64_t splits) {
  if (n_img <= 0) return 0;
  const int64_t per = images_per_split(n_img, splits);
  return (n_img + per - 1) / per;
}

// Values per row of o: C, or C*k*k for kPatchSameWhole.
inline int64_t patch_value_width(int rule, int C, int k) {
  return rule == kPatchSameWhole ? int64_t(C) * k * k : int64_t(C);
}

}  // namespace ad_patch
