// VGG's 3x3 stride-1 SAME convolution as XLA FFI custom calls into oneDNN (CPU).
//
// Three handlers, NHWC activations and HWIO kernels as vggjax stores them (oneDNN runs nhwc
// natively; only the kernel is reordered into its blocked layout, once per call):
//   VggjaxConvFwd         x (N,H,W,Cin) T, w (3,3,Cin,Cout) T, b (Cout) f32 -> y (N,H,W,Cout) T
//   VggjaxConvBwdData     dy (N,H,W,Cout) T, w (3,3,Cin,Cout) T           -> dx (N,H,W,Cin) T
//   VggjaxConvBwdWeights  x (N,H,W,Cin) T, dy (N,H,W,Cout) T              -> dw (3,3,Cin,Cout) f32,
//                                                                            db (Cout) f32
//   VggjaxWinogradFwd     x (N,H,W,Cin) f32, u (36,Cin,Cout) f32, b (Cout) f32 -> y (N,H,W,Cout) f32
// T is float32 or bfloat16 (bf16 in, f32 accumulation; the weight gradient comes out in f32).
// `relu` (forward only) fuses max(y, 0) as a oneDNN post-op.
// Primitives are built once per (kind, shape, dtype, relu) and cached: building one costs
// milliseconds (JIT code generation), running one is the convolution itself.
//
// Every primitive runs with a user-managed scratchpad (`scratchpad`). oneDNN's default, the
// library-managed one, is a thread-local buffer sized on the thread that *created* the primitive;
// XLA runs custom calls on whichever of its worker threads is free, so a primitive created on one
// thread and run on another wrote past (or through a null) scratchpad of the wrong size. That was
// the segfault of issue 29: oneDNN's gemm-based backward-weights (chosen for 2x2 maps under the
// AVX2 ISA) needs a large im2col scratchpad, the others little or none.
//
// VggjaxWinogradFwd is Winograd F(4x4, 3x3) (Lavin & Gray 2016; the matrices of
// vggjax/model/winograd.py, whose `transform_kernel` makes u = G g G^T): 4x fewer multiplies
// than the direct conv, which oneDNN 3.2 runs at the cores' FMA peak and has no fp32 Winograd
// for. Per chunk of 4x4 output tiles: the input transform B^T d B (OpenMP, vectorised for the
// ISA oneDNN runs, so ONEDNN_MAX_CPU_ISA caps it too), 36 (tiles x Cin) @ (Cin x Cout) GEMMs in
// one batched oneDNN matmul, then the output transform A^T m A with bias and ReLU. Chunks keep
// the transformed tiles within kWinogradScratch bytes, reused from call to call.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <sstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Kind { kFwd, kBwdData, kBwdWeights };

struct Plan {
  dnnl::primitive prim;
  memory::desc src, wei, dst, bias;      // what the primitive wants
  memory::desc user_wei;                 // HWIO as XLA holds it
  memory::desc scratch;                  // the primitive's scratchpad (user-managed)
  bool reorder_wei = false;
  dnnl::reorder wei_reorder;             // HWIO -> blocked (fwd, bwd-data) or back (bwd-weights)
  memory::desc reorder_scratch;
};

dnnl::engine& engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// Attributes every primitive is built with: a scratchpad the caller passes (`scratchpad`; see the top).
dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// The calling thread's scratchpad memory for `md`: one 64-byte aligned buffer per thread, grown to
// the largest scratchpad that thread has run. Primitives run synchronously on the CPU engine, so
// one execution is over before the next one on this thread reuses the buffer.
memory scratchpad(const memory::desc& md) {
  struct Buffer {
    void* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buf;
  const size_t need = md.get_size();
  if (need > buf.size) {
    const size_t size = (need + 63) / 64 * 64;
    void* bigger = std::aligned_alloc(64, size);
    if (bigger == nullptr) throw std::bad_alloc();
    std::free(buf.data);
    buf.data = bigger;
    buf.size = size;
  }
  return memory(md, engine(), need ? buf.data : nullptr);
}

using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int, bool>;

Plan& plan_for(Kind kind, int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout,
               memory::data_type dt, bool relu) {
  static std::mutex cache_mu;
  static std::map<Key, std::unique_ptr<Plan>> cache;
  Key key{kind, n, h, w, cin, cout, static_cast<int>(dt), relu};
  std::lock_guard<std::mutex> lock(cache_mu);
  auto it = cache.find(key);
  if (it != cache.end()) return *it->second;

  auto& eng = engine();
  const auto f32 = memory::data_type::f32;
  memory::dims strides{1, 1}, pad{1, 1};
  memory::desc src({n, cin, h, w}, dt, tag::nhwc);
  memory::desc dst({n, cout, h, w}, dt, tag::nhwc);
  memory::desc wei_any({cout, cin, 3, 3}, dt, tag::any);
  memory::desc bias({cout}, f32, tag::x);
  dnnl::primitive_attr attr = user_scratchpad();
  if (relu) {
    dnnl::post_ops ops;
    ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    attr.set_post_ops(ops);
  }
  auto p = std::make_unique<Plan>();
  p->src = src;
  p->dst = dst;
  p->bias = bias;
  // The forward descriptor: the primitive itself, or the hint the backward ones require.
  dnnl::convolution_forward::primitive_desc fwd(
      eng, kind == kFwd ? dnnl::prop_kind::forward_inference : dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, src, wei_any, bias, dst, strides, pad, pad, attr);
  memory::desc wei;
  if (kind == kFwd) {
    p->prim = dnnl::convolution_forward(fwd);
    p->scratch = fwd.scratchpad_desc();
    wei = fwd.weights_desc();
    p->user_wei = memory::desc({cout, cin, 3, 3}, dt, tag::hwio);
  } else if (kind == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, src, wei_any, dst, strides, pad, pad, fwd, attr);
    p->prim = dnnl::convolution_backward_data(bwd);
    p->scratch = bwd.scratchpad_desc();
    wei = bwd.weights_desc();
    p->user_wei = memory::desc({cout, cin, 3, 3}, dt, tag::hwio);
  } else {
    memory::desc dwei_any({cout, cin, 3, 3}, f32, tag::any);
    dnnl::convolution_backward_weights::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, src, dwei_any, bias, dst, strides, pad, pad, fwd,
        attr);
    p->prim = dnnl::convolution_backward_weights(bwd);
    p->scratch = bwd.scratchpad_desc();
    wei = bwd.diff_weights_desc();
    p->user_wei = memory::desc({cout, cin, 3, 3}, f32, tag::hwio);
  }
  p->wei = wei;
  p->reorder_wei = wei != p->user_wei;
  if (p->reorder_wei) {
    auto rpd = kind == kBwdWeights
                   ? dnnl::reorder::primitive_desc(eng, wei, eng, p->user_wei, user_scratchpad())
                   : dnnl::reorder::primitive_desc(eng, p->user_wei, eng, wei, user_scratchpad());
    p->wei_reorder = dnnl::reorder(rpd);
    p->reorder_scratch = rpd.scratchpad_desc();
  }
  Plan& ref = *p;
  cache.emplace(key, std::move(p));
  return ref;
}

// Runs `p` with the user's HWIO kernel pointer, reordering into (or out of) oneDNN's layout.
ffi::Error run(Plan& p, Kind kind, void* x, void* wei, void* bias, void* y) {
  auto& eng = engine();
  dnnl::stream stream(eng);
  memory user_wei(p.user_wei, eng, wei);
  memory prim_wei = p.reorder_wei ? memory(p.wei, eng) : user_wei;
  auto reorder = [&](memory& from, memory& to) {
    p.wei_reorder.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                   {DNNL_ARG_SCRATCHPAD, scratchpad(p.reorder_scratch)}});
  };
  if (p.reorder_wei && kind != kBwdWeights) reorder(user_wei, prim_wei);
  std::unordered_map<int, memory> args;
  if (kind == kFwd) {
    args = {{DNNL_ARG_SRC, memory(p.src, eng, x)},
            {DNNL_ARG_WEIGHTS, prim_wei},
            {DNNL_ARG_BIAS, memory(p.bias, eng, bias)},
            {DNNL_ARG_DST, memory(p.dst, eng, y)}};
  } else if (kind == kBwdData) {  // x: dx (out), y: dy (in)
    args = {{DNNL_ARG_DIFF_SRC, memory(p.src, eng, x)},
            {DNNL_ARG_WEIGHTS, prim_wei},
            {DNNL_ARG_DIFF_DST, memory(p.dst, eng, y)}};
  } else {
    args = {{DNNL_ARG_SRC, memory(p.src, eng, x)},
            {DNNL_ARG_DIFF_WEIGHTS, prim_wei},
            {DNNL_ARG_DIFF_BIAS, memory(p.bias, eng, bias)},
            {DNNL_ARG_DIFF_DST, memory(p.dst, eng, y)}};
  }
  args.emplace(DNNL_ARG_SCRATCHPAD, scratchpad(p.scratch));
  p.prim.execute(stream, args);
  if (p.reorder_wei && kind == kBwdWeights) reorder(prim_wei, user_wei);
  stream.wait();
  return ffi::Error::Success();
}

// Checks the activation `act` (x for forward and backward-weights, dy for backward-data: its
// dims are N, H, W and Cin or Cout), then runs the cached plan on the raw pointers.
ffi::Error conv(Kind kind, const ffi::AnyBuffer& act, int64_t cin, int64_t cout, bool relu, void* x,
                void* wei, void* bias, void* y) {
  static const char* names[] = {"forward", "backward-data", "backward-weights"};
  memory::data_type dt;
  if (act.element_type() == ffi::DataType::F32) {
    dt = memory::data_type::f32;
  } else if (act.element_type() == ffi::DataType::BF16) {
    dt = memory::data_type::bf16;
  } else {
    return ffi::Error::InvalidArgument("vggjax oneDNN conv: dtype must be float32 or bfloat16");
  }
  auto d = act.dimensions();  // rank 4: checked by the handler
  try {
    return run(plan_for(kind, d[0], d[1], d[2], cin, cout, dt, relu), kind, x, wei, bias, y);
  } catch (const dnnl::error& e) {
    // A refusal names what was asked and on which ISA, not only oneDNN's own words.
    std::ostringstream msg;
    msg << "oneDNN refused the " << names[kind] << " conv of NHWC (" << d[0] << ", " << d[1] << ", "
        << d[2] << ", " << cin << ") -> " << cout << " channels in "
        << (dt == memory::data_type::bf16 ? "bfloat16" : "float32") << " on oneDNN ISA 0x" << std::hex
        << static_cast<int>(dnnl::get_effective_cpu_isa()) << " (dnnl_cpu_isa_t): " << e.what();
    return ffi::Error::Internal(msg.str());
  }
}

// True where `b` has exactly the dimensions `want` (an argument or a result of the handler).
template <typename B>
bool dims_are(const B& b, std::initializer_list<int64_t> want) {
  auto d = b.dimensions();
  return d.size() == want.size() && std::equal(want.begin(), want.end(), d.begin());
}

// Every buffer's shape is checked against the activation's before oneDNN reads or writes it:
// a mismatch is an error, never a write past a buffer.
ffi::Error bad_shapes(const char* what) {
  return ffi::Error::InvalidArgument(std::string("vggjax oneDNN conv: ") + what);
}

ffi::Error Fwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> b,
               ffi::Result<ffi::AnyBuffer> y, bool relu) {
  auto d = x.dimensions();
  if (d.size() != 4 || w.dimensions().size() != 4) return bad_shapes("forward expects NHWC x, HWIO w");
  const int64_t cin = d[3], cout = w.dimensions()[3];
  if (!dims_are(w, {3, 3, cin, cout}) || !dims_are(b, {cout}) || !dims_are(*y, {d[0], d[1], d[2], cout}) ||
      w.element_type() != x.element_type() || y->element_type() != x.element_type())
    return bad_shapes("forward expects x (N,H,W,Cin), w (3,3,Cin,Cout) and y (N,H,W,Cout) of one "
                      "dtype, b (Cout) float32");
  return conv(kFwd, x, cin, cout, relu, x.untyped_data(), w.untyped_data(), b.typed_data(),
              y->untyped_data());
}

ffi::Error BwdData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx) {
  auto d = dy.dimensions();
  if (d.size() != 4 || w.dimensions().size() != 4) return bad_shapes("backward-data expects NHWC dy, HWIO w");
  const int64_t cin = w.dimensions()[2], cout = d[3];
  if (!dims_are(w, {3, 3, cin, cout}) || !dims_are(*dx, {d[0], d[1], d[2], cin}) ||
      w.element_type() != dy.element_type() || dx->element_type() != dy.element_type())
    return bad_shapes("backward-data expects dy (N,H,W,Cout), w (3,3,Cin,Cout) and dx (N,H,W,Cin) "
                      "of one dtype");
  return conv(kBwdData, dy, cin, cout, false, dx->untyped_data(), w.untyped_data(), nullptr,
              dy.untyped_data());
}

ffi::Error BwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::Buffer<ffi::F32>> dw,
                      ffi::Result<ffi::Buffer<ffi::F32>> db) {
  auto d = x.dimensions();
  if (d.size() != 4 || dy.dimensions().size() != 4) return bad_shapes("backward-weights expects NHWC x, dy");
  const int64_t cin = d[3], cout = dy.dimensions()[3];
  if (!dims_are(dy, {d[0], d[1], d[2], cout}) || !dims_are(*dw, {3, 3, cin, cout}) ||
      !dims_are(*db, {cout}) || dy.element_type() != x.element_type())
    return bad_shapes("backward-weights expects x (N,H,W,Cin) and dy (N,H,W,Cout) of one dtype, "
                      "dw (3,3,Cin,Cout) and db (Cout) float32");
  return conv(kBwdWeights, x, cin, cout, false, x.untyped_data(), dw->typed_data(),
              db->typed_data(), dy.untyped_data());
}

// ---- Winograd F(4x4, 3x3), float32 -------------------------------------------------------

constexpr int kVec = 16;                          // channels per vector block
constexpr int64_t kWinogradScratch = 24 << 20;    // bytes of transformed tiles per chunk

// One chunk of tiles: tile t (0 <= t < count) is tile `first + t` of the batch, numbered
// image-major, then tile row, then tile column; each tile is 4x4 outputs.
struct Tiles {
  int64_t h, w, th, tw, first, count;
  int64_t origin(int64_t t, int64_t* y0, int64_t* x0) const {  // image index; top-left pixel
    const int64_t tile = first + t, rem = tile % (th * tw);
    *y0 = rem / tw * 4;
    *x0 = rem % tw * 4;
    return tile / (th * tw);
  }
};

// B^T applied to six rows of kVec channels (in[i][k] -> out[i][k]). This and at6 expand
// winograd.MATRICES[4] by hand; tests/test_winograd.py evaluates both against that one source.
static inline __attribute__((always_inline)) void bt6(float (*in)[kVec], float (*out)[kVec]) {
#pragma omp simd
  for (int k = 0; k < kVec; ++k) {
    const float d0 = in[0][k], d1 = in[1][k], d2 = in[2][k];
    const float d3 = in[3][k], d4 = in[4][k], d5 = in[5][k];
    out[0][k] = 4 * d0 - 5 * d2 + d4;
    out[1][k] = -4 * (d1 + d2) + d3 + d4;
    out[2][k] = 4 * (d1 - d2) - d3 + d4;
    out[3][k] = -2 * (d1 - d3) - d2 + d4;
    out[4][k] = 2 * (d1 - d3) - d2 + d4;
    out[5][k] = 4 * d1 - 5 * d3 + d5;
  }
}

// A^T applied to six rows of kVec channels (in[i][k] -> out[0..3][k]).
static inline __attribute__((always_inline)) void at6(float (*in)[kVec], float (*out)[kVec]) {
#pragma omp simd
  for (int k = 0; k < kVec; ++k) {
    const float a = in[1][k] + in[2][k], b = in[1][k] - in[2][k];
    const float e = in[3][k] + in[4][k], f = in[3][k] - in[4][k];
    out[0][k] = in[0][k] + a + e;
    out[1][k] = b + 2 * f;
    out[2][k] = a + 4 * e;
    out[3][k] = b + 8 * f + in[5][k];
  }
}

// V[p][t][c0 .. c0+kVec) = (B^T d B)[p] for the 6x6 input patch of tile t (zero outside x).
static inline __attribute__((always_inline)) void input_tile(const Tiles& g, const float* x,
                                                             int64_t c, float* v, int64_t t,
                                                             int64_t c0) {
  int64_t y0, x0;
  const int64_t img = g.origin(t, &y0, &x0), cn = std::min<int64_t>(kVec, c - c0);
  alignas(64) float d[6][6][kVec], r[6][6][kVec], col[6][kVec], out[6][kVec];
  for (int i = 0; i < 6; ++i) {
    for (int j = 0; j < 6; ++j) {
      const int64_t yy = y0 - 1 + i, xx = x0 - 1 + j;
      if (yy < 0 || yy >= g.h || xx < 0 || xx >= g.w) {  // the SAME conv's zero padding
        for (int k = 0; k < kVec; ++k) d[j][i][k] = 0.f;
        continue;
      }
      const float* src = x + ((img * g.h + yy) * g.w + xx) * c + c0;
      for (int k = 0; k < kVec; ++k) d[j][i][k] = k < cn ? src[k] : 0.f;
    }
  }
  for (int j = 0; j < 6; ++j) bt6(d[j], r[j]);        // r[j][i] = (B^T d)[i][j]
  for (int i = 0; i < 6; ++i) {
    for (int j = 0; j < 6; ++j)
      for (int k = 0; k < kVec; ++k) col[j][k] = r[j][i][k];
    bt6(col, out);                                      // out[j] = (B^T d B)[i][j]
    for (int j = 0; j < 6; ++j) {
      float* dst = v + ((i * 6 + j) * g.count + t) * c + c0;
      for (int k = 0; k < cn; ++k) dst[k] = out[j][k];
    }
  }
}

// y's 4x4 outputs of tile t from M[p][t][c0 .. c0+kVec): A^T m A + bias, then ReLU if asked.
static inline __attribute__((always_inline)) void output_tile(const Tiles& g, const float* m,
                                                              const float* bias, bool relu,
                                                              int64_t c, float* y, int64_t t,
                                                              int64_t c0) {
  int64_t y0, x0;
  const int64_t img = g.origin(t, &y0, &x0), cn = std::min<int64_t>(kVec, c - c0);
  alignas(64) float d[6][6][kVec], r[6][4][kVec], col[6][kVec], out[4][kVec], b[kVec];
  for (int p = 0; p < 36; ++p) {
    const float* src = m + (p * g.count + t) * c + c0;
    for (int k = 0; k < kVec; ++k) d[p % 6][p / 6][k] = k < cn ? src[k] : 0.f;
  }
  for (int k = 0; k < kVec; ++k) b[k] = k < cn ? bias[c0 + k] : 0.f;
  for (int j = 0; j < 6; ++j) at6(d[j], r[j]);        // r[j][i] = (A^T m)[i][j]
  for (int i = 0; i < 4 && y0 + i < g.h; ++i) {
    for (int j = 0; j < 6; ++j)
      for (int k = 0; k < kVec; ++k) col[j][k] = r[j][i][k];
    at6(col, out);                                      // out[j] = (A^T m A)[i][j]
    for (int j = 0; j < 4 && x0 + j < g.w; ++j) {
      float* dst = y + ((img * g.h + y0 + i) * g.w + x0 + j) * c + c0;
      for (int k = 0; k < cn; ++k) {
        const float val = out[j][k] + b[k];
        dst[k] = relu && val < 0.f ? 0.f : val;
      }
    }
  }
}

// One OpenMP loop over (tile, channel block) per transform and ISA: the loop bodies inline into
// each target so they vectorise for it (AVX-512: one register per kVec channels).
#define VGGJAX_TRANSFORMS(suffix, isa)                                                        \
  isa void input_transform_##suffix(const Tiles& g, const float* x, int64_t c, float* v) {    \
    const int64_t blocks = (c + kVec - 1) / kVec;                                             \
    _Pragma("omp parallel for collapse(2) schedule(static)")                                  \
    for (int64_t t = 0; t < g.count; ++t)                                                     \
      for (int64_t cb = 0; cb < blocks; ++cb) input_tile(g, x, c, v, t, cb * kVec);           \
  }                                                                                           \
  isa void output_transform_##suffix(const Tiles& g, const float* m, const float* bias,       \
                                     bool relu, int64_t c, float* y) {                        \
    const int64_t blocks = (c + kVec - 1) / kVec;                                             \
    _Pragma("omp parallel for collapse(2) schedule(static)")                                  \
    for (int64_t t = 0; t < g.count; ++t)                                                     \
      for (int64_t cb = 0; cb < blocks; ++cb) output_tile(g, m, bias, relu, c, y, t, cb * kVec); \
  }

VGGJAX_TRANSFORMS(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))))
VGGJAX_TRANSFORMS(avx2, __attribute__((target("avx2,fma"))))
VGGJAX_TRANSFORMS(sse, )

enum class Isa { kSse, kAvx2, kAvx512 };

Isa transform_isa() {  // oneDNN's effective ISA, so ONEDNN_MAX_CPU_ISA caps the transforms too
  const auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  auto has = [isa](dnnl::cpu_isa want) {
    const auto bits = static_cast<unsigned>(want);
    return (isa & bits) == bits;
  };
  return has(dnnl::cpu_isa::avx512_core) ? Isa::kAvx512 : has(dnnl::cpu_isa::avx2) ? Isa::kAvx2 : Isa::kSse;
}

// The 36 Winograd-domain GEMMs of a chunk of `count` tiles, as one batched oneDNN matmul.
struct Matmul {
  dnnl::matmul prim;
  memory::desc scratch;
};

Matmul& winograd_matmul(int64_t count, int64_t cin, int64_t cout) {
  static std::mutex mu;
  static std::map<std::tuple<int64_t, int64_t, int64_t>, Matmul> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_tuple(count, cin, cout);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const auto f32 = memory::data_type::f32;
  dnnl::matmul::primitive_desc pd(engine(), memory::desc({36, count, cin}, f32, tag::abc),
                                  memory::desc({36, cin, cout}, f32, tag::abc),
                                  memory::desc({36, count, cout}, f32, tag::abc), user_scratchpad());
  return cache.emplace(key, Matmul{dnnl::matmul(pd), pd.scratchpad_desc()}).first->second;
}

ffi::Error winograd(const float* x, const float* u, const float* bias, float* y, int64_t n,
                    int64_t h, int64_t w, int64_t cin, int64_t cout, bool relu) {
  const int64_t th = (h + 3) / 4, tw = (w + 3) / 4, total = n * th * tw;
  if (total == 0) return ffi::Error::Success();  // an empty batch or map: nothing to write
  int64_t count = std::min<int64_t>(
      std::max<int64_t>(16, kWinogradScratch / (36 * (cin + cout) * 4)), total);
  const int64_t chunks = (total + count - 1) / count;
  count = (total + chunks - 1) / chunks;  // even chunks (the last may be shorter)
  // One scratch for all calls (they take turns: each one already uses every core).
  static std::mutex mu;
  static std::unique_ptr<float[]> scratch;
  static int64_t scratch_size = 0;
  std::lock_guard<std::mutex> lock(mu);
  if (scratch_size < 36 * count * (cin + cout)) {
    std::unique_ptr<float[]> bigger(new float[36 * count * (cin + cout)]);  // may throw: size after
    scratch = std::move(bigger);
    scratch_size = 36 * count * (cin + cout);
  }
  float *v = scratch.get(), *m = v + 36 * count * cin;
  auto& eng = engine();
  dnnl::stream stream(eng);
  const Isa isa = transform_isa();
  for (int64_t first = 0; first < total; first += count) {
    const Tiles g{h, w, th, tw, first, std::min(count, total - first)};
    if (isa == Isa::kAvx512) input_transform_avx512(g, x, cin, v);
    else if (isa == Isa::kAvx2) input_transform_avx2(g, x, cin, v);
    else input_transform_sse(g, x, cin, v);
    const auto f32 = memory::data_type::f32;
    Matmul& mm = winograd_matmul(g.count, cin, cout);
    mm.prim.execute(stream, {
        {DNNL_ARG_SRC, memory({{36, g.count, cin}, f32, tag::abc}, eng, v)},
        {DNNL_ARG_WEIGHTS, memory({{36, cin, cout}, f32, tag::abc}, eng, const_cast<float*>(u))},
        {DNNL_ARG_DST, memory({{36, g.count, cout}, f32, tag::abc}, eng, m)},
        {DNNL_ARG_SCRATCHPAD, scratchpad(mm.scratch)}});
    stream.wait();
    if (isa == Isa::kAvx512) output_transform_avx512(g, m, bias, relu, cout, y);
    else if (isa == Isa::kAvx2) output_transform_avx2(g, m, bias, relu, cout, y);
    else output_transform_sse(g, m, bias, relu, cout, y);
  }
  return ffi::Error::Success();
}

ffi::Error WinogradFwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> b,
                       ffi::Result<ffi::Buffer<ffi::F32>> y, bool relu) {
  auto d = x.dimensions();
  auto k = u.dimensions();
  auto out = y->dimensions();
  if (d.size() != 4 || k.size() != 3 || k[0] != 36 || k[1] != d[3] || k[1] < 1 || k[2] < 1 ||
      b.dimensions().size() != 1 || b.dimensions()[0] != k[2] || out.size() != 4 ||
      out[0] != d[0] || out[1] != d[1] || out[2] != d[2] || out[3] != k[2])
    return ffi::Error::InvalidArgument("vggjax oneDNN Winograd: expects x (N,H,W,Cin), "
                                       "u (36,Cin,Cout), b (Cout) -> y (N,H,W,Cout)");
  try {
    return winograd(x.typed_data(), u.typed_data(), b.typed_data(), y->typed_data(), d[0], d[1],
                    d[2], d[3], k[2], relu);
  } catch (const std::exception& e) {  // oneDNN's refusal, or no memory for the scratch
    std::ostringstream msg;
    msg << "the oneDNN Winograd conv failed for NHWC (" << d[0] << ", " << d[1] << ", " << d[2]
        << ", " << d[3] << ") -> " << k[2] << " channels: " << e.what();
    return ffi::Error::Internal(msg.str());
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VggjaxConvFwd, Fwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("relu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VggjaxConvBwdData, BwdData,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VggjaxConvBwdWeights, BwdWeights,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VggjaxWinogradFwd, WinogradFwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("relu"));
