// pybind11 bindings of the CUDA retrieval kernels: analytic_diffusion._cuda (no torch headers).
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

#include "global_retrieval.cuh"

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

py::tuple device_count() {
  cudaError_t err = cudaSuccess;
  const int n = ad_cuda::device_count(&err);
  return py::make_tuple(n, err == cudaSuccess ? std::string() : std::string(ad_cuda::error_string(err)));
}

}  // namespace

PYBIND11_MODULE(_cuda, mod) {
  mod.doc() = "CUDA kernels of analytic_diffusion: split-N softmax retrieval and exact k-NN (fp32, direct "
              "distances, deterministic). Pointers are integer device addresses; see ops/cuda_backend.py.";
  mod.attr("KEYS_U8") = py::int_(static_cast<int>(ad_cuda::kKeysU8));
  mod.attr("KEYS_F32") = py::int_(static_cast<int>(ad_cuda::kKeysF32));
  mod.attr("MAX_K") = py::int_(ad_cuda::kMaxK);
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
}
