// oneDNN 3x3 SAME convolutions (stride 1, no bias) as XLA FFI handlers, float32, NHWC / HWIO.
//
//   maml_onednn_conv3x3:  x [G, N, H, W, C], w [G, 3, 3, C, F]  ->  y [G, N, H, W, F]
//   maml_onednn_wgrad3x3: x [G, N, H, W, C], g [G, N, H, W, F]  ->  dw [G, 3, 3, C, F]
//                         (dw[k] = d<g[k], conv(x[k], w)>/dw: the convolution's weight gradient)
//
// G independent groups (a vmapped batch of tasks, each with its own weights), split over threads (below).
// The convolution's data gradient is the convolution itself with the kernel flipped and transposed, so
// these two are all a bilinear convolution needs (maml/nn/onednn.py holds the rules). Weights are
// reordered between HWIO and oneDNN's blocked layout inside each call.
//
// XLA runs these handlers on any of its threads, several at once. oneDNN's default (library) scratchpad
// is shared per creating thread and must not migrate between threads, so every primitive here takes a
// user scratchpad, allocated for each call: then one primitive may run in several threads at once.
//
// oneDNN (Debian's build) parallelises with OpenMP. Called from XLA's threads, every calling thread would
// start an OpenMP team of its own; libgomp counts all their threads, and once it manages more threads than
// there are CPUs it stops spinning between parallel regions (100 spins instead of 300,000) for every team
// in the process, including PyTorch's, which shares the process's one libgomp.so.1 (PyTorch 1.3-1.7x slower
// beside these calls). So oneDNN runs single-threaded here (`omp_set_num_threads(1)` for the duration of a
// call, restored after) and a call splits its work itself: the G groups, or each group's images (convolution)
// or output channels (weight gradient), into as many items as XLA's intra-op pool has threads, run by the
// calling thread and tasks on that pool.
#include <Python.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Primitives for one shape (N, H, W, C, F), built once and shared (each execution brings its own scratchpad).
struct Plan {
  memory::desc x_md, y_md, hwio_md;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_forward fwd;
  dnnl::reorder::primitive_desc w_to_blocked_pd;
  dnnl::reorder w_to_blocked;
  dnnl::convolution_backward_weights::primitive_desc bwd_pd;
  dnnl::convolution_backward_weights bwd;
  dnnl::reorder::primitive_desc dw_to_hwio_pd;
  dnnl::reorder dw_to_hwio;
};

using Shape = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>;

const Plan& GetPlan(const Shape& s) {
  static std::mutex mu;
  static std::map<Shape, std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = plans[s];
  if (slot) return *slot;
  auto [n, h, w, c, f] = s;
  auto& eng = Engine();
  auto p = std::make_unique<Plan>();
  p->x_md = memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
  p->y_md = memory::desc({n, f, h, w}, dt::f32, tag::nhwc);
  p->hwio_md = memory::desc({f, c, 3, 3}, dt::f32, tag::hwio);
  memory::desc w_any({f, c, 3, 3}, dt::f32, tag::any);
  memory::dims stride{1, 1}, pad{1, 1};
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::desc fd(dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
                                     p->x_md, w_any, p->y_md, stride, pad, pad);
  p->fwd_pd = dnnl::convolution_forward::primitive_desc(fd, attr, eng);
  p->fwd = dnnl::convolution_forward(p->fwd_pd);
  p->w_to_blocked_pd = dnnl::reorder::primitive_desc(eng, p->hwio_md, eng, p->fwd_pd.weights_desc(), attr);
  p->w_to_blocked = dnnl::reorder(p->w_to_blocked_pd);
  dnnl::convolution_backward_weights::desc bd(dnnl::algorithm::convolution_direct, p->x_md, w_any, p->y_md,
                                              stride, pad, pad);
  p->bwd_pd = dnnl::convolution_backward_weights::primitive_desc(bd, attr, eng, p->fwd_pd);
  p->bwd = dnnl::convolution_backward_weights(p->bwd_pd);
  p->dw_to_hwio_pd = dnnl::reorder::primitive_desc(eng, p->bwd_pd.diff_weights_desc(), eng, p->hwio_md, attr);
  p->dw_to_hwio = dnnl::reorder(p->dw_to_hwio_pd);
  slot = std::move(p);
  return *slot;
}

ffi::Error CheckRank(const char* what, ffi::Span<const int64_t> d) {
  if (d.size() != 5) return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(what) + " must have rank 5");
  return ffi::Error::Success();
}

// oneDNN single-threaded on this thread while in scope (OpenMP's per-thread setting, restored after: the
// caller may be a thread whose OpenMP setting someone else relies on, e.g. Python's main thread).
class SingleThreaded {
 public:
  SingleThreaded() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~SingleThreaded() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

// Items [0, count) of `run`, each once, on the calling thread and up to count - 1 tasks on XLA's pool. The
// caller claims items until none is left, then waits only for items another thread has already started;
// a task that starts after that finds nothing to claim. So no thread ever waits on a task that has not
// started, even when every pool thread is inside such a call. Returns the first error an item threw.
struct Items {
  std::function<void(int64_t)> run;
  int64_t count;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
  std::string error;

  void Work() {
    SingleThreaded single;
    for (int64_t i; (i = next.fetch_add(1)) < count;) {
      std::string err;
      try {
        run(i);
      } catch (const std::exception& e) {  // dnnl::error, std::bad_alloc
        err = e.what();
      }
      std::lock_guard<std::mutex> lock(mu);
      if (error.empty()) error = err;
      if (++done == count) cv.notify_all();
    }
  }
};

std::string RunItems(ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> run) {
  auto items = std::make_shared<Items>();
  items->run = std::move(run);
  items->count = count;
  for (int64_t t = 1; t < count; ++t) pool.Schedule([items] { items->Work(); });
  items->Work();
  std::unique_lock<std::mutex> lock(items->mu);
  items->cv.wait(lock, [&] { return items->done == items->count; });
  return items->error;
}

// How a call of G groups is split: into `per_group` chunks of each group's N units (images for the convolution,
// 16-channel blocks for the weight gradient) when there are fewer groups than threads, else whole groups.
struct Split {
  int64_t per_group;
  int64_t Count(int64_t g) const { return g * per_group; }
  int64_t Lo(int64_t n, int64_t j) const { return n * j / per_group; }
};

Split SplitFor(ffi::ThreadPool& pool, int64_t g, int64_t n) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return {g == 0 || g >= threads ? 1 : std::max<int64_t>(1, std::min(n, (threads + g - 1) / g))};
}

ffi::Error Conv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (auto e = CheckRank("x", xd); e.failure()) return e;
  if (auto e = CheckRank("w", wd); e.failure()) return e;
  const int64_t g = xd[0], n = xd[1], h = xd[2], wi = xd[3], c = xd[4], f = wd[4];
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  float* ys = y->typed_data();
  const Split split = SplitFor(pool, g, n);
  auto item = [&](int64_t i) {
    const int64_t k = i / split.per_group, j = i % split.per_group;
    const int64_t lo = split.Lo(n, j), hi = split.Lo(n, j + 1);
    if (lo == hi) return;
    const Plan& p = GetPlan({hi - lo, h, wi, c, f});
    auto& eng = Engine();
    dnnl::stream stream(eng);
    memory blocked(p.fwd_pd.weights_desc(), eng);
    memory scratch(p.fwd_pd.scratchpad_desc(), eng), scratch_r(p.w_to_blocked_pd.scratchpad_desc(), eng);
    memory wm(p.hwio_md, eng, const_cast<float*>(ws + k * 9 * c * f));
    p.w_to_blocked.execute(stream, {{DNNL_ARG_FROM, wm}, {DNNL_ARG_TO, blocked}, {DNNL_ARG_SCRATCHPAD, scratch_r}});
    memory xm(p.x_md, eng, const_cast<float*>(xs + (k * n + lo) * h * wi * c));
    memory ym(p.y_md, eng, ys + (k * n + lo) * h * wi * f);
    p.fwd.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, blocked}, {DNNL_ARG_DST, ym},
                           {DNNL_ARG_SCRATCHPAD, scratch}});
    stream.wait();
  };
  std::string err = RunItems(pool, split.Count(g), item);
  if (!err.empty()) return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN convolution: " + err);
  return ffi::Error::Success();
}

// The weight gradient reduces over the N images: a split over them would sum partial gradients that cancel
// (batch norm makes each channel's total gradient small against its images' parts; in float32 that made the
// 20-way meta-gradient 10x less accurate). So it splits over output channels F instead, in multiples of 16
// (oneDNN's AVX-512 block): each item copies its channels of g into a dense buffer and its gradient back.
constexpr int64_t kChannelBlock = 16;

ffi::Error WeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy,
                      ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions(), gd = gy.dimensions();
  if (auto e = CheckRank("x", xd); e.failure()) return e;
  if (auto e = CheckRank("g", gd); e.failure()) return e;
  const int64_t g = xd[0], n = xd[1], h = xd[2], wi = xd[3], c = xd[4], f = gd[4], size = 9 * c * f;
  const int64_t pixels = n * h * wi;
  const float* xs = x.typed_data();
  const float* gs = gy.typed_data();
  float* out = dw->typed_data();
  const Split split = SplitFor(pool, g, f / kChannelBlock);  // chunks of whole 16-channel blocks
  auto item = [&](int64_t i) {
    const int64_t k = i / split.per_group, j = i % split.per_group;
    const int64_t blocks = std::max<int64_t>(1, f / kChannelBlock);
    const int64_t lo = j == 0 ? 0 : split.Lo(blocks, j) * kChannelBlock;
    const int64_t hi = j + 1 == split.per_group ? f : split.Lo(blocks, j + 1) * kChannelBlock;
    const int64_t fc = hi - lo;
    float* dst = out + k * size;
    if (pixels == 0) {  // no images: a zero gradient
      for (int64_t r = 0; r < 9 * c; ++r) std::fill(dst + r * f + lo, dst + r * f + hi, 0.0f);
      return;
    }
    const Plan& p = GetPlan({n, h, wi, c, fc});
    const float* gk = gs + k * pixels * f;
    std::vector<float> dense_g, dense_dw;
    if (fc != f) {  // this item's channels of g, dense
      dense_g.resize(pixels * fc);
      for (int64_t r = 0; r < pixels; ++r) std::copy(gk + r * f + lo, gk + r * f + hi, dense_g.data() + r * fc);
      dense_dw.resize(9 * c * fc);
    }
    auto& eng = Engine();
    dnnl::stream stream(eng);
    memory blocked(p.bwd_pd.diff_weights_desc(), eng);
    memory scratch(p.bwd_pd.scratchpad_desc(), eng), scratch_r(p.dw_to_hwio_pd.scratchpad_desc(), eng);
    memory xm(p.x_md, eng, const_cast<float*>(xs + k * pixels * c));
    memory gm(p.y_md, eng, fc == f ? const_cast<float*>(gk) : dense_g.data());
    p.bwd.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, gm}, {DNNL_ARG_DIFF_WEIGHTS, blocked},
                           {DNNL_ARG_SCRATCHPAD, scratch}});
    memory om(p.hwio_md, eng, fc == f ? dst : dense_dw.data());
    p.dw_to_hwio.execute(stream, {{DNNL_ARG_FROM, blocked}, {DNNL_ARG_TO, om}, {DNNL_ARG_SCRATCHPAD, scratch_r}});
    stream.wait();
    if (fc != f)
      for (int64_t r = 0; r < 9 * c; ++r) std::copy(dense_dw.data() + r * fc, dense_dw.data() + (r + 1) * fc, dst + r * f + lo);
  };
  std::string err = RunItems(pool, split.Count(g), item);
  if (!err.empty()) return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN weight gradient: " + err);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MamlOnednnConv3x3, Conv,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(MamlOnednnWgrad3x3, WeightGrad,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

// The Python module: `handlers()` gives {target name: PyCapsule} for `jax.ffi.register_ffi_target`.
static PyObject* Handlers(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (!d) return nullptr;
  PyObject* conv = PyCapsule_New(reinterpret_cast<void*>(MamlOnednnConv3x3), nullptr, nullptr);
  PyObject* wgrad = PyCapsule_New(reinterpret_cast<void*>(MamlOnednnWgrad3x3), nullptr, nullptr);
  if (!conv || !wgrad || PyDict_SetItemString(d, "maml_onednn_conv3x3", conv) ||
      PyDict_SetItemString(d, "maml_onednn_wgrad3x3", wgrad)) {
    Py_XDECREF(conv);
    Py_XDECREF(wgrad);
    Py_DECREF(d);
    return nullptr;
  }
  Py_DECREF(conv);
  Py_DECREF(wgrad);
  return d;
}

static PyMethodDef kMethods[] = {
    {"handlers", Handlers, METH_NOARGS, "The XLA FFI handlers: {target name: PyCapsule}."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_onednn", "oneDNN 3x3 convolutions as XLA FFI handlers.",
                              -1, kMethods};

PyMODINIT_FUNC PyInit__onednn(void) { return PyModule_Create(&kModule); }
