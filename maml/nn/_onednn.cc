// oneDNN 3x3 SAME convolutions (stride 1, no bias) as XLA FFI handlers, float32, NHWC / HWIO.
//
//   maml_onednn_conv3x3:  x [G, N, H, W, C], w [G, 3, 3, C, F]  ->  y [G, N, H, W, F]
//   maml_onednn_wgrad3x3: x [G, N, H, W, C], g [G, N, H, W, F]  ->  dw [G, 3, 3, C, F]
//                         (dw[k] = d<g[k], conv(x[k], w)>/dw: the convolution's weight gradient)
//
// G independent groups (a vmapped batch of tasks, each with its own weights), split over threads (below).
// The convolution's data gradient is the convolution itself with the kernel flipped and transposed, so
// these two are all a bilinear convolution needs (maml/nn/onednn.py holds the rules). Weights are
// reordered between HWIO and oneDNN's blocked layout inside each call. Each piece of work runs oneDNN's
// Winograd F(4x4, 3x3) on its blocked layout where that was measured faster (`WinogradPays`), else the
// direct convolution on NHWC.
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
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>
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

// One piece of work's blocked copies and scratchpads (Winograd's transformed tiles take several MB), freed when it
// ends. The bytes they hold at once, over all calls, are counted: `buffer_bytes()` reports the high-water mark,
// which XLA's memory analysis cannot see.
std::atomic<int64_t> live_bytes{0}, peak_bytes{0};

class Buffers {
 public:
  Buffers() = default;
  Buffers(const Buffers&) = delete;
  Buffers& operator=(const Buffers&) = delete;
  ~Buffers() {
    for (void* p : held_) std::free(p);
    live_bytes -= total_;
  }
  memory Get(const memory::desc& d) {
    const size_t size = std::max<size_t>(64, (d.get_size() + 63) / 64 * 64);
    void* p = std::aligned_alloc(64, size);
    if (!p) throw std::bad_alloc();
    held_.push_back(p);
    total_ += size;
    const int64_t now = live_bytes += size;
    for (int64_t peak = peak_bytes.load(); now > peak && !peak_bytes.compare_exchange_weak(peak, now);) {
    }
    return memory(d, Engine(), p);
  }

 private:
  std::vector<void*> held_;
  int64_t total_ = 0;
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

struct Reorder {
  dnnl::reorder::primitive_desc pd;
  dnnl::reorder prim;

  Reorder() = default;
  Reorder(const memory::desc& from, const memory::desc& to)
      : pd(Engine(), from, Engine(), to, UserScratchpad()), prim(pd) {}
  void operator()(dnnl::stream& stream, memory& from, memory& to, Buffers& buffers) const {
    memory scratch = buffers.Get(pd.scratchpad_desc());
    prim.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, scratch}});
  }
};

// Which algorithm an item runs: oneDNN's Winograd F(4x4, 3x3) (implemented for AVX-512; taken here for 16-channel
// multiples) on its blocked layout, the activations reordered in and out, where it was measured faster than the
// direct convolution on NHWC (benchmarks/RESULTS.md, section 1; 2-core AMD EPYC with AVX-512, a call's two items
// at once): images of at least 7x7 and at least 256 output pixels per item (Omniglot Conv4's block 2, 75 images of
// 14x14x64: 3.1 against 5.0 ms; 5x5 and 3x3 images, or 5 images of 7x7, were slower); its weight gradient likewise,
// for items of at least 32 output channels (16-channel items of 42x42x32 were slower: 20 against 15 ms). Elsewhere,
// and where oneDNN has no Winograd for the CPU, the direct convolution.
constexpr int64_t kWinogradMinSize = 7, kWinogradMinPixels = 256, kWinogradMinWgradChannels = 32;

bool WinogradPays(int64_t n, int64_t h, int64_t w, int64_t c, int64_t f) {
  return std::min(h, w) >= kWinogradMinSize && n * h * w >= kWinogradMinPixels && c % 16 == 0 && f % 16 == 0;
}

using Shape = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>;
using WgradShape = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

// The forward primitive for (n, h, w, c, f) with activations in layout `act` (tag::any: oneDNN's blocked choice).
dnnl::convolution_forward::primitive_desc Forward(dnnl::algorithm algorithm, int64_t n, int64_t h, int64_t w,
                                                  int64_t c, int64_t f, tag act) {
  memory::dims stride{1, 1}, pad{1, 1};
  dnnl::convolution_forward::desc d(dnnl::prop_kind::forward_training, algorithm,
                                    memory::desc({n, c, h, w}, dt::f32, act),
                                    memory::desc({f, c, 3, 3}, dt::f32, tag::any),
                                    memory::desc({n, f, h, w}, dt::f32, act), stride, pad, pad);
  return dnnl::convolution_forward::primitive_desc(d, UserScratchpad(), Engine());
}

// `make(algorithm, layout)`'s primitive for Winograd on oneDNN's blocked layout where `pays` and oneDNN implements it
// for this CPU and these channels (second: true), else for the direct convolution on NHWC (false).
template <typename Make>
auto WinogradOrDirect(bool pays, Make make)
    -> std::pair<decltype(make(dnnl::algorithm::convolution_direct, tag::nhwc)), bool> {
  if (pays) {
    try {
      return {make(dnnl::algorithm::convolution_winograd, tag::any), true};
    } catch (const dnnl::error&) {  // not implemented here
    }
  }
  return {make(dnnl::algorithm::convolution_direct, tag::nhwc), false};
}

// y = conv(x, w) for one item: x [n, h, w, c], w [3, 3, c, f] (HWIO), y [n, h, w, f].
struct ConvPlan {
  bool blocked = false;  // Winograd on oneDNN's blocked activations (else direct on NHWC)
  memory::desc x_md, y_md, w_md;
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward prim;
  Reorder w_in, x_in, y_out;  // x_in and y_out only where blocked
};

std::unique_ptr<ConvPlan> MakeConvPlan(const Shape& s) {
  auto [n, h, w, c, f] = s;
  auto p = std::make_unique<ConvPlan>();
  p->x_md = memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
  p->y_md = memory::desc({n, f, h, w}, dt::f32, tag::nhwc);
  p->w_md = memory::desc({f, c, 3, 3}, dt::f32, tag::hwio);
  std::tie(p->pd, p->blocked) = WinogradOrDirect(
      WinogradPays(n, h, w, c, f), [&](dnnl::algorithm a, tag act) { return Forward(a, n, h, w, c, f, act); });
  p->prim = dnnl::convolution_forward(p->pd);
  p->w_in = Reorder(p->w_md, p->pd.weights_desc());
  if (p->blocked) {
    p->x_in = Reorder(p->x_md, p->pd.src_desc());
    p->y_out = Reorder(p->pd.dst_desc(), p->y_md);
  }
  return p;
}

// The weight gradient's output channels [lo, lo + fc) of f for one item: x [n, h, w, c], g [n, h, w, f] read as
// its fc channels (a strided view), written into those columns of dw [3, 3, c, f] (a strided view of HWIO).
struct WgradPlan {
  bool blocked = false;  // Winograd on oneDNN's blocked activations (else direct on NHWC)
  bool dense_g = true;   // g is passed as it is (direct, all channels); else reordered in (blocked, or dense)
  memory::desc x_md, g_md, dw_md;
  dnnl::convolution_backward_weights::primitive_desc pd;
  dnnl::convolution_backward_weights prim;
  Reorder x_in, g_in, dw_out;  // x_in only where blocked, g_in unless dense_g
};

std::unique_ptr<WgradPlan> MakeWgradPlan(const WgradShape& s) {
  auto [n, h, w, c, fc, f] = s;
  auto p = std::make_unique<WgradPlan>();
  p->x_md = memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
  p->g_md = memory::desc({n, fc, h, w}, dt::f32, memory::dims{h * w * f, 1, w * f, f});
  p->dw_md = memory::desc({fc, c, 3, 3}, dt::f32, memory::dims{1, f, 3 * c * f, c * f});
  memory::dims stride{1, 1}, pad{1, 1};
  auto backward = [&](dnnl::algorithm algorithm, tag act) {
    memory::desc x({n, c, h, w}, dt::f32, act), g({n, fc, h, w}, dt::f32, act), wa({fc, c, 3, 3}, dt::f32, tag::any);
    dnnl::convolution_backward_weights::desc d(algorithm, x, wa, g, stride, pad, pad);
    return dnnl::convolution_backward_weights::primitive_desc(d, UserScratchpad(), Engine(),
                                                              Forward(algorithm, n, h, w, c, fc, act));
  };
  const bool pays = fc >= kWinogradMinWgradChannels && WinogradPays(n, h, w, c, fc);
  std::tie(p->pd, p->blocked) = WinogradOrDirect(pays, backward);
  p->dense_g = !p->blocked && fc == f;
  p->prim = dnnl::convolution_backward_weights(p->pd);
  if (p->blocked) p->x_in = Reorder(p->x_md, p->pd.src_desc());
  if (!p->dense_g) p->g_in = Reorder(p->g_md, p->pd.diff_dst_desc());
  p->dw_out = Reorder(p->pd.diff_weights_desc(), p->dw_md);
  return p;
}

// Plans by shape, built once and shared (each execution brings its own buffers).
template <typename Key, typename Plan>
const Plan& Cached(const Key& key, std::unique_ptr<Plan> (*make)(const Key&)) {
  static std::mutex mu;
  static std::map<Key, std::unique_ptr<Plan>> plans;
  std::lock_guard<std::mutex> lock(mu);
  auto& slot = plans[key];
  if (!slot) slot = make(key);
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

// A convolution's pieces hold at most this many images (more pieces, in multiples of `SplitFor`'s so that the
// threads stay balanced): oneDNN's Winograd kept its scratchpad near 7 MB for pieces of up to 38 images of 14x14x64
// but took 29 MB at 75 and 95 MB at 300 (the 20-way step's pieces, allocated anew each call, ran it at 3.9 instead
// of 5.2 tasks/s), and two pieces at once ran 0.064-0.070 ms per image at 16-38 images, 0.095-0.15 at 75.
constexpr int64_t kMaxPieceImages = 40;

Split ConvSplit(ffi::ThreadPool& pool, int64_t g, int64_t n) {
  const int64_t per = SplitFor(pool, g, n).per_group;
  const int64_t rounds = (n + per * kMaxPieceImages - 1) / (per * kMaxPieceImages);
  return {std::max<int64_t>(1, std::min(n, per * rounds))};
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
  const Split split = ConvSplit(pool, g, n);
  auto item = [&](int64_t i) {
    const int64_t k = i / split.per_group, j = i % split.per_group;
    const int64_t lo = split.Lo(n, j), hi = split.Lo(n, j + 1);
    if (lo == hi) return;
    const ConvPlan& p = Cached<Shape, ConvPlan>({hi - lo, h, wi, c, f}, MakeConvPlan);
    dnnl::stream stream(Engine());
    Buffers buffers;
    memory wm(p.w_md, Engine(), const_cast<float*>(ws + k * 9 * c * f)), wb = buffers.Get(p.pd.weights_desc());
    memory xm(p.x_md, Engine(), const_cast<float*>(xs + (k * n + lo) * h * wi * c));
    memory ym(p.y_md, Engine(), ys + (k * n + lo) * h * wi * f);
    memory xb = p.blocked ? buffers.Get(p.pd.src_desc()) : xm, yb = p.blocked ? buffers.Get(p.pd.dst_desc()) : ym;
    memory scratch = buffers.Get(p.pd.scratchpad_desc());
    p.w_in(stream, wm, wb, buffers);
    if (p.blocked) p.x_in(stream, xm, xb, buffers);
    p.prim.execute(stream,
                   {{DNNL_ARG_SRC, xb}, {DNNL_ARG_WEIGHTS, wb}, {DNNL_ARG_DST, yb}, {DNNL_ARG_SCRATCHPAD, scratch}});
    if (p.blocked) p.y_out(stream, yb, ym, buffers);
    stream.wait();
  };
  std::string err = RunItems(pool, split.Count(g), item);
  if (!err.empty()) return ffi::Error(ffi::ErrorCode::kInternal, "oneDNN convolution: " + err);
  return ffi::Error::Success();
}

// The weight gradient reduces over the N images: a split over them would sum partial gradients that cancel
// (batch norm makes each channel's total gradient small against its images' parts; in float32 that made the
// 20-way meta-gradient 10x less accurate). So it splits over output channels F instead, in multiples of 16
// (oneDNN's AVX-512 block): each item reads its channels of g through a strided view, reordered into its
// primitive's layout, and writes its columns of dw through another.
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
    float* dst = out + k * size;
    if (pixels == 0) {  // no images: a zero gradient
      for (int64_t r = 0; r < 9 * c; ++r) std::fill(dst + r * f + lo, dst + r * f + hi, 0.0f);
      return;
    }
    const WgradPlan& p = Cached<WgradShape, WgradPlan>({n, h, wi, c, hi - lo, f}, MakeWgradPlan);
    dnnl::stream stream(Engine());
    Buffers buffers;
    memory xm(p.x_md, Engine(), const_cast<float*>(xs + k * pixels * c));
    memory gm(p.g_md, Engine(), const_cast<float*>(gs + k * pixels * f + lo));
    memory dwm(p.dw_md, Engine(), dst + lo);
    memory xb = p.blocked ? buffers.Get(p.pd.src_desc()) : xm;
    memory gb = p.dense_g ? memory(p.pd.diff_dst_desc(), Engine(), gm.get_data_handle())
                          : buffers.Get(p.pd.diff_dst_desc());
    memory dwb = buffers.Get(p.pd.diff_weights_desc()), scratch = buffers.Get(p.pd.scratchpad_desc());
    if (p.blocked) p.x_in(stream, xm, xb, buffers);
    if (!p.dense_g) p.g_in(stream, gm, gb, buffers);
    p.prim.execute(stream, {{DNNL_ARG_SRC, xb}, {DNNL_ARG_DIFF_DST, gb}, {DNNL_ARG_DIFF_WEIGHTS, dwb},
                            {DNNL_ARG_SCRATCHPAD, scratch}});
    p.dw_out(stream, dwb, dwm, buffers);
    stream.wait();
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

// `algorithms(n, h, w, c, f, fc)`: ("winograd" or "direct") for one convolution item of n images and for one
// weight-gradient item of fc of the f output channels, as the handlers choose them on this CPU (for tests).
static PyObject* Algorithms(PyObject*, PyObject* args) {
  long long n, h, w, c, f, fc;
  if (!PyArg_ParseTuple(args, "LLLLLL", &n, &h, &w, &c, &f, &fc)) return nullptr;
  try {
    SingleThreaded single;
    const bool conv = Cached<Shape, ConvPlan>({n, h, w, c, f}, MakeConvPlan).blocked;
    const bool wgrad = Cached<WgradShape, WgradPlan>({n, h, w, c, fc, f}, MakeWgradPlan).blocked;
    return Py_BuildValue("(ss)", conv ? "winograd" : "direct", wgrad ? "winograd" : "direct");
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

// `buffer_bytes(reset=False)`: (bytes the calls hold now, the most they held at once since the last reset).
static PyObject* BufferBytes(PyObject*, PyObject* args) {
  int reset = 0;
  if (!PyArg_ParseTuple(args, "|p", &reset)) return nullptr;
  const long long live = live_bytes.load(), peak = peak_bytes.load();
  if (reset) peak_bytes = live;
  return Py_BuildValue("(LL)", live, peak);
}

static PyMethodDef kMethods[] = {
    {"handlers", Handlers, METH_NOARGS, "The XLA FFI handlers: {target name: PyCapsule}."},
    {"algorithms", Algorithms, METH_VARARGS, "(conv, weight gradient) algorithm for an item's shape."},
    {"buffer_bytes", BufferBytes, METH_VARARGS, "(bytes held now, high-water mark since the last reset)."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_onednn", "oneDNN 3x3 convolutions as XLA FFI handlers.",
                              -1, kMethods};

PyMODINIT_FUNC PyInit__onednn(void) { return PyModule_Create(&kModule); }
