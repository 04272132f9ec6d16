// 2:4 sparse GEMM for Hopper (sm_90a) built on CUTLASS 3's sparse warp-specialised kernels, with the
// epilogues cuSPARSELt does not offer in fp16/bf16: per-row bias + exact (erf) GELU, and per-row bias +
// residual.  Exposed through a plain C ABI so Python can call it through ctypes, like the cuSPARSELt path.
//
// Orientation (as in kernels/cusparselt.py): y[tokens, out] = x[tokens, in] @ W[out, in]^T is computed as
// D[out, tokens] = A[out, in] * B[in, tokens] with A = W (row-major, sparse), B = x^T (x row-major, so B is
// column-major), D = y^T (y row-major, so D is column-major).  GEMM M = out features, N = tokens, K = in.
//
// Every kernel here shares one compressed layout (tile K = 128), so a weight compressed once runs on all.

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/transform/device/transform_universal_adapter.hpp"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

#if defined(__CUDA_ARCH__) && !defined(CUTLASS_ARCH_MMA_SM90A_ENABLED)
#error "build for sm_90a: -gencode=arch=compute_90a,code=sm_90a"
#endif

#ifndef HSS_DTYPE
#define HSS_DTYPE cutlass::half_t
#endif

namespace hss {

using Element = HSS_DTYPE;
using ElementAcc = float;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::ColumnMajor;
constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
using ProblemShape = Shape<int, int, int, int>;

template <template <class> class Act, class Tile, class Cluster, class MainSched, class EpiSched,
          class Scheduler = void>
struct Kernel {
  using Fusion = cutlass::epilogue::fusion::LinCombPerRowBiasEltAct<Act, Element, ElementAcc, Element, Element,
                                                                    ElementAcc>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc, Element, LayoutD, kAlign, Element,
      LayoutD, kAlign, EpiSched, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign,
      ElementAcc, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSched>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;

// The tile configurations, by index (tile M x N x K, cluster, schedule, tile scheduler).
template <class Tile_, class Cluster_, class Main_, class Epi_, class Scheduler_ = void>
struct Config {
  using Tile = Tile_;
  using Cluster = Cluster_;
  using Main = Main_;
  using Epi = Epi_;
  using Scheduler = Scheduler_;
};
using Config0 = Config<Shape<_128, _128, _128>, Shape<_1, _2, _1>, Coop, CoopEpi>;
using Config1 = Config<Shape<_128, _256, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>;
using Config2 = Config<Shape<_64, _128, _128>, Shape<_1, _2, _1>, Ping, PingEpi>;
using Config3 = Config<Shape<_64, _256, _128>, Shape<_1, _1, _1>, Ping, PingEpi>;
using Config4 = Config<Shape<_256, _128, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>;
// Decode (a few tokens: GEMM N = 16-64): small token tiles; the weight is the only large operand, so what counts
// is how many SMs stream it. 64-row tiles give a 4096-row weight 64 CTAs; Stream-K splits K across the rest.
using Config5 = Config<Shape<_64, _64, _128>, Shape<_1, _1, _1>, Ping, PingEpi>;
using Config6 = Config<Shape<_64, _32, _128>, Shape<_1, _1, _1>, Ping, PingEpi>;
using Config7 = Config<Shape<_128, _64, _128>, Shape<_1, _1, _1>, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;
using Config8 = Config<Shape<_128, _32, _128>, Shape<_1, _1, _1>, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;
#define HSS_CONFIGS(X) \
  X(0, Config0) X(1, Config1) X(2, Config2) X(3, Config3) X(4, Config4) X(5, Config5) X(6, Config6) X(7, Config7) \
  X(8, Config8)
constexpr int kNumConfigs = 9;

template <template <class> class Act, class C>
using KernelOf =
    Kernel<Act, typename C::Tile, typename C::Cluster, typename C::Main, typename C::Epi, typename C::Scheduler>;

using Reference = KernelOf<cutlass::epilogue::thread::Identity, Config0>;
using Mainloop0 = Reference::Mainloop;
using SparseConfig = typename Mainloop0::SparseConfig;
using ElementE = typename Mainloop0::ElementE;
using StrideA = cutlass::gemm::TagToStrideA_t<LayoutA>;
using Compressor = cutlass::transform::device::TransformUniversalAdapter<
    cutlass::transform::kernel::StructuredSparseCompressor<ProblemShape, Element, LayoutA, SparseConfig,
                                                           cutlass::arch::Sm90>>;
using CompressorUtility =
    cutlass::transform::kernel::StructuredSparseCompressorUtility<ProblemShape, Element, LayoutA, SparseConfig>;

int sm_count(int device) {
  static int counts[64] = {0};
  if (device < 0 || device >= 64) return 0;
  if (counts[device] == 0) {
    cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device);
  }
  return counts[device];
}

template <class K>
typename K::Gemm::Arguments make_arguments(const void* a_c, const void* e, const void* b, const void* bias,
                                           const void* c, void* d, int m, int n, int k, float beta) {
  using Gemm = typename K::Gemm;
  static_assert(std::is_same_v<typename K::Mainloop::SparseConfig, SparseConfig>,
                "every kernel must share the compressed layout");
  ProblemShape shape{m, n, k, 1};
  auto stride_b = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideB{}, make_shape(n, k, 1));
  auto stride_c = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideC{}, make_shape(m, n, 1));
  auto stride_d = cutlass::make_cute_packed_stride(typename Gemm::GemmKernel::StrideD{}, make_shape(m, n, 1));
  int device = 0;
  cudaGetDevice(&device);
  cutlass::KernelHardwareInfo hw{device, sm_count(device)};
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      shape,
      {static_cast<const Element*>(a_c), SparseConfig::fill_layoutA(shape), static_cast<const Element*>(b),
       stride_b, static_cast<const ElementE*>(e), SparseConfig::fill_layoutE(shape)},
      {{}, static_cast<const Element*>(c != nullptr ? c : d), stride_c, static_cast<Element*>(d), stride_d},
      hw};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = c != nullptr ? beta : 0.0f;
  args.epilogue.thread.bias_ptr = static_cast<const Element*>(bias);
  return args;
}

template <class K>
int workspace(int m, int n, int k, size_t* bytes) {
  // Stream-K's workspace size divides by the SM count: without a GPU whose count can be read, refuse (15)
  // instead of dividing by zero.  (The GEMM itself passes 0 on to CUTLASS, which then queries the count.)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || sm_count(device) <= 0) {
    cudaGetLastError();  // clear it: a later launch's own error check must not see it
    return 15;
  }
  auto args = make_arguments<K>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, 0.0f);
  *bytes = K::Gemm::get_workspace_size(args);
  return 0;
}

template <class K>
int run(const void* a_c, const void* e, const void* b, const void* bias, const void* c, void* d, int m, int n,
        int k, float beta, void* ws, size_t ws_bytes, cudaStream_t stream) {
  typename K::Gemm gemm;
  auto args = make_arguments<K>(a_c, e, b, bias, c, d, m, n, k, beta);
  if (K::Gemm::get_workspace_size(args) > ws_bytes) return 10;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 11;
  if (gemm.initialize(args, ws, stream) != cutlass::Status::kSuccess) return 12;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return 13;
  return cudaGetLastError() == cudaSuccess ? 0 : 14;
}

}  // namespace hss

extern "C" {

// Error codes: 0 ok; 1 bad argument; 10 workspace too small; 11 shape not supported; 12 initialise failed;
// 13 launch failed; 14 CUDA error after launch; 15 no GPU to size the workspace for.

int hss_num_configs() { return hss::kNumConfigs; }

// Elements of the compressed A (same dtype as A) and bytes of the metadata E for an m x k weight.
int hss_compressed_sizes(int m, int k, int64_t* a_elements, int64_t* e_bytes) {
  hss::ProblemShape shape{m, 128, k, 1};
  auto stride_a = cutlass::make_cute_packed_stride(hss::StrideA{}, make_shape(m, k, 1));
  hss::CompressorUtility util(shape, stride_a);
  *a_elements = int64_t(m) * util.get_tensorA_k_physical();
  *e_bytes = int64_t(util.get_metadata_m_physical()) * util.get_metadata_k_physical() *
             int64_t(cutlass::sizeof_bits<hss::ElementE>::value) / 8;
  return 0;
}

// Compresses a dense m x k row-major 2:4 weight on the device.  a_c and e sized by hss_compressed_sizes.
int hss_compress(const void* a, void* a_c, void* e, int m, int k, void* ws, size_t ws_bytes, void* stream) {
  hss::ProblemShape shape{m, 128, k, 1};
  auto stride_a = cutlass::make_cute_packed_stride(hss::StrideA{}, make_shape(m, k, 1));
  int device = 0;
  cudaGetDevice(&device);
  cutlass::KernelHardwareInfo hw{device, hss::sm_count(device)};
  typename hss::Compressor::Arguments args{
      shape, {static_cast<const hss::Element*>(a), stride_a, static_cast<hss::Element*>(a_c),
              static_cast<hss::ElementE*>(e)}, {hw}};
  hss::Compressor op;
  if (hss::Compressor::get_workspace_size(args) > ws_bytes) return 10;
  if (op.can_implement(args) != cutlass::Status::kSuccess) return 11;
  if (op.initialize(args, ws, static_cast<cudaStream_t>(stream)) != cutlass::Status::kSuccess) return 12;
  if (op.run(static_cast<cudaStream_t>(stream)) != cutlass::Status::kSuccess) return 13;
  return cudaGetLastError() == cudaSuccess ? 0 : 14;
}

size_t hss_compress_workspace(int m, int k) {
  hss::ProblemShape shape{m, 128, k, 1};
  auto stride_a = cutlass::make_cute_packed_stride(hss::StrideA{}, make_shape(m, k, 1));
  typename hss::Compressor::Arguments args{shape, {nullptr, stride_a, nullptr, nullptr}, {}};
  return hss::Compressor::get_workspace_size(args);
}

#define HSS_DISPATCH(IDX, CONFIG)                                                  \
  case IDX:                                                                        \
    if (gelu) return FN<hss::KernelOf<cutlass::epilogue::thread::GELU, hss::CONFIG>> ARGS; \
    return FN<hss::KernelOf<cutlass::epilogue::thread::Identity, hss::CONFIG>> ARGS;

// Workspace bytes for one kernel on one problem.
int hss_gemm_workspace(int config, int gelu, int m, int n, int k, size_t* bytes) {
#define FN hss::workspace
#define ARGS (m, n, k, bytes)
  switch (config) { HSS_CONFIGS(HSS_DISPATCH) }
#undef FN
#undef ARGS
  return 1;
}

// D = act(A_c * B + bias + beta * C).  bias may be null (no bias); c may be null (no residual); gelu only
// without c.  All device pointers; stream is a cudaStream_t.
int hss_gemm(int config, int gelu, const void* a_c, const void* e, const void* b, const void* bias,
             const void* c, void* d, int m, int n, int k, float beta, void* ws, size_t ws_bytes, void* stream) {
  if (gelu && c != nullptr) return 1;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#define FN hss::run
#define ARGS (a_c, e, b, bias, c, d, m, n, k, beta, ws, ws_bytes, s)
  switch (config) { HSS_CONFIGS(HSS_DISPATCH) }
#undef FN
#undef ARGS
  return 1;
}

}  // extern "C"
