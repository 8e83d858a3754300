// pybind11 bindings of the CUDA retrieval kernels (global and patch): analytic_diffusion._cuda (no torch headers).
//
// Tensors cross as integer device addresses (torch `tensor.data_ptr()`), the stream as an integer handle
// (`torch.cuda.current_stream().cuda_stream`); 0 stands for "none" (labels) or the legacy default stream.
// The caller (analytic_diffusion/ops/cuda_backend.py) owns every buffer, including the scratch, whose size
// the *_scratch_bytes functions give. Arguments are checked here (ValueError naming the argument); CUDA errors
// raise RuntimeError with the runtime's message. Launches are asynchronous on the given stream.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "coordinate_retrieval.cuh"
#include "global_retrieval.cuh"
#include "patch_retrieval.cuh"

namespace py = pybind11;

namespace {

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("analytic_diffusion._cuda.") + what + ": CUDA error " +
                             std::to_string(static_cast<int>(err)) + " (" + ad_cuda::error_string(err) + ")");
}

ad_cuda::Problem make_problem(uintptr_t queries, uintptr_t keys, int key_type, int64_t B, int64_t N, int64_t D,
                              double scale, double shift, uintptr_t key_labels, uintptr_t query_labels) {
  require(queries != 0, "queries: null device pointer");
  require(keys != 0, "keys: null device pointer");
  require(key_type == ad_cuda::kKeysU8 || key_type == ad_cuda::kKeysF32,
          "key_type: expected 0 (uint8) or 1 (float32), got " + std::to_string(key_type));
  require(B >= 0, "B: expected >= 0 query rows, got " + std::to_string(B));
  require(N >= 1 && N < int64_t(INT32_MAX), "N: expected 1 <= N < 2^31 candidate rows, got " + std::to_string(N));
  require(D >= 1, "D: expected >= 1 values per row, got " + std::to_string(D));
  require(query_labels == 0 || key_labels != 0,
          "query_labels: class-conditional retrieval needs key_labels (got a null pointer)");
  ad_cuda::Problem p;
  p.queries = ptr<const float>(queries);
  p.keys = ptr<const void>(keys);
  p.key_type = key_type;
  p.B = B;
  p.N = N;
  p.D = D;
  p.scale = static_cast<float>(scale);
  p.shift = static_cast<float>(shift);
  p.key_labels = ptr<const int64_t>(key_labels);
  p.query_labels = ptr<const int64_t>(query_labels);
  return p;
}

void softmax_retrieval(uintptr_t queries, uintptr_t keys, int key_type, int64_t B, int64_t N, int64_t D,
                       double scale, double shift, uintptr_t coef, uintptr_t key_labels, uintptr_t query_labels,
                       uintptr_t m, uintptr_t l, uintptr_t l2, uintptr_t o, uintptr_t scratch, uint64_t scratch_bytes,
                       uintptr_t stream) {
  const ad_cuda::Problem p = make_problem(queries, keys, key_type, B, N, D, scale, shift, key_labels, query_labels);
  require(coef != 0 && m != 0 && l != 0 && l2 != 0 && o != 0, "coef, m, l, l2, o: null device pointer");
  const size_t need = ad_cuda::softmax_scratch_bytes(N, D);
  require(scratch != 0 && scratch_bytes >= need, "scratch: expected " + std::to_string(need) + " bytes, got " +
                                                     std::to_string(scratch_bytes));
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = ad_cuda::softmax_retrieval(p, ptr<const float>(coef), ptr<float>(m), ptr<float>(l), ptr<float>(l2),
                                     ptr<float>(o), ptr<void>(scratch), scratch_bytes,
                                     reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "softmax_retrieval");
}

void knn_search(uintptr_t queries, uintptr_t keys, int key_type, int64_t B, int64_t N, int64_t D, double scale,
                double shift, int k, uintptr_t key_labels, uintptr_t query_labels, uintptr_t dist, uintptr_t index,
                uintptr_t scratch, uint64_t scratch_bytes, uintptr_t stream) {
  const ad_cuda::Problem p = make_problem(queries, keys, key_type, B, N, D, scale, shift, key_labels, query_labels);
  require(k >= 1 && k <= ad_cuda::kMaxK,
          "k: expected 1 <= k <= " + std::to_string(ad_cuda::kMaxK) + ", got " + std::to_string(k));
  require(dist != 0 && index != 0, "dist, index: null device pointer");
  const size_t need = ad_cuda::knn_scratch_bytes(N, D, k);
  require(scratch != 0 && scratch_bytes >= need, "scratch: expected " + std::to_string(need) + " bytes, got " +
                                                     std::to_string(scratch_bytes));
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = ad_cuda::knn_search(p, k, ptr<float>(dist), ptr<int64_t>(index), ptr<void>(scratch), scratch_bytes,
                              reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "knn_search");
}

void patch_partials(uintptr_t queries, uintptr_t images, int key_type, uintptr_t image_index, int64_t n_img,
                    uintptr_t positions, int64_t n_pos, int rule, int64_t R, int C, int H, int W, int k, double scale,
                    double shift, uintptr_t coef2, double skip_bits, int64_t splits, uintptr_t m, uintptr_t l,
                    uintptr_t l2, uintptr_t o, uintptr_t stream) {
  require(rule == ad_cuda::kPatchShared || rule == ad_cuda::kPatchSameCentre || rule == ad_cuda::kPatchSameWhole,
          "rule: expected 0 (shared positions), 1 (same position, centre) or 2 (same position, whole patch), got " +
              std::to_string(rule));
  require(key_type == ad_cuda::kPatchKeysU8 || key_type == ad_cuda::kPatchKeysF32,
          "key_type: expected 0 (uint8) or 1 (float32), got " + std::to_string(key_type));
  require(R >= 0 && n_img >= 0, "R, n_img: expected >= 0");
  require(C >= 1 && H >= 1 && W >= 1 && k >= 1, "C, H, W, k: expected >= 1");
  require(rule != ad_cuda::kPatchShared || n_pos >= 1, "n_pos: the shared-position rule needs >= 1 centre");
  require(ad_cuda::patch_query_block(rule, C, k) > 0,
          "k: a C*k*k = " + std::to_string(int64_t(C) * k * k) + " patch does not fit the kernel's shared memory");
  require(ad_cuda::patch_num_splits(n_img, splits) <= 65535, "splits: expected at most 65535 image splits");
  require(queries != 0 && images != 0 && image_index != 0 && positions != 0 && coef2 != 0 && m != 0 && l != 0 &&
              l2 != 0 && o != 0,
          "queries, images, image_index, positions, coef2, m, l, l2, o: null device pointer");
  ad_cuda::PatchProblem p;
  p.queries = ptr<const float>(queries);
  p.images = ptr<const void>(images);
  p.key_type = key_type;
  p.image_index = ptr<const int32_t>(image_index);
  p.n_img = n_img;
  p.positions = ptr<const int32_t>(positions);
  p.n_pos = n_pos;
  p.rule = rule;
  p.R = R;
  p.C = C;
  p.H = H;
  p.W = W;
  p.k = k;
  p.scale = static_cast<float>(scale);
  p.shift = static_cast<float>(shift);
  p.coef2 = ptr<const float>(coef2);
  p.skip_bits = static_cast<float>(skip_bits);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = ad_cuda::patch_partials(p, splits, ptr<float>(m), ptr<float>(l), ptr<float>(l2), ptr<float>(o),
                                  reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "patch_partials");
}

void coordinate_partials(uintptr_t x, uintptr_t images, int key_type, uintptr_t stencil, int64_t nnz,
                         uintptr_t value_index, uintptr_t coef2, uintptr_t splits, int64_t S, uintptr_t image_labels,
                         uintptr_t query_labels, int64_t B, int64_t D, int64_t N, double scale, double shift,
                         uintptr_t m, uintptr_t l, uintptr_t o, uintptr_t stream) {
  require(key_type == ad_patch::kPatchKeysU8 || key_type == ad_patch::kPatchKeysF32,
          "key_type: expected 0 (uint8) or 1 (float32), got " + std::to_string(key_type));
  require(B >= 0 && D >= 0 && N >= 0 && nnz >= 0 && S >= 0, "B, D, N, nnz, S: expected >= 0");
  require(B <= 65535 && S <= 65535, "B, S: expected at most 65535 queries and 65535 candidate splits");
  require((image_labels == 0) == (query_labels == 0), "image_labels, query_labels: give both or neither");
  require(x != 0 && images != 0 && stencil != 0 && value_index != 0 && coef2 != 0 && splits != 0 && m != 0 &&
              l != 0 && o != 0,
          "x, images, stencil, value_index, coef2, splits, m, l, o: null device pointer");
  ad_cuda::CoordinateProblem p;
  p.x = ptr<const float>(x);
  p.images = ptr<const void>(images);
  p.key_type = key_type;
  p.stencil = ptr<const int32_t>(stencil);
  p.nnz = nnz;
  p.value_index = ptr<const int32_t>(value_index);
  p.coef2 = ptr<const float>(coef2);
  p.splits = ptr<const int32_t>(splits);
  p.S = S;
  p.image_labels = ptr<const int64_t>(image_labels);
  p.query_labels = ptr<const int64_t>(query_labels);
  p.B = B;
  p.D = D;
  p.N = N;
  p.scale = static_cast<float>(scale);
  p.shift = static_cast<float>(shift);
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = ad_cuda::coordinate_partials(p, ptr<float>(m), ptr<float>(l), ptr<float>(o),
                                       reinterpret_cast<cudaStream_t>(stream));
  }
  check_cuda(err, "coordinate_partials");
}

py::tuple device_count() {
  cudaError_t err = cudaSuccess;
  const int n = ad_cuda::device_count(&err);
  return py::make_tuple(n, err == cudaSuccess ? std::string() : std::string(ad_cuda::error_string(err)));
}

}  // namespace

PYBIND11_MODULE(_cuda, mod) {
  mod.doc() = "CUDA kernels of analytic_diffusion: split-N softmax retrieval, exact k-NN, the local family's "
              "patch softmax and pca_locality's coordinate softmax (fp32, direct distances, deterministic). "
              "Pointers are integer device addresses; see ops/cuda_backend.py.";
  mod.attr("KEYS_U8") = py::int_(static_cast<int>(ad_cuda::kKeysU8));
  mod.attr("KEYS_F32") = py::int_(static_cast<int>(ad_cuda::kKeysF32));
  mod.attr("MAX_K") = py::int_(ad_cuda::kMaxK);
  mod.attr("COORDINATE_THREADS") = py::int_(ad_cuda::kCoordinateThreads);
  mod.attr("PATCH_SHARED") = py::int_(static_cast<int>(ad_cuda::kPatchShared));
  mod.attr("PATCH_SAME_CENTRE") = py::int_(static_cast<int>(ad_cuda::kPatchSameCentre));
  mod.attr("PATCH_SAME_WHOLE") = py::int_(static_cast<int>(ad_cuda::kPatchSameWhole));
  mod.def("num_splits", &ad_cuda::num_splits, py::arg("n"),
          "Candidate splits (CTAs) for n candidates: depends on n only (determinism across devices).");
  mod.def("query_block", &ad_cuda::query_block, py::arg("d"), "Queries per kernel launch for rows of d values.");
  mod.def("softmax_scratch_bytes", &ad_cuda::softmax_scratch_bytes, py::arg("n"), py::arg("d"),
          "Scratch bytes softmax_retrieval needs for n candidates of d values (any batch size).");
  mod.def("knn_scratch_bytes", &ad_cuda::knn_scratch_bytes, py::arg("n"), py::arg("d"), py::arg("k"),
          "Scratch bytes knn_search needs.");
  mod.def("device_count", &device_count,
          "(number of CUDA devices, '' or the runtime's error message when it cannot tell, e.g. no driver).");
  mod.def("softmax_retrieval", &softmax_retrieval, py::arg("queries"), py::arg("keys"), py::arg("key_type"),
          py::arg("B"), py::arg("N"), py::arg("D"), py::arg("scale"), py::arg("shift"), py::arg("coef"),
          py::arg("key_labels"), py::arg("query_labels"), py::arg("m"), py::arg("l"), py::arg("l2"), py::arg("o"),
          py::arg("scratch"), py::arg("scratch_bytes"), py::arg("stream"),
          R"doc(Enqueue the partial softmax state over candidates y_j = scale * keys[j] + shift.

queries (B, D) fp32, keys (N, D) uint8/fp32, coef (B,) fp32; logit_bj = -coef[b] * sum_d (q_bd - y_jd)^2 (nats).
Candidates with key_labels[j] != query_labels[b] are excluded when both (int64) are given (0 = none).
Writes m (max logit, nats; -inf if no candidate), l = sum exp(z - m), l2 = sum exp(2(z - m)) (B,) and
o = sum exp(z - m) y_j (B, D), all fp32. Asynchronous on `stream`.)doc");
  mod.def("knn_search", &knn_search, py::arg("queries"), py::arg("keys"), py::arg("key_type"), py::arg("B"),
          py::arg("N"), py::arg("D"), py::arg("scale"), py::arg("shift"), py::arg("k"), py::arg("key_labels"),
          py::arg("query_labels"), py::arg("dist"), py::arg("index"), py::arg("scratch"), py::arg("scratch_bytes"),
          py::arg("stream"),
          R"doc(Enqueue the k <= 32 nearest candidates by exact fp32 squared distance: dist (B, k) fp32 and index
(B, k) int64, ascending, ties by the smaller index; rows with fewer than k allowed candidates are padded with
(inf, -1). Asynchronous on `stream`.)doc");
  mod.def("patch_num_splits", &ad_cuda::patch_num_splits, py::arg("n_img"), py::arg("splits"),
          "Leading dimension S of the patch partials for n_img images asked to run in `splits` pieces.");
  mod.def("patch_query_block", &ad_cuda::patch_query_block, py::arg("rule"), py::arg("C"), py::arg("k"),
          "Query rows per CTA of the patch kernel (0: the patch does not fit shared memory).");
  mod.def("patch_partials", &patch_partials, py::arg("queries"), py::arg("images"), py::arg("key_type"),
          py::arg("image_index"), py::arg("n_img"), py::arg("positions"), py::arg("n_pos"), py::arg("rule"),
          py::arg("R"), py::arg("C"), py::arg("H"), py::arg("W"), py::arg("k"), py::arg("scale"), py::arg("shift"),
          py::arg("coef2"), py::arg("skip_bits"), py::arg("splits"), py::arg("m"), py::arg("l"), py::arg("l2"),
          py::arg("o"), py::arg("stream"),
          R"doc(Enqueue the per-split partials of the patch softmax (ELS / bbELS, LS, PSPC; patch_retrieval.cuh).

queries (R, C*k*k) fp32; images (N, C, H, W) uint8/fp32; image_index (n_img,) int32; positions int32 (n_pos, 2)
shared centres (rule 0) or (R, 2) one per row (rules 1, 2); coef2 (R,) fp32 base-2 coefficients. Writes
m (base 2), l, l2 (S, R) and o (S, R, V) fp32, V = C (rules 0, 1) or C*k*k (rule 2), S = patch_num_splits.
Asynchronous on `stream`.)doc");
  mod.def("coordinate_partials", &coordinate_partials, py::arg("x"), py::arg("images"), py::arg("key_type"),
          py::arg("stencil"), py::arg("nnz"), py::arg("value_index"), py::arg("coef2"), py::arg("splits"),
          py::arg("S"), py::arg("image_labels"), py::arg("query_labels"), py::arg("B"), py::arg("D"), py::arg("N"),
          py::arg("scale"), py::arg("shift"), py::arg("m"), py::arg("l"), py::arg("o"), py::arg("stream"),
          R"doc(Enqueue the per-split partials of pca_locality's coordinate softmax (coordinate_retrieval.cuh).

x (B, D) fp32; images (N, D) uint8/fp32; stencil (nnz, D) int32 (-1 padded); value_index (D,) int32; coef2 (B,)
fp32 base 2; splits (S + 1,) int32; image_labels (N,) and query_labels (B,) int64, or both 0. Writes m (base 2),
l, o (S, B, D) fp32. Asynchronous on `stream`.)doc");
}
