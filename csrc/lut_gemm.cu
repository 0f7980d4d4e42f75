// LUT-GEMM for binary-coding-quantized (BCQ) weights: y = x Wᵀ with
//   W[m, j] = offset[g(j), m] + Σ_i alpha[i, g(j), m] · (2·bit_i(m, j) − 1),   g(j) = j / group.
// No dequantization: per thread block, every chunk of 8 activations gets a table of its 256 signed
// sums (±x0 ± … ± x7) in shared memory, and a packed weight byte indexes the table directly.
//
// Kernel layout (built from BCQLinear's storage by compress.kernels.layout, exactly):
//   kplanes: uint8 [q][KT][N][16]   KT = ceil(K / 128); byte c of (i, t, m) holds the signs of plane i,
//            row m, inputs t·128 + 8c … +7 (bit s = input +s, 1 = +1); bytes past K are 0.
//   alpha:   half  [q][G][N]        G = K / group
//   offset:  float [G][N]
// Grid: (ceil(N / 256), KT); one thread per output row, one K tile of 128 inputs per block. Partial
// sums are added to a float32 output [B][N] (zeroed by the caller) with atomicAdd.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

namespace {

constexpr int kTile = 128;             // inputs per block
constexpr int kChunks = kTile / 8;     // LUT chunks per tile (one packed byte each)
constexpr int kRows = 256;             // threads (= output rows) per block
constexpr int kBatchPerPass = 2;       // batch elements whose tables share the shared memory at once
constexpr int kMaxBits = 4;

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__global__ void __launch_bounds__(kRows) lut_gemm_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ kplanes, const __half* __restrict__ alpha,
    const float* __restrict__ offset, float* __restrict__ out, int B, int N, int K, int q, int group) {
  __shared__ float lut[kBatchPerPass][kChunks][256];
  __shared__ float xs[kBatchPerPass][kTile];
  __shared__ float csum[kBatchPerPass][kChunks];

  const int tid = threadIdx.x;
  const int m = blockIdx.x * kRows + tid;
  const int t = blockIdx.y;
  const int k0 = t * kTile;
  const int KT = gridDim.y;
  const int valid_chunks = min(kChunks, (K - k0) / 8);  // K is a multiple of 8
  const int G = K / group;

  // this row's packed signs for the tile: 16 bytes per plane, one 16-byte load each
  uint4 w[kMaxBits];
#pragma unroll
  for (int i = 0; i < kMaxBits; ++i) {
    w[i] = make_uint4(0, 0, 0, 0);
    if (i < q && m < N) {
      w[i] = *reinterpret_cast<const uint4*>(kplanes + ((static_cast<size_t>(i) * KT + t) * N + m) * 16);
    }
  }

  for (int b0 = 0; b0 < B; b0 += kBatchPerPass) {
    const int nb = min(kBatchPerPass, B - b0);
    __syncthreads();  // the previous pass's tables are no longer read
    for (int idx = tid; idx < kBatchPerPass * kTile; idx += kRows) {
      const int bb = idx / kTile, j = idx % kTile;
      const int k = k0 + j;
      xs[bb][j] = (bb < nb && k < K) ? to_float(x[static_cast<size_t>(b0 + bb) * K + k]) : 0.0f;
    }
    __syncthreads();
    // tables: thread e builds entry e of every chunk (conflict-free stores)
    for (int bb = 0; bb < nb; ++bb) {
#pragma unroll 4
      for (int c = 0; c < kChunks; ++c) {
        float s = 0.0f;
#pragma unroll
        for (int u = 0; u < 8; ++u) {
          const float v = xs[bb][c * 8 + u];
          s += ((tid >> u) & 1) ? v : -v;
        }
        lut[bb][c][tid] = s;
      }
      if (tid < kChunks) {
        float s = 0.0f;
#pragma unroll
        for (int u = 0; u < 8; ++u) s += xs[bb][tid * 8 + u];
        csum[bb][tid] = s;
      }
    }
    __syncthreads();
    if (m >= N) continue;

    for (int bb = 0; bb < nb; ++bb) {
      float y = 0.0f;
      float acc[kMaxBits];
#pragma unroll
      for (int i = 0; i < kMaxBits; ++i) acc[i] = 0.0f;
      float xsum = 0.0f;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        if (c < valid_chunks) {
#pragma unroll
          for (int i = 0; i < kMaxBits; ++i) {
            if (i < q) {
              const uint32_t word = c < 4 ? w[i].x : c < 8 ? w[i].y : c < 12 ? w[i].z : w[i].w;
              const uint32_t byte = (word >> (8 * (c & 3))) & 0xFFu;
              acc[i] += lut[bb][c][byte];
            }
          }
          xsum += csum[bb][c];
          const int k_end = k0 + 8 * (c + 1);
          // flush at the end of a group or of the valid part of the tile
          if (k_end % group == 0 || c == valid_chunks - 1) {
            const int g = (k_end - 1) / group;
            float part = offset[static_cast<size_t>(g) * N + m] * xsum;
#pragma unroll
            for (int i = 0; i < kMaxBits; ++i) {
              if (i < q) part += __half2float(alpha[(static_cast<size_t>(i) * G + g) * N + m]) * acc[i];
              acc[i] = 0.0f;
            }
            y += part;
            xsum = 0.0f;
          }
        }
      }
      atomicAdd(out + static_cast<size_t>(b0 + bb) * N + m, y);
    }
  }
}

}  // namespace

// Returns a cudaError_t as int (0 = success). dtype: 0 = float16, 1 = bfloat16.
int compress_lut_gemm_launch(const void* x, int dtype, const uint8_t* kplanes, const void* alpha, const float* offset,
                             float* out, int B, int N, int K, int q, int group, cudaStream_t stream) {
  if (B < 1 || q < 1 || q > kMaxBits || group % 8 != 0 || K % group != 0 || K % 8 != 0) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid((N + kRows - 1) / kRows, (K + kTile - 1) / kTile);
  const dim3 block(kRows);
  const __half* a = static_cast<const __half*>(alpha);
  if (dtype == 0) {
    lut_gemm_kernel<__half><<<grid, block, 0, stream>>>(static_cast<const __half*>(x), kplanes, a, offset, out, B, N, K, q, group);
  } else {
    lut_gemm_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), kplanes, a, offset, out, B, N, K, q, group);
  }
  return static_cast<int>(cudaGetLastError());
}
