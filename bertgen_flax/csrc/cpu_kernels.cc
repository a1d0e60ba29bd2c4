// CPU kernels for generation (and the forward products of training), called from XLA through its FFI.
//
// XLA:CPU runs products with few rows (a decode step has one row per sequence) well below the memory bandwidth
// that bounds them: on a 2-core Xeon, 24 [1024, 4096] + [4096, 1024] products streamed 21 GB/s with one row and
// 10 GB/s with eight, where the machine reads 29 GB/s. The streaming kernels read each weight once for all rows,
// with a block of outputs kept in registers; the packed ones are a BLAS-style product (panels of B, a 14 x 32
// register block on AVX-512) with a bias / GELU / head-major epilogue. Work is split over XLA's intra-op pool.
//
//   bertgen_matmul_nn      y[M, N] = x[M, K] @ w[K, N]        w float32 (Dense kernels as stored, [in, out]), M <= 8
//   bertgen_matmul_nn_i8   y[M, N] = x[M, K] @ q[K, N]        q int8 (the caller scales the columns)
//   bertgen_matmul_nn_i4   y[M, N] = x[M, K] @ (q * s)        q packed 4-bit [K/2, N], s [K/g, N] per group of g rows
//   bertgen_matmul_nt      y[M, N] = x[M, K] @ w[N, K]^T      w float32 (the tied LM head: the embedding table)
//   bertgen_matmul_nt_i8   y[M, N] = x[M, K] @ q[N, K]^T      q int8 (the caller scales the columns)
//   bertgen_gemm_nn        y[M, N] = x[M, K] @ w[K, N]        9 rows and up
//   bertgen_gemm_nn_i8/i4  the same for int8 / packed int4 weights, widened while packed
//   bertgen_gemm_nt_i8     y[M, N] = x[M, K] @ q[N, K]^T      an int8 table, 9 rows and up
//   bertgen_gemm_nn_bias   y = act(x @ w + b)                 y [M, N] or head-major [M / S, N / D, S, D]
//   bertgen_gemm_packed    y = act(x @ w + b)                 w packed beforehand (bertgen_pack_panels)
//   bertgen_gemm_packed_i8/i4  the same from int8 / packed int4 panels (packed once), widened in registers
//   bertgen_pack_panels    w [K, N] or [N, K] -> [P, K, panel width]
//   bertgen_attend_one     attention of G queries per row over its keys and values (decode steps, the encoder)
//   bertgen_reorder_rows   beam search's cache reorder, in place, over the written positions
//   bertgen_argmax_rows    the first maximum of each row of the logits
//   bertgen_beam_candidates  beam search's log-softmax, running scores and top-C candidates in one pass per row
//   bertgen_layer_norm / bertgen_add_layer_norm  LayerNorm of x (or of x + residual) per row
//
// The integer forms are those of quantization.py; weights are widened in registers, so a step reads 1 (int8) or
// 1/2 (int4) byte per weight instead of 4. Products accumulate over k in order, with fused multiply-adds, in
// chunks of 128 k. Built by cpu_kernels.py with the host's instruction set (-march=native), so the vector width
// below follows the machine (AVX-512, AVX2 or the compiler's generic vectors).
#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <chrono>
#include <functional>
#include <mutex>
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

// kWidth consecutive weights of a row, widened to float.
inline vec load_w(const float* p) { return load(p); }
#if defined(__AVX512F__)
inline vec load_w(const int8_t* p) {
  return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// Packed int4: byte j holds row 2i (low nibble) and row 2i+1 (high nibble) of column j, each stored as q + 8.
inline void load_i4(const uint8_t* p, vec& lo, vec& hi) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  __m512i eight = _mm512_set1_epi32(8);
  lo = (vec)_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(15)), eight));
  hi = (vec)_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b, 4), eight));
}
#elif defined(__AVX2__)
inline vec load_w(const int8_t* p) {
  return (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void load_i4(const uint8_t* p, vec& lo, vec& hi) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  __m256i eight = _mm256_set1_epi32(8);
  lo = (vec)_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, _mm256_set1_epi32(15)), eight));
  hi = (vec)_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), eight));
}
#else
inline vec load_w(const int8_t* p) {
  vec v;
  for (int i = 0; i < kWidth; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
inline void load_i4(const uint8_t* p, vec& lo, vec& hi) {
  for (int i = 0; i < kWidth; ++i) {
    lo[i] = static_cast<float>((p[i] & 15) - 8);
    hi[i] = static_cast<float>((p[i] >> 4) - 8);
  }
}
#endif
inline float widen(float w) { return w; }
inline float widen(int8_t w) { return static_cast<float>(w); }

// Runs chunk(i) for i in [0, n) on the calling thread and on XLA's pool. Chunks are handed out by an atomic
// counter: a pool task that starts late finds none left and returns, so the caller only ever waits for chunks that
// are already running (never for a task still queued behind a busy thread), which cannot deadlock.
//
// A pool thread that was asleep started 11-43 us after it was asked (means of runs), as long as a batch-1 product, so
// the second core did little at batch 1. So a pool task, when it runs out of chunks, stays for up to g_spin_ns
// looking for the next parallel_for's job in a mailbox (each new job resets its wait), and takes chunks of it
// straight away. (Helper threads of our own that spun between calls were tried earlier and were 6% slower at
// batch 32: they competed with XLA's own threads for the two cores.)
struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  std::function<void(int64_t)> chunk;
  void work() {
    int64_t i;
    while ((i = next.fetch_add(1)) < n) {
      chunk(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

std::atomic<int64_t> g_spin_ns{0};
std::atomic<int64_t> g_lingering{0};    // pool threads in linger() now
std::atomic<uint64_t> g_job_serial{0};  // bumped when a job is posted
std::mutex g_job_mutex;
std::shared_ptr<Job> g_job;             // the latest job (guarded by g_job_mutex)

// Called by a pool task when its job has no chunks left; `serial` is that job's.
void linger(uint64_t serial) {
  const int64_t spin = g_spin_ns.load(std::memory_order_relaxed);
  if (spin <= 0) return;
  g_lingering.fetch_add(1);
  auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(spin);
  while (std::chrono::steady_clock::now() < until) {
    const uint64_t now = g_job_serial.load(std::memory_order_acquire);
    if (now == serial) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
      continue;
    }
    std::shared_ptr<Job> job;
    {
      std::lock_guard<std::mutex> lock(g_job_mutex);
      job = g_job;
      serial = g_job_serial.load(std::memory_order_acquire);
    }
    if (job) job->work();
    until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(spin);
  }
  g_lingering.fetch_sub(1);
}

template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, F chunk) {
  int64_t workers = std::min<int64_t>(pool.num_threads(), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) chunk(i);
    return;
  }
  auto job = std::make_shared<Job>();
  job->n = n;
  job->chunk = chunk;
  uint64_t serial;
  {
    std::lock_guard<std::mutex> lock(g_job_mutex);
    g_job = job;
    serial = g_job_serial.fetch_add(1, std::memory_order_acq_rel) + 1;
  }
  // threads lingering after an earlier job take this one; wake pool threads only for the rest
  for (int64_t t = 1 + g_lingering.load(std::memory_order_acquire); t < workers; ++t)
    pool.Schedule([job, serial]() {
      job->work();
      linger(serial);
    });
  job->work();
  while (job->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
  std::lock_guard<std::mutex> lock(g_job_mutex);
  // Every chunk is done, so a thread still holding the job finds none to start (the closure refers to this
  // frame); drop the mailbox's reference so that lingering threads stop looking at it.
  if (g_job == job) g_job.reset();
}

// The NN product streams w in memory order. Each thread takes a contiguous range of the rows of w (so it reads
// one contiguous block of memory, front to back; walking a band of columns down all rows instead jumps a row,
// kilobytes, per load and ran at half the bandwidth), computes a partial y for its rows, and the partials are
// added at the end. Rows are taken kGroup at a time with the partial sums of a register block of outputs held in
// registers; sums collect in a buffer for a chunk of rows (kChunk, or an int4 scale group) and are then added to
// the thread's partial (scaled by the group's scales for int4), so the rounding error grows with about
// K / chunk + chunk / kGroup + kGroup terms rather than K.
constexpr int64_t kGroup = 8;
constexpr int64_t kChunk = 128;

// part[r, c0:c0+kBlock] += x[r, k0:k0+g] @ w[k0:k0+g, c0:c0+kBlock] for rows r0 .. r0+R-1 (part has row stride N).
template <int R, typename W>
void nn_group(const float* x, const W* w, float* part, int64_t K, int64_t N, int64_t r0, int64_t k0, int64_t g,
              int64_t c0) {
  vec acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = load(part + (r0 + r) * N + c0 + v * kWidth);
  for (int64_t j = 0; j < g; ++j) {
    const W* wp = w + (k0 + j) * N + c0;
    vec wv[kVecs];
    for (int v = 0; v < kVecs; ++v) wv[v] = load_w(wp + v * kWidth);
    for (int r = 0; r < R; ++r) {
      vec xr = splat(x[(r0 + r) * K + k0 + j]);
      for (int v = 0; v < kVecs; ++v) acc[r][v] += xr * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) store(part + (r0 + r) * N + c0 + v * kWidth, acc[r][v]);
}

// The same for packed int4 rows k0 .. k0+g-1 (k0 and g even): byte row k0/2 + i holds rows k0+2i and k0+2i+1.
template <int R>
void nn_group(const float* x, const uint8_t* w, float* part, int64_t K, int64_t N, int64_t r0, int64_t k0,
              int64_t g, int64_t c0) {
  vec acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = load(part + (r0 + r) * N + c0 + v * kWidth);
  for (int64_t j = 0; j < g; j += 2) {
    const uint8_t* wp = w + (k0 + j) / 2 * N + c0;
    vec lo[kVecs], hi[kVecs];
    for (int v = 0; v < kVecs; ++v) load_i4(wp + v * kWidth, lo[v], hi[v]);
    for (int r = 0; r < R; ++r) {
      vec x0 = splat(x[(r0 + r) * K + k0 + j]), x1 = splat(x[(r0 + r) * K + k0 + j + 1]);
      for (int v = 0; v < kVecs; ++v) acc[r][v] += x0 * lo[v] + x1 * hi[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) store(part + (r0 + r) * N + c0 + v * kWidth, acc[r][v]);
}

template <int R, typename W>
void nn_group_rows(const float* x, const W* w, float* part, int64_t K, int64_t N, int64_t M, int64_t r0,
                   int64_t k0, int64_t g, int64_t c0) {
  int64_t r = r0;
  for (; r + R <= M; r += R) nn_group<R>(x, w, part, K, N, r, k0, g, c0);
  if constexpr (R > 1) {
    if (r < M) nn_group_rows<R - 1>(x, w, part, K, N, M, r, k0, g, c0);
  }
}

// out[M, N] (row stride N) = x[:, k0:k1] @ w[k0:k1, :] over the first `cols` columns (a multiple of kBlock), in
// chunks of `chunk` rows; with `scale` (int4), chunk i is one scale group, multiplied by scale[k / chunk, :].
template <typename W>
void nn_rows(const float* x, const W* w, const float* scale, float* out, int64_t M, int64_t K, int64_t N,
             int64_t cols, int64_t k0, int64_t k1, int64_t chunk) {
  std::vector<float> part(M * N);
  for (int64_t r = 0; r < M; ++r) std::fill(out + r * N, out + r * N + cols, 0.0f);
  for (int64_t kc = k0; kc < k1; kc += chunk) {
    std::fill(part.begin(), part.end(), 0.0f);
    const int64_t kend = std::min(k1, kc + chunk);
    for (int64_t kg = kc; kg < kend; kg += kGroup) {
      const int64_t g = std::min(kGroup, kend - kg);
      for (int64_t c = 0; c < cols; c += kBlock) nn_group_rows<kMaxRows>(x, w, part.data(), K, N, M, 0, kg, g, c);
    }
    const float* s = scale ? scale + kc / chunk * N : nullptr;
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < cols; ++c) out[r * N + c] += s ? part[r * N + c] * s[c] : part[r * N + c];
  }
}

// One weight of row k, column c, as float (the last, narrower column block, done one value at a time).
inline float weight_at(const float* w, const float*, int64_t N, int64_t, int64_t k, int64_t c) { return w[k * N + c]; }
inline float weight_at(const int8_t* w, const float*, int64_t N, int64_t, int64_t k, int64_t c) {
  return static_cast<float>(w[k * N + c]);
}
inline float weight_at(const uint8_t* w, const float* scale, int64_t N, int64_t group, int64_t k, int64_t c) {
  const uint8_t b = w[k / 2 * N + c];
  return static_cast<float>(((k & 1) ? (b >> 4) : (b & 15)) - 8) * scale[k / group * N + c];
}

template <typename W>
void nn_tail(const float* x, const W* w, const float* scale, float* y, int64_t K, int64_t N, int64_t M, int64_t c0,
             int64_t group) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t c = c0; c < N; ++c) {
      float s = 0.0f;
      for (int64_t k = 0; k < K; ++k) s += x[r * K + k] * weight_at(w, scale, N, group, k, c);
      y[r * N + c] = s;
    }
}

// y = x @ w with w [K, N] in format W; `group` > 0 for int4 (rows per scale group; a multiple of 2 dividing K).
template <typename W>
void matmul_nn(ffi::ThreadPool& pool, const float* xp, const W* wp, const float* scale, float* yp, int64_t M,
               int64_t K, int64_t N, int64_t group) {
  const int64_t cols = N / kBlock * kBlock;
  const int64_t unit = group ? group : kGroup;  // a thread's rows start on a scale group (int4) or a kGroup
  const int64_t units = K / unit;
  // One range of rows of w per thread; the first writes y, the others their own partials.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), K / (4 * kGroup)));
  std::vector<std::vector<float>> partials(parts - 1);
  for (auto& p : partials) p.resize(M * N);
  auto rows = [&](int64_t i) { return i == parts ? K : units * i / parts * unit; };
  parallel_for(pool, parts, [&](int64_t i) {
    nn_rows(xp, wp, scale, i == 0 ? yp : partials[i - 1].data(), M, K, N, cols, rows(i), rows(i + 1),
            group ? group : kChunk);
  });
  for (const auto& p : partials)
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < cols; ++c) yp[r * N + c] += p[r * N + c];
  if (cols < N) nn_tail(xp, wp, scale, yp, K, N, M, cols, group);
}

ffi::Error MatmulNN(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("bertgen_matmul_nn: expects x [M, K] and w [K, N]");
  matmul_nn(pool, x.typed_data(), w.typed_data(), nullptr, y->typed_data(), xd[0], xd[1], wd[1], 0);
  return ffi::Error::Success();
}

ffi::Error MatmulNNI8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || xd[1] != qd[0])
    return ffi::Error::InvalidArgument("bertgen_matmul_nn_i8: expects x [M, K] and q [K, N]");
  matmul_nn(pool, x.typed_data(), q.typed_data(), nullptr, y->typed_data(), xd[0], xd[1], qd[1], 0);
  return ffi::Error::Success();
}

ffi::Error MatmulNNI4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q,
                      ffi::Buffer<ffi::F32> s, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = s.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2 || xd[1] != 2 * qd[0] || sd[1] != qd[1] || sd[0] < 1 ||
      xd[1] % sd[0] != 0 || (xd[1] / sd[0]) % 2 != 0)
    return ffi::Error::InvalidArgument(
        "bertgen_matmul_nn_i4: expects x [M, K], packed q [K/2, N] and scales [K/g, N] with an even g dividing K");
  matmul_nn(pool, x.typed_data(), q.typed_data(), s.typed_data(), y->typed_data(), xd[0], xd[1], qd[1],
            xd[1] / sd[0]);
  return ffi::Error::Success();
}

// y[r0 .. r0+R-1, n0 .. n0+C-1] with w rows contiguous: dot products along k, reduced at the end.
template <int R, int C, typename W>
void nt_block(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t r0, int64_t n0) {
  vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = splat(0.0f);
  int64_t k = 0;
  for (; k + kWidth <= K; k += kWidth) {
    vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load_w(w + (n0 + c) * K + k);
    for (int r = 0; r < R; ++r) {
      vec xv = load(x + (r0 + r) * K + k);
      for (int c = 0; c < C; ++c) acc[r][c] += xv * wv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t j = k; j < K; ++j) s += x[(r0 + r) * K + j] * widen(w[(n0 + c) * K + j]);
      y[(r0 + r) * N + n0 + c] = s;
    }
}

constexpr int kNtCols = 4;  // w rows per block
constexpr int kNtRows = kWidth == 16 ? 4 : 2;

template <int R, typename W>
void nt_rows(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t M, int64_t n0, int64_t n1) {
  int64_t r = 0;
  for (; r + R <= M; r += R) {
    int64_t n = n0;
    for (; n + kNtCols <= n1; n += kNtCols) nt_block<R, kNtCols, W>(x, w, y, K, N, r, n);
    for (; n < n1; ++n) nt_block<R, 1, W>(x, w, y, K, N, r, n);
  }
  if constexpr (R > 1) {
    if (r < M) nt_rows<R - 1, W>(x + r * K, w, y + r * N, K, N, M - r, n0, n1);
  }
}

template <typename W>
void matmul_nt(ffi::ThreadPool& pool, const float* xp, const W* wp, float* yp, int64_t M, int64_t K, int64_t N) {
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(N / kNtCols, 4 * std::max<int64_t>(1, pool.num_threads())));
  parallel_for(pool, chunks, [&](int64_t i) {
    nt_rows<kNtRows, W>(xp, wp, yp, K, N, M, N * i / chunks, N * (i + 1) / chunks);
  });
}

ffi::Error MatmulNT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1])
    return ffi::Error::InvalidArgument("bertgen_matmul_nt: expects x [M, K] and w [N, K]");
  matmul_nt(pool, x.typed_data(), w.typed_data(), y->typed_data(), xd[0], xd[1], wd[0]);
  return ffi::Error::Success();
}

ffi::Error MatmulNTI8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || xd[1] != qd[1])
    return ffi::Error::InvalidArgument("bertgen_matmul_nt_i8: expects x [M, K] and q [N, K]");
  matmul_nt(pool, x.typed_data(), q.typed_data(), y->typed_data(), xd[0], xd[1], qd[0]);
  return ffi::Error::Success();
}

typedef int32_t ivec __attribute__((vector_size(kWidth * sizeof(int32_t))));

// exp(x) to about 2 ulp: x = n ln2 + r, 2^n from the exponent bits, a degree-7 polynomial for exp(r) (Cephes'
// expf coefficients); below the float range it is 0, as XLA's is.
inline vec vexp(vec x) {
  const vec lo = splat(-87.3365478515625f), hi = splat(88.72283172607421875f);
  vec xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  vec t = xc * splat(1.44269504088896341f);
  ivec ni = __builtin_convertvector(t + (t >= splat(0.0f) ? splat(0.5f) : splat(-0.5f)), ivec);
  vec n = __builtin_convertvector(ni, vec);
  vec r = xc - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vec p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  ivec bits = (ni + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(vec));
  vec y = p * scale;
  return x < lo ? splat(0.0f) : y;
}

// ---- packed products for more rows (compute-bound) -------------------------------------------------------------
// C[I, J] = A[I, K] @ B[K, J] the way BLAS libraries do it: B is copied ("packed") a block of kGemmKc x kGemmNc
// at a time into panels of kNr columns, k-major, so the micro-kernel reads each panel front to back from L1/L2
// without the same-cache-set conflicts a weight row stride of 1 or 4 KB causes; a register block of kMr rows x
// kNr columns of C accumulates over the block's k, reading A (rows contiguous in k, in place) by broadcast. The
// epilogue adds a bias, applies GELU, or writes C head-major (see Out).
//
//   bertgen_gemm_nn        y[M, N] = x[M, K] @ w[K, N]
//   bertgen_gemm_nn_bias   y = act(x @ w + b), y [M, N] or head-major [M / S, N / D, S, D]
//
// Used from 9 rows (a decode step's batch, an encoder chunk) up; the streaming kernels above do fewer. In a decode
// step at batch 32 they made the step 14% faster than the streaming kernel; at 128 rows, 2% faster than XLA's.
#if defined(__AVX512F__)
constexpr int kMr = 14;  // 14 x 2 accumulators + 2 panel vectors + a broadcast: 31 of 32 registers
#elif defined(__AVX__)
constexpr int kMr = 6;   // 6 x 2 + 2 + 1 = 15 of 16
#else
constexpr int kMr = 4;
#endif
constexpr int kNr = 2 * kWidth;       // panel width: two vectors
constexpr int64_t kGemmKc = 256;      // k per packed block
constexpr int64_t kGemmNc = 16 * kNr; // columns per packed block (kGemmKc x kGemmNc floats: 512 KB on AVX-512)

#if defined(__AVX512F__)
inline vec fmadd(vec a, vec b, vec c) { return (vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#elif defined(__FMA__)
inline vec fmadd(vec a, vec b, vec c) { return (vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
inline vec fmadd(vec a, vec b, vec c) { return a * b + c; }
#endif

// Strided 2-D view: element (i, k) at p[i * si + k * sk] (B is viewed as (j, k)).
struct View {
  const float* p;
  int64_t si, sk;
  // Or a quantized weight (quantization.py's forms), widened while it is packed: int8 q8 with the strides above
  // ([K, N], or a table [N, K] read transposed; the caller scales the columns), or packed int4 q4 [K/2, N] times
  // its scales [K/group, N].
  const int8_t* q8 = nullptr;
  const uint8_t* q4 = nullptr;
  const float* scale = nullptr;
  int64_t group = 0;
};

// The weight at row k, column j of a quantized View with N columns, as float (int4: times its group's scale).
inline float quantized_at(const View& b, int64_t N, int64_t k, int64_t j) {
  if (b.q8) return static_cast<float>(b.q8[k * b.sk + j * b.si]);
  const uint8_t byte = b.q4[k / 2 * N + j];
  return static_cast<float>(((k & 1) ? (byte >> 4) : (byte & 15)) - 8) * b.scale[k / b.group * N + j];
}

// Packs B rows k0 .. k0+kc, columns j0 .. j0+nc (zero past J) into panels: panel q holds [kc][kNr] contiguous.
void pack_b(View b, int64_t J, int64_t k0, int64_t kc, int64_t j0, int64_t nc, float* out) {
  for (int64_t q = 0; q * kNr < nc; ++q) {
    float* dst = out + q * kc * kNr;
    const int64_t jq = j0 + q * kNr, width = std::min<int64_t>(kNr, J - jq);
    if (b.q8 && b.si == 1 && width == kNr) {
      for (int64_t k = 0; k < kc; ++k) {
        const int8_t* src = b.q8 + (k0 + k) * b.sk + jq;
        store(dst + k * kNr, load_w(src));
        store(dst + k * kNr + kWidth, load_w(src + kWidth));
      }
    } else if (b.q4 && width == kNr && k0 % 2 == 0 && kc % 2 == 0) {  // two rows per byte row, one scale row
      for (int64_t k = 0; k < kc; k += 2) {
        const uint8_t* src = b.q4 + (k0 + k) / 2 * J + jq;
        const float* sc = b.scale + (k0 + k) / b.group * J + jq;
        vec lo0, hi0, lo1, hi1;
        load_i4(src, lo0, hi0);
        load_i4(src + kWidth, lo1, hi1);
        const vec s0 = load(sc), s1 = load(sc + kWidth);
        store(dst + k * kNr, lo0 * s0);
        store(dst + k * kNr + kWidth, lo1 * s1);
        store(dst + (k + 1) * kNr, hi0 * s0);
        store(dst + (k + 1) * kNr + kWidth, hi1 * s1);
      }
    } else if (b.q8 || b.q4) {  // int4 (widened as XLA's reference widens it), a table, or a last panel
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t j = 0; j < kNr; ++j) dst[k * kNr + j] = j < width ? quantized_at(b, J, k0 + k, jq + j) : 0.0f;
    } else if (b.sk != 1 && b.si == 1 && width == kNr) {  // rows of the panel contiguous in j: two vector copies per k
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = b.p + (k0 + k) * b.sk + jq;
        store(dst + k * kNr, load(src));
        store(dst + k * kNr + kWidth, load(src + kWidth));
      }
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t j = 0; j < kNr; ++j) dst[k * kNr + j] = j < width ? b.p[(k0 + k) * b.sk + (jq + j) * b.si] : 0.0f;
    }
  }
}

// Packed panels of B for the micro-kernel: panel q starts at p + q * stride, its k rows kNr weights each, as
// float32, as int8 (widened in registers; the caller's column scales are applied in the epilogue, see Out), or as
// packed int4 (byte row i holds k rows 2i and 2i+1 as low and high nibbles, each q + 8), where each group of `group`
// k rows has a row of kNr scales at gscale + q * gstride + (k / group) * kNr.
template <typename W>
struct Panels {
  const W* p;
  int64_t stride;
  const float* gscale = nullptr;
  int64_t gstride = 0, group = 0;
};

#if defined(__AVX512F__)
// kWidth int4 weights of one nibble row (shift 0: the low nibbles, 4: the high ones) as floats: a 16-entry
// permutation of the values -8 .. 7 (vpermps reads only the low 4 bits of each index, so no mask is needed).
inline vec nibbles(const uint8_t* p, int shift) {
  const __m512 values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  if (shift) b = _mm512_srli_epi32(b, 4);
  return (vec)_mm512_permutexvar_ps(b, values);
}
#else
inline vec nibbles(const uint8_t* p, int shift) {
  vec lo, hi;
  load_i4(p, lo, hi);
  return shift ? hi : lo;
}
#endif

template <int R>
inline void fma_rows(const float* ak, int64_t ra, vec b0, vec b1, vec (&sum)[R][2]) {
  for (int r = 0; r < R; ++r) {
    const vec ar = splat(ak[r * ra]);
    sum[r][0] = fmadd(ar, b0, sum[r][0]);
    sum[r][1] = fmadd(ar, b1, sum[r][1]);
  }
}

// acc[R][2] = sum over k < kc of A[r, k] * panel[k, :]; A row r at a + r * ra, step ka per k.
// The sums live in locals for a chunk of kChunk k at a time (accumulating into `acc` itself made gcc store every
// register to memory on every k, as a vector of floats may alias the float inputs: half the speed) and are then
// added to `acc`, so the rounding error grows with about kChunk + kc / kChunk terms rather than kc. Integer panels
// are widened in registers, one panel row per k (a row of 32 int8 or 16 bytes of int4 instead of 128 bytes); for
// int4 a chunk is a scale group, and its sums are multiplied by the group's scales as they are added to `acc`.
template <int R, typename W>
inline void micro(const float* a, int64_t ra, int64_t ka, const W* panel, int64_t kc, vec (&acc)[kMr][2],
                  const float* gscale = nullptr, int64_t group = 0) {
  constexpr bool int4 = std::is_same_v<W, uint8_t>;
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = splat(0.0f);
  const int64_t chunk = int4 ? group : kChunk;
  for (int64_t k0 = 0; k0 < kc; k0 += chunk) {
    const int64_t k1 = std::min(kc, k0 + chunk);
    vec sum[R][2];
    for (int r = 0; r < R; ++r) sum[r][0] = sum[r][1] = splat(0.0f);
    if constexpr (int4) {  // k0 and k1 even: whole byte rows
      for (int64_t k = k0; k < k1; k += 2) {
        const uint8_t* row = panel + k / 2 * kNr;
        fma_rows<R>(a + k * ka, ra, nibbles(row, 0), nibbles(row + kWidth, 0), sum);
        fma_rows<R>(a + (k + 1) * ka, ra, nibbles(row, 4), nibbles(row + kWidth, 4), sum);
      }
    } else {
      for (int64_t k = k0; k < k1; ++k)
        fma_rows<R>(a + k * ka, ra, load_w(panel + k * kNr), load_w(panel + k * kNr + kWidth), sum);
    }
    if constexpr (int4) {
      const float* s = gscale + k0 / group * kNr;
      const vec s0 = load(s), s1 = load(s + kWidth);
      for (int r = 0; r < R; ++r) {
        acc[r][0] = fmadd(sum[r][0], s0, acc[r][0]);
        acc[r][1] = fmadd(sum[r][1], s1, acc[r][1]);
      }
    } else {
      for (int r = 0; r < R; ++r) {
        acc[r][0] += sum[r][0];
        acc[r][1] += sum[r][1];
      }
    }
  }
}

// GELU, x/2 (1 + erf(x / sqrt 2)), as torch's exact form, to about 4e-7 absolute for |x| <= 12 (XLA's erf-based
// GELU: 1e-6). 1 + erf(z) = 2 - erfc(z) for z >= 0 and erfc(-z) below, with erfc(z) = t exp(-z^2 + R(t)),
// t = 1 / (1 + z/2), R a degree-9 least-squares polynomial in u = a t + b (t over [1/6.5, 1] mapped onto [-1, 1]),
// fitted for this file against scipy's erfc in float64 (relative error of erfc 5e-8 there).
inline vec vgelu(vec x) {
  const float r[10] = {-5.67365526e-01f, 5.78567895e-01f, 1.76364656e-02f, -3.07747214e-02f, -1.43587185e-03f,
                       4.02507774e-03f,  -1.81051624e-04f, -6.10116481e-04f, 7.18158769e-05f, 6.60855845e-05f};
  vec z = (x < splat(0.0f) ? -x : x) * splat(0.70710678118654752f);
  z = z > splat(11.0f) ? splat(11.0f) : z;
  const vec t = splat(1.0f) / (splat(1.0f) + splat(0.5f) * z);
  const vec u = t * splat(2.36363636363636364f) + splat(-1.36363636363636364f);
  vec p = splat(r[9]);
  for (int i = 8; i >= 0; --i) p = p * u + splat(r[i]);
  const vec e = t * vexp(p - z * z);                          // erfc(|x| / sqrt 2)
  return splat(0.5f) * x * (x < splat(0.0f) ? e : splat(2.0f) - e);
}

// Where C goes: C(i, j) at p[i * ld + j]; with `seq` > 0 head-major instead, the layout attention reads keys and
// values in: row i = b * seq + s, column j = n * dh + d, at p[((b * heads + n) * seq + s) * dh + d]. The epilogue,
// once the last k block is in, multiplies by the column scales `scale` [J] (an int8 weight's), adds `bias` [J]
// and applies `act` (1: GELU).
struct Out {
  float* p;
  int64_t ld;
  int64_t seq = 0, dh = 0, heads = 0;
  const float* bias = nullptr;
  int64_t act = 0;
  const float* scale = nullptr;
  // Address of C(i, j), for a run of columns that stays inside one row (and, head-major, one head).
  float* at(int64_t i, int64_t j) const {
    if (seq == 0) return p + i * ld + j;
    return p + (((i / seq) * heads + j / dh) * seq + i % seq) * dh + j % dh;
  }
  bool whole_panels() const { return seq == 0 || dh % kNr == 0; }
};

inline vec finish(vec v, const Out& c, const float* bias, const float* scale) {
  if (scale) v *= load(scale);
  if (bias) v += load(bias);
  return c.act == 1 ? vgelu(v) : v;
}

// Adds (or, for the first k block, writes) a kMr x kNr register block to C at (i0, j0): `rows` x `cols` of it,
// with the epilogue when this was the last k block.
void put_c(vec (&acc)[kMr][2], int rows, int64_t cols, const Out& c, int64_t i0, int64_t j0, bool add, bool last) {
  if (cols == kNr && c.whole_panels()) {
    const float* bias = c.bias ? c.bias + j0 : nullptr;
    const float* scale = c.scale ? c.scale + j0 : nullptr;
    for (int r = 0; r < rows; ++r) {
      float* row = c.at(i0 + r, j0);
      vec v0 = add ? load(row) + acc[r][0] : acc[r][0];
      vec v1 = add ? load(row + kWidth) + acc[r][1] : acc[r][1];
      if (last) {
        v0 = finish(v0, c, bias, scale);
        v1 = finish(v1, c, bias ? bias + kWidth : nullptr, scale ? scale + kWidth : nullptr);
      }
      store(row, v0);
      store(row + kWidth, v1);
    }
    return;
  }
  // The last, narrower panel: through a tile.
  float tile[kMr][kNr];
  float bias[kNr] = {}, scale[kNr] = {};
  for (int64_t j = 0; j < cols; ++j) {
    if (c.bias) bias[j] = c.bias[j0 + j];
    if (c.scale) scale[j] = c.scale[j0 + j];
  }
  for (int r = 0; r < rows; ++r) {
    store(tile[r], acc[r][0]);
    store(tile[r] + kWidth, acc[r][1]);
    if (add)
      for (int64_t j = 0; j < cols; ++j) tile[r][j] += *c.at(i0 + r, j0 + j);
    if (last) {
      store(tile[r], finish(load(tile[r]), c, c.bias ? bias : nullptr, c.scale ? scale : nullptr));
      store(tile[r] + kWidth, finish(load(tile[r] + kWidth), c, c.bias ? bias + kWidth : nullptr,
                                     c.scale ? scale + kWidth : nullptr));
    }
    for (int64_t j = 0; j < cols; ++j) *c.at(i0 + r, j0 + j) = tile[r][j];
  }
}

template <int R, typename W>
void block_rows(const float* a, int64_t lda, const Panels<W>& b, int64_t kc, int64_t nc, int rows, const Out& c,
                int64_t i0, int64_t j0, int64_t J, bool add, bool last) {
  vec acc[kMr][2];
  for (int64_t q = 0; q * kNr < nc; ++q) {
    micro<R>(a, lda, 1, b.p + q * b.stride, kc, acc, b.gscale ? b.gscale + q * b.gstride : nullptr, b.group);
    put_c(acc, rows, std::min<int64_t>(kNr, J - j0 - q * kNr), c, i0, j0 + q * kNr, add, last);
  }
}

template <int R, typename W>
void block_rows_any(const float* a, int64_t lda, const Panels<W>& b, int64_t kc, int64_t nc, int rows,
                    const Out& c, int64_t i0, int64_t j0, int64_t J, bool add, bool last) {
  if (rows == R) return block_rows<R>(a, lda, b, kc, nc, rows, c, i0, j0, J, add, last);
  if constexpr (R > 1) block_rows_any<R - 1>(a, lda, b, kc, nc, rows, c, i0, j0, J, add, last);
}

// k per packed block: kGemmKc, deeper when C has fewer columns than a packed block holds (less adding into C).
// It depends on J alone, so an element's sum is the same however C is split over threads (a half batch gives its
// rows' values bit for bit).
// A multiple of 8, so that packed int4 rows (two per byte) never straddle two blocks (J = 384 gave 341, and int4
// products of that width fell back to widening one weight at a time: 4x slower).
int64_t k_depth(int64_t J) {
  return std::max(kGemmKc, kGemmKc * kGemmNc / std::min(kGemmNc, (J + kNr - 1) / kNr * kNr) / 8 * 8);
}

// C[i0:i1, j0:j1] of C[I, J] = A @ B, A's rows contiguous in k (row stride a.si). Rows are cut into blocks of
// near-equal size (32 rows: 11 + 11 + 10, not 14 + 14 + 4, whose last block would run at a third of the speed).
void gemm_range(View a, View b, const Out& c, int64_t K, int64_t J, int64_t i0, int64_t i1, int64_t j0,
                int64_t j1) {
  thread_local std::vector<float> packed;
  const int64_t ncols = std::min(kGemmNc, (j1 - j0 + kNr - 1) / kNr * kNr);
  const int64_t kdepth = k_depth(J);
  packed.resize(kdepth * ncols);
  const int64_t blocks = (i1 - i0 + kMr - 1) / kMr;
  for (int64_t jb = j0; jb < j1; jb += ncols) {
    const int64_t nc = std::min(ncols, j1 - jb);
    for (int64_t kb = 0; kb < K; kb += kdepth) {
      const int64_t kc = std::min(kdepth, K - kb);
      pack_b(b, J, kb, kc, jb, nc, packed.data());
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t i = i0 + (i1 - i0) * blk / blocks;
        const int rows = static_cast<int>(i0 + (i1 - i0) * (blk + 1) / blocks - i);
        block_rows_any<kMr>(a.p + i * a.si + kb, a.si, Panels<float>{packed.data(), kc * kNr}, kc, nc, rows, c, i,
                            jb, J, kb > 0, kb + kc >= K);
      }
    }
  }
}

// Splits C along its longer side: each thread then reads only its share of the larger operand (A [I, K] when
// I > J, else B [K, J]) and all of the smaller one. Splitting the 8,192 rows of the cross-attention keys' product
// by columns instead made both threads stream all of x: 1.7x slower.
void gemm(ffi::ThreadPool& pool, View a, View b, const Out& c, int64_t I, int64_t K, int64_t J) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t panels = (J + kNr - 1) / kNr, blocks = (I + kMr - 1) / kMr;
  // Several ranges per thread, handed out as threads come free: a pool thread that wakes late takes fewer.
  const int64_t ranges = threads > 1 ? 4 * threads : 1;
  const int64_t jt = I > J ? 1 : std::min(panels, ranges);
  const int64_t it = std::min(blocks, (ranges + jt - 1) / jt);
  parallel_for(pool, jt * it, [&](int64_t t) {
    const int64_t ti = t / jt, tj = t % jt;
    gemm_range(a, b, c, K, J, blocks * ti / it * kMr, std::min(I, blocks * (ti + 1) / it * kMr),
               panels * tj / jt * kNr, std::min(J, panels * (tj + 1) / jt * kNr));
  });
}

// y[M, N] = act(x[M, K] @ w[K, N] + bias), or without bias and act; `heads` > 0: y head-major [M / seq, N / dh,
// seq, dh] (seq and dh from y's shape).
ffi::Error gemm_nn(ffi::ThreadPool& pool, const ffi::AnyBuffer::Dimensions& xd, const float* x,
                   const ffi::AnyBuffer::Dimensions& wd, const float* w, const float* bias, float* y,
                   const ffi::AnyBuffer::Dimensions& yd, int64_t act, const char* name) {
  const bool heads = yd.size() == 4;
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || act < 0 || act > 1 ||
      (heads ? yd[0] * yd[2] != xd[0] || yd[1] * yd[3] != wd[1] || yd[3] % kNr != 0
             : yd.size() != 2 || yd[0] != xd[0] || yd[1] != wd[1]))
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": expects x [M, K], w [K, N] and y [M, N] (or y [M / S, N / D, S, D] with D "
                                       "a multiple of the panel width), act 0 or 1");
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  Out out{y, N};
  if (heads) out.seq = yd[2], out.dh = yd[3], out.heads = yd[1];
  out.bias = bias;
  out.act = act;
  if (K == 0) return ffi::Error::InvalidArgument(std::string(name) + ": K must be positive");
  gemm(pool, View{x, K, 1}, View{w, 1, N}, out, M, K, N);
  return ffi::Error::Success();
}

// y[M, N] = x[M, K] @ widen(q) for a quantized weight, widened while its panels are packed: int8 q [K, N], or an
// int8 table q [N, K] read transposed (the tied LM head), the caller scaling the columns; or packed int4 q [K/2, N]
// times scales s [K/g, N]. For 9 rows and more, where the streaming kernels' widening in registers costs more
// compute than their saved bytes are worth.
ffi::Error gemm_i8(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, ffi::Buffer<ffi::S8>& q,
                   ffi::ResultBuffer<ffi::F32>& y, bool transposed) {
  auto xd = x.dimensions(), qd = q.dimensions(), yd = y->dimensions();
  const int64_t n = transposed ? 0 : 1;  // q's axis of the outputs
  if (xd.size() != 2 || qd.size() != 2 || xd[1] != qd[1 - n] || xd[1] == 0 || yd.size() != 2 || yd[0] != xd[0] ||
      yd[1] != qd[n])
    return ffi::Error::InvalidArgument(transposed
                                           ? "bertgen_gemm_nt_i8: expects x [M, K], q [N, K] int8 and y [M, N]"
                                           : "bertgen_gemm_nn_i8: expects x [M, K], q [K, N] int8 and y [M, N]");
  View b{nullptr, transposed ? xd[1] : 1, transposed ? 1 : qd[1]};
  b.q8 = q.typed_data();
  gemm(pool, View{x.typed_data(), xd[1], 1}, b, Out{y->typed_data(), qd[n]}, xd[0], xd[1], qd[n]);
  return ffi::Error::Success();
}

ffi::Error GemmNNI8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                    ffi::ResultBuffer<ffi::F32> y) {
  return gemm_i8(pool, x, q, y, false);
}

ffi::Error GemmNTI8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                    ffi::ResultBuffer<ffi::F32> y) {
  return gemm_i8(pool, x, q, y, true);
}

ffi::Error GemmNNI4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> q, ffi::Buffer<ffi::F32> s,
                    ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), qd = q.dimensions(), sd = s.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || qd.size() != 2 || sd.size() != 2 || xd[1] != 2 * qd[0] || xd[1] == 0 || sd[1] != qd[1] ||
      sd[0] < 1 || xd[1] % sd[0] != 0 || (xd[1] / sd[0]) % 2 != 0 || yd.size() != 2 || yd[0] != xd[0] ||
      yd[1] != qd[1])
    return ffi::Error::InvalidArgument(
        "bertgen_gemm_nn_i4: expects x [M, K], packed q [K/2, N], scales [K/g, N] with an even g dividing K, "
        "y [M, N]");
  View b{nullptr, 1, qd[1]};
  b.q4 = q.typed_data(), b.scale = s.typed_data(), b.group = xd[1] / sd[0];
  gemm(pool, View{x.typed_data(), xd[1], 1}, b, Out{y->typed_data(), qd[1]}, xd[0], xd[1], qd[1]);
  return ffi::Error::Success();
}

ffi::Error GemmNN(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> y) {
  return gemm_nn(pool, x.dimensions(), x.typed_data(), w.dimensions(), w.typed_data(), nullptr, y->typed_data(),
                 y->dimensions(), 0, "bertgen_gemm_nn");
}

ffi::Error GemmNNBias(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y, int64_t act) {
  if (b.dimensions().size() != 1 || w.dimensions().size() != 2 || b.dimensions()[0] != w.dimensions()[1])
    return ffi::Error::InvalidArgument("bertgen_gemm_nn_bias: expects a bias [N] for w [K, N]");
  return gemm_nn(pool, x.dimensions(), x.typed_data(), w.dimensions(), w.typed_data(), b.typed_data(),
                 y->typed_data(), y->dimensions(), act, "bertgen_gemm_nn_bias");
}

// y[M, N] = act(x[M, K] @ w + bias) with w given already packed: wp [P, K, kNr], panel q holding columns
// q * kNr .. q * kNr + kNr - 1 (zero past N), i.e. B as gemm_range packs it, but once per model (or per generate
// call) instead of once per product. A decode step then reads each weight where it lies, with no copy: at batch 32
// packing the [256, 256] weights of a step cost about as much as multiplying by them, and at 64 rows (an encoder
// at batch 1) a [256, 1024] product ran in 104 us packed beforehand against 153 us packing its own panels. With
// more rows than columns each thread takes chunks of rows, else a range of panels (and, with fewer panels than
// threads, of rows too); either way every row block runs against a panel while it is in cache.
// The panels may also be int8 or packed int4 (see Panels), widened in registers: a quantized model's products
// then read a quarter or an eighth of float32's bytes, and widening them while packing on every call (gemm_i8)
// cost batch-32 generation 13-16% against float32.
template <typename W>
void gemm_packed(ffi::ThreadPool& pool, const float* xp, int64_t M, int64_t K, const Panels<W>& w, int64_t P,
                 const Out& out) {
  const int64_t N = out.ld, panel_bytes = w.stride * static_cast<int64_t>(sizeof(W));
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Rows r0..r1 against panels q0..q1: each panel runs every row block while it is in cache. The whole panel is
  // requested up front (prefetches into L2): weights packed beforehand come from memory at the start of a call
  // (the steps in between evict them), and a panel read only as the micro-kernel reaches it kept too few misses
  // in flight. That took a cold encoder pass from 3.8 to 3.4 ms at batch 1 (2.7 ms warm) and generation 2.6% /
  // 2.5% faster at batch 1 / 32.
  auto run = [&](int64_t r0, int64_t r1, int64_t q0, int64_t q1) {
    const int64_t nb = (r1 - r0 + kMr - 1) / kMr;
    for (int64_t q = q0; q < q1; ++q) {
      const char* panel = reinterpret_cast<const char*>(w.p + q * w.stride);
      for (int64_t at = 0; at < panel_bytes; at += 64) __builtin_prefetch(panel + at, 0, 2);
      Panels<W> one = w;
      one.p = w.p + q * w.stride;
      if (w.gscale) one.gscale = w.gscale + q * w.gstride;
      for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t i = r0 + (r1 - r0) * blk / nb;
        const int rows = static_cast<int>(r0 + (r1 - r0) * (blk + 1) / nb - i);
        block_rows_any<kMr>(xp + i * K, K, one, K, kNr, rows, out, i, q * kNr, N, false, true);
      }
    }
  };
  const int64_t blocks = (M + kMr - 1) / kMr;
  if (M > N) {
    // More rows than columns (an encoder's or the cross keys' product over a batch's tokens): split the rows, as
    // gemm() does, in chunks whose rows of x fit in L2 (~512 KB) while every panel passes over them. Split by
    // panels instead, each thread read all of x once per panel: 8.5% slower generation at batch 128.
    const int64_t fits = std::max<int64_t>(1, (512 << 10) / (4 * K * kMr));   // row blocks per chunk
    const int64_t share = (blocks + 4 * threads - 1) / (4 * threads);        // and at least 4 chunks per thread
    const int64_t chunk = std::max<int64_t>(1, std::min(fits, share)) * kMr;
    const int64_t tasks = (M + chunk - 1) / chunk;
    parallel_for(pool, tasks, [&](int64_t t) { run(t * chunk, std::min(M, (t + 1) * chunk), 0, P); });
    return;
  }
  const int64_t ranges = threads > 1 ? 4 * threads : 1;
  const int64_t pt = std::min(P, ranges), rt = std::min(blocks, (ranges + pt - 1) / pt);
  parallel_for(pool, pt * rt, [&](int64_t t) {
    const int64_t tp = t % pt, tr = t / pt;
    run(blocks * tr / rt * kMr, std::min(M, blocks * (tr + 1) / rt * kMr), P * tp / pt, P * (tp + 1) / pt);
  });
}

// The checks shared by the packed products: x [M, K], panels [P, rows, kNr] with `rows` panel rows for K (K, or
// K / 2 for int4), bias [N] with (P - 1) * kNr < N <= P * kNr, y [M, N] or head-major [M / S, N / D, S, D].
// Returns the Out for y, or one with p == nullptr when they do not fit.
Out packed_out(const ffi::AnyBuffer::Dimensions& xd, const ffi::AnyBuffer::Dimensions& wd, int64_t rows,
               const ffi::AnyBuffer::Dimensions& bd, float* y, const ffi::AnyBuffer::Dimensions& yd, int64_t act,
               const float* bias) {
  const bool heads = yd.size() == 4;  // y [M / S, N / D, S, D]: keys or values, head-major (as gemm_nn writes them)
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != rows || wd[2] != kNr || xd[1] == 0 || bd.size() != 1 ||
      bd[0] > wd[0] * kNr || bd[0] <= (wd[0] - 1) * kNr || act < 0 || act > 1 ||
      (heads ? yd[0] * yd[2] != xd[0] || yd[1] * yd[3] != bd[0] || yd[3] % kNr != 0
             : yd.size() != 2 || yd[0] != xd[0] || yd[1] != bd[0]))
    return Out{nullptr, 0};
  Out out{y, bd[0]};
  if (heads) out.seq = yd[2], out.dh = yd[3], out.heads = yd[1];
  out.bias = bias;
  out.act = act;
  return out;
}

ffi::Error GemmPacked(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wp,
                      ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y, int64_t act) {
  auto xd = x.dimensions(), wd = wp.dimensions();
  Out out = packed_out(xd, wd, xd.size() == 2 ? xd[1] : -1, b.dimensions(), y->typed_data(), y->dimensions(), act,
                       b.typed_data());
  if (!out.p)
    return ffi::Error::InvalidArgument(
        "bertgen_gemm_packed: expects x [M, K], packed w [P, K, panel width of this build], bias [N] with "
        "(P - 1) * width < N <= P * width, y [M, N] (or y [M / S, N / D, S, D] with D a multiple of the panel "
        "width), act 0 or 1");
  gemm_packed(pool, x.typed_data(), xd[0], xd[1], Panels<float>{wp.typed_data(), xd[1] * kNr}, wd[0], out);
  return ffi::Error::Success();
}

// The same with int8 panels wp [P, K, kNr] (a quantized kernel or table packed by cpu_kernels.py) and their
// column scales [N]: y = act((x @ q) * scale + bias).
ffi::Error GemmPackedI8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> wp,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y,
                        int64_t act) {
  auto xd = x.dimensions(), wd = wp.dimensions();
  Out out = packed_out(xd, wd, xd.size() == 2 ? xd[1] : -1, b.dimensions(), y->typed_data(), y->dimensions(), act,
                       b.typed_data());
  if (!out.p || scale.dimensions().size() != 1 || scale.dimensions()[0] != b.dimensions()[0])
    return ffi::Error::InvalidArgument(
        "bertgen_gemm_packed_i8: expects x [M, K], int8 panels [P, K, panel width of this build], scales [N] and "
        "bias [N] with (P - 1) * width < N <= P * width, y [M, N] (or head-major), act 0 or 1");
  out.scale = scale.typed_data();
  gemm_packed(pool, x.typed_data(), xd[0], xd[1], Panels<int8_t>{wp.typed_data(), xd[1] * kNr}, wd[0], out);
  return ffi::Error::Success();
}

// The same with packed int4 panels wp [P, K / 2, kNr] (two k rows per byte row, as quantization.py packs them)
// and group scales gs [P, K / g, kNr] (panel q's scales of its columns, one row per group of g k rows; g even):
// y = act(x @ (q * s) + bias), each group's sums scaled once.
ffi::Error GemmPackedI4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> wp,
                        ffi::Buffer<ffi::F32> gs, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y,
                        int64_t act) {
  auto xd = x.dimensions(), wd = wp.dimensions(), sd = gs.dimensions();
  const int64_t K = xd.size() == 2 ? xd[1] : -1;
  Out out = packed_out(xd, wd, K % 2 == 0 ? K / 2 : -1, b.dimensions(), y->typed_data(), y->dimensions(), act,
                       b.typed_data());
  if (!out.p || sd.size() != 3 || sd[0] != wd[0] || sd[2] != kNr || sd[1] < 1 || K % sd[1] != 0 ||
      (K / sd[1]) % 2 != 0)
    return ffi::Error::InvalidArgument(
        "bertgen_gemm_packed_i4: expects x [M, K], int4 panels [P, K / 2, panel width of this build], group "
        "scales [P, K / g, width] with an even g dividing K, bias [N] with (P - 1) * width < N <= P * width, "
        "y [M, N] (or head-major), act 0 or 1");
  Panels<uint8_t> w{wp.typed_data(), K / 2 * kNr, gs.typed_data(), sd[1] * kNr, K / sd[1]};
  gemm_packed(pool, x.typed_data(), xd[0], K, w, wd[0], out);
  return ffi::Error::Success();
}

// Packs weights into bertgen_gemm_packed's layout: w [K, N] (transposed = 0: a Dense kernel) or w [N, K]
// (transposed = 1: a table contracted as x @ w^T) -> out [P, K, kNr], panel q holding columns q * kNr ..
// q * kNr + kNr - 1 of the [K, N] product weight, zero past N. XLA's transposes did this at about 1 GB/s and then
// copied the result into another layout: 31 ms of a batch-32 call for the small model's 23 MB of decoder weights.
ffi::Error PackPanels(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> out,
                      int64_t transposed) {
  auto wd = w.dimensions(), od = out->dimensions();
  if (wd.size() != 2 || od.size() != 3 || od[2] != kNr || (transposed != 0 && transposed != 1))
    return ffi::Error::InvalidArgument("bertgen_pack_panels: expects w [K, N] or [N, K] and out [P, K, panel width]");
  const int64_t K = transposed ? wd[1] : wd[0], N = transposed ? wd[0] : wd[1], P = od[0];
  if (od[1] != K || P * kNr < N || (P - 1) * kNr >= N)
    return ffi::Error::InvalidArgument("bertgen_pack_panels: out [P, K, width] must hold w's columns in P panels");
  const float* src = w.typed_data();
  float* dst = out->typed_data();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(P, 4 * std::max<int64_t>(1, pool.num_threads())));
  parallel_for(pool, chunks, [&](int64_t c) {
    for (int64_t q = P * c / chunks; q < P * (c + 1) / chunks; ++q) {
      float* panel = dst + q * K * kNr;
      const int64_t width = std::min<int64_t>(kNr, N - q * kNr);
      if (!transposed) {
        for (int64_t k = 0; k < K; ++k) {
          std::memcpy(panel + k * kNr, src + k * N + q * kNr, sizeof(float) * width);
          std::fill(panel + k * kNr + width, panel + (k + 1) * kNr, 0.0f);
        }
      } else {
        std::fill(panel, panel + K * kNr, 0.0f);
        for (int64_t j = 0; j < width; ++j) {
          const float* row = src + (q * kNr + j) * K;
          for (int64_t k = 0; k < K; ++k) panel[k * kNr + j] = row[k];
        }
      }
    }
  });
  return ffi::Error::Success();
}

// ---- single-query attention -------------------------------------------------------------------------------------
// out[b, g, n] = softmax(where(allowed[b], q[b, g, n] . k[b, n]^T / sqrt(D), float32 min)) @ v[b, n]
// q [B, G, N, D] (G queries share a cache row: the beams of one source), k and v [B, N, S, D] (the cache's
// head-major layout), allowed [B, S]. The same arithmetic as the XLA path (scores, then the scale, the mask, a
// max-subtracted exp, a division by the sum), with a vectorised exp; one (b, n) pair reads its keys and values once.

constexpr float kMasked = -3.4028234663852886e+38f;  // jnp.finfo(float32).min, what the XLA path writes
constexpr int64_t kManyQueries = 8;  // queries per (row, head) from which attend_pair runs as two packed products

// Softmax over sc[0:S] in place (S need not be a multiple of kWidth).
void softmax_row(float* sc, int64_t S) {
  float m = sc[0];
  for (int64_t s = 1; s < S; ++s) m = std::max(m, sc[s]);
  const vec mv = splat(m);
  vec sum = splat(0.0f);
  float tail = 0.0f;
  int64_t s = 0;
  for (; s + kWidth <= S; s += kWidth) {
    vec e = vexp(load(sc + s) - mv);
    store(sc + s, e);
    sum += e;
  }
  if (s < S) {
    float buf[kWidth];
    for (int i = 0; i < kWidth; ++i) buf[i] = s + i < S ? sc[s + i] : kMasked;
    vec e = vexp(load(buf) - mv);
    for (int i = 0; s + i < S; ++i) {
      sc[s + i] = e[i];
      tail += e[i];
    }
  }
  const float total = hsum(sum) + tail;
  for (int64_t j = 0; j < S; ++j) sc[j] = sc[j] / total;
}

void attend_pair(const float* q, const float* k, const float* v, const bool* allowed, float* out, float* sc,
                 int64_t G, int64_t N, int64_t S, int64_t D, float scale) {
  // q and out: G rows of D with row stride N * D; k, v: S rows of D; sc: G x S scores.
  // Keys after the last allowed one get exactly zero weight (exp of float32's minimum minus the maximum), so they
  // are not read at all: the unwritten end of the self-attention cache and a short source's padding. A row with
  // no allowed key keeps all S (the XLA path's uniform weights).
  int64_t last = S;
  while (last > 0 && !allowed[last - 1]) --last;
  if (last > 0) S = last;
  if (G >= kManyQueries) {
    // Many queries (an encoder's tokens, or a prompt's attending to the source): two small products with the
    // packed kernel, scores = q k^T, then the softmax, then out = p v.
    gemm_range(View{q, N * D, 1}, View{k, D, 1}, Out{sc, S}, D, S, 0, G, 0, S);
    for (int64_t g = 0; g < G; ++g) {
      float* row = sc + g * S;
      for (int64_t s = 0; s < S; ++s) row[s] = allowed[s] ? row[s] / scale : kMasked;
      softmax_row(row, S);
    }
    gemm_range(View{sc, S, 1}, View{v, 1, D}, Out{out, N * D}, S, D, 0, G, 0, D);
    return;
  }
  if (D % kWidth == 0 && D <= 4 * kWidth) {
    const int64_t nv = D / kWidth;
    for (int64_t g = 0; g < G; ++g) {
      vec qv[4];
      for (int64_t i = 0; i < nv; ++i) qv[i] = load(q + g * N * D + i * kWidth);
      for (int64_t s = 0; s < S; ++s) {
        vec acc = qv[0] * load(k + s * D);
        for (int64_t i = 1; i < nv; ++i) acc += qv[i] * load(k + s * D + i * kWidth);
        sc[g * S + s] = hsum(acc);
      }
    }
  } else {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t s = 0; s < S; ++s) {
        float acc = 0.0f;
        for (int64_t d = 0; d < D; ++d) acc += q[g * N * D + d] * k[s * D + d];
        sc[g * S + s] = acc;
      }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* row = sc + g * S;
    for (int64_t s = 0; s < S; ++s) row[s] = allowed[s] ? row[s] / scale : kMasked;
    softmax_row(row, S);
  }
  if (D % kWidth == 0 && D <= 4 * kWidth) {
    const int64_t nv = D / kWidth;
    for (int64_t g = 0; g < G; ++g) {
      vec acc[4] = {splat(0.0f), splat(0.0f), splat(0.0f), splat(0.0f)};
      for (int64_t s = 0; s < S; ++s) {
        vec p = splat(sc[g * S + s]);
        for (int64_t i = 0; i < nv; ++i) acc[i] += p * load(v + s * D + i * kWidth);
      }
      for (int64_t i = 0; i < nv; ++i) store(out + g * N * D + i * kWidth, acc[i]);
    }
  } else {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) {
        float acc = 0.0f;
        for (int64_t s = 0; s < S; ++s) acc += sc[g * S + s] * v[s * D + d];
        out[g * N * D + d] = acc;
      }
  }
}

ffi::Error AttendOne(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> allowed, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = allowed.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 2 || qd[0] != kd[0] || qd[2] != kd[1] ||
      qd[3] != kd[3] || kd[0] != vd[0] || kd[1] != vd[1] || kd[2] != vd[2] || kd[3] != vd[3] || md[0] != kd[0] ||
      md[1] != kd[2])
    return ffi::Error::InvalidArgument(
        "bertgen_attend_one: expects q [B, G, N, D], k and v [B, N, S, D] and allowed [B, S]");
  const int64_t B = qd[0], G = qd[1], N = qd[2], D = qd[3], S = kd[2];
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const bool* ap = allowed.typed_data();
  float* op = out->typed_data();
  const float scale = std::sqrt(static_cast<float>(D));
  const int64_t pairs = B * N;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(pairs, 4 * std::max<int64_t>(1, pool.num_threads())));
  parallel_for(pool, chunks, [&](int64_t c) {
    std::vector<float> sc(G * S);
    for (int64_t pr = pairs * c / chunks; pr < pairs * (c + 1) / chunks; ++pr) {
      const int64_t b = pr / N, n = pr % N;
      attend_pair(qp + (b * G * N + n) * D, kp + pr * S * D, vp + pr * S * D, ap + b * S, op + (b * G * N + n) * D,
                  sc.data(), G, N, S, D, scale);
    }
  });
  return ffi::Error::Success();
}

// The maximum of row[0:V] (V > 0) by vectors, and whether the row holds a NaN (a NaN makes a lane's running value
// NaN, so it is tracked apart and the maximum is of the numbers).
inline float row_max(const float* row, int64_t V, bool& nan) {
  vec best = splat(row[0]);
  ivec odd = ivec{} == 1;  // all lanes 0
  int64_t v = 0;
  for (; v + kWidth <= V; v += kWidth) {
    const vec a = load(row + v);
    odd |= a != a;
    best = a > best ? a : best;
  }
  float m = row[0];
  nan = false;
  for (int i = 0; i < kWidth; ++i) m = std::max(m, best[i]), nan |= odd[i] != 0;
  for (; v < V; ++v) nan |= row[v] != row[v], m = std::max(m, row[v]);
  return m;
}

// ---- greedy search: the first maximum of each row ----------------------------------------------------------------
// out[r] = the index of the first maximum of x[r, :] (of the first NaN when the row has one), as jnp.argmax. One
// pass over the logits, rows split over the threads; XLA made four passes of it (a max, a compare-select against
// an iota, a min in two reductions), a tenth of a greedy step at batch 32.
ffi::Error ArgmaxRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::S32> out) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || xd[1] == 0 || out->dimensions().size() != 1 || out->dimensions()[0] != xd[0])
    return ffi::Error::InvalidArgument("bertgen_argmax_rows: expects x [N, V] with V > 0 and out [N]");
  const int64_t rows = xd[0], V = xd[1];
  const float* xp = x.typed_data();
  int32_t* op = out->typed_data();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * std::max<int64_t>(1, pool.num_threads())));
  parallel_for(pool, chunks, [&](int64_t c) {
    for (int64_t r = rows * c / chunks; r < rows * (c + 1) / chunks; ++r) {
      const float* row = xp + r * V;
      bool nan;
      const float m = row_max(row, V, nan);
      int64_t found = V - 1;
      for (int64_t j = 0; j < V; ++j)
        if (nan ? row[j] != row[j] : row[j] == m) {
          found = j;
          break;
        }
      op[r] = static_cast<int32_t>(found);
    }
  });
  return ffi::Error::Success();
}

// ---- LayerNorm of a residual sum ------------------------------------------------------------------------------
// y = (s - mean(s)) / sqrt(var(s) + eps) * scale + bias with s = x + residual (or x), per row of [M, N]; the
// variance in two passes, as torch computes it. The row is summed while s is written, then read twice more while it
// sits in L1. XLA ran a LayerNorm as six small thunks (reductions, then elementwise); as one kernel, generation ran
// 2% faster at batch 32 and 128 (paired A/Bs; at batch 1, 0.3% over 32 new tokens).
void norm_row(const float* x, const float* r, const float* g, const float* b, float eps, float* y, int64_t N) {
  vec acc = splat(0.0f);
  float tail = 0.0f;
  int64_t j = 0;
  for (; j + kWidth <= N; j += kWidth) {
    const vec v = r ? load(x + j) + load(r + j) : load(x + j);
    store(y + j, v);
    acc += v;
  }
  for (; j < N; ++j) tail += (y[j] = r ? x[j] + r[j] : x[j]);
  const float mean = (hsum(acc) + tail) / static_cast<float>(N);
  const vec m = splat(mean);
  acc = splat(0.0f), tail = 0.0f;
  for (j = 0; j + kWidth <= N; j += kWidth) {
    const vec d = load(y + j) - m;
    acc += d * d;
  }
  for (; j < N; ++j) tail += (y[j] - mean) * (y[j] - mean);
  const float rstd = 1.0f / std::sqrt((hsum(acc) + tail) / static_cast<float>(N) + eps);
  const vec rs = splat(rstd);
  for (j = 0; j + kWidth <= N; j += kWidth) store(y + j, (load(y + j) - m) * (rs * load(g + j)) + load(b + j));
  for (; j < N; ++j) y[j] = (y[j] - mean) * (rstd * g[j]) + b[j];
}

ffi::Error layer_norm(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& x, const float* r, ffi::Buffer<ffi::F32>& g,
                      ffi::Buffer<ffi::F32>& b, ffi::ResultBuffer<ffi::F32>& y, float eps, const char* expects) {
  auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || xd[1] == 0 || g.dimensions().size() != 1 || g.dimensions()[0] != xd[1] ||
      b.dimensions().size() != 1 || b.dimensions()[0] != xd[1] || yd.size() != 2 || yd[0] != xd[0] ||
      yd[1] != xd[1] || !(eps >= 0.0f))
    return ffi::Error::InvalidArgument(expects);
  const int64_t M = xd[0], N = xd[1];
  const float *xp = x.typed_data(), *gp = g.typed_data(), *bp = b.typed_data();
  float* yp = y->typed_data();
  // about 16K values per chunk: a decode step's few rows run on the calling thread alone
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>({M, 4 * threads, M * N / 16384}));
  parallel_for(pool, chunks, [&](int64_t c) {
    for (int64_t i = M * c / chunks; i < M * (c + 1) / chunks; ++i)
      norm_row(xp + i * N, r ? r + i * N : nullptr, gp, bp, eps, yp + i * N, N);
  });
  return ffi::Error::Success();
}

ffi::Error LayerNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> b,
                     ffi::ResultBuffer<ffi::F32> y, float eps) {
  return layer_norm(pool, x, nullptr, g, b, y, eps,
                    "bertgen_layer_norm: expects x [M, N] with N > 0, scale [N], bias [N], y [M, N], eps >= 0");
}

ffi::Error AddLayerNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> r,
                        ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y, float eps) {
  if (r.dimensions().size() != 2 || x.dimensions().size() != 2 || r.dimensions()[0] != x.dimensions()[0] ||
      r.dimensions()[1] != x.dimensions()[1])
    return ffi::Error::InvalidArgument("bertgen_add_layer_norm: expects x and residual of one shape [M, N]");
  return layer_norm(pool, x, r.typed_data(), g, b, y, eps,
                    "bertgen_add_layer_norm: expects x [M, N] with N > 0, residual [M, N], scale [N], bias [N], "
                    "y [M, N], eps >= 0");
}

// ---- beam search: the self-attention cache follows the beams' parents ------------------------------------------
// x[b, :, :length] = x[rows[b], :, :length] for x [B, N, S, D], in place (the output aliases x). Positions from
// `length` on are not written yet (the step about to run writes position `length`), so they are left as they are,
// and beams that continue themselves (rows[b] == b) are not touched. A parent is parked in a buffer first only if
// it is itself overwritten; every other row is copied straight from its parent. XLA's gather copied every
// position of every row into a new buffer, and that back into the loop's cache: a fifth of a beam-search step.
// (Parking whole groups of beams, one input's at a time, moved more data and was slower; parking every parent
// of a moved row was 5% of a step more than this.)
ffi::Error ReorderRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> rows,
                       ffi::Buffer<ffi::S32> length, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), rd = rows.dimensions();
  if (xd.size() != 4 || rd.size() != 1 || rd[0] != xd[0] || length.element_count() != 1)
    return ffi::Error::InvalidArgument("bertgen_reorder_rows: expects x [B, N, S, D], rows [B] and a scalar length");
  const int64_t B = xd[0], N = xd[1], S = xd[2], D = xd[3];
  const int32_t* src = rows.typed_data();
  for (int64_t b = 0; b < B; ++b)
    if (src[b] < 0 || src[b] >= B)
      return ffi::Error::InvalidArgument("bertgen_reorder_rows: a row index is out of range");
  const int64_t L = std::min<int64_t>(S, std::max<int32_t>(0, length.typed_data()[0]));
  float* y = out->typed_data();
  if (y != x.typed_data()) std::memcpy(y, x.typed_data(), sizeof(float) * B * N * S * D);
  std::vector<int64_t> moved, slot(B, -1);  // slot[c]: where parent c is parked (-1: read in place)
  for (int64_t b = 0; b < B; ++b)
    if (src[b] != b) moved.push_back(b);
  if (moved.empty() || L == 0) return ffi::Error::Success();
  std::vector<int64_t> parked;
  for (int64_t b : moved)
    if (src[src[b]] != src[b] && slot[src[b]] < 0) {  // the parent is overwritten too
      slot[src[b]] = static_cast<int64_t>(parked.size());
      parked.push_back(src[b]);
    }
  const int64_t run = L * D;  // one (row, head) run: L x D floats
  std::vector<float> buffer(parked.size() * N * run);
  const int64_t threads = 4 * std::max<int64_t>(1, pool.num_threads());
  const int64_t park_pairs = static_cast<int64_t>(parked.size()) * N;
  if (park_pairs > 0) {
    const int64_t chunks = std::min(park_pairs, threads);
    parallel_for(pool, chunks, [&](int64_t c) {
      for (int64_t p = park_pairs * c / chunks; p < park_pairs * (c + 1) / chunks; ++p)
        std::memcpy(buffer.data() + p * run, y + ((parked[p / N] * N + p % N) * S) * D, sizeof(float) * run);
    });
  }
  const int64_t pairs = static_cast<int64_t>(moved.size()) * N, chunks = std::min(pairs, threads);
  parallel_for(pool, chunks, [&](int64_t c) {
    for (int64_t p = pairs * c / chunks; p < pairs * (c + 1) / chunks; ++p) {
      const int64_t b = moved[p / N], n = p % N, from = src[b];
      const float* source = slot[from] >= 0 ? buffer.data() + (slot[from] * N + n) * run : y + ((from * N + n) * S) * D;
      std::memcpy(y + ((b * N + n) * S) * D, source, sizeof(float) * run);
    }
  });
  return ffi::Error::Success();
}

// ---- beam search: the candidates of a step ---------------------------------------------------------------------
// For x [B, K, V] (the logits of K beams per input), r [B, K] (their running scores), the EOS ids e [E] and a ban
// flag: values[b, :C], indices[b, :C] = top_C over j = k * V + v of log_softmax(x[b, k])[v] + r[b, k], where the
// log-probabilities of the EOS columns are -inf while banned (min_length / min_new_tokens), as
// jax.lax.top_k(acc, C) ranks them: descending, NaN above every number, ties to the lower index. A row is read
// three times while it sits in L1 (its maximum, the sum of exp(x - max), then the candidates), and only C values
// per input are written. XLA made six passes over [B * K, V] for it (log-softmax, the beams' scores added, the
// chunk maxima and NaN checks of decoding.top_k): a tenth of a beam-search step at batch 32 with 4 beams.
struct Candidates {
  int64_t count = 0, cap = 0;
  float* val;
  int32_t* idx;
  // a ranks above b: NaN above any number, then by value (ties keep the earlier, lower index first)
  static bool above(float a, float b) { return (a != a && b == b) || a > b; }
  bool full() const { return count == cap; }
  void offer(float v, int32_t i) {  // i is larger than every index offered before
    if (full() && !above(v, val[cap - 1])) return;
    int64_t p = full() ? cap - 1 : count++;
    for (; p > 0 && above(v, val[p - 1]); --p) val[p] = val[p - 1], idx[p] = idx[p - 1];
    val[p] = v, idx[p] = i;
  }
};

ffi::Error BeamCandidates(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> running,
                          ffi::Buffer<ffi::S32> eos, ffi::Buffer<ffi::S32> ban, ffi::ResultBuffer<ffi::F32> values,
                          ffi::ResultBuffer<ffi::S32> indices) {
  auto xd = x.dimensions(), rd = running.dimensions(), vd = values->dimensions(), id = indices->dimensions();
  if (xd.size() != 3 || xd[2] == 0 || rd.size() != 2 || rd[0] != xd[0] || rd[1] != xd[1] ||
      eos.dimensions().size() != 1 || ban.element_count() != 1 || vd.size() != 2 || vd[0] != xd[0] ||
      vd[1] > xd[1] * xd[2] || vd[1] < 1 ||
      id.size() != 2 || id[0] != vd[0] || id[1] != vd[1] || xd[1] * xd[2] > INT32_MAX)
    return ffi::Error::InvalidArgument(
        "bertgen_beam_candidates: expects x [B, K, V], running scores [B, K], eos ids [E], a scalar ban flag and "
        "values / indices [B, C] with 1 <= C <= K * V");
  const int64_t B = xd[0], K = xd[1], V = xd[2], C = vd[1];
  std::vector<int64_t> banned;  // sorted, in range, once each
  if (ban.typed_data()[0] != 0)
    for (int64_t i = 0; i < eos.dimensions()[0]; ++i)
      if (eos.typed_data()[i] >= 0 && eos.typed_data()[i] < V) banned.push_back(eos.typed_data()[i]);
  std::sort(banned.begin(), banned.end());
  banned.erase(std::unique(banned.begin(), banned.end()), banned.end());
  const float* xp = x.typed_data();
  const float* rp = running.typed_data();
  float* vp = values->typed_data();
  int32_t* ip = indices->typed_data();
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(B, 4 * std::max<int64_t>(1, pool.num_threads())));
  parallel_for(pool, chunks, [&](int64_t c) {
    for (int64_t b = B * c / chunks; b < B * (c + 1) / chunks; ++b) {
      Candidates top;
      top.cap = C, top.val = vp + b * C, top.idx = ip + b * C;
      for (int64_t k = 0; k < K; ++k) {
        const float* row = xp + (b * K + k) * V;
        const int32_t base = static_cast<int32_t>(k * V);
        bool nan;  // a NaN anywhere makes the whole row NaN, as torch's log_softmax (XLA's CPU max may skip it)
        const float m = row_max(row, V, nan);
        int64_t v;
        if (nan) {  // every log-probability of the row is NaN (banned ones -inf), as torch's log_softmax gives
          for (int64_t j = 0; j < V && !(top.full() && top.val[C - 1] != top.val[C - 1]); ++j)
            top.offer(std::binary_search(banned.begin(), banned.end(), j) ? -INFINITY : std::nanf(""),
                      base + static_cast<int32_t>(j));
          continue;
        }
        // log-probabilities as jax.nn.log_softmax: (x - m) - log(sum(exp(x - m))); then + the running score
        vec sum = splat(0.0f);
        const vec mv = splat(m);
        for (v = 0; v + kWidth <= V; v += kWidth) sum += vexp(load(row + v) - mv);
        float total = hsum(sum);
        for (; v < V; ++v) total += std::exp(row[v] - m);
        const float lse = std::log(total), score = rp[b * K + k];
        const vec lv = splat(lse), sv = splat(score);
        auto value = [&](int64_t j) { return ((row[j] - m) - lse) + score; };
        size_t next = 0;  // the next banned column
        for (v = 0; v < V;) {
          const int64_t ban_at = next < banned.size() ? banned[next] : V;
          if (v + kWidth <= V && v + kWidth <= ban_at) {  // a whole vector before the next banned column
            const vec a = ((load(row + v) - mv) - lv) + sv;
            bool any = !top.full();
            if (!any) {
              const float t = top.val[C - 1];
              const auto hit = a > splat(t);
              for (int i = 0; i < kWidth; ++i) any |= hit[i] != 0;
            }
            if (any)
              for (int i = 0; i < kWidth; ++i) top.offer(a[i], base + static_cast<int32_t>(v + i));
            v += kWidth;
          } else {
            top.offer(v == ban_at ? -INFINITY : value(v), base + static_cast<int32_t>(v));
            if (v == ban_at) ++next;
            ++v;
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// x, a weight and a bias in, one float32 result out, an int64 attribute `act` (the packed products' epilogue)
#define BERTGEN_BIND_BIAS_ACT                                                                                 \
  ffi::Ffi::Bind()                                                                                            \
      .Ctx<ffi::ThreadPool>()                                                                                 \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                           \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                           \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                           \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                           \
      .Attr<int64_t>("act")

#define BERTGEN_BIND2(W) \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<W>>().Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_matmul_nn, MatmulNN, BERTGEN_BIND2(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_matmul_nn_i8, MatmulNNI8, BERTGEN_BIND2(ffi::S8));
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_matmul_nt, MatmulNT, BERTGEN_BIND2(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_matmul_nt_i8, MatmulNTI8, BERTGEN_BIND2(ffi::S8));
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_gemm_nn, GemmNN, BERTGEN_BIND2(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_gemm_nn_bias, GemmNNBias, BERTGEN_BIND_BIAS_ACT);
#define BERTGEN_BIND_I4                                                                                       \
  ffi::Ffi::Bind()                                                                                            \
      .Ctx<ffi::ThreadPool>()                                                                                 \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                           \
      .Arg<ffi::Buffer<ffi::U8>>()                                                                            \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                           \
      .Ret<ffi::Buffer<ffi::F32>>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_matmul_nn_i4, MatmulNNI4, BERTGEN_BIND_I4);
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_gemm_nn_i8, GemmNNI8, BERTGEN_BIND2(ffi::S8));
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_gemm_nt_i8, GemmNTI8, BERTGEN_BIND2(ffi::S8));
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_gemm_nn_i4, GemmNNI4, BERTGEN_BIND_I4);
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_attend_one, AttendOne,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_reorder_rows, ReorderRows,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_gemm_packed, GemmPacked, BERTGEN_BIND_BIAS_ACT);
#define BERTGEN_BIND_PACKED_Q(W)                                                                              \
  ffi::Ffi::Bind()                                                                                            \
      .Ctx<ffi::ThreadPool>()                                                                                 \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                           \
      .Arg<ffi::Buffer<W>>()                                                                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                           \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                           \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                           \
      .Attr<int64_t>("act")
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_gemm_packed_i8, GemmPackedI8, BERTGEN_BIND_PACKED_Q(ffi::S8));
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_gemm_packed_i4, GemmPackedI4, BERTGEN_BIND_PACKED_Q(ffi::U8));
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_argmax_rows, ArgmaxRows,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::S32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_layer_norm, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_add_layer_norm, AddLayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_beam_candidates, BeamCandidates,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(bertgen_pack_panels, PackPanels,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("transposed"));

// How long (ns) a pool thread keeps looking for the next parallel job after finishing one (0: it returns at once).
extern "C" void bertgen_set_spin_ns(int64_t ns) { g_spin_ns.store(ns < 0 ? 0 : ns); }

// Columns per packed panel on this build (head-major products need a head dim that is a multiple of it).
extern "C" int bertgen_panel_width() { return kNr; }
