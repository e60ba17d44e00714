// The CUDA span search: one thread block per row; the top-k spans are found on the device in k
// rounds of a block-wide argmax (round r takes the best span ranked after round r-1's), so the
// result follows span_before exactly and matches the C++ decoder bit for bit.
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <string>

#include "spanrt/span_search.h"

namespace spanrt {
namespace {

[[noreturn]] void throw_cuda_error(cudaError_t error, const char* expression, const char* file,
                                   int line) {
  (void)cudaGetLastError();  // clear a non-sticky error so later calls start clean
  std::string message = std::string(expression) + " failed (" + file + ":" + std::to_string(line) +
                        "): " + cudaGetErrorName(error) + ": " + cudaGetErrorString(error);
  if (error == cudaErrorNoDevice || error == cudaErrorInsufficientDriver ||
      error == cudaErrorInitializationError || error == cudaErrorNoKernelImageForDevice ||
      error == cudaErrorUnsupportedPtxVersion) {
    throw CudaUnavailableError(
        message +
        ". The CUDA decoder needs an NVIDIA GPU, a driver for this CUDA version and a build for "
        "its architecture (CMAKE_CUDA_ARCHITECTURES).");
  }
  throw std::runtime_error(message);
}

#define SPANRT_CUDA_CHECK(expression)                                       \
  do {                                                                      \
    const cudaError_t spanrt_error_ = (expression);                         \
    if (spanrt_error_ != cudaSuccess) {                                     \
      throw_cuda_error(spanrt_error_, #expression, __FILE__, __LINE__);     \
    }                                                                       \
  } while (0)

cudaStream_t as_stream(intptr_t handle) {
  if (handle == 1) return cudaStreamLegacy;
  if (handle == 2) return cudaStreamPerThread;
  return reinterpret_cast<cudaStream_t>(handle);
}

struct BetterSpan {
  __device__ Span operator()(const Span& a, const Span& b) const {
    return span_before(a, b) ? a : b;
  }
};

struct MaxValue {
  __device__ float operator()(float a, float b) const { return a > b ? a : b; }
};

constexpr int kNoNanRow = 0x7f7f7f7f;  // what cudaMemsetAsync(..., 0x7f, 4) leaves

// log-sum-exp of one row's logits over mask | {0}; every thread of the block gets the result.
template <int kThreads>
__device__ float block_lse(const SpanSearchParams& p, const void* logits, int64_t row,
                           typename cub::BlockReduce<float, kThreads>::TempStorage& temp,
                           float& broadcast) {
  using Reduce = cub::BlockReduce<float, kThreads>;
  const int64_t offset = row * p.seq_len;
  float maximum = negative_infinity();
  int saw_nan = 0;
  for (int64_t i = threadIdx.x; i < p.seq_len; i += kThreads) {
    if (!in_lse(i, p.mask[offset + i] != 0)) continue;
    const float x = load_logit(logits, p.logit_type, offset + i);
    saw_nan |= isnan(x) ? 1 : 0;
    maximum = x > maximum ? x : maximum;
  }
  saw_nan = __syncthreads_or(saw_nan);
  maximum = Reduce(temp).Reduce(maximum, MaxValue());
  if (threadIdx.x == 0) broadcast = maximum;
  __syncthreads();
  maximum = broadcast;
  float sum = 0.0f;
  if (!saw_nan && maximum > negative_infinity() && !isinf(maximum)) {
    for (int64_t i = threadIdx.x; i < p.seq_len; i += kThreads) {
      if (in_lse(i, p.mask[offset + i] != 0)) {
        sum += lse_term(load_logit(logits, p.logit_type, offset + i), maximum);
      }
    }
  }
  __syncthreads();  // temp is reused
  sum = Reduce(temp).Sum(sum);
  __syncthreads();
  return lse_finish(maximum, sum, saw_nan != 0);
}

// This thread's best span of a row that ranks after `previous` (all spans when first_round).
// Pairs (start, start + offset) are dealt to threads round-robin, so every thread gets the same
// share whatever the mask.
template <typename Index>
__device__ Span thread_best(const SpanSearchParams& p, const float* start, const float* end,
                            Index window, Index pairs, bool first_round, const Span& previous,
                            int threads) {
  Span best = no_span();
  for (Index q = threadIdx.x; q < pairs; q += threads) {
    const Index i = q / window;
    const Index j = i + (q - i * window);
    if (static_cast<int64_t>(j) > last_end(i, p.max_answer_len, p.seq_len)) continue;
    const Span candidate{span_score(start[i], end[j]), static_cast<int32_t>(i),
                         static_cast<int32_t>(j)};
    if (!is_valid_score(candidate.score)) continue;
    if (!first_round && !span_before(previous, candidate)) continue;
    if (span_before(candidate, best)) best = candidate;
  }
  return best;
}

// One block per row. `row_buffers` is null when the row's logits fit in shared memory, else a
// global buffer of [batch, 2, seq_len] floats.
template <int kThreads>
__global__ void __launch_bounds__(kThreads)
    span_search_kernel(SpanSearchParams p, float* row_buffers, int* nan_row) {
  using SpanReduce = cub::BlockReduce<Span, kThreads>;
  using ValueReduce = cub::BlockReduce<float, kThreads>;
  __shared__ union {
    typename SpanReduce::TempStorage span;
    typename ValueReduce::TempStorage value;
  } temp;
  __shared__ Span chosen;
  __shared__ float broadcast;
  extern __shared__ float shared_rows[];

  const int64_t row = blockIdx.x;
  const int64_t n = p.seq_len;
  const int64_t offset = row * n;
  float* start = row_buffers != nullptr ? row_buffers + 2 * offset : shared_rows;
  float* end = start + n;

  int saw_nan = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float s = load_logit(p.start_logits, p.logit_type, offset + i);
    const float e = load_logit(p.end_logits, p.logit_type, offset + i);
    const bool in_mask = p.mask[offset + i] != 0;
    saw_nan |= is_nan_in_mask(s, e, in_mask) ? 1 : 0;
    start[i] = masked_logit(s, in_mask);
    end[i] = masked_logit(e, in_mask);
  }
  if (saw_nan) atomicMin(nan_row, static_cast<int>(row));
  __syncthreads();

  if (p.start_lse != nullptr) {
    const float lse = block_lse<kThreads>(p, p.start_logits, row, temp.value, broadcast);
    if (threadIdx.x == 0) p.start_lse[row] = lse;
  }
  if (p.end_lse != nullptr) {
    const float lse = block_lse<kThreads>(p, p.end_logits, row, temp.value, broadcast);
    if (threadIdx.x == 0) p.end_lse[row] = lse;
  }
  if (p.null_scores != nullptr && threadIdx.x == 0) {
    p.null_scores[row] = span_score(load_logit(p.start_logits, p.logit_type, offset),
                                    load_logit(p.end_logits, p.logit_type, offset));
  }

  const int64_t window = p.max_answer_len < n ? p.max_answer_len : n;
  const int64_t pairs = n * window;
  const bool narrow = pairs < (int64_t{1} << 31);  // 32-bit index arithmetic is much cheaper
  Span previous = no_span();
  for (int64_t rank = 0; rank < p.top_k; ++rank) {
    const bool first_round = rank == 0;
    const Span mine =
        narrow ? thread_best<uint32_t>(p, start, end, static_cast<uint32_t>(window),
                                       static_cast<uint32_t>(pairs), first_round, previous,
                                       kThreads)
               : thread_best<int64_t>(p, start, end, window, pairs, first_round, previous,
                                      kThreads);
    const Span best = SpanReduce(temp.span).Reduce(mine, BetterSpan());
    if (threadIdx.x == 0) chosen = best;
    __syncthreads();
    previous = chosen;
    __syncthreads();  // `chosen` and `temp` are written again next round
    if (!is_valid_score(previous.score)) {  // no span left: fill the rest (uniform branch)
      for (int64_t r = rank + threadIdx.x; r < p.top_k; r += kThreads) write_span(p, row, r, no_span());
      return;
    }
    if (threadIdx.x == 0) write_span(p, row, rank, previous);
  }
}

// Makes `device` current for the scope of one call and restores the caller's device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    SPANRT_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) SPANRT_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { (void)cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Device scratch for one call, allocated and freed in stream order where the device has memory
// pools (cudaMallocAsync) and with cudaMalloc/cudaFree elsewhere (same result, more overhead).
class StreamBuffer {
 public:
  StreamBuffer(size_t bytes, cudaStream_t stream, int device) : stream_(stream) {
    int pools = 0;
    SPANRT_CUDA_CHECK(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device));
    pooled_ = pools != 0;
    if (pooled_) {
      SPANRT_CUDA_CHECK(cudaMallocAsync(&data_, bytes, stream));
    } else {
      SPANRT_CUDA_CHECK(cudaMalloc(&data_, bytes));
    }
  }
  ~StreamBuffer() {
    if (pooled_) {
      (void)cudaFreeAsync(data_, stream_);
    } else {
      (void)cudaFree(data_);
    }
  }
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  char* data() const { return static_cast<char*>(data_); }

 private:
  void* data_ = nullptr;
  cudaStream_t stream_;
  bool pooled_ = false;
};

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

template <int kThreads>
void launch(const SpanSearchParams& p, float* row_buffers, int* nan_row, size_t shared_bytes,
            cudaStream_t stream) {
  span_search_kernel<kThreads>
      <<<static_cast<unsigned int>(p.batch), kThreads, shared_bytes, stream>>>(p, row_buffers,
                                                                              nan_row);
  SPANRT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

int cuda_pointer_device(const void* pointer) {
  cudaPointerAttributes attributes{};
  SPANRT_CUDA_CHECK(cudaPointerGetAttributes(&attributes, pointer));
  if (attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged) {
    return attributes.device;
  }
  return -1;
}

int64_t span_search_cuda(const SpanSearchParams& params, const CudaLaunch& launch_options) {
  if (params.batch == 0) return -1;
  DeviceGuard guard(launch_options.device);
  const cudaStream_t stream = as_stream(launch_options.stream);

  // Stream-ordered hand-off from the streams that wrote the inputs (CAI v3 "stream").
  for (int w = 0; w < launch_options.num_wait_for; ++w) {
    const intptr_t producer = launch_options.wait_for[w];
    if (producer == launch_options.stream) continue;
    cudaEvent_t ready;
    SPANRT_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    const cudaError_t recorded = cudaEventRecord(ready, as_stream(producer));
    const cudaError_t waited =
        recorded == cudaSuccess ? cudaStreamWaitEvent(stream, ready, 0) : recorded;
    (void)cudaEventDestroy(ready);
    SPANRT_CUDA_CHECK(waited);
  }

  const int64_t b = params.batch;
  const int64_t k = params.top_k;
  const int64_t n = params.seq_len;
  const size_t shared_bytes = 2 * static_cast<size_t>(n) * sizeof(float);
  // Dynamic shared memory plus the kernel's static reduction storage must stay within the 48 KiB
  // a block gets without opting in; longer rows (S > 5120) use a global buffer instead.
  const bool rows_in_shared = shared_bytes <= 40 * 1024;
  const bool host_out = launch_options.outputs_on_host;

  size_t bytes = align_up(sizeof(int));  // NaN row flag
  const size_t spans_at = bytes;
  if (host_out) bytes += align_up(sizeof(int64_t) * 2 * b * k);
  const size_t scores_at = bytes;
  if (host_out) bytes += align_up(sizeof(float) * b * k);
  const size_t extras_at = bytes;  // start_lse, end_lse, null_scores: [3, batch]
  if (host_out) bytes += align_up(sizeof(float) * 3 * b);
  const size_t rows_at = bytes;
  if (!rows_in_shared) bytes += align_up(shared_bytes * b);
  StreamBuffer scratch(bytes, stream, launch_options.device);

  int* nan_row = reinterpret_cast<int*>(scratch.data());
  SPANRT_CUDA_CHECK(cudaMemsetAsync(nan_row, 0x7f, sizeof(int), stream));
  SpanSearchParams device_params = params;
  float* extras = reinterpret_cast<float*>(scratch.data() + extras_at);
  if (host_out) {
    device_params.spans = reinterpret_cast<int64_t*>(scratch.data() + spans_at);
    device_params.scores = reinterpret_cast<float*>(scratch.data() + scores_at);
    device_params.start_lse = params.start_lse != nullptr ? extras : nullptr;
    device_params.end_lse = params.end_lse != nullptr ? extras + b : nullptr;
    device_params.null_scores = params.null_scores != nullptr ? extras + 2 * b : nullptr;
  }
  float* row_buffers = rows_in_shared ? nullptr : reinterpret_cast<float*>(scratch.data() + rows_at);
  const size_t dynamic_shared = rows_in_shared ? shared_bytes : 0;
  const int64_t window = params.max_answer_len < n ? params.max_answer_len : n;
  if (n * window <= 4096) {
    launch<128>(device_params, row_buffers, nan_row, dynamic_shared, stream);
  } else {
    launch<256>(device_params, row_buffers, nan_row, dynamic_shared, stream);
  }

  if (host_out) {
    SPANRT_CUDA_CHECK(cudaMemcpyAsync(params.spans, device_params.spans,
                                      sizeof(int64_t) * 2 * b * k, cudaMemcpyDeviceToHost, stream));
    SPANRT_CUDA_CHECK(cudaMemcpyAsync(params.scores, device_params.scores, sizeof(float) * b * k,
                                      cudaMemcpyDeviceToHost, stream));
    const std::pair<float*, float*> extra_outputs[] = {
        {params.start_lse, device_params.start_lse},
        {params.end_lse, device_params.end_lse},
        {params.null_scores, device_params.null_scores}};
    for (const auto& [host, device] : extra_outputs) {
      if (host != nullptr) {
        SPANRT_CUDA_CHECK(
            cudaMemcpyAsync(host, device, sizeof(float) * b, cudaMemcpyDeviceToHost, stream));
      }
    }
  }
  int first_nan_row = kNoNanRow;
  SPANRT_CUDA_CHECK(
      cudaMemcpyAsync(&first_nan_row, nan_row, sizeof(int), cudaMemcpyDeviceToHost, stream));
  SPANRT_CUDA_CHECK(cudaStreamSynchronize(stream));
  return first_nan_row == kNoNanRow ? -1 : first_nan_row;
}

}  // namespace spanrt
