// 2:4 sparse × dense product for decode batch sizes: y[b, m] = Σ_k W[m, k] x[b, k] with W in the
// compressed 2:4 form of compress.solvers.sparse24:
//   values: T [N][K/2]   (the two kept values of each group of 4, in position order)
//   meta:   uint8 [N][K/8]  (per group a 4-bit code i0 | i1 << 2; group 2j in the low nibble of byte j)
// Each value and metadata byte is read once. One warp per output row (grid-stride over rows); each
// lane takes chunks of 8 groups (32 inputs): two 16-byte loads of values and one 4-byte load of
// metadata, then gathers the activations at the kept positions (L1-cached). Batch ≤ 16 with
// per-lane float accumulators, reduced across the warp by shuffles. Needs K % 32 == 0 (the caller
// falls back to the reference op otherwise).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxBatch = 16;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int BT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) sparse24_kernel(
    const T* __restrict__ x, const T* __restrict__ values, const uint8_t* __restrict__ meta, const T* __restrict__ bias,
    T* __restrict__ out, int B, int N, int K) {
  const int lane = threadIdx.x & 31;
  const int warp = (blockIdx.x * kWarpsPerBlock) + (threadIdx.x >> 5);
  const int n_warps = gridDim.x * kWarpsPerBlock;
  const int chunks = K / 32;
  for (int m = warp; m < N; m += n_warps) {
    float acc[BT];
#pragma unroll
    for (int b = 0; b < BT; ++b) acc[b] = 0.0f;
    const T* vrow = values + static_cast<size_t>(m) * (K / 2);
    const uint8_t* mrow = meta + static_cast<size_t>(m) * (K / 8);
    for (int c = lane; c < chunks; c += 32) {
      const uint4 v0 = *reinterpret_cast<const uint4*>(vrow + c * 16);
      const uint4 v1 = *reinterpret_cast<const uint4*>(vrow + c * 16 + 8);
      const uint32_t mw = *reinterpret_cast<const uint32_t*>(mrow + c * 4);
      const T* vals0 = reinterpret_cast<const T*>(&v0);
      const T* vals1 = reinterpret_cast<const T*>(&v1);
#pragma unroll
      for (int gi = 0; gi < 8; ++gi) {
        const uint32_t code = (mw >> (4 * gi)) & 0xFu;  // group gi of the chunk: byte gi/2, nibble gi%2
        const int k = c * 32 + gi * 4;
        const int p0 = k + (code & 3u), p1 = k + ((code >> 2) & 3u);
        const float w0 = to_float(gi < 4 ? vals0[2 * gi] : vals1[2 * (gi - 4)]);
        const float w1 = to_float(gi < 4 ? vals0[2 * gi + 1] : vals1[2 * (gi - 4) + 1]);
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          if (b < B) {
            const T* xb = x + static_cast<size_t>(b) * K;
            acc[b] += w0 * to_float(__ldg(xb + p0)) + w1 * to_float(__ldg(xb + p1));
          }
        }
      }
    }
#pragma unroll
    for (int b = 0; b < BT; ++b) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], off);
    }
    if (lane == 0) {
      const float bv = bias != nullptr ? to_float(bias[m]) : 0.0f;
#pragma unroll
      for (int b = 0; b < BT; ++b) {
        if (b < B) out[static_cast<size_t>(b) * N + m] = from_float<T>(acc[b] + bv);
      }
    }
  }
}

template <typename T, int BT>
void launch(const void* x, const void* values, const uint8_t* meta, const void* bias, void* out, int B, int N, int K,
            int blocks, cudaStream_t stream) {
  sparse24_kernel<T, BT><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(values), meta, static_cast<const T*>(bias), static_cast<T*>(out), B, N, K);
}

template <typename T>
void dispatch(const void* x, const void* values, const uint8_t* meta, const void* bias, void* out, int B, int N, int K,
              int blocks, cudaStream_t stream) {
  if (B <= 1) launch<T, 1>(x, values, meta, bias, out, B, N, K, blocks, stream);
  else if (B <= 2) launch<T, 2>(x, values, meta, bias, out, B, N, K, blocks, stream);
  else if (B <= 4) launch<T, 4>(x, values, meta, bias, out, B, N, K, blocks, stream);
  else if (B <= 8) launch<T, 8>(x, values, meta, bias, out, B, N, K, blocks, stream);
  else launch<T, kMaxBatch>(x, values, meta, bias, out, B, N, K, blocks, stream);
}

}  // namespace

// Returns a cudaError_t as int (0 = success). dtype: 0 = float16, 1 = bfloat16. bias may be null.
int compress_sparse24_launch(const void* x, int dtype, const void* values, const uint8_t* meta, const void* bias, void* out,
                             int B, int N, int K, int sm_count, cudaStream_t stream) {
  if (B < 1 || B > kMaxBatch || K % 32 != 0) return static_cast<int>(cudaErrorInvalidValue);
  const int needed = (N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int blocks = needed < sm_count * 16 ? needed : sm_count * 16;
  if (dtype == 0) dispatch<__half>(x, values, meta, bias, out, B, N, K, blocks, stream);
  else dispatch<__nv_bfloat16>(x, values, meta, bias, out, B, N, K, blocks, stream);
  return static_cast<int>(cudaGetLastError());
}
