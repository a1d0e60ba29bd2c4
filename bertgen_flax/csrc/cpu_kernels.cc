// CPU kernels for the decode step's skinny matrix products, called from XLA through its FFI.
//
// XLA:CPU runs products with few rows (a decode step has one row per sequence) well below the memory bandwidth
// that bounds them: on a 2-core Xeon, 24 [1024, 4096] + [4096, 1024] products streamed 21 GB/s with one row and
// 10 GB/s with eight, where the machine reads 29 GB/s. These kernels stream each weight once for all rows, with
// every output column block kept in registers, and split the columns over XLA's own intra-op thread pool.
//
//   bertgen_matmul_nn: y[M, N] = x[M, K] @ w[K, N]     (Dense kernels as stored, [in, out])
//   bertgen_matmul_nt: y[M, N] = x[M, K] @ w[N, K]^T   (the tied LM head: the embedding table as stored)
//
// float32 only; products accumulate over k in order, with fused multiply-adds. Built by cpu_kernels.py with the
// host's instruction set (-march=native), so the vector width below follows the machine.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kWidth = 16;  // floats per vector register
constexpr int kMaxRows = 6;  // rows per register block: 6 x 4 accumulators + 4 weight vectors of 32 registers
#else
constexpr int kWidth = 8;
constexpr int kMaxRows = 3;  // 16 registers
#endif
constexpr int kVecs = 4;                   // vectors per column block
constexpr int kBlock = kVecs * kWidth;     // columns per block

typedef float vec __attribute__((vector_size(kWidth * sizeof(float))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
#if defined(__AVX512F__)
inline vec splat(float x) { return (vec)_mm512_set1_ps(x); }
inline float hsum(vec v) { return _mm512_reduce_add_ps((__m512)v); }
#elif defined(__AVX__)
inline vec splat(float x) { return (vec)_mm256_set1_ps(x); }
inline float hsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
#else
inline vec splat(float x) {
  vec v;
  for (int i = 0; i < kWidth; ++i) v[i] = x;
  return v;
}
inline float hsum(vec v) {
  float s = 0.0f;
  for (int i = 0; i < kWidth; ++i) s += v[i];
  return s;
}
#endif

// Runs chunk(i) for i in [0, n) on the calling thread and on XLA's pool. Chunks are handed out by an atomic
// counter: a pool task that starts late finds none left and returns, so the caller only ever waits for chunks that
// are already running (never for a task still queued behind a busy thread), which cannot deadlock.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F chunk) {
  int64_t workers = std::min<int64_t>(pool.num_threads(), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) chunk(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, chunk]() {
    int64_t i;
    while ((i = state->next.fetch_add(1)) < n) {
      chunk(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < workers; ++t) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// The NN product streams w in memory order. Each thread takes a contiguous range of the rows of w (so it reads
// one contiguous block of memory, front to back; walking a band of columns down all rows instead jumps a row,
// kilobytes, per load and ran at half the bandwidth), computes a partial y for its rows, and the partials are
// added at the end. Rows are taken kGroup at a time with the partial sums of a register block of outputs held in
// registers; sums collect in a buffer for kChunk rows and are then added to the thread's partial, so the rounding
// error grows with about K / kChunk + kChunk / kGroup + kGroup terms rather than K.
constexpr int64_t kGroup = 8;
constexpr int64_t kChunk = 128;

// part[r, c0:c0+kBlock] += x[r, k0:k0+g] @ w[k0:k0+g, c0:c0+kBlock] for rows r0 .. r0+R-1 (part has row stride N).
template <int R>
void nn_group(const float* x, const float* w, float* part, int64_t K, int64_t N, int64_t r0, int64_t k0, int64_t g,
              int64_t c0) {
  vec acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = load(part + (r0 + r) * N + c0 + v * kWidth);
  for (int64_t j = 0; j < g; ++j) {
    const float* wp = w + (k0 + j) * N + c0;
    vec wv[kVecs];
    for (int v = 0; v < kVecs; ++v) wv[v] = load(wp + v * kWidth);
    for (int r = 0; r < R; ++r) {
      vec xr = splat(x[(r0 + r) * K + k0 + j]);
      for (int v = 0; v < kVecs; ++v) acc[r][v] += xr * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) store(part + (r0 + r) * N + c0 + v * kWidth, acc[r][v]);
}

template <int R>
void nn_group_rows(const float* x, const float* w, float* part, int64_t K, int64_t N, int64_t M, int64_t r0,
                   int64_t k0, int64_t g, int64_t c0) {
  int64_t r = r0;
  for (; r + R <= M; r += R) nn_group<R>(x, w, part, K, N, r, k0, g, c0);
  if constexpr (R > 1) {
    if (r < M) nn_group_rows<R - 1>(x, w, part, K, N, M, r, k0, g, c0);
  }
}

// out[M, N] (row stride N) = x[:, k0:k1] @ w[k0:k1, :] over the first `cols` columns (a multiple of kBlock).
void nn_rows(const float* x, const float* w, float* out, int64_t M, int64_t K, int64_t N, int64_t cols, int64_t k0,
             int64_t k1) {
  std::vector<float> part(M * N);
  for (int64_t r = 0; r < M; ++r) std::fill(out + r * N, out + r * N + cols, 0.0f);
  for (int64_t kc = k0; kc < k1; kc += kChunk) {
    std::fill(part.begin(), part.end(), 0.0f);
    const int64_t kend = std::min(k1, kc + kChunk);
    for (int64_t kg = kc; kg < kend; kg += kGroup) {
      const int64_t g = std::min(kGroup, kend - kg);
      for (int64_t c = 0; c < cols; c += kBlock) nn_group_rows<kMaxRows>(x, w, part.data(), K, N, M, 0, kg, g, c);
    }
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < cols; ++c) out[r * N + c] += part[r * N + c];
  }
}

// The last, narrower column block (N not a multiple of kBlock), one row at a time.
void nn_tail(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t M, int64_t c0) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = c0; c < N; ++c) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[r * K + k] * w[k * N + c];
      y[r * N + c] = s;
    }
}

ffi::Error MatmulNN(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("bertgen_matmul_nn: expects x [M, K] and w [K, N]");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t cols = N / kBlock * kBlock;
  // One range of rows of w per thread (in multiples of kGroup); the first writes y, the others their own partials.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), K / (4 * kGroup)));
  std::vector<std::vector<float>> partials(parts - 1);
  for (auto& p : partials) p.resize(M * N);
  auto rows = [&](int64_t i) { return (K / kGroup * i / parts) * kGroup + (i == parts ? K % kGroup : 0); };
  parallel_for(pool, parts, [&](int64_t i) {
    nn_rows(xp, wp, i == 0 ? yp : partials[i - 1].data(), M, K, N, cols, rows(i), rows(i + 1));
  });
  for (const auto& p : partials)
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < cols; ++c) yp[r * N + c] += p[r * N + c];
  if (cols < N) nn_tail(xp, wp, yp, K, N, M, cols);
  return ffi::Error::Success();
}

// y[r0 .. r0+R-1, n0 .. n0+C-1] with w rows contiguous: dot products along k, reduced at the end.
template <int R, int C>
void nt_block(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t r0, int64_t n0) {
  vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = splat(0.0f);
  int64_t k = 0;
  for (; k + kWidth <= K; k += kWidth) {
    vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load(w + (n0 + c) * K + k);
    for (int r = 0; r < R; ++r) {
      vec xv = load(x + (r0 + r) * K + k);
      for (int c = 0; c < C; ++c) acc[r][c] += xv * wv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t j = k; j < K; ++j) s += x[(r0 + r) * K + j] * w[(n0 + c) * K + j];
      y[(r0 + r) * N + n0 + c] = s;
    }
}

constexpr int kNtCols = 4;  // w rows per block
constexpr int kNtRows = kWidth == 16 ? 4 : 2;

template <int R>
void nt_rows(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t M, int64_t n0, int64_t n1) {
  int64_t r = 0;
  for (; r + R <= M; r += R) {
    int64_t n = n0;
    for (; n + kNtCols <= n1; n += kNtCols) nt_block<R, kNtCols>(x, w, y, K, N, r, n);
    for (; n < n1; ++n) nt_block<R, 1>(x, w, y, K, N, r, n);
  }
  if constexpr (R > 1) {
    if (r < M) nt_rows<R - 1>(x + r * K, w, y + r * N, K, N, M - r, n0, n1);
  }
}

ffi::Error MatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("bertgen_matmul_nt: expects x [M, K] and w [N, K]");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(N / kNtCols, 4 * std::max<int64_t>(1, pool.num_threads())));
  parallel_for(pool, chunks, [&](int64_t i) {
    nt_rows<kNtRows>(xp, wp, yp, K, N, M, N * i / chunks, N * (i + 1) / chunks);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_matmul_nn, MatmulNN,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_matmul_nt, MatmulNT,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
