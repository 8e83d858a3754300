// pybind11 bindings of the C++ CPU retrieval kernels: analytic_diffusion._cpu (no torch headers).
//
// NumPy arrays in, NumPy arrays out. Arguments are validated here (TypeError for a wrong type or dtype,
// ValueError for a wrong shape, layout or value, each message naming the argument); the GIL is released while
// the kernels run. Python side: analytic_diffusion/ops/cpu_backend.py.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "coordinate.h"
#include "patch.h"
#include "retrieval.h"

namespace py = pybind11;

namespace {

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

py::array as_array(const py::object& obj, const char* name) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + ": expected a numpy.ndarray, got " +
                         py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  return py::reinterpret_borrow<py::array>(obj);
}

void require_layout(const py::array& a, const char* name, py::ssize_t ndim) {
  if (a.ndim() != ndim)
    throw py::value_error(std::string(name) + ": expected a " + std::to_string(ndim) + "-D array, got " +
                          std::to_string(a.ndim()) + "-D");
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + ": expected a C-contiguous array (use np.ascontiguousarray)");
}

template <class T>
bool is_dtype(const py::array& a) {
  return a.dtype().is(py::dtype::of<T>());
}

struct Common {
  ad_cpu::Problem p;
  bool f64 = false;
};

// Shared validation of (queries, keys, labels); fills the Problem.
Common validate(const py::object& queries_o, const py::object& keys_o, double key_scale, double key_shift,
                const py::object& key_labels_o, const py::object& query_labels_o) {
  Common c;
  py::array q = as_array(queries_o, "queries");
  if (!is_dtype<float>(q) && !is_dtype<double>(q))
    throw py::type_error("queries: expected float32 or float64, got " + dtype_name(q));
  require_layout(q, "queries", 2);
  py::array k = as_array(keys_o, "keys");
  ad_cpu::KeyType kt;
  if (is_dtype<uint8_t>(k)) kt = ad_cpu::KeyType::U8;
  else if (is_dtype<float>(k)) kt = ad_cpu::KeyType::F32;
  else if (is_dtype<double>(k)) kt = ad_cpu::KeyType::F64;
  else throw py::type_error("keys: expected uint8, float32 or float64, got " + dtype_name(k));
  require_layout(k, "keys", 2);
  if (k.shape(1) != q.shape(1))
    throw py::value_error("keys: expected D = " + std::to_string(q.shape(1)) + " values per row (the queries'), got " +
                          std::to_string(k.shape(1)));
  if (!std::isfinite(key_scale) || !std::isfinite(key_shift))
    throw py::value_error("key_scale, key_shift: expected finite numbers");
  c.f64 = is_dtype<double>(q);
  c.p.queries = q.data();
  c.p.keys = k.data();
  c.p.key_type = kt;
  c.p.B = q.shape(0);
  c.p.N = k.shape(0);
  c.p.D = q.shape(1);
  c.p.scale = key_scale;
  c.p.shift = key_shift;
  if (!key_labels_o.is_none()) {
    py::array kl = as_array(key_labels_o, "key_labels");
    if (!is_dtype<int64_t>(kl)) throw py::type_error("key_labels: expected int64, got " + dtype_name(kl));
    require_layout(kl, "key_labels", 1);
    if (kl.shape(0) != c.p.N)
      throw py::value_error("key_labels: expected shape (" + std::to_string(c.p.N) + ",), got (" +
                            std::to_string(kl.shape(0)) + ",)");
    c.p.key_labels = static_cast<const int64_t*>(kl.data());
  }
  if (!query_labels_o.is_none()) {
    if (key_labels_o.is_none())
      throw py::value_error("query_labels: class-conditional retrieval needs key_labels (got None)");
    py::array ql = as_array(query_labels_o, "query_labels");
    if (!is_dtype<int64_t>(ql)) throw py::type_error("query_labels: expected int64, got " + dtype_name(ql));
    require_layout(ql, "query_labels", 1);
    if (ql.shape(0) != c.p.B)
      throw py::value_error("query_labels: expected shape (" + std::to_string(c.p.B) + ",), got (" +
                            std::to_string(ql.shape(0)) + ",)");
    c.p.query_labels = static_cast<const int64_t*>(ql.data());
  }
  return c;
}

template <class T>
py::tuple softmax_impl(Common& c, int num_threads) {
  const py::ssize_t B = c.p.B, D = c.p.D;
  py::array_t<T> m({B}), l({B}), l2({B}), o({B, D});
  T *pm = m.mutable_data(), *pl = l.mutable_data(), *pl2 = l2.mutable_data(), *po = o.mutable_data();
  {
    py::gil_scoped_release release;
    ad_cpu::softmax_retrieval<T>(c.p, num_threads, pm, pl, pl2, po);
  }
  return py::make_tuple(m, l, l2, o);
}

py::tuple softmax_retrieval(const py::object& queries, const py::object& keys, double key_scale,
                            double key_shift, const py::object& coef_o, const py::object& key_labels,
                            const py::object& query_labels, int num_threads) {
  Common c = validate(queries, keys, key_scale, key_shift, key_labels, query_labels);
  py::array coef = as_array(coef_o, "coef");
  if (c.f64 ? !is_dtype<double>(coef) : !is_dtype<float>(coef))
    throw py::type_error(std::string("coef: expected the queries' dtype ") + (c.f64 ? "float64" : "float32") +
                         ", got " + dtype_name(coef));
  require_layout(coef, "coef", 1);
  if (coef.shape(0) != c.p.B)
    throw py::value_error("coef: expected shape (" + std::to_string(c.p.B) + ",), got (" +
                          std::to_string(coef.shape(0)) + ",)");
  c.p.coef = coef.data();
  return c.f64 ? softmax_impl<double>(c, num_threads) : softmax_impl<float>(c, num_threads);
}

template <class T>
py::tuple knn_impl(Common& c, int64_t k, int num_threads) {
  const py::ssize_t B = c.p.B, K = static_cast<py::ssize_t>(k);
  py::array_t<T> dist({B, K});
  py::array_t<int64_t> index({B, K});
  T* pd = dist.mutable_data();
  int64_t* pi = index.mutable_data();
  {
    py::gil_scoped_release release;
    ad_cpu::knn_search<T>(c.p, k, num_threads, pd, pi);
  }
  return py::make_tuple(dist, index);
}

py::tuple knn_search(const py::object& queries, const py::object& keys, double key_scale, double key_shift,
                     int64_t k, const py::object& key_labels, const py::object& query_labels, int num_threads) {
  Common c = validate(queries, keys, key_scale, key_shift, key_labels, query_labels);
  if (k < 1) throw py::value_error("k: expected a positive number of neighbours, got " + std::to_string(k));
  if (k > c.p.N)
    throw py::value_error("k: asked for " + std::to_string(k) + " neighbours but keys has only " +
                          std::to_string(c.p.N) + " rows");
  return c.f64 ? knn_impl<double>(c, k, num_threads) : knn_impl<float>(c, k, num_threads);
}

// Shared validation of the subset kernels' (keys, index) arguments; fills the SubsetProblem.
ad_cpu::SubsetProblem subset_problem(const py::object& keys_o, double key_scale, double key_shift, int64_t width,
                                     const py::array& index, py::ssize_t rows) {
  ad_cpu::SubsetProblem p;
  py::array k = as_array(keys_o, "keys");
  if (is_dtype<uint8_t>(k)) p.key_type = ad_cpu::KeyType::U8;
  else if (is_dtype<float>(k)) p.key_type = ad_cpu::KeyType::F32;
  else if (is_dtype<double>(k)) p.key_type = ad_cpu::KeyType::F64;
  else throw py::type_error("keys: expected uint8, float32 or float64, got " + dtype_name(k));
  require_layout(k, "keys", 2);
  if (!std::isfinite(key_scale) || !std::isfinite(key_shift))
    throw py::value_error("key_scale, key_shift: expected finite numbers");
  p.keys = k.data();
  p.N = k.shape(0);
  p.D = k.shape(1);
  p.scale = key_scale;
  p.shift = key_shift;
  if (width < 0 || (width > 0 && p.D % width != 0))
    throw py::value_error("width: expected 0 (no mirrored rows) or a divisor of D = " + std::to_string(p.D) +
                          ", got " + std::to_string(width));
  p.width = width;
  if (!is_dtype<int64_t>(index)) throw py::type_error("index: expected int64, got " + dtype_name(index));
  require_layout(index, "index", 2);
  if (index.shape(0) != rows)
    throw py::value_error("index: expected " + std::to_string(rows) + " rows, got " + std::to_string(index.shape(0)));
  const int64_t limit = width > 0 ? 2 * p.N : p.N;
  const int64_t* ix = static_cast<const int64_t*>(index.data());
  for (py::ssize_t e = 0; e < index.size(); ++e)
    if (ix[e] < -1 || ix[e] >= limit)
      throw py::value_error("index: entries must lie in [-1, " + std::to_string(limit) + "), got " +
                            std::to_string(ix[e]));
  return p;
}

py::array_t<double> subset_relative_d2(const py::object& queries_o, const py::object& keys, double key_scale,
                                       double key_shift, const py::object& index_o, const py::object& ref_o,
                                       int64_t width, int num_threads) {
  py::array q = as_array(queries_o, "queries");
  if (!is_dtype<double>(q)) throw py::type_error("queries: expected float64, got " + dtype_name(q));
  require_layout(q, "queries", 2);
  py::array index = as_array(index_o, "index");
  ad_cpu::SubsetProblem p = subset_problem(keys, key_scale, key_shift, width, index, q.shape(0));
  if (q.shape(1) != p.D)
    throw py::value_error("queries: expected D = " + std::to_string(p.D) + " values per row (the keys'), got " +
                          std::to_string(q.shape(1)));
  py::array ref = as_array(ref_o, "ref");
  if (!is_dtype<int64_t>(ref)) throw py::type_error("ref: expected int64, got " + dtype_name(ref));
  require_layout(ref, "ref", 1);
  if (ref.shape(0) != q.shape(0))
    throw py::value_error("ref: expected shape (" + std::to_string(q.shape(0)) + ",), got (" +
                          std::to_string(ref.shape(0)) + ",)");
  const int64_t* pr = static_cast<const int64_t*>(ref.data());
  for (py::ssize_t b = 0; b < ref.shape(0); ++b)
    if (pr[b] < 0 || pr[b] >= (width > 0 ? 2 * p.N : p.N))
      throw py::value_error("ref: entries must be valid candidate indices, got " + std::to_string(pr[b]));
  const py::ssize_t B = q.shape(0), K = index.shape(1);
  py::array_t<double> out({B, K});
  double* po = out.mutable_data();
  {
    py::gil_scoped_release release;
    ad_cpu::subset_relative_d2(p, static_cast<const double*>(q.data()), B,
                               static_cast<const int64_t*>(index.data()), K, pr, num_threads, po);
  }
  return out;
}

py::array_t<double> subset_weighted_sum(const py::object& keys, double key_scale, double key_shift,
                                        const py::object& index_o, const py::object& weight_o, int64_t width,
                                        int num_threads) {
  py::array index = as_array(index_o, "index");
  py::array w = as_array(weight_o, "weight");
  if (!is_dtype<double>(w)) throw py::type_error("weight: expected float64, got " + dtype_name(w));
  require_layout(w, "weight", 2);
  ad_cpu::SubsetProblem p = subset_problem(keys, key_scale, key_shift, width, index, w.shape(0));
  if (w.shape(1) != index.shape(1))
    throw py::value_error("weight: expected the index's shape, got " + std::to_string(w.shape(1)) + " columns");
  const py::ssize_t B = w.shape(0), K = w.shape(1), D = p.D;
  py::array_t<double> out({B, D});
  double* po = out.mutable_data();
  {
    py::gil_scoped_release release;
    ad_cpu::subset_weighted_sum(p, B, static_cast<const int64_t*>(index.data()),
                                static_cast<const double*>(w.data()), K, num_threads, po);
  }
  return out;
}

template <class T>
const T* checked_data(const py::object& obj, const char* name, py::ssize_t ndim) {
  py::array a = as_array(obj, name);
  if (!is_dtype<T>(a))
    throw py::type_error(std::string(name) + ": expected " + py::str(py::dtype::of<T>()).cast<std::string>() +
                         ", got " + dtype_name(a));
  require_layout(a, name, ndim);
  return static_cast<const T*>(a.data());
}

void require_shape(const py::object& obj, const char* name, std::initializer_list<py::ssize_t> shape) {
  py::array a = py::reinterpret_borrow<py::array>(obj);
  std::string want = "(", got = "(";
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  py::ssize_t i = 0;
  for (py::ssize_t n : shape) {
    want += std::to_string(n) + (i + 1 < static_cast<py::ssize_t>(shape.size()) ? ", " : ")");
    ok = ok && i < a.ndim() && a.shape(i) == n;
    ++i;
  }
  for (py::ssize_t j = 0; j < a.ndim(); ++j) got += std::to_string(a.shape(j)) + (j + 1 < a.ndim() ? ", " : ")");
  if (!ok) throw py::value_error(std::string(name) + ": expected shape " + want + ", got " + got);
}

// The training images of a local-family kernel: a C-contiguous uint8 or float32 array of `ndim` dimensions; its
// ad_patch::PatchKeys code goes to key_type.
py::array key_images(const py::object& obj, py::ssize_t ndim, int& key_type) {
  py::array images = as_array(obj, "images");
  if (is_dtype<uint8_t>(images)) key_type = ad_patch::kPatchKeysU8;
  else if (is_dtype<float>(images)) key_type = ad_patch::kPatchKeysF32;
  else throw py::type_error("images: expected uint8 or float32, got " + dtype_name(images));
  require_layout(images, "images", ndim);
  return images;
}

// A caller-allocated float32 output of the given shape, which the kernel overwrites.
float* output_data(const py::object& obj, const char* name, std::initializer_list<py::ssize_t> shape) {
  checked_data<float>(obj, name, static_cast<py::ssize_t>(shape.size()));
  require_shape(obj, name, shape);
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!a.writeable()) throw py::value_error(std::string(name) + ": expected a writeable array");
  return static_cast<float*>(a.mutable_data());
}

// The patch softmax partials (patch.h) into caller-allocated outputs m, l, l2 (S, R) and o (S, R, V), which the
// kernel overwrites completely (tests poison them first).
void patch_partials(const py::object& queries, const py::object& images_o, const py::object& image_index,
                    const py::object& positions, const py::object& coef2, int k, double scale, double shift,
                    int64_t splits, int rule, int num_threads, const py::object& m_o, const py::object& l_o,
                    const py::object& l2_o, const py::object& o_o) {
  ad_cpu::PatchProblem p;
  if (rule != ad_cpu::kPatchShared && rule != ad_cpu::kPatchSameCentre && rule != ad_cpu::kPatchSameWhole)
    throw py::value_error("rule: expected 0 (shared), 1 (same_centre) or 2 (same_whole), got " +
                          std::to_string(rule));
  if (k < 1) throw py::value_error("k: expected a patch side >= 1, got " + std::to_string(k));
  if (!std::isfinite(scale) || !std::isfinite(shift)) throw py::value_error("scale, shift: expected finite numbers");
  py::array images = key_images(images_o, 4, p.key_type);
  const py::ssize_t N = images.shape(0);
  p.C = static_cast<int>(images.shape(1));
  p.H = static_cast<int>(images.shape(2));
  p.W = static_cast<int>(images.shape(3));
  p.k = k;
  p.images = images.data();
  p.queries = checked_data<float>(queries, "queries", 2);
  const py::ssize_t R = py::reinterpret_borrow<py::array>(queries).shape(0);
  const py::ssize_t F = static_cast<py::ssize_t>(p.C) * k * k;
  require_shape(queries, "queries", {R, F});
  p.R = R;
  p.image_index = checked_data<int32_t>(image_index, "image_index", 1);
  p.n_img = py::reinterpret_borrow<py::array>(image_index).shape(0);
  for (int64_t i = 0; i < p.n_img; ++i)
    if (p.image_index[i] < 0 || p.image_index[i] >= N)
      throw py::value_error("image_index: entries must lie in [0, " + std::to_string(N) + "), got " +
                            std::to_string(p.image_index[i]));
  p.positions = checked_data<int32_t>(positions, "positions", 2);
  p.n_pos = py::reinterpret_borrow<py::array>(positions).shape(0);
  require_shape(positions, "positions", {rule == ad_cpu::kPatchShared ? p.n_pos : R, 2});
  for (int64_t i = 0; i < p.n_pos; ++i)
    if (p.positions[2 * i] < 0 || p.positions[2 * i] >= p.H || p.positions[2 * i + 1] < 0 ||
        p.positions[2 * i + 1] >= p.W)
      throw py::value_error("positions: centres must lie inside the " + std::to_string(p.H) + "x" +
                            std::to_string(p.W) + " image");
  p.rule = rule;
  p.coef2 = checked_data<float>(coef2, "coef2", 1);
  require_shape(coef2, "coef2", {R});
  p.scale = static_cast<float>(scale);
  p.shift = static_cast<float>(shift);
  const py::ssize_t S = ad_cpu::patch_num_splits(p.n_img, splits);
  const py::ssize_t V = ad_cpu::patch_value_width(rule, p.C, k);
  float* m = output_data(m_o, "m", {S, R});
  float* l = output_data(l_o, "l", {S, R});
  float* l2 = output_data(l2_o, "l2", {S, R});
  float* o = output_data(o_o, "o", {S, R, V});
  py::gil_scoped_release release;
  ad_cpu::patch_partials(p, splits, num_threads, m, l, l2, o);
}


// pca_locality's coordinate-softmax partials (coordinate.h) into caller-allocated m, l, o (S, B, D), which the
// kernel overwrites completely.
void coordinate_partials(const py::object& x_o, const py::object& images_o, const py::object& stencil_o,
                         const py::object& value_index_o, const py::object& coef2_o, const py::object& splits_o,
                         double scale, double shift, const py::object& image_labels_o,
                         const py::object& query_labels_o, int num_threads, const py::object& m_o,
                         const py::object& l_o, const py::object& o_o) {
  ad_cpu::CoordinateProblem p;
  if (!std::isfinite(scale) || !std::isfinite(shift)) throw py::value_error("scale, shift: expected finite numbers");
  py::array images = key_images(images_o, 2, p.key_type);
  p.images = images.data();
  p.N = images.shape(0);
  p.D = images.shape(1);
  p.x = checked_data<float>(x_o, "x", 2);
  p.B = py::reinterpret_borrow<py::array>(x_o).shape(0);
  require_shape(x_o, "x", {p.B, p.D});
  p.stencil = checked_data<int32_t>(stencil_o, "stencil", 2);
  p.nnz = py::reinterpret_borrow<py::array>(stencil_o).shape(0);
  require_shape(stencil_o, "stencil", {p.nnz, p.D});
  for (int64_t i = 0; i < p.nnz * p.D; ++i)
    if (p.stencil[i] < -1 || p.stencil[i] >= p.D)
      throw py::value_error("stencil: entries must be -1 (padding) or lie in [0, " + std::to_string(p.D) + ")");
  p.value_index = checked_data<int32_t>(value_index_o, "value_index", 1);
  require_shape(value_index_o, "value_index", {p.D});
  for (int64_t i = 0; i < p.D; ++i)
    if (p.value_index[i] < 0 || p.value_index[i] >= p.D)
      throw py::value_error("value_index: entries must lie in [0, " + std::to_string(p.D) + ")");
  p.coef2 = checked_data<float>(coef2_o, "coef2", 1);
  require_shape(coef2_o, "coef2", {p.B});
  p.splits = checked_data<int32_t>(splits_o, "splits", 1);
  const py::ssize_t ns = py::reinterpret_borrow<py::array>(splits_o).shape(0);
  if (ns < 1) throw py::value_error("splits: expected at least one boundary");
  p.S = ns - 1;
  for (int64_t i = 0; i <= p.S; ++i)
    if (p.splits[i] < 0 || p.splits[i] > p.N || (i > 0 && p.splits[i] < p.splits[i - 1]))
      throw py::value_error("splits: expected non-decreasing boundaries within [0, " + std::to_string(p.N) + "]");
  if (image_labels_o.is_none() != query_labels_o.is_none())
    throw py::value_error("image_labels, query_labels: give both or neither");
  if (!image_labels_o.is_none()) {
    p.image_labels = checked_data<int64_t>(image_labels_o, "image_labels", 1);
    require_shape(image_labels_o, "image_labels", {p.N});
    p.query_labels = checked_data<int64_t>(query_labels_o, "query_labels", 1);
    require_shape(query_labels_o, "query_labels", {p.B});
  }
  p.scale = static_cast<float>(scale);
  p.shift = static_cast<float>(shift);
  float* m = output_data(m_o, "m", {p.S, p.B, p.D});
  float* l = output_data(l_o, "l", {p.S, p.B, p.D});
  float* o = output_data(o_o, "o", {p.S, p.B, p.D});
  py::gil_scoped_release release;
  ad_cpu::coordinate_partials(p, num_threads, m, l, o);
}

}  // namespace

PYBIND11_MODULE(_cpu, mod) {
  mod.doc() = "C++ CPU kernels of analytic_diffusion: streaming softmax retrieval and exact k-NN "
              "(direct distances, deterministic for any thread count).";
  mod.def("softmax_retrieval", &softmax_retrieval, py::arg("queries"), py::arg("keys"), py::arg("key_scale"),
          py::arg("key_shift"), py::arg("coef"), py::arg("key_labels") = py::none(),
          py::arg("query_labels") = py::none(), py::arg("num_threads") = 0,
          R"doc(Partial softmax state over all candidates y_j = key_scale * keys[j] + key_shift.

logit_bj = -coef[b] * sum_d (queries[b, d] - y_jd)^2 (nats); candidates with key_labels[j] != query_labels[b]
are excluded when both label arrays are given. Returns (m, l, l2, o) in the queries' dtype:
m = max logit (-inf if no candidate), l = sum exp(logit - m), l2 = sum exp(2 (logit - m)),
o = sum exp(logit - m) * y_j. num_threads <= 0 uses OpenMP's default. Bitwise independent of num_threads.)doc");
  mod.def("knn_search", &knn_search, py::arg("queries"), py::arg("keys"), py::arg("key_scale"),
          py::arg("key_shift"), py::arg("k"), py::arg("key_labels") = py::none(),
          py::arg("query_labels") = py::none(), py::arg("num_threads") = 0,
          R"doc(The k nearest candidates by exact squared distance: (dist2 (B, k) queries' dtype, index (B, k) int64),
ascending, ties by the smaller index; rows with fewer than k allowed candidates are padded with (inf, -1).)doc");
  mod.def("subset_relative_d2", &subset_relative_d2, py::arg("queries"), py::arg("keys"), py::arg("key_scale"),
          py::arg("key_shift"), py::arg("index"), py::arg("ref"), py::arg("width") = 0,
          py::arg("num_threads") = 0,
          R"doc(Float64 relative squared distances over explicit candidates: out[b, j] = ||q_b - y_index[b, j]||^2 -
||q_b - y_ref[b]||^2 as sum_d (y - y_ref)(y + y_ref - 2 q) (no ||q||^2 term), +inf where index is -1. Candidate i
is key_scale * keys[i] + key_shift in float64, i >= N the row i - N mirrored within rows of `width` values
(width 0: no mirrored index allowed). queries (B, D) float64, index (B, K) int64, ref (B,) int64.)doc");
  mod.def("subset_weighted_sum", &subset_weighted_sum, py::arg("keys"), py::arg("key_scale"), py::arg("key_shift"),
          py::arg("index"), py::arg("weight"), py::arg("width") = 0, py::arg("num_threads") = 0,
          R"doc(Float64 weighted sums over explicit candidates: out[b] = sum_j weight[b, j] y_index[b, j] over index >= 0
and weight != 0, in list order (candidates as in subset_relative_d2). index (B, K) int64, weight (B, K) float64.)doc");
  mod.def("patch_partials", &patch_partials, py::arg("queries"), py::arg("images"), py::arg("image_index"),
          py::arg("positions"), py::arg("coef2"), py::arg("k"), py::arg("scale"), py::arg("shift"),
          py::arg("splits"), py::arg("rule"), py::arg("num_threads"), py::arg("m"), py::arg("l"), py::arg("l2"),
          py::arg("o"),
          R"doc(Per-split partials of the patch softmax (ELS / bbELS rule 0, LS rule 1, PSPC rule 2) written into m, l,
l2 (S, R) and o (S, R, V) float32: logit = -coef2[r] * sum_f (queries[r, f] - patch_f)^2 in base 2, patches of
images[image_index] (uint8 / float32, value scale * u + shift, zero outside) centred at positions (shared, or one
per row). S = patch_num_splits(len(image_index), splits); V = C, or C*k*k for rule 2.)doc");
  mod.def("coordinate_partials", &coordinate_partials, py::arg("x"), py::arg("images"), py::arg("stencil"),
          py::arg("value_index"), py::arg("coef2"), py::arg("splits"), py::arg("scale"), py::arg("shift"),
          py::arg("image_labels"), py::arg("query_labels"), py::arg("num_threads"), py::arg("m"), py::arg("l"),
          py::arg("o"),
          R"doc(Per-split partials of pca_locality's coordinate softmax written into m, l, o (S, B, D) float32: for output
coordinate c, logit_j = -coef2[b] * sum over the stencil's column c (-1 = padding) of (x[b, n] - y_j[n])^2 in base 2,
value y_j[value_index[c]], candidates y_j = scale * images[j] + shift (uint8 / float32 (N, D)) for j in
splits[s] .. splits[s + 1] - 1, restricted to image_labels[j] == query_labels[b] when labels (int64) are given.)doc");
  mod.def("patch_num_splits", &ad_cpu::patch_num_splits, py::arg("n_img"), py::arg("splits"),
          "Leading dimension S of patch_partials' outputs for n_img images asked to run in `splits` pieces.");
  mod.def("patch_isa", []() { return std::string(ad_cpu::patch_kernels_selected().isa); },
          "Instruction set of the patch kernels in use (AD_CPU_ISA caps it as for the global kernels).");
  mod.def("isa", []() { return std::string(ad_cpu::kernels_selected().isa); },
          "Instruction set of the kernels in use: 'avx512', 'avx2' or 'base' (the environment variable "
          "AD_CPU_ISA=base|avx2|avx512 caps it; read at every call; another value raises ValueError).");
  mod.def("runnable_isas", &ad_cpu::runnable_isas,
          "The instruction sets this build can run on this CPU, narrowest first: the values of AD_CPU_ISA that "
          "select a kernel of their own.");
  mod.def("num_segments", &ad_cpu::num_segments, py::arg("n"),
          "Number of candidate segments combined in order for n candidates (independent of threads).");
  mod.attr("coordinate_queries_per_task") = py::int_(ad_cpu::kCoordinateQueries);
  mod.attr("openmp") = py::bool_(AD_WITH_OPENMP != 0);
}
