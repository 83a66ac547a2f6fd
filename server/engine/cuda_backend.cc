// Host-compiled against the CUDA runtime, cuSOLVER and cuBLAS; no kernels of
// our own, so no nvcc. See cuda_backend.h for the scheme.
#include "server/engine/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cusolverDn.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <list>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

// cusolverDnXsyevBatched appeared in CUDA 12.6 (server/engine/README.md).
#if !defined(CUSOLVER_VERSION) || CUSOLVER_VERSION < 11700
#error "the CUDA backend needs cuSOLVER from CUDA >= 12.6 (cusolverDnXsyevBatched)"
#endif

namespace natgrad::engine {
namespace {

absl::Status CudaOk(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();  // clear the sticky-free error so later calls start clean
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")"));
}

absl::Status SolverOk(cusolverStatus_t s, const char* what) {
  if (s == CUSOLVER_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cusolverStatus ", static_cast<int>(s)));
}

absl::Status BlasOk(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cublasGetStatusName(s), " (", cublasGetStatusString(s), ")"));
}

#define NG_RETURN_IF_ERROR(expr)             \
  do {                                       \
    if (absl::Status _s = (expr); !_s.ok()) { \
      return _s;                             \
    }                                        \
  } while (0)

template <typename Scalar>
constexpr cudaDataType CudaType() {
  return std::is_same_v<Scalar, float> ? CUDA_R_32F : CUDA_R_64F;
}

size_t NextPow2(size_t v) {
  size_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Device and pinned host buffers for one (kind, dtype, n, capacity).
struct Workspace {
  DecompositionKind kind;
  bool is_double;
  int64_t n;
  int64_t capacity;  // matrices

  void* d_a = nullptr;     // inputs; eigenvectors (eigh) or L (Cholesky)
  void* d_b = nullptr;     // Cholesky: the inverses
  void* d_eye = nullptr;   // Cholesky: capacity identities, copied to d_b
  void* d_w = nullptr;     // eigh: eigenvalues
  int* d_info = nullptr;
  void** d_ptrs = nullptr;  // Cholesky: [A pointers | B pointers]
  void* d_work = nullptr;
  size_t d_work_bytes = 0;
  std::vector<char> h_work;  // syevBatched host workspace

  void* h_a = nullptr;  // pinned staging, matrices both ways
  void* h_w = nullptr;  // pinned eigenvalues
  int* h_info = nullptr;

  ~Workspace() {
    for (void* p : {d_a, d_b, d_eye, d_w, static_cast<void*>(d_info),
                    static_cast<void*>(d_ptrs), d_work}) {
      if (p) cudaFree(p);
    }
    for (void* p : {h_a, h_w, static_cast<void*>(h_info)}) {
      if (p) cudaFreeHost(p);
    }
  }
};

}  // namespace

struct CudaBackend::Impl {
  CudaBackendOptions options;
  std::string description;
  cudaStream_t stream = nullptr;
  cusolverDnHandle_t solver = nullptr;
  cusolverDnParams_t params = nullptr;
  cublasHandle_t blas = nullptr;
  std::mutex mu;  // one batch at a time: the stream and buffers are shared
  std::list<Workspace> cache;  // most recently used first
  std::atomic<int64_t> cpu_fallbacks{0};

  ~Impl() {
    cudaSetDevice(options.device);
    if (stream) cudaStreamSynchronize(stream);
    cache.clear();
    if (params) cusolverDnDestroyParams(params);
    if (solver) cusolverDnDestroy(solver);
    if (blas) cublasDestroy(blas);
    if (stream) cudaStreamDestroy(stream);
  }

  template <typename Scalar>
  absl::StatusOr<Workspace*> GetWorkspace(DecompositionKind kind, int64_t n,
                                          int64_t batch);
  template <typename Scalar>
  void Run(DecompositionKind kind, absl::Span<BatchJob<Scalar>> jobs);
  template <typename Scalar>
  absl::Status RunChunk(DecompositionKind kind, int64_t n,
                        std::vector<BatchJob<Scalar>*>& chunk);
  template <typename Scalar>
  void FallBackToCpu(DecompositionKind kind, BatchJob<Scalar>& job,
                     MatrixX<Scalar> prepared, const absl::Status& why);
};

template <typename Scalar>
absl::StatusOr<Workspace*> CudaBackend::Impl::GetWorkspace(DecompositionKind kind,
                                                           int64_t n, int64_t batch) {
  constexpr bool kDouble = std::is_same_v<Scalar, double>;
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    if (it->kind == kind && it->is_double == kDouble && it->n == n && it->capacity >= batch) {
      cache.splice(cache.begin(), cache, it);
      return &cache.front();
    }
  }
  while (static_cast<int>(cache.size()) >= std::max(1, options.max_cached_workspaces)) {
    cache.pop_back();
  }
  cache.emplace_front();
  Workspace& ws = cache.front();
  ws.kind = kind;
  ws.is_double = kDouble;
  ws.n = n;
  ws.capacity = static_cast<int64_t>(NextPow2(static_cast<size_t>(batch)));
  // Never round past the INT32 element limit the caller split for.
  ws.capacity = std::min<int64_t>(ws.capacity, std::max<int64_t>(batch, INT32_MAX / (n * n)));
  const size_t mat_bytes = sizeof(Scalar) * static_cast<size_t>(n * n);
  const size_t all_bytes = mat_bytes * static_cast<size_t>(ws.capacity);
  absl::Status s = CudaOk(cudaMalloc(&ws.d_a, all_bytes), "cudaMalloc(A)");
  if (s.ok()) s = CudaOk(cudaMalloc(reinterpret_cast<void**>(&ws.d_info),
                                    sizeof(int) * ws.capacity), "cudaMalloc(info)");
  if (s.ok()) s = CudaOk(cudaMallocHost(&ws.h_a, all_bytes), "cudaMallocHost(A)");
  if (s.ok()) s = CudaOk(cudaMallocHost(reinterpret_cast<void**>(&ws.h_info),
                                        sizeof(int) * ws.capacity), "cudaMallocHost(info)");
  if (s.ok() && kind == DecompositionKind::kEigh) {
    const size_t w_bytes = sizeof(Scalar) * static_cast<size_t>(n * ws.capacity);
    s = CudaOk(cudaMalloc(&ws.d_w, w_bytes), "cudaMalloc(W)");
    if (s.ok()) s = CudaOk(cudaMallocHost(&ws.h_w, w_bytes), "cudaMallocHost(W)");
  }
  if (s.ok() && kind == DecompositionKind::kCholeskyInverse) {
    s = CudaOk(cudaMalloc(&ws.d_b, all_bytes), "cudaMalloc(B)");
    if (s.ok()) s = CudaOk(cudaMalloc(&ws.d_eye, all_bytes), "cudaMalloc(I)");
    if (s.ok()) {
      s = CudaOk(cudaMalloc(reinterpret_cast<void**>(&ws.d_ptrs),
                            2 * sizeof(void*) * ws.capacity), "cudaMalloc(ptrs)");
    }
    if (s.ok()) {
      // The pointer arrays and identities depend only on the buffers: upload
      // them once per workspace, through the (not yet used) pinned staging.
      Scalar* eye = static_cast<Scalar*>(ws.h_a);
      std::memset(eye, 0, all_bytes);
      for (int64_t k = 0; k < ws.capacity; ++k) {
        for (int64_t i = 0; i < n; ++i) eye[k * n * n + i * n + i] = Scalar(1);
      }
      s = CudaOk(cudaMemcpyAsync(ws.d_eye, eye, all_bytes, cudaMemcpyHostToDevice, stream),
                 "upload identities");
      std::vector<void*> ptrs(2 * ws.capacity);
      for (int64_t k = 0; k < ws.capacity; ++k) {
        ptrs[k] = static_cast<Scalar*>(ws.d_a) + k * n * n;
        ptrs[ws.capacity + k] = static_cast<Scalar*>(ws.d_b) + k * n * n;
      }
      if (s.ok()) {
        s = CudaOk(cudaMemcpyAsync(ws.d_ptrs, ptrs.data(), ptrs.size() * sizeof(void*),
                                   cudaMemcpyHostToDevice, stream),
                   "upload pointer arrays");
      }
      // `ptrs` and the staging are reused right after: wait for the copies.
      if (s.ok()) s = CudaOk(cudaStreamSynchronize(stream), "sync after upload");
    }
  }
  if (!s.ok()) {
    cache.pop_front();
    return s;
  }
  return &ws;
}

template <typename Scalar>
void CudaBackend::Impl::FallBackToCpu(DecompositionKind kind, BatchJob<Scalar>& job,
                                      MatrixX<Scalar> prepared, const absl::Status& why) {
  (void)why;  // the retry count records that the GPU result was not used
  cpu_fallbacks.fetch_add(1, std::memory_order_relaxed);
  absl::StatusOr<Decomposition<Scalar>> r =
      DecomposeLapack<Scalar>(std::move(prepared), kind, /*already_prepared=*/true);
  if (r.ok()) r->retries += 1;
  job.result = std::move(r);
}

template <typename Scalar>
absl::Status CudaBackend::Impl::RunChunk(DecompositionKind kind, int64_t n,
                                         std::vector<BatchJob<Scalar>*>& chunk) {
  const int64_t batch = static_cast<int64_t>(chunk.size());
  absl::StatusOr<Workspace*> got = GetWorkspace<Scalar>(kind, n, batch);
  if (!got.ok()) return got.status();
  Workspace& ws = **got;
  const size_t nn = static_cast<size_t>(n * n);
  const size_t bytes = sizeof(Scalar) * nn * static_cast<size_t>(batch);
  Scalar* h_a = static_cast<Scalar*>(ws.h_a);
  for (int64_t k = 0; k < batch; ++k) {
    // Eigen matrices are column-major and contiguous, as cuSOLVER wants.
    std::memcpy(h_a + k * nn, chunk[k]->matrix.data(), sizeof(Scalar) * nn);
  }
  NG_RETURN_IF_ERROR(CudaOk(
      cudaMemcpyAsync(ws.d_a, h_a, bytes, cudaMemcpyHostToDevice, stream), "H2D A"));

  if (kind == DecompositionKind::kEigh) {
    constexpr cudaDataType t = CudaType<Scalar>();
    size_t dev_bytes = 0, host_bytes = 0;
    NG_RETURN_IF_ERROR(SolverOk(
        cusolverDnXsyevBatched_bufferSize(solver, params, CUSOLVER_EIG_MODE_VECTOR,
                                          CUBLAS_FILL_MODE_LOWER, n, t, ws.d_a, n, t,
                                          ws.d_w, t, &dev_bytes, &host_bytes, batch),
        "cusolverDnXsyevBatched_bufferSize"));
    if (dev_bytes > ws.d_work_bytes) {
      if (ws.d_work) cudaFree(ws.d_work);
      ws.d_work = nullptr;
      ws.d_work_bytes = 0;
      NG_RETURN_IF_ERROR(CudaOk(cudaMalloc(&ws.d_work, dev_bytes), "cudaMalloc(work)"));
      ws.d_work_bytes = dev_bytes;
    }
    if (host_bytes > ws.h_work.size()) ws.h_work.resize(host_bytes);
    NG_RETURN_IF_ERROR(SolverOk(
        cusolverDnXsyevBatched(solver, params, CUSOLVER_EIG_MODE_VECTOR,
                               CUBLAS_FILL_MODE_LOWER, n, t, ws.d_a, n, t, ws.d_w, t,
                               ws.d_work, ws.d_work_bytes,
                               ws.h_work.empty() ? nullptr : ws.h_work.data(),
                               ws.h_work.size(), ws.d_info, batch),
        "cusolverDnXsyevBatched"));
    NG_RETURN_IF_ERROR(CudaOk(
        cudaMemcpyAsync(h_a, ws.d_a, bytes, cudaMemcpyDeviceToHost, stream), "D2H V"));
    NG_RETURN_IF_ERROR(CudaOk(
        cudaMemcpyAsync(ws.h_w, ws.d_w, sizeof(Scalar) * n * batch,
                        cudaMemcpyDeviceToHost, stream), "D2H W"));
  } else {
    const int ni = static_cast<int>(n);
    const int bi = static_cast<int>(batch);
    Scalar** a_ptrs = reinterpret_cast<Scalar**>(ws.d_ptrs);
    Scalar** b_ptrs = a_ptrs + ws.capacity;
    const Scalar one = 1;
    NG_RETURN_IF_ERROR(CudaOk(cudaMemcpyAsync(ws.d_b, ws.d_eye, bytes,
                                              cudaMemcpyDeviceToDevice, stream),
                              "B = I"));
    if constexpr (std::is_same_v<Scalar, float>) {
      NG_RETURN_IF_ERROR(SolverOk(cusolverDnSpotrfBatched(solver, CUBLAS_FILL_MODE_LOWER, ni,
                                                          a_ptrs, ni, ws.d_info, bi),
                                  "cusolverDnSpotrfBatched"));
      for (cublasOperation_t op : {CUBLAS_OP_N, CUBLAS_OP_T}) {
        NG_RETURN_IF_ERROR(BlasOk(
            cublasStrsmBatched(blas, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, op,
                               CUBLAS_DIAG_NON_UNIT, ni, ni, &one, a_ptrs, ni, b_ptrs,
                               ni, bi),
            "cublasStrsmBatched"));
      }
    } else {
      NG_RETURN_IF_ERROR(SolverOk(cusolverDnDpotrfBatched(solver, CUBLAS_FILL_MODE_LOWER, ni,
                                                          a_ptrs, ni, ws.d_info, bi),
                                  "cusolverDnDpotrfBatched"));
      for (cublasOperation_t op : {CUBLAS_OP_N, CUBLAS_OP_T}) {
        NG_RETURN_IF_ERROR(BlasOk(
            cublasDtrsmBatched(blas, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, op,
                               CUBLAS_DIAG_NON_UNIT, ni, ni, &one, a_ptrs, ni, b_ptrs,
                               ni, bi),
            "cublasDtrsmBatched"));
      }
    }
    NG_RETURN_IF_ERROR(CudaOk(
        cudaMemcpyAsync(h_a, ws.d_b, bytes, cudaMemcpyDeviceToHost, stream), "D2H inverse"));
  }
  NG_RETURN_IF_ERROR(CudaOk(cudaMemcpyAsync(ws.h_info, ws.d_info, sizeof(int) * batch,
                                            cudaMemcpyDeviceToHost, stream),
                            "D2H info"));
  NG_RETURN_IF_ERROR(CudaOk(cudaStreamSynchronize(stream), "cudaStreamSynchronize"));

  // Unpack; jobs the GPU failed on go to the CPU ladder.
  const Scalar* h_w = static_cast<const Scalar*>(ws.h_w);
  for (int64_t k = 0; k < batch; ++k) {
    BatchJob<Scalar>& job = *chunk[k];
    Decomposition<Scalar> d;
    d.kind = kind;
    d.matrix = Eigen::Map<const MatrixX<Scalar>>(h_a + k * nn, n, n);
    bool good = ws.h_info[k] == 0 && d.matrix.allFinite();
    if (kind == DecompositionKind::kEigh) {
      d.eigenvalues = Eigen::Map<const Eigen::Matrix<Scalar, Eigen::Dynamic, 1>>(h_w + k * n, n);
      good = good && d.eigenvalues.allFinite();
      d.eigenvalues = d.eigenvalues.cwiseMax(Scalar(0));
    } else {
      // Two triangular solves leave rounding-level asymmetry.
      d.matrix = (d.matrix + d.matrix.transpose()).eval() * Scalar(0.5);
    }
    if (good) {
      job.result = std::move(d);
    } else {
      FallBackToCpu<Scalar>(kind, job, std::move(job.matrix),
                            absl::InternalError(absl::StrCat("info=", ws.h_info[k])));
    }
  }
  return absl::OkStatus();
}

template <typename Scalar>
void CudaBackend::Impl::Run(DecompositionKind kind, absl::Span<BatchJob<Scalar>> jobs) {
  if (jobs.empty()) return;
  std::lock_guard<std::mutex> lock(mu);
  // The current device is per host thread; the dispatcher is not the thread
  // that created the backend.
  const absl::Status dev = CudaOk(cudaSetDevice(options.device), "cudaSetDevice");
  std::vector<BatchJob<Scalar>*> valid;
  valid.reserve(jobs.size());
  for (BatchJob<Scalar>& job : jobs) {
    if (absl::Status s = PrepareSymmetric(job.matrix); !s.ok()) {
      job.result = std::move(s);  // fails alone, never reaches the GPU
    } else if (job.matrix.rows() == 0) {
      Decomposition<Scalar> d;
      d.kind = kind;
      job.result = std::move(d);
    } else {
      valid.push_back(&job);
    }
  }
  if (valid.empty()) return;
  const int64_t n = valid.front()->matrix.rows();
  // cuSOLVER's batched eigensolver indexes with 32-bit ints: n·lda·batch must
  // stay ≤ INT32_MAX (lda = n here).
  const int64_t max_chunk = std::max<int64_t>(1, INT32_MAX / (n * n));
  for (size_t begin = 0; begin < valid.size();) {
    const size_t end = std::min(valid.size(), begin + static_cast<size_t>(max_chunk));
    std::vector<BatchJob<Scalar>*> chunk(valid.begin() + begin, valid.begin() + end);
    absl::Status s = dev.ok() ? RunChunk<Scalar>(kind, n, chunk) : dev;
    if (!s.ok()) {
      // A CUDA/cuSOLVER API failure (out of memory, lost device): the whole
      // chunk goes to the CPU rather than failing the jobs.
      for (BatchJob<Scalar>* job : chunk) {
        FallBackToCpu<Scalar>(kind, *job, std::move(job->matrix), s);
      }
    }
    begin = end;
  }
}

CudaBackend::CudaBackend(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaBackend::~CudaBackend() = default;

const std::string& CudaBackend::description() const { return impl_->description; }
int64_t CudaBackend::cpu_fallbacks() const { return impl_->cpu_fallbacks.load(); }

void CudaBackend::Run(DecompositionKind kind, absl::Span<BatchJob<float>> jobs) {
  impl_->Run<float>(kind, jobs);
}
void CudaBackend::Run(DecompositionKind kind, absl::Span<BatchJob<double>> jobs) {
  impl_->Run<double>(kind, jobs);
}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(CudaBackendOptions options) {
  absl::StatusOr<int> count = CudaDeviceCount();
  if (!count.ok()) return absl::FailedPreconditionError(count.status().message());
  if (options.device < 0 || options.device >= *count) {
    return absl::FailedPreconditionError(absl::StrCat(
        "CUDA device ", options.device, " requested but ", *count, " visible"));
  }
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  NG_RETURN_IF_ERROR(CudaOk(cudaSetDevice(options.device), "cudaSetDevice"));
  cudaDeviceProp prop{};
  NG_RETURN_IF_ERROR(CudaOk(cudaGetDeviceProperties(&prop, options.device),
                            "cudaGetDeviceProperties"));
  impl->description = absl::StrCat("device ", options.device, ": ", prop.name, " (sm_",
                                   prop.major, prop.minor, ", ",
                                   prop.totalGlobalMem >> 30, " GiB)");
  NG_RETURN_IF_ERROR(CudaOk(cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking),
                            "cudaStreamCreate"));
  NG_RETURN_IF_ERROR(SolverOk(cusolverDnCreate(&impl->solver), "cusolverDnCreate"));
  NG_RETURN_IF_ERROR(SolverOk(cusolverDnSetStream(impl->solver, impl->stream),
                              "cusolverDnSetStream"));
  NG_RETURN_IF_ERROR(SolverOk(cusolverDnCreateParams(&impl->params), "cusolverDnCreateParams"));
  NG_RETURN_IF_ERROR(BlasOk(cublasCreate(&impl->blas), "cublasCreate"));
  NG_RETURN_IF_ERROR(BlasOk(cublasSetStream(impl->blas, impl->stream), "cublasSetStream"));
  NG_RETURN_IF_ERROR(BlasOk(cublasSetPointerMode(impl->blas, CUBLAS_POINTER_MODE_HOST),
                            "cublasSetPointerMode"));
  return std::unique_ptr<CudaBackend>(new CudaBackend(std::move(impl)));
}

absl::StatusOr<int> CudaDeviceCount() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::UnavailableError(absl::StrCat("cudaGetDeviceCount: ", cudaGetErrorName(e),
                                               " (", cudaGetErrorString(e), ")"));
  }
  return count;
}

}  // namespace natgrad::engine
