// Torch bindings of the CUDA kernels (built lazily by compress.kernels.build). Every entry checks
// its inputs and the launch's status; callers in Python decide when a kernel applies, fall back to
// the reference op otherwise, and pass the current stream (and the device's SM count) so that this
// file needs only torch/extension.h and the CUDA runtime header.
#include <torch/extension.h>
#include <cuda_runtime.h>

int compress_lut_gemm_launch(const void* x, int dtype, const uint8_t* kplanes, const void* alpha, const float* offset,
                             float* out, int B, int N, int K, int q, int group, cudaStream_t stream);
int compress_sparse24_launch(const void* x, int dtype, const void* values, const uint8_t* meta, const void* bias, void* out,
                             int B, int N, int K, int sm_count, cudaStream_t stream);

namespace {

int dtype_code(const torch::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == torch::kHalf || t.scalar_type() == torch::kBFloat16,
              "activations must be float16 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == torch::kHalf ? 0 : 1;
}

void check_cuda(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

// x [B, K] (fp16/bf16), kplanes uint8 [q, KT, N, 16], alpha fp16 [q, G, N], offset fp32 [G, N] -> float32 [B, N]
torch::Tensor lut_gemm(torch::Tensor x, torch::Tensor kplanes, torch::Tensor alpha, torch::Tensor offset, int64_t K, int64_t group,
                       int64_t stream) {
  check_cuda(x, "x");
  check_cuda(kplanes, "kplanes");
  check_cuda(alpha, "alpha");
  check_cuda(offset, "offset");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [B, K] with K = ", K);
  TORCH_CHECK(kplanes.scalar_type() == torch::kUInt8 && kplanes.dim() == 4 && kplanes.size(3) == 16, "kplanes must be uint8 [q, KT, N, 16]");
  TORCH_CHECK(alpha.scalar_type() == torch::kHalf && offset.scalar_type() == torch::kFloat, "alpha must be float16 and offset float32");
  const int q = static_cast<int>(kplanes.size(0));
  const int N = static_cast<int>(kplanes.size(2));
  TORCH_CHECK(kplanes.size(1) == (K + 127) / 128, "kplanes has ", kplanes.size(1), " K tiles, expected ", (K + 127) / 128);
  TORCH_CHECK(alpha.size(0) == q && alpha.size(1) == K / group && alpha.size(2) == N, "alpha must be [q, K/group, N]");
  TORCH_CHECK(offset.size(0) == K / group && offset.size(1) == N, "offset must be [K/group, N]");
  auto out = torch::zeros({x.size(0), N}, x.options().dtype(torch::kFloat));
  const int err = compress_lut_gemm_launch(x.data_ptr(), dtype_code(x), kplanes.data_ptr<uint8_t>(), alpha.data_ptr(), offset.data_ptr<float>(),
                                           out.data_ptr<float>(), static_cast<int>(x.size(0)), N, static_cast<int>(K), q, static_cast<int>(group),
                                           reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == 0, "lut_gemm launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

// x [B, K], values [N, K/2] (same dtype as x), meta uint8 [N, K/8], bias [N] or empty -> [B, N] in x's dtype
torch::Tensor sparse24_gemm(torch::Tensor x, torch::Tensor values, torch::Tensor meta, c10::optional<torch::Tensor> bias, int64_t sms,
                            int64_t stream) {
  check_cuda(x, "x");
  check_cuda(values, "values");
  check_cuda(meta, "meta");
  TORCH_CHECK(x.dim() == 2 && values.dim() == 2 && meta.dim() == 2, "x, values and meta must be 2-D");
  const int64_t K = x.size(1);
  const int64_t N = values.size(0);
  TORCH_CHECK(values.size(1) * 2 == K && meta.size(0) == N && meta.size(1) * 8 == K, "values must be [N, K/2] and meta [N, K/8]");
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "values must have x's dtype");
  TORCH_CHECK(meta.scalar_type() == torch::kUInt8, "meta must be uint8");
  const void* bptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    check_cuda(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->numel() == N, "bias must be [N] in x's dtype");
    bptr = bias->data_ptr();
  }
  auto out = torch::empty({x.size(0), N}, x.options());
  const int err = compress_sparse24_launch(x.data_ptr(), dtype_code(x), values.data_ptr(), meta.data_ptr<uint8_t>(), bptr, out.data_ptr(),
                                           static_cast<int>(x.size(0)), static_cast<int>(N), static_cast<int>(K), static_cast<int>(sms),
                                           reinterpret_cast<cudaStream_t>(stream));
  TORCH_CHECK(err == 0, "sparse24 launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lut_gemm", &lut_gemm, "LUT-GEMM for BCQ weights (float32 output)");
  m.def("sparse24_gemm", &sparse24_gemm, "2:4 sparse x dense for small batches");
}
