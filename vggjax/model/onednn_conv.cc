// VGG's 3x3 stride-1 SAME convolution as XLA FFI custom calls into oneDNN (CPU).
//
// Three handlers, NHWC activations and HWIO kernels as vggjax stores them (oneDNN runs nhwc
// natively; only the kernel is reordered into its blocked layout, once per call):
//   VggjaxConvFwd         x (N,H,W,Cin) T, w (3,3,Cin,Cout) T, b (Cout) f32 -> y (N,H,W,Cout) T
//   VggjaxConvBwdData     dy (N,H,W,Cout) T, w (3,3,Cin,Cout) T           -> dx (N,H,W,Cin) T
//   VggjaxConvBwdWeights  x (N,H,W,Cin) T, dy (N,H,W,Cout) T              -> dw (3,3,Cin,Cout) f32,
//                                                                            db (Cout) f32
// T is float32 or bfloat16 (bf16 in, f32 accumulation; the weight gradient comes out in f32).
// `relu` (forward only) fuses max(y, 0) as a oneDNN post-op.
// Primitives are built once per (kind, shape, dtype, relu) and cached: building one costs
// milliseconds (JIT code generation), running one is the convolution itself.
#include <sstream>
#include <cstdint>
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
  bool reorder_wei = false;
  dnnl::reorder wei_reorder;             // HWIO -> blocked (fwd, bwd-data) or back (bwd-weights)
  std::mutex mu;                         // the library-managed scratchpad is per primitive
};

dnnl::engine& engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
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
  dnnl::primitive_attr attr;
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
    wei = fwd.weights_desc();
    p->user_wei = memory::desc({cout, cin, 3, 3}, dt, tag::hwio);
  } else if (kind == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, src, wei_any, dst, strides, pad, pad, fwd);
    p->prim = dnnl::convolution_backward_data(bwd);
    wei = bwd.weights_desc();
    p->user_wei = memory::desc({cout, cin, 3, 3}, dt, tag::hwio);
  } else {
    memory::desc dwei_any({cout, cin, 3, 3}, f32, tag::any);
    dnnl::convolution_backward_weights::primitive_desc bwd(
        eng, dnnl::algorithm::convolution_direct, src, dwei_any, bias, dst, strides, pad, pad, fwd);
    p->prim = dnnl::convolution_backward_weights(bwd);
    wei = bwd.diff_weights_desc();
    p->user_wei = memory::desc({cout, cin, 3, 3}, f32, tag::hwio);
  }
  p->wei = wei;
  p->reorder_wei = wei != p->user_wei;
  if (p->reorder_wei) {
    p->wei_reorder = kind == kBwdWeights ? dnnl::reorder(dnnl::reorder::primitive_desc(eng, wei, eng, p->user_wei))
                                         : dnnl::reorder(dnnl::reorder::primitive_desc(eng, p->user_wei, eng, wei));
  }
  Plan& ref = *p;
  cache.emplace(key, std::move(p));
  return ref;
}

// Runs `p` with the user's HWIO kernel pointer, reordering into (or out of) oneDNN's layout.
ffi::Error run(Plan& p, Kind kind, void* x, void* wei, void* bias, void* y) {
  auto& eng = engine();
  dnnl::stream stream(eng);
  std::lock_guard<std::mutex> lock(p.mu);
  memory user_wei(p.user_wei, eng, wei);
  memory prim_wei = p.reorder_wei ? memory(p.wei, eng) : user_wei;
  if (p.reorder_wei && kind != kBwdWeights) p.wei_reorder.execute(stream, user_wei, prim_wei);
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
  p.prim.execute(stream, args);
  if (p.reorder_wei && kind == kBwdWeights) p.wei_reorder.execute(stream, prim_wei, user_wei);
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
  auto d = act.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("vggjax oneDNN conv: activations must be NHWC");
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

ffi::Error Fwd(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> b,
               ffi::Result<ffi::AnyBuffer> y, bool relu) {
  return conv(kFwd, x, x.dimensions()[3], w.dimensions()[3], relu, x.untyped_data(),
              w.untyped_data(), b.typed_data(), y->untyped_data());
}

ffi::Error BwdData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx) {
  return conv(kBwdData, dy, w.dimensions()[2], dy.dimensions()[3], false, dx->untyped_data(),
              w.untyped_data(), nullptr, dy.untyped_data());
}

ffi::Error BwdWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::Buffer<ffi::F32>> dw,
                      ffi::Result<ffi::Buffer<ffi::F32>> db) {
  return conv(kBwdWeights, x, x.dimensions()[3], dy.dimensions()[3], false, x.untyped_data(),
              dw->typed_data(), db->typed_data(), dy.untyped_data());
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
