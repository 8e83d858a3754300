// The partial-state contract every patch-softmax kernel shares (csrc/cpu/patch.h, csrc/cuda/patch_retrieval.cuh;
// kernels/patch_retrieval.py computes the same split in Python): the rule codes, how the image list is split, and
// the value width, and the problem description both launchers take. Plain C++ (host only), included by both the
// C++ and the nvcc builds.
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

// Key storage codes (the bindings' key_type argument): the training images as uint8 (mapped by scale, shift) or fp32.
enum PatchKeys : int { kPatchKeysU8 = 0, kPatchKeysF32 = 1 };

// One patch-softmax problem: the query rows, the images they scan and the rule that places the candidates.
struct PatchProblem {
  const float* queries = nullptr;        // (R, C*k*k) fp32, rows contiguous
  const void* images = nullptr;          // (N, C, H, W) uint8 or fp32, as key_type says
  int key_type = kPatchKeysU8;
  const int32_t* image_index = nullptr;  // (n_img,) images to scan
  int64_t n_img = 0;
  const int32_t* positions = nullptr;  // (n_pos, 2) shared centres, or (R, 2) one per row: (row, col)
  int64_t n_pos = 0;
  int rule = kPatchShared;
  int64_t R = 0;
  int C = 1, H = 1, W = 1, k = 1;
  float scale = 1.0f, shift = 0.0f;
  const float* coef2 = nullptr;  // (R,) base-2 coefficients
  // kPatchShared on CUDA: key tiles whose best weight is below 2^-skip_bits of the running max are skipped. The
  // C++ kernels skip at their fixed exp2 cutoff (2^-63) instead.
  float skip_bits = 64.0f;
};

// Values per row of o: C, or C*k*k for kPatchSameWhole.
inline int64_t patch_value_width(int rule, int C, int k) {
  return rule == kPatchSameWhole ? int64_t(C) * k * k : int64_t(C);
}

}  // namespace ad_patch
