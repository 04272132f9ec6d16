// FP8 (e4m3) 2:4 sparse GEMM for Hopper (sm_90a) on CUTLASS 3's sparse warp-specialised kernels, with a scaled
// epilogue: per-output-channel weight scales, per-token activation scales, bias, fp16 or bf16 output.  Also the
// per-token dynamic quantisation of activations (absmax and cast to e4m3, one pass per row) and CUTLASS's 2:4
// compressor for e4m3 weights.  A plain C ABI called from Python through ctypes (kernels/cutlass_fp8.py).
//
// Orientation (as sm90_sparse_gemm.cu): y[tokens, out] = x[tokens, in] @ W[out, in]^T is computed as
// D[out, tokens] = A[out, in] * B[in, tokens], A = the e4m3 weight (row-major, sparse), B = the e4m3 activations
// (x row-major, so B is column-major), D = y^T (column-major).  GEMM M = out features, N = tokens, K = in.
//
// Epilogue (a CUTLASS 3 epilogue visitor tree, the recipe of vLLM's former scaled_mm_c3x kernels):
//   D[m, n] = scale_w[m] * (scale_x[n] * acc[m, n]) + bias[m]
// scale_w: a column broadcast (one float per row of D), scale_x: a row broadcast (one float per column of D),
// bias: a column broadcast in the output dtype, or none (nullptr, read as 0).
//
// The mainloops use the FP8 "fast accumulation" schedules (no periodic promotion of wgmma's accumulator to a
// separate fp32 register set), as vLLM's and torchao's FP8 2:4 kernels did.  Every configuration shares one
// compressed layout (CUTLASS's sparse layout of tile K = 128 elements), so a weight compressed once runs on all.

#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/functional.h"
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

#ifndef HSS_OUT_DTYPE
#define HSS_OUT_DTYPE cutlass::half_t
#endif

namespace hss_fp8 {

using Element = cutlass::float_e4m3_t;  // A and B
using ElementOut = HSS_OUT_DTYPE;      // D, the bias, and the activations the quantiser reads
using ElementAcc = float;
using ElementScale = float;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::ColumnMajor;
constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;      // 16 e4m3 elements
constexpr int kAlignOut = 128 / cutlass::sizeof_bits<ElementOut>::value;  // 8 fp16/bf16 elements
using ProblemShape = Shape<int, int, int, int>;

namespace fusion = cutlass::epilogue::fusion;

// scale_w[m] * (scale_x[n] * acc) + bias[m]
template <class Tile>
struct ScaledBiasEpilogue {
  using Acc = fusion::Sm90AccFetch;
  using ScaleW = fusion::Sm90ColBroadcast<0, Tile, ElementScale, ElementAcc>;
  using ScaleX = fusion::Sm90RowBroadcast<0, Tile, ElementScale, ElementAcc>;
  using Bias = fusion::Sm90ColBroadcast<0, Tile, ElementOut, ElementAcc>;
  using Compute0 = fusion::Sm90Compute<cutlass::multiplies, ElementAcc, ElementAcc,
                                       cutlass::FloatRoundStyle::round_to_nearest>;
  using Tree0 = fusion::Sm90EVT<Compute0, ScaleX, Acc>;
  using Compute1 = fusion::Sm90Compute<cutlass::multiply_add, ElementOut, ElementAcc,
                                       cutlass::FloatRoundStyle::round_to_nearest>;
  using Tree = fusion::Sm90EVT<Compute1, ScaleW, Tree0, Bias>;

  static typename Tree::Arguments arguments(const float* scale_w, const float* scale_x, const ElementOut* bias) {
    return {
        {scale_w, 1.0f, {}},              // ScaleW
        {{scale_x, 1.0f, {}}, {}, {}},    // Tree0: ScaleX, Acc, multiplies
        {bias, ElementOut(0), {}},        // Bias (nullptr: 0)
        {}                                // multiply_add
    };
  }
};

template <class Tile, class Cluster, class MainSched, class EpiSched, class Scheduler = void>
struct Kernel {
  using Epi = ScaledBiasEpilogue<Tile>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc, void, LayoutD, kAlignOut,
      ElementOut, LayoutD, kAlignOut, EpiSched, typename Epi::Tree>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign,
      ElementAcc, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainSched>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;

// Swizzle_: the tile scheduler's max_swizzle_size, a launch argument (1 = CUTLASS's default): tiles that share
// operands run closer together in time, so more of them come from L2 at large token counts.  Configurations that
// differ only in it share one kernel.
template <class Tile_, class Cluster_, class Main_, class Epi_, class Scheduler_ = void, int Swizzle_ = 1>
struct Config {
  using K = Kernel<Tile_, Cluster_, Main_, Epi_, Scheduler_>;
  static constexpr int swizzle = Swizzle_;
};
// The tile configurations, by index (tile M x N x K in elements, cluster, schedule, tile scheduler).
// M = out features, N = tokens: the 64-wide N tiles are for small token counts.
using Config0 = Config<Shape<_128, _128, _256>, Shape<_1, _2, _1>, Coop, CoopEpi>;
using Config1 = Config<Shape<_128, _256, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>;
using Config2 = Config<Shape<_64, _128, _256>, Shape<_1, _2, _1>, Ping, PingEpi>;
using Config3 = Config<Shape<_128, _64, _256>, Shape<_1, _1, _1>, Coop, CoopEpi>;
using Config4 = Config<Shape<_256, _128, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>;
// Decode (GEMM N = 16-64 tokens), as sm90_sparse_gemm.cu's configurations 5-8: the weight is the only large
// operand, so what counts is how many SMs stream it.  64-row tiles give a 4096-row weight 64 CTAs where 128-row
// tiles give 32 of 132 SMs; Stream-K splits K across the SMs left over.
using Config5 = Config<Shape<_64, _64, _256>, Shape<_1, _1, _1>, Ping, PingEpi>;
using Config6 = Config<Shape<_64, _32, _256>, Shape<_1, _1, _1>, Ping, PingEpi>;
using Config7 = Config<Shape<_128, _64, _256>, Shape<_1, _1, _1>, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;
using Config8 = Config<Shape<_128, _32, _256>, Shape<_1, _1, _1>, Coop, CoopEpi, cutlass::gemm::StreamKScheduler>;
// Prefill (2,048+ tokens, December 2026): the two large tiles with a swizzle of 4, and 128 x 256 tiles in clusters
// of two along M, whose CTAs share (multicast) each token tile they load.
using Config9 = Config<Shape<_128, _256, _128>, Shape<_1, _1, _1>, Coop, CoopEpi, void, 4>;
using Config10 = Config<Shape<_256, _128, _128>, Shape<_2, _1, _1>, Coop, CoopEpi, void, 4>;
using Config11 = Config<Shape<_128, _256, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>;
using Config12 = Config<Shape<_128, _256, _128>, Shape<_2, _1, _1>, Coop, CoopEpi, void, 4>;
#define HSS_FP8_CONFIGS(X) \
  X(0, Config0) X(1, Config1) X(2, Config2) X(3, Config3) X(4, Config4) X(5, Config5) X(6, Config6) X(7, Config7) \
  X(8, Config8) X(9, Config9) X(10, Config10) X(11, Config11) X(12, Config12)
constexpr int kNumConfigs = 13;

using Mainloop0 = Config0::K::Mainloop;
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

template <class K, int Swizzle>
typename K::Gemm::Arguments make_arguments(const void* a_c, const void* e, const void* b, const float* scale_w,
                                           const float* scale_x, const void* bias, void* d, int m, int n, int k) {
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
      {K::Epi::arguments(scale_w, scale_x, static_cast<const ElementOut*>(bias)), nullptr, stride_c,
       static_cast<ElementOut*>(d), stride_d},
      hw};
  if constexpr (Swizzle > 1) args.scheduler.max_swizzle_size = Swizzle;
  return args;
}

template <class K, int Swizzle>
int workspace(int m, int n, int k, size_t* bytes) {
  // Stream-K's workspace size divides by the SM count: without a GPU whose count can be read, refuse (15)
  // instead of dividing by zero.  (The GEMM itself passes 0 on to CUTLASS, which then queries the count.)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || sm_count(device) <= 0) {
    cudaGetLastError();  // clear it: a later launch's own error check must not see it
    return 15;
  }
  auto args = make_arguments<K, Swizzle>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k);
  *bytes = K::Gemm::get_workspace_size(args);
  return 0;
}

template <class K, int Swizzle>
int run(const void* a_c, const void* e, const void* b, const float* scale_w, const float* scale_x,
        const void* bias, void* d, int m, int n, int k, void* ws, size_t ws_bytes, cudaStream_t stream) {
  typename K::Gemm gemm;
  auto args = make_arguments<K, Swizzle>(a_c, e, b, scale_w, scale_x, bias, d, m, n, k);
  if (K::Gemm::get_workspace_size(args) > ws_bytes) return 10;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 11;
  if (gemm.initialize(args, ws, stream) != cutlass::Status::kSuccess) return 12;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return 13;
  return cudaGetLastError() == cudaSuccess ? 0 : 14;
}

// ------------------------------------------------------------------------ per-token dynamic quantisation
// One block per row: absmax over the row, scale = max(absmax / 448, FLT_MIN) (1 for an all-zero row), then
// q = e4m3(clamp(x * (1 / scale), -448, 448)) rounded to nearest even (cvt.rn.satfinite).  Every step is one
// correctly rounded float32 operation, spelled with the _rn intrinsics (a division and a reciprocal per row, a
// multiplication per element that is never fused into anything), so cutlass_fp8.quantize_rows reproduces the codes
// bit for bit on any device whatever -prec-div says; subnormals are kept (-ftz=false, as the build sets).  FLT_MIN
// keeps 1 / scale finite for rows of tiny bf16 values.  Rows in [m, m_padded) are written as zeros with scale 1.
constexpr float kFp8Max = 448.0f;
constexpr int kQuantThreads = 256;

__device__ inline float to_float(cutlass::half_t v) { return float(v); }
__device__ inline float to_float(cutlass::bfloat16_t v) { return float(v); }

__global__ void quantize_rows(const ElementOut* __restrict__ x, __nv_fp8_e4m3* __restrict__ q,
                              float* __restrict__ scale, int m, int k, int64_t ld_x) {
  const int row = blockIdx.x;
  __nv_fp8_e4m3* q_row = q + int64_t(row) * k;
  if (row >= m) {  // padding row
    for (int i = threadIdx.x; i < k; i += blockDim.x) q_row[i] = __nv_fp8_e4m3(0.0f);
    if (threadIdx.x == 0) scale[row] = 1.0f;
    return;
  }
  const ElementOut* x_row = x + int64_t(row) * ld_x;
  float amax = 0.0f;
  // k % 8 == 0 and 16-byte aligned rows (checked by the caller): 8 elements per load
  const uint4* x_vec = reinterpret_cast<const uint4*>(x_row);
  const int k_vec = k / 8;
  for (int i = threadIdx.x; i < k_vec; i += blockDim.x) {
    uint4 raw = x_vec[i];
    const ElementOut* v = reinterpret_cast<const ElementOut*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(to_float(v[j])));
  }
  __shared__ float warp_max[kQuantThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    amax = threadIdx.x < blockDim.x / 32 ? warp_max[threadIdx.x] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
    if (threadIdx.x == 0) warp_max[0] = amax;
  }
  __syncthreads();
  amax = warp_max[0];
  const float s = amax > 0.0f ? fmaxf(__fdiv_rn(amax, kFp8Max), FLT_MIN) : 1.0f;
  const float inv_s = __frcp_rn(s);  // once per row: a multiplication per element instead of a division
  if (threadIdx.x == 0) scale[row] = s;
  uint2* q_vec = reinterpret_cast<uint2*>(q_row);
  for (int i = threadIdx.x; i < k_vec; i += blockDim.x) {
    uint4 raw = x_vec[i];
    const ElementOut* v = reinterpret_cast<const ElementOut*>(&raw);
    __nv_fp8_e4m3 out[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      out[j] = __nv_fp8_e4m3(fminf(fmaxf(__fmul_rn(to_float(v[j]), inv_s), -kFp8Max), kFp8Max));
    }
    q_vec[i] = *reinterpret_cast<uint2*>(out);
  }
}

}  // namespace hss_fp8

extern "C" {

// Error codes: 0 ok; 1 bad argument; 10 workspace too small; 11 shape not supported; 12 initialise failed;
// 13 launch failed; 14 CUDA error after launch; 15 no GPU to size the workspace for.

int hss_fp8_num_configs() { return hss_fp8::kNumConfigs; }

// Bits of the output dtype's storage and whether it is bf16 (1) or fp16 (0): the library's identity.
int hss_fp8_out_is_bf16() { return std::is_same_v<hss_fp8::ElementOut, cutlass::bfloat16_t> ? 1 : 0; }

// Elements (bytes) of the compressed A and bytes of the metadata E for an m x k e4m3 weight.
int hss_fp8_compressed_sizes(int m, int k, int64_t* a_elements, int64_t* e_bytes) {
  hss_fp8::ProblemShape shape{m, 128, k, 1};
  auto stride_a = cutlass::make_cute_packed_stride(hss_fp8::StrideA{}, make_shape(m, k, 1));
  hss_fp8::CompressorUtility util(shape, stride_a);
  *a_elements = int64_t(m) * util.get_tensorA_k_physical();
  *e_bytes = int64_t(util.get_metadata_m_physical()) * util.get_metadata_k_physical() *
             int64_t(cutlass::sizeof_bits<hss_fp8::ElementE>::value) / 8;
  return 0;
}

// Compresses a dense m x k row-major 2:4 e4m3 weight on the device.  a_c and e sized by hss_fp8_compressed_sizes.
int hss_fp8_compress(const void* a, void* a_c, void* e, int m, int k, void* ws, size_t ws_bytes, void* stream) {
  hss_fp8::ProblemShape shape{m, 128, k, 1};
  auto stride_a = cutlass::make_cute_packed_stride(hss_fp8::StrideA{}, make_shape(m, k, 1));
  int device = 0;
  cudaGetDevice(&device);
  cutlass::KernelHardwareInfo hw{device, hss_fp8::sm_count(device)};
  typename hss_fp8::Compressor::Arguments args{
      shape, {static_cast<const hss_fp8::Element*>(a), stride_a, static_cast<hss_fp8::Element*>(a_c),
              static_cast<hss_fp8::ElementE*>(e)}, {hw}};
  hss_fp8::Compressor op;
  if (hss_fp8::Compressor::get_workspace_size(args) > ws_bytes) return 10;
  if (op.can_implement(args) != cutlass::Status::kSuccess) return 11;
  if (op.initialize(args, ws, static_cast<cudaStream_t>(stream)) != cutlass::Status::kSuccess) return 12;
  if (op.run(static_cast<cudaStream_t>(stream)) != cutlass::Status::kSuccess) return 13;
  return cudaGetLastError() == cudaSuccess ? 0 : 14;
}

size_t hss_fp8_compress_workspace(int m, int k) {
  hss_fp8::ProblemShape shape{m, 128, k, 1};
  auto stride_a = cutlass::make_cute_packed_stride(hss_fp8::StrideA{}, make_shape(m, k, 1));
  typename hss_fp8::Compressor::Arguments args{shape, {nullptr, stride_a, nullptr, nullptr}, {}};
  return hss_fp8::Compressor::get_workspace_size(args);
}

#define HSS_FP8_DISPATCH(IDX, CONFIG) \
  case IDX:                           \
    return FN<hss_fp8::CONFIG::K, hss_fp8::CONFIG::swizzle> ARGS;

// Workspace bytes for one configuration on one problem.
int hss_fp8_gemm_workspace(int config, int m, int n, int k, size_t* bytes) {
#define FN hss_fp8::workspace
#define ARGS (m, n, k, bytes)
  switch (config) { HSS_FP8_CONFIGS(HSS_FP8_DISPATCH) }
#undef FN
#undef ARGS
  return 1;
}

// D = scale_w[m] * scale_x[n] * (A_c * B) + bias[m].  a_c/e: the compressed e4m3 weight (m x k); b: e4m3
// activations, n rows of k; scale_w: m floats; scale_x: n floats; bias: m elements of the output dtype or null;
// d: n rows of m elements of the output dtype.  All device pointers; stream is a cudaStream_t.
int hss_fp8_gemm(int config, const void* a_c, const void* e, const void* b, const float* scale_w,
                 const float* scale_x, const void* bias, void* d, int m, int n, int k, void* ws, size_t ws_bytes,
                 void* stream) {
  if (scale_w == nullptr || scale_x == nullptr) return 1;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#define FN hss_fp8::run
#define ARGS (a_c, e, b, scale_w, scale_x, bias, d, m, n, k, ws, ws_bytes, s)
  switch (config) { HSS_FP8_CONFIGS(HSS_FP8_DISPATCH) }
#undef FN
#undef ARGS
  return 1;
}

// Per-token quantisation: x (m rows of k elements of the output dtype, row stride ld_x elements) into q
// (m_padded rows of k e4m3, contiguous) and scale (m_padded floats); rows m..m_padded-1 become zeros with
// scale 1.  Needs k % 8 == 0, ld_x % 8 == 0 and a 16-byte aligned x.
int hss_fp8_quantize(const void* x, void* q, float* scale, int m, int m_padded, int k, int64_t ld_x,
                     void* stream) {
  if (k % 8 || ld_x % 8 || reinterpret_cast<uintptr_t>(x) % 16 || m_padded < m || m < 0) return 1;
  if (m_padded == 0) return 0;
  hss_fp8::quantize_rows<<<m_padded, hss_fp8::kQuantThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const hss_fp8::ElementOut*>(x), static_cast<__nv_fp8_e4m3*>(q), scale, m, k, ld_x);
  return cudaGetLastError() == cudaSuccess ? 0 : 14;
}

}  // extern "C"
