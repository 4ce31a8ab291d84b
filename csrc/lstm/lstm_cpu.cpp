// Recurrent cells and sequence layers on CPU: LSTM (with optional projection), GRU, tanh/ReLU RNN.
//
// One rnn_layer call runs a whole layer-direction with the time loop in C++:
//   1. gates_x = X W_ih^T for a chunk of ~256 rows (8 steps at batch 32): one GEMM per chunk,
//      ~half the FLOPs of the layer, split across threads;
//   2. per step t: gates_h = h_{t-1} W_hh^T on the step's rows and the fused cell (lstm_cell_cpu.h),
//      tile by tile in one pass (fused_step), then for LSTM with proj_size h_t = r_t W_hr^T.
// With a gradient to come, each row's h_{t-1}, gate activations, c_{t-1} and c_t go to a workspace.
// The backward walks the same chunks last to first: per step the cell backward and one GEMM
// (d h_{t-1} = d gates W_hh); per chunk d input and the weight gradients, one GEMM each. PackedSequence
// input is the same loop with a shrinking (or, in reverse, growing) number of rows per step; rows
// that join take h0 / c0, rows that leave write hy / cy.
//
// fp32 GEMMs run on oneDNN's brgemm (lstm_gemm_cpu.h); fp64 on MKL's dgemm.
//
// bf16 computes in fp32: inputs and weights are converted once per call and the states stay fp32
// between steps (torch's bf16 path rounds h to bf16 every step), outputs are rounded at the end.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <sys/mman.h>
#include <time.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "lstm/lstm_cell_cpu.h"
#include "lstm/lstm_gemm_cpu.h"
#include "lstm/lstm_ops.h"
#include "lstm/rnn_cell_ops.h"

namespace fastdl::rnn {
namespace {

using cpu::gemm;
using cpu::Vec;

template <typename T>
void copy_rows(int64_t rows, int64_t cols, const T* src, int64_t src_stride, T* dst, int64_t dst_stride) {
  for (int64_t b = 0; b < rows; ++b) std::memcpy(dst + b * dst_stride, src + b * src_stride, cols * sizeof(T));
}
template <typename T>
void zero_rows(int64_t rows, int64_t cols, T* dst, int64_t dst_stride) {
  for (int64_t b = 0; b < rows; ++b) std::fill(dst + b * dst_stride, dst + b * dst_stride + cols, T(0));
}

// Internal buffers of an op call (transposed weights, gate tiles, running state, per-chunk gradients),
// in memory this thread keeps between calls, one slot per buffer. Every call writes them before
// reading, so reuse only saves the page faults of fresh large allocations: ~10 MB per forward at
// B = 32, H = 512, where the kernel zeroing new pages was 6% of the time (perf). Held until the
// thread exits; a slot grows to the largest call seen.
enum Slot : int {
  kWihT, kWhhT, kWhrT, kGatesX, kGatesH, kHState, kCState, kRState,                    // forward
  kGradGatesX, kGradGatesH, kGradH, kGradC, kGradHAll, kGradR, kGWihT, kGWhhT, kGWhrT,  // backward
  kPackedWih, kPackedWhh,                                                               // backward, fp32
  kNumSlots
};

at::Tensor scratch(Slot slot, c10::IntArrayRef sizes, at::ScalarType dtype) {
  struct Buffer {
    void* ptr = nullptr;
    size_t bytes = 0;
    ~Buffer() { std::free(ptr); }
  };
  static thread_local std::array<Buffer, kNumSlots> buffers;
  Buffer& buf = buffers[slot];
  const size_t bytes = std::max<size_t>(64, c10::multiply_integers(sizes) * c10::elementSize(dtype));
  if (buf.bytes < bytes) {
    std::free(buf.ptr);
    buf.ptr = nullptr;
    buf.bytes = 0;
    TORCH_CHECK(posix_memalign(&buf.ptr, 64, bytes) == 0, "rnn_layer: cannot allocate ", bytes, " bytes of scratch");
    buf.bytes = bytes;
  }
  return at::from_blob(buf.ptr, sizes, at::TensorOptions().dtype(dtype));
}

// Memory for the layer's workspace (an op output, saved by autograd until the backward has run). At
// B = 32, T = 128, H = 512 it is 58 MB: above glibc's largest mmap threshold (32 MB), so every forward
// would map fresh pages and every backward unmap them. perf of a single-threaded forward + backward: 14% of
// the time in the kernel (page faults, zeroing pages, unmapping). A freed workspace therefore returns here
// and the next call of the same size takes it back; blocks are 2 MB aligned and advised for transparent
// huge pages, so a new one faults in 2 MB at a time. At most kMaxCached bytes are kept, in kMaxBlocks
// blocks; the rest go back to the OS.
class WorkspacePool {
 public:
  static WorkspacePool& get() {
    static WorkspacePool* pool = new WorkspacePool();  // never destroyed: tensors may outlive static destructors
    return *pool;
  }

  at::Tensor empty(c10::IntArrayRef sizes, const at::TensorOptions& options) {
    const size_t bytes = std::max<size_t>(1, c10::multiply_integers(sizes) * options.dtype().itemsize());
    void* ptr = take(bytes);
    return at::from_blob(ptr, sizes, [this, bytes](void* p) { give_back(p, bytes); }, options);
  }

 private:
  static constexpr size_t kAlign = size_t(2) << 20, kMaxCached = size_t(512) << 20, kMaxBlocks = 4;
  struct Block {
    void* ptr;
    size_t bytes;
  };

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest cached block that fits without wasting more than half of it.
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i)
        if (free_[i].bytes >= bytes && free_[i].bytes <= 2 * bytes && (best == free_.size() || free_[i].bytes < free_[best].bytes))
          best = i;
      if (best < free_.size()) {
        void* ptr = free_[best].ptr;
        cached_ -= free_[best].bytes;
        free_.erase(free_.begin() + best);
        return ptr;
      }
    }
    void* ptr = nullptr;
    TORCH_CHECK(posix_memalign(&ptr, kAlign, bytes) == 0, "rnn_layer: cannot allocate a workspace of ", bytes,
                " bytes");
    madvise(ptr, bytes, MADV_HUGEPAGE);  // a hint: fine to fail where THP is off
    return ptr;
  }

  void give_back(void* ptr, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back({ptr, bytes});
    cached_ += bytes;
    while (cached_ > kMaxCached || free_.size() > kMaxBlocks) {  // drop the oldest first
      cached_ -= free_.front().bytes;
      std::free(free_.front().ptr);
      free_.erase(free_.begin());
    }
  }

  std::mutex mutex_;
  std::vector<Block> free_;
  size_t cached_ = 0;
};

// Whether one step's recurrent GEMM (and the cell, and the LSTMCell op's GEMM) is split across threads.
// A step is a fork/join of the thread pool, and on a machine shared with other jobs one descheduled
// thread stalls the join for a whole time slice at every step: under load ~9, serial steps gave a
// forward of 500-560 ms against 940-1370 ms with parallel ones. But on an idle 2-core machine serial
// steps leave the second core idle for most of the forward (the per-step GEMM is ~60% of it): with a
// 64 MFLOP-per-thread threshold B = 32, H = 512 (67 MFLOP a step) stayed serial and ran at 1.57x
// torch's forward, 1.18x forward + backward, 0.83x the LSTMCell step; with 4 MFLOP per thread (~20 us
// of GEMM, a few fork/joins' worth) 1.04x, 0.93x, 0.50x (benchmarks/RESULTS.md, lstm). Every tile is
// owned by one thread with a fixed reduction order, so results do not depend on this choice (checked
// bit for bit at 1 and 2 threads, 4 and 64 MFLOP).
// FASTDL_RNN_STEP_MFLOP (environment, read once) overrides the threshold.
inline int64_t step_mflop_threshold() {
  static const int64_t v = [] {
    const char* e = std::getenv("FASTDL_RNN_STEP_MFLOP");
    return e ? std::max<int64_t>(0, std::atoll(e)) : int64_t(4);
  }();
  return v;
}
inline bool parallel_steps(int64_t batch, int64_t gates_width, int64_t state) {
  return 2 * batch * gates_width * state >= int64_t(at::get_num_threads()) * (step_mflop_threshold() << 20);
}

// FASTDL_RNN_PROFILE=1 (environment, read once): each fp32 rnn_layer forward prints to stderr where its
// wall time went, per thread: the input projection, the recurrent GEMM, the cell, copies of state rows, and
// waiting for the other threads (at the per-step barrier, or in the fork/join of a step's parallel region).
// FASTDL_RNN_PROFILE=cpu counts each thread's CPU time instead (clock_gettime(CLOCK_THREAD_CPUTIME_ID), a
// system call of ~0.3 us per mark, ~5% of a forward), which time slices lost to other jobs on a loaded
// machine do not inflate. Off, a phase costs one predictable branch.
namespace prof {
enum Phase : int { kPack, kProj, kGemm, kCell, kCopy, kWait, kSteps, kNumPhases };
constexpr const char* kNames[kNumPhases] = {"pack", "proj", "gemm", "cell", "copy", "wait", "steps"};
constexpr int kMaxThreads = 64;
inline int mode() {  // 0 off, 1 wall, 2 thread CPU time
  static const int m = [] {
    const char* e = std::getenv("FASTDL_RNN_PROFILE");
    if (!e || !*e || std::strcmp(e, "0") == 0) return 0;
    return std::strcmp(e, "cpu") == 0 ? 2 : 1;
  }();
  return m;
}
inline bool enabled() { return mode() != 0; }
inline double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
inline double thread_now() {
  if (mode() == 1) return now();
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}
struct alignas(64) Acc {
  double s[kNumPhases];
};
inline Acc* accs() {
  static Acc a[kMaxThreads];
  return a;
}
inline void reset() { std::memset(accs(), 0, sizeof(Acc) * kMaxThreads); }
// Adds the time since the last mark to phase ph of thread tid and moves the mark.
struct Clock {
  bool on = enabled();
  int tid = std::min(at::get_thread_num(), kMaxThreads - 1);
  double t = on ? thread_now() : 0;
  void mark(Phase ph) {
    if (!on) return;
    const double n = thread_now();
    accs()[tid].s[ph] += n - t;
    t = n;
  }
};
inline void report(const char* what, int64_t T, int64_t B, int64_t H, int threads, double wall) {
  std::fprintf(stderr, "fastdl rnn_layer %s T=%ld B=%ld H=%ld threads=%d: wall %.2f ms, phases in %s ms\n", what,
               long(T), long(B), long(H), threads, wall * 1e3, mode() == 2 ? "thread CPU" : "wall");
  for (int t = 0; t < std::min(threads, kMaxThreads); ++t) {
    std::fprintf(stderr, "  thread %d:", t);
    for (int ph = 0; ph < kNumPhases; ++ph) std::fprintf(stderr, " %s %.2f", kNames[ph], accs()[t].s[ph] * 1e3);
    std::fprintf(stderr, " ms\n");
  }
}
}  // namespace prof

// Whether the fp32 gate-blocked forward runs its time loop as one parallel region (forward_persistent):
// whenever its steps are worth splitting across threads (parallel_steps) and every thread gets a panel; on one
// thread too, where it is the same loop without the barrier and packs the weights faster. It needs
// OpenMP's guarantee that a region's threads run at once (they meet at a barrier every step); with
// torch's other parallel backends a task could wait for a thread that waits on it.
// FASTDL_RNN_ONE_REGION=0 (environment, read once) keeps a fork/join per step (fused_step) instead.
inline bool one_region_forward(Mode mode, int64_t batch, int64_t hidden, int64_t proj, int64_t gb) {
#if FASTDL_RNN_BRGEMM && AT_PARALLEL_OPENMP
  static const bool allowed = [] {
    const char* e = std::getenv("FASTDL_RNN_ONE_REGION");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  const int64_t threads = at::get_num_threads();
  return allowed && gb > 0 && proj == 0 && (hidden + gb - 1) / gb >= threads &&
         !at::in_parallel_region() && parallel_steps(batch, num_gates(mode) * hidden, hidden);
#else
  return false;
#endif
}

// Step index of the k-th step in processing order.
inline int64_t step_at(const LayerParams& p, int64_t k) { return p.reverse ? p.seq_len - 1 - k : k; }
// Rows of the k-th processed step; 0 outside [0, T).
inline int64_t rows_at(const LayerParams& p, int64_t k) {
  return k < 0 || k >= p.seq_len ? 0 : p.batch_sizes[step_at(p, k)];
}

// Rows [r0, r1) of the steps k_lo..k_hi (processing order): contiguous in either direction.
inline std::pair<int64_t, int64_t> chunk_rows(const LayerParams& p, int64_t k_lo, int64_t k_hi) {
  const int64_t ta = step_at(p, k_lo), tb = step_at(p, k_hi);
  return {std::min(p.offsets[ta], p.offsets[tb]),
          std::max(p.offsets[ta] + p.batch_sizes[ta], p.offsets[tb] + p.batch_sizes[tb])};
}

#if FASTDL_RNN_BRGEMM
// Rows per brgemm call of the forward's input projection (a chunk of ~256 rows is one call per panel; see
// brgemm_packed).
constexpr int64_t kProjRows = 256;

// C[m, n] = A[m, K] B[K, n] (row-major, leading dimensions given) in one thread, K in chunks of 512.
inline void brgemm_block(int64_t m, int64_t n, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                         float* C, int64_t ldc) {
  constexpr int64_t kChunk = 512;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk)
    at::native::cpublas::brgemm(m, n, std::min(kChunk, K - k0), lda, ldb, ldc, k0 > 0, A + k0, B + k0 * ldb, C,
                                /*is_vnni=*/false);
}

// Starts loading the input-projection gates (x W_ih^T) of rows [m0, m0 + m), panel q, into L2 ahead of the
// cell. The input projection wrote them up to a chunk of steps earlier (a 2 MB chunk at B = 32, H = 512)
// and the recurrent weights streamed through L2 since, so they come from L3: 32 rows of 512 bytes 8 KB
// apart. Issued before the panel's GEMM (~20 us), they arrive while it runs instead of stalling the cell.
inline void prefetch_igates(const CellFwdParams& c, int64_t m0, int64_t m, int64_t q) {
  const int64_t nb = num_gates(c.mode) * c.gate_block;
  const float* base = static_cast<const float*>(c.igates) + q * nb;
  for (int64_t b = m0; b < m0 + m; ++b)
    for (int64_t i = 0; i < nb; i += 16)
      _mm_prefetch(reinterpret_cast<const char*>(base + b * c.igates_stride + i), _MM_HINT_T1);
  if (c.c_prev) {  // LSTM: the c rows of these units, evicted from L2 by the weights a step streams
    const float* cp = static_cast<const float*>(c.c_prev) + q * c.gate_block;
    for (int64_t b = m0; b < m0 + m; ++b)
      for (int64_t i = 0; i < c.gate_block; i += 16)
        _mm_prefetch(reinterpret_cast<const char*>(cp + b * c.c_prev_stride + i), _MM_HINT_T1);
  }
}

// One forward step (fp32) in a single parallel region: a task takes gb hidden units (gate_block: 16 for LSTM,
// else 32) x 32 rows, runs the recurrent GEMM for the units' G gates as one brgemm call of 32 x (G * gb) x P
// on their packed panel of W_hh^T (gate-blocked: the G gates' gb columns side by side, one contiguous
// [P, G * gb] block, 128 KB for an LSTM at P = 512), then the cell on the same block while its gates are in
// L1. One region per step instead of two (GEMM, then cell): a step is ~0.2 ms at H = 512, and each region is
// a fork/join of the thread pool. The cell writes h to a buffer other than h_prev, which other tasks are still reading.
void fused_step(const CellFwdParams& c, const float* h_prev, int64_t P, const float* w_hh_packed, float* gh,
                bool parallel) {
  constexpr int64_t kRows = 32;
  const int64_t gb = c.gate_block, H = c.hidden, bs = c.batch, nb = num_gates(c.mode) * gb;
  const int64_t jt = (H + gb - 1) / gb, mt = (bs + kRows - 1) / kRows, ldg = c.hgates_stride;
  const int64_t tasks = jt * mt;
  const bool small = !parallel || bs * jt * nb * P < (int64_t(1) << 19);
  at::parallel_for(0, tasks, small ? tasks : 1, [&](int64_t begin, int64_t end) {
    prof::Clock clock;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t q = task % jt, m0 = (task / jt) * kRows;
      const int64_t j0 = q * gb, n = std::min(gb, H - j0), m = std::min(kRows, bs - m0);
      prefetch_igates(c, m0, m, q);
      brgemm_block(m, nb, P, h_prev + m0 * P, P, w_hh_packed + q * P * nb, nb, gh + m0 * ldg + q * nb, ldg);
      clock.mark(prof::kGemm);
      for (int64_t b = m0; b < m0 + m; ++b) cpu::cell_forward_block<float>(c, b, j0, j0 + n);
      clock.mark(prof::kCell);
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
}
#endif

#if FASTDL_RNN_BRGEMM && AT_PARALLEL_OPENMP
// A barrier for the workers of one parallel region, counted in slots: a worker that at::parallel_for gave
// several slots (fewer threads in the team than asked for) arrives once with all of them. Sense by
// generation: the last to arrive resets the count, then bumps the generation the others spin on. Spinning
// is short on an idle machine (the threads run the same work per step); after 20000 pauses (a few hundred
// us) it yields the core, so that on a loaded machine a descheduled peer or another job can run.
class SpinBarrier {
 public:
  explicit SpinBarrier(int64_t slots) : slots_(slots) {}
  void wait(int64_t weight) {
    const int64_t gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(weight, std::memory_order_acq_rel) + weight == slots_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int64_t spin = 0; gen_.load(std::memory_order_acquire) == gen; ++spin) {
      if (spin < 20000) {
        _mm_pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  const int64_t slots_;
  alignas(64) std::atomic<int64_t> count_{0};
  alignas(64) std::atomic<int64_t> gen_{0};
};

// Panel q of the gate-blocked packing (pack_gate_blocked below: [K, G, gb], unit columns of W^T gate by gate,
// zero past H) from w [G*H, K] row-major: G transposes of <= gb rows x K, 16 x 16 in AVX-512 registers
// (at::vec::transpose_mxn). A worker packs the panels it reads itself, inside the region: at::copy_ of the
// permuted view took 1.4 ms per 4 MB weight on one thread (plus a fork/join), two weights per forward.
void pack_panel(const float* w, int64_t H, int64_t K, int64_t G, int64_t gb, int64_t q, float* panel) {
  const int64_t j0 = q * gb, n = std::min(gb, H - j0), ld = G * gb;
  for (int64_t g = 0; g < G; ++g) {
    at::vec::transpose_mxn<float>(w + (g * H + j0) * K, K, panel + g * gb, ld, int(n), int(K));
    if (n < gb)
      for (int64_t k = 0; k < K; ++k) std::fill(panel + k * ld + g * gb + n, panel + k * ld + (g + 1) * gb, 0.f);
  }
}

// The whole fp32 gate-blocked forward without projection (LSTM, GRU, RNN) in one parallel region. Each
// worker owns a fixed range of the gate-blocked panels, so everything it writes is its own columns: its packed
// weight panels, the input projection of its panels (x W_ih^T for a chunk of steps: only its own cells read
// those gates), the recurrent GEMM and cell of its panels, its columns of c, h, the output and the saved
// workspace rows. The only exchange is h: a step's GEMM reads every unit of h_{t-1}, so the workers meet at
// one barrier per step, where fused_step opened and joined a parallel region per step and one per input
// chunk (on a loaded machine each fork/join can wait a time slice for a descheduled thread). A worker reads
// only its own panels, W_hh^T every step and W_ih^T every chunk (2 MB each at H = 512 on two threads). Every
// output tile is the same brgemm computation as in fused_step / brgemm_packed (same shapes and K chunks, one
// thread each; only where C is stored differs), so results are bit-identical to the other path and to any
// thread count.
void forward_persistent(const LayerParams& p, const float* cell_b_ih, const float* cell_b_hh, int64_t nslots) {
  constexpr int64_t kRows = 32;
  const int64_t H = p.hidden, P = H, I = p.input_size, B = p.batch, gb = p.gate_block, G = num_gates(p.mode);
  const int64_t nb = G * gb, jt = (H + gb - 1) / gb;
  const bool lstm = p.mode == Mode::kLSTM;
  const WorkspaceLayout L = workspace_layout(p.mode, H, 0);
  const int64_t Wd = L.width;
  float* ws = static_cast<float*>(p.workspace);
  float* out = static_cast<float*>(p.output);
  float* gx = static_cast<float*>(p.gates_x);
  float* gh = static_cast<float*>(p.gates_h);
  float* cs = static_cast<float*>(p.c_state);
  const float* x = static_cast<const float*>(p.input);
  float* const w_ih = static_cast<float*>(const_cast<void*>(p.w_ih_t));
  float* const w_hh = static_cast<float*>(const_cast<void*>(p.w_hh_t));
  float* const h_a = static_cast<float*>(p.h_state);
  float* const h_b = h_a + B * P;
  // gates_x and gates_h panel-major here, [panels, rows, nb]: a task's gates are one contiguous block (16 KB
  // for 32 rows of an LSTM panel) instead of 32 rows of 512 bytes 8 KB apart, which the cell read from L3.
  const int64_t gx_rows = std::min(p.rows, p.chunk_steps * B);
  const bool lstm_panel_cell = lstm && (gb == 16 || gb == 32) && cell_b_hh == nullptr;
  SpinBarrier barrier(nslots);
  at::parallel_for(0, nslots, 1, [&](int64_t s0, int64_t s1) {
    prof::Clock clock;
    const int64_t q0 = s0 * jt / nslots, q1 = s1 * jt / nslots;  // this worker's panels
    const int64_t u0 = q0 * gb, u1 = std::min(H, q1 * gb), nu = u1 - u0;  // and hidden units
    for (int64_t q = q0; q < q1; ++q) {
      pack_panel(static_cast<const float*>(p.w_ih), H, I, G, gb, q, w_ih + q * I * nb);
      pack_panel(static_cast<const float*>(p.w_hh), H, P, G, gb, q, w_hh + q * P * nb);
    }
    clock.mark(prof::kPack);
    float* hs = h_a;
    float* h_next = h_b;
    int64_t chunk_row0 = 0;
    for (int64_t k = 0; k < p.seq_len; ++k) {
      if (k % p.chunk_steps == 0 && q1 > q0) {
        const auto [r0, r1] = chunk_rows(p, k, std::min(p.seq_len, k + p.chunk_steps) - 1);
        for (int64_t q = q0; q < q1; ++q)
          cpu::brgemm_packed(r1 - r0, nb, I, x + r0 * I, I, w_ih + q * I * nb, nb, false, gx + q * gx_rows * nb, nb,
                             /*parallel=*/false, kProjRows);
        chunk_row0 = r0;
        clock.mark(prof::kProj);
      }
      const int64_t t = step_at(p, k), bs = p.batch_sizes[t], off = p.offsets[t];
      float* row = ws ? ws + off * Wd : nullptr;
      if (row && nu > 0) {
        copy_rows(bs, nu, hs + u0, P, row + L.hprev + u0, Wd);
        if (lstm) copy_rows(bs, nu, cs + u0, H, row + L.cprev + u0, Wd);
        clock.mark(prof::kCopy);
      }
      CellFwdParams c;
      c.mode = p.mode;
      c.dtype = p.dtype;
      c.batch = bs;
      c.hidden = H;
      c.igates_stride = nb, c.hgates_stride = nb;  // panel-major: set per panel below
      c.gate_block = gb;
      c.b_ih = cell_b_ih;
      c.b_hh = cell_b_hh;
      c.h_prev = hs, c.h_prev_stride = P;
      if (lstm) {
        c.c_prev = cs, c.c_prev_stride = H;
        c.c_out = cs, c.c_out_stride = H;
      }
      c.h_out = h_next, c.h_out_stride = P;
      c.saved = row ? row + L.saved : nullptr, c.saved_stride = Wd;
      // fused_step's tasks restricted to this worker's panels, every other step in reverse panel order: the
      // worker's W_hh^T panels (2 MB at H = 512 on two threads) do not fit its 1 MB L2, and streamed in the
      // same order every step an LRU cache keeps none of them; turning around, a step starts on the panels
      // the previous one read last, still in L2. The order of the panels does not change any result.
      const bool down = k % 2 == 1;
      for (int64_t m0 = 0; m0 < bs; m0 += kRows) {
        const int64_t m = std::min(kRows, bs - m0);
        for (int64_t i = 0; i < q1 - q0; ++i) {
          const int64_t q = down ? q1 - 1 - i : q0 + i;
          const int64_t j0 = q * gb, n = std::min(gb, H - j0);
          // The cell finds gate k of unit j of row b at gates + b * stride + q * (G - 1) * gb + k * gb + j (its
          // row-major gate-blocked indexing); these bases make that the panel's [rows, nb] block.
          c.igates = gx + q * gx_rows * nb + (off - chunk_row0) * nb - q * nb;
          c.hgates = gh + q * B * nb - q * nb;
          prefetch_igates(c, m0, m, q);
          brgemm_block(m, nb, P, hs + m0 * P, P, w_hh + q * P * nb, nb, gh + q * B * nb + m0 * nb, nb);
          clock.mark(prof::kGemm);
          if (lstm_panel_cell && n == gb) {
            gb == 16 ? cpu::lstm_cell_panel_f32<16>(c, m0, m, j0) : cpu::lstm_cell_panel_f32<32>(c, m0, m, j0);
          } else {
            for (int64_t b = m0; b < m0 + m; ++b) cpu::cell_forward_block<float>(c, b, j0, j0 + n);
          }
          clock.mark(prof::kCell);
        }
      }
      if (nu > 0) {
        if (row && lstm) copy_rows(bs, nu, cs + u0, H, row + L.c + u0, Wd);
        copy_rows(bs, nu, h_next + u0, P, out + off * P + u0, P);
        // Rows whose sequence ends here have their final state.
        const int64_t next = rows_at(p, k + 1);
        if (bs > next)
          copy_rows(bs - next, nu, h_next + next * P + u0, P, static_cast<float*>(p.hy) + next * P + u0, P);
        clock.mark(prof::kCopy);
      }
      barrier.wait(s1 - s0);  // every unit of h_t is written before any worker's next GEMM reads it
      clock.mark(prof::kWait);
      std::swap(hs, h_next);
    }
    if (lstm && nu > 0) copy_rows(B, nu, cs + u0, H, static_cast<float*>(p.cy) + u0, H);
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
}
#endif

template <typename T>
void layer_forward(const LayerParams& p) {
  const int64_t H = p.hidden, P = p.proj > 0 ? p.proj : H, I = p.input_size, B = p.batch;
  const int64_t GH = num_gates(p.mode) * H;
  const bool lstm = p.mode == Mode::kLSTM, gru = p.mode == Mode::kGRU, proj = p.proj > 0;
  const WorkspaceLayout L = workspace_layout(p.mode, H, p.proj);
  const int64_t Wd = L.width;
  T* ws = static_cast<T*>(p.workspace);
  T* out = static_cast<T*>(p.output);
  T* gx = static_cast<T*>(p.gates_x);
  T* gh = static_cast<T*>(p.gates_h);
  T* hs = static_cast<T*>(p.h_state);
  T* cs = static_cast<T*>(p.c_state);
  const T* x = static_cast<const T*>(p.input);
  // Weights as the GEMMs want them: row-major W^T when the caller provides it, else transposed on the fly.
  const T* w_ih = static_cast<const T*>(p.w_ih_t ? p.w_ih_t : p.w_ih);
  const T* w_hh = static_cast<const T*>(p.w_hh_t ? p.w_hh_t : p.w_hh);
  const T* w_hr = static_cast<const T*>(p.w_hr_t ? p.w_hr_t : p.w_hr);
  const bool ih_t = p.w_ih_t == nullptr, hh_t = p.w_hh_t == nullptr, hr_t = p.w_hr_t == nullptr;
  // Gate-blocked (p.gate_block > 0, fp32 brgemm): w_ih_t / w_hh_t are packed panels and the gate rows
  // (gates_x, gates_h) are GHp = ceil(H / gb) * G * gb wide, in the cell's gate-blocked column order.
  const int64_t gb = p.gate_block, G = num_gates(p.mode);
  const int64_t GHp = gb ? (H + gb - 1) / gb * G * gb : GH;

  // Biases are added by the cell, on gates it has in L1 anyway: b_ih + b_hh summed once for LSTM / RNN;
  // GRU keeps b_hn apart, scaled by r. (Folded into the input projection, as before, they cost a copy of
  // the bias into every row of gates_x ahead of the GEMM: 32 MB of stores per forward at T = 128, B = 32,
  // H = 512, and a read of C in each GEMM tile.)
  const T* b_ih = static_cast<const T*>(p.b_ih);
  const T* b_hh = static_cast<const T*>(p.b_hh);
  std::vector<T> bias_sum;
  if (!gru && b_ih && b_hh) {
    bias_sum.resize(GH);
    for (int64_t j = 0; j < GH; ++j) bias_sum[j] = b_ih[j] + b_hh[j];
  }
  const T* cell_b_ih = gru ? b_ih : (bias_sum.empty() ? (b_ih ? b_ih : b_hh) : bias_sum.data());
  const T* cell_b_hh = gru ? b_hh : nullptr;

  // The state buffers start as h0 / c0 for every row: a row joins the recurrence when its sequence
  // starts (every row at the first step, or later in a reverse pass over a packed batch). h ping-pongs
  // between two buffers (a step reads one, writes the other); c is updated in place.
  T* h_next = hs + B * P;
  std::memcpy(hs, p.h0, B * P * sizeof(T));
  std::memcpy(h_next, p.h0, B * P * sizeof(T));
  if (lstm) std::memcpy(cs, p.c0, B * H * sizeof(T));

  const bool par = parallel_steps(B, GH, P);
  const bool profile = prof::enabled() && std::is_same_v<T, float>;
  if (profile) prof::reset();
  const double t_start = profile ? prof::now() : 0;
#if FASTDL_RNN_BRGEMM && AT_PARALLEL_OPENMP
  if constexpr (std::is_same_v<T, float>) {
    if (p.one_region) {
      const int64_t threads = at::get_num_threads();
      forward_persistent(p, cell_b_ih, cell_b_hh, threads);
      if (profile) prof::report("forward (one region)", p.seq_len, B, H, int(threads), prof::now() - t_start);
      return;
    }
  }
#endif
  prof::Clock clock;
  int64_t chunk_row0 = 0;
  for (int64_t k = 0; k < p.seq_len; ++k) {
    if (k % p.chunk_steps == 0) {
      // x W_ih^T for the next chunk of steps: their rows are contiguous in either direction.
      const int64_t k_last = std::min(p.seq_len, k + p.chunk_steps) - 1;
      const int64_t ta = step_at(p, k), tb = step_at(p, k_last);
      const int64_t r0 = std::min(p.offsets[ta], p.offsets[tb]);
      const int64_t r1 = std::max(p.offsets[ta] + p.batch_sizes[ta], p.offsets[tb] + p.batch_sizes[tb]);
#if FASTDL_RNN_BRGEMM
      if constexpr (std::is_same_v<T, float>) {
        if (gb) {
          cpu::brgemm_packed(r1 - r0, GHp, I, x + r0 * I, I, w_ih, G * gb, false, gx, GHp, true, kProjRows);
        } else {
          gemm<T>(false, ih_t, r1 - r0, GH, I, x + r0 * I, I, w_ih, ih_t ? I : GH, false, gx, GH);
        }
      } else
#endif
      {
        gemm<T>(false, ih_t, r1 - r0, GH, I, x + r0 * I, I, w_ih, ih_t ? I : GH, false, gx, GH);
      }
      chunk_row0 = r0;
      clock.mark(prof::kProj);
    }
    const int64_t t = step_at(p, k), bs = p.batch_sizes[t], off = p.offsets[t];
    T* row = ws ? ws + off * Wd : nullptr;
    if (row) {
      copy_rows(bs, P, hs, P, row + L.hprev, Wd);
      if (lstm) copy_rows(bs, H, cs, H, row + L.cprev, Wd);
    }
    CellFwdParams c;
    c.mode = p.mode;
    c.dtype = p.dtype;
    c.batch = bs;
    c.hidden = H;
    c.igates = gx + (off - chunk_row0) * GHp, c.igates_stride = GHp;
    c.hgates = gh, c.hgates_stride = GHp;
    c.gate_block = gb;
    c.b_ih = cell_b_ih;
    c.b_hh = cell_b_hh;
    c.h_prev = hs, c.h_prev_stride = P;
    if (lstm) {
      c.c_prev = cs, c.c_prev_stride = H;
      c.c_out = cs, c.c_out_stride = H;
    }
    T* r = proj ? (row ? row + L.r : static_cast<T*>(p.r_state)) : nullptr;
    c.h_out = proj ? r : h_next;
    c.h_out_stride = proj ? (row ? Wd : H) : P;
    c.saved = row ? row + L.saved : nullptr, c.saved_stride = Wd;
#if FASTDL_RNN_BRGEMM
    if constexpr (std::is_same_v<T, float>) {
      if (gb) {
        clock.mark(prof::kCopy);
        fused_step(c, hs, P, w_hh, gh, par);
        clock.mark(prof::kSteps);
      } else {
        gemm<T>(false, hh_t, bs, GH, P, hs, P, w_hh, P, false, gh, GH, par);
        cpu::cell_forward<T>(c, par);
      }
    } else
#endif
    {
      gemm<T>(false, hh_t, bs, GH, P, hs, P, w_hh, hh_t ? P : GH, false, gh, GH, par);
      cpu::cell_forward<T>(c, par);
    }
    if (row && lstm) copy_rows(bs, H, cs, H, row + L.c, Wd);
    if (proj) {
      gemm<T>(false, hr_t, bs, P, H, r, c.h_out_stride, w_hr, hr_t ? H : P, false, out + off * P, P, par);
      std::memcpy(h_next, out + off * P, bs * P * sizeof(T));
    } else {
      std::memcpy(out + off * P, h_next, bs * P * sizeof(T));
    }
    // Rows whose sequence ends here have their final state.
    const int64_t next = rows_at(p, k + 1);
    if (bs > next) std::memcpy(static_cast<T*>(p.hy) + next * P, h_next + next * P, (bs - next) * P * sizeof(T));
    std::swap(hs, h_next);
  }
  if (lstm) std::memcpy(p.cy, cs, B * H * sizeof(T));
  clock.mark(prof::kCopy);
  if (profile) prof::report("forward", p.seq_len, B, H, par ? at::get_num_threads() : 1, prof::now() - t_start);
}

// [rows, cols] (row stride ld) -> a new contiguous [cols, rows].
template <typename T>
at::Tensor transposed(const T* src, int64_t rows, int64_t cols, int64_t ld) {
  const auto opts = at::TensorOptions().dtype(cpu::scalar_type_of<T>());
  return at::from_blob(const_cast<T*>(src), {rows, cols}, {ld, 1}, opts).t().contiguous();
}

template <typename T>
void add_column_sums(const T* g, int64_t rows, int64_t cols, std::vector<double>& acc) {
  std::vector<T> part(cols, T(0));
  for (int64_t r = 0; r < rows; ++r)
    at::vec::map2<T>([](Vec<T> a, Vec<T> b) { return a + b; }, part.data(), part.data(), g + r * cols, cols);
  for (int64_t j = 0; j < cols; ++j) acc[j] += double(part[j]);
}

// Backward through time in chunks of steps (the forward's chunks, taken last to first): the gate
// gradients of a chunk (~256 rows) stay in cache, and the chunk's share of d input and of every weight
// gradient is one GEMM each with K = the chunk's rows, accumulated into W^T in chunk order.
template <typename T>
void layer_backward(const LayerBwdParams& q) {
  const LayerParams& p = q.fwd;
  const int64_t H = p.hidden, P = p.proj > 0 ? p.proj : H, I = p.input_size;
  const int64_t GH = num_gates(p.mode) * H;
  const bool lstm = p.mode == Mode::kLSTM, gru = p.mode == Mode::kGRU, proj = p.proj > 0;
  const WorkspaceLayout L = workspace_layout(p.mode, H, p.proj);
  const int64_t Wd = L.width;
  const auto opts = at::TensorOptions().dtype(cpu::scalar_type_of<T>());
  const T* ws = static_cast<const T*>(p.workspace);
  const T* X = static_cast<const T*>(p.input);
  const T* w_hh = static_cast<const T*>(p.w_hh);
  T* dgx = static_cast<T*>(q.grad_gates_x);
  T* dgh = gru ? static_cast<T*>(q.grad_gates_h) : dgx;
  T* dh = static_cast<T*>(q.grad_h);
  T* dc = static_cast<T*>(q.grad_c);
  T* dh_all = static_cast<T*>(q.grad_h_all);
  const T* g_out = static_cast<const T*>(q.grad_output);
  const T* g_hy = static_cast<const T*>(q.grad_hy);
  const T* g_cy = static_cast<const T*>(q.grad_cy);

  const auto dtype = cpu::scalar_type_of<T>();
  at::Tensor w_ih_t = scratch(kGWihT, {I, GH}, dtype), w_hh_t = scratch(kGWhhT, {P, GH}, dtype);
  at::Tensor w_hr_t = proj ? scratch(kGWhrT, {H, P}, dtype) : at::Tensor();
  std::vector<double> db_ih(GH, 0.0), db_hh(gru ? GH : 0, 0.0);
  const int64_t nchunks = (p.seq_len + p.chunk_steps - 1) / p.chunk_steps;
  const bool par = parallel_steps(p.batch, GH, P);

  // The GEMMs by W_hh (every step) and W_ih (every chunk) read them as B, [G*H, P or I] row-major: for
  // fp32 brgemm packed into 32-column panels once per call (cpu::brgemm_packed).
  constexpr int64_t kPanel = 32;
  const T* w_ih = static_cast<const T*>(p.w_ih);
  T* w_hh_packed = nullptr;
  T* w_ih_packed = nullptr;
#if FASTDL_RNN_BRGEMM
  if constexpr (std::is_same_v<T, float>) {
    w_hh_packed = scratch(kPackedWhh, {(P + kPanel - 1) / kPanel, GH, kPanel}, dtype).template data_ptr<T>();
    cpu::pack_b<T>(false, GH, P, w_hh, P, kPanel, w_hh_packed);
    if (q.grad_input) {
      w_ih_packed = scratch(kPackedWih, {(I + kPanel - 1) / kPanel, GH, kPanel}, dtype).template data_ptr<T>();
      cpu::pack_b<T>(false, GH, I, w_ih, I, kPanel, w_ih_packed);
    }
  }
#endif
  // C[M, N] (+)= A[M, G*H] W[G*H, N], W packed or not.
  auto times_w = [&](int64_t M, int64_t N, const T* A, const T* W, const T* W_packed, bool accumulate, T* C,
                     bool parallel) {
#if FASTDL_RNN_BRGEMM
    if constexpr (std::is_same_v<T, float>) {
      if (W_packed) return cpu::brgemm_packed(M, N, GH, A, GH, W_packed, kPanel, accumulate, C, N, parallel);
    }
#endif
    gemm<T>(false, false, M, N, GH, A, GH, W, N, accumulate, C, N, parallel);
  };

  for (int64_t chunk = nchunks - 1; chunk >= 0; --chunk) {
    const int64_t k_lo = chunk * p.chunk_steps, k_hi = std::min(p.seq_len, k_lo + p.chunk_steps) - 1;
    const auto [r0, r1] = chunk_rows(p, k_lo, k_hi);
    for (int64_t k = k_hi; k >= k_lo; --k) {
      const int64_t t = step_at(p, k), bs = p.batch_sizes[t], off = p.offsets[t];
      const T* row = ws + off * Wd;
      // Rows whose sequence ended at this step in the forward start from d hy / d cy; the others
      // carry d h_t, d c_t from the step after.
      const int64_t next = rows_at(p, k + 1);
      if (bs > next) {
        g_hy ? copy_rows(bs - next, P, g_hy + next * P, P, dh + next * P, P) : zero_rows(bs - next, P, dh + next * P, P);
        if (lstm)
          g_cy ? copy_rows(bs - next, H, g_cy + next * H, H, dc + next * H, H) : zero_rows(bs - next, H, dc + next * H, H);
      }
      if (g_out) at::vec::map2<T>([](Vec<T> a, Vec<T> b) { return a + b; }, dh, dh, g_out + off * P, bs * P);
      const T* grad_h = dh;
      int64_t grad_h_stride = P;
      if (proj) {
        // h_t = r_t W_hr^T: keep d h_t for grad_w_hr, and d r_t = d h_t W_hr feeds the cell.
        std::memcpy(dh_all + (off - r0) * P, dh, bs * P * sizeof(T));
        gemm<T>(false, false, bs, H, P, dh, P, static_cast<const T*>(p.w_hr), H, false, static_cast<T*>(q.grad_r), H,
                par);
        grad_h = static_cast<const T*>(q.grad_r);
        grad_h_stride = H;
      }

      CellBwdParams c;
      c.mode = p.mode;
      c.dtype = p.dtype;
      c.batch = bs;
      c.hidden = H;
      c.grad_h = grad_h, c.grad_h_stride = grad_h_stride;
      c.saved = row + L.saved, c.saved_stride = Wd;
      c.h_prev = row + L.hprev, c.h_prev_stride = Wd;
      if (lstm) {
        c.grad_c = dc, c.grad_c_stride = H;
        c.c_prev = row + L.cprev, c.c_prev_stride = Wd;
        c.c_out = row + L.c, c.c_out_stride = Wd;
        c.grad_c_prev = dc, c.grad_c_prev_stride = H;
      }
      c.grad_igates = dgx + (off - r0) * GH, c.grad_igates_stride = GH;
      if (gru) {
        c.grad_hgates = dgh + (off - r0) * GH, c.grad_hgates_stride = GH;
        c.grad_h_prev = dh, c.grad_h_prev_stride = P;  // z * d h, the W_hh path is added below
      }
      cpu::cell_backward<T>(c, par);
      // d h_{t-1} (+)= d gates_h W_hh
      times_w(bs, P, dgh + (off - r0) * GH, w_hh, w_hh_packed, gru, dh, par);

      // Rows that joined at this step took h0 / c0.
      const int64_t joined = rows_at(p, k - 1);
      if (bs > joined) {
        copy_rows(bs - joined, P, dh + joined * P, P, static_cast<T*>(q.grad_h0) + joined * P, P);
        if (lstm) copy_rows(bs - joined, H, dc + joined * H, H, static_cast<T*>(q.grad_c0) + joined * H, H);
      }
    }

    // This chunk's share of d input and of the weight gradients (W^T += operand^T d gates).
    const int64_t nr = r1 - r0;
    const bool acc = chunk != nchunks - 1;
    if (q.grad_input) times_w(nr, I, dgx, w_ih, w_ih_packed, false, static_cast<T*>(q.grad_input) + r0 * I, true);
    gemm<T>(false, false, I, GH, nr, transposed(X + r0 * I, nr, I, I).template data_ptr<T>(), nr, dgx, GH, acc,
            w_ih_t.data_ptr<T>(), GH);
    gemm<T>(false, false, P, GH, nr, transposed(ws + r0 * Wd + L.hprev, nr, P, Wd).template data_ptr<T>(), nr, dgh,
            GH, acc, w_hh_t.data_ptr<T>(), GH);
    if (proj)
      gemm<T>(false, false, H, P, nr, transposed(ws + r0 * Wd + L.r, nr, H, Wd).template data_ptr<T>(), nr, dh_all, P,
              acc, w_hr_t.data_ptr<T>(), P);
    if (q.grad_b_ih) add_column_sums(dgx, nr, GH, db_ih);
    if (q.grad_b_ih && gru) add_column_sums(dgh, nr, GH, db_hh);
  }

  at::from_blob(q.grad_w_ih, {GH, I}, opts).copy_(w_ih_t.t());
  at::from_blob(q.grad_w_hh, {GH, P}, opts).copy_(w_hh_t.t());
  if (proj) at::from_blob(q.grad_w_hr, {P, H}, opts).copy_(w_hr_t.t());
  // Bias gradients: column sums of the gate gradients, per chunk in T, across chunks in double.
  if (q.grad_b_ih) {
    T* bi = static_cast<T*>(q.grad_b_ih);
    T* bh = static_cast<T*>(q.grad_b_hh);
    for (int64_t j = 0; j < GH; ++j) {
      bi[j] = T(db_ih[j]);
      bh[j] = T(gru ? db_hh[j] : db_ih[j]);
    }
  }
}

// ---- op bodies ------------------------------------------------------------------------------------

void fill_layer(LayerParams& p, const LayerShape& s, bool reverse) {
  p.mode = s.mode;
  p.reverse = reverse;
  p.seq_len = s.seq_len;
  p.batch = s.batch;
  p.rows = s.rows;
  p.input_size = s.input_size;
  p.hidden = s.hidden;
  p.proj = s.proj;
  p.batch_sizes = s.batch_sizes.data();
  p.offsets = s.offsets.data();
}

// Units per gate-blocked tile of the fp32 forward (lstm_params.h); 0 where brgemm is not built in. LSTM
// takes half: 16 units x 4 gates = 64-column panels, one zmm per gate and row in the cell. One Zen 5 core
// runs a step's 32 x 64 x 512 brgemm calls over 16 panels at 216-221 GFLOP/s against 203-216 for
// 32 x 128 x 512 over 8 (same 2 MB of W_hh^T); the forward's GEMM phase 20.8 -> 20.2 ms per thread at 2 threads.
// Results are the same bits either way (each output element is the same K-ordered dot product).
constexpr int64_t kGateBlock = FASTDL_RNN_BRGEMM ? 32 : 0;
inline int64_t gate_block(Mode mode) { return mode == Mode::kLSTM ? kGateBlock / 2 : kGateBlock; }

// w [G*H, K] (row-major, nn.LSTM's layout) -> packed [ceil(H / gb), K, G * gb]: panel q holds W^T's
// columns of units [q * gb, (q + 1) * gb), gate by gate, zero past H.
void pack_gate_blocked(const Tensor& w, int64_t G, int64_t H, int64_t gb, Tensor& out) {
  const int64_t K = w.size(1), full = H / gb, nq = (H + gb - 1) / gb;
  Tensor dst = out.view({nq, K, G, gb});
  const Tensor src = w.view({G, H, K});
  if (full > 0)
    dst.narrow(0, 0, full).copy_(src.narrow(1, 0, full * gb).view({G, full, gb, K}).permute({1, 3, 0, 2}));
  if (full < nq) {
    Tensor last = dst.select(0, full);  // [K, G, gb]
    last.zero_();
    last.narrow(2, 0, H - full * gb).copy_(src.narrow(1, full * gb, H - full * gb).permute({2, 0, 1}));
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_layer_cpu(const Tensor& input, const std::optional<Tensor>& batch_sizes,
                                                         const Tensor& hx, const std::optional<Tensor>& cx,
                                                         const Tensor& w_ih, const Tensor& w_hh,
                                                         const std::optional<Tensor>& b_ih,
                                                         const std::optional<Tensor>& b_hh,
                                                         const std::optional<Tensor>& w_hr, c10::string_view mode_str,
                                                         bool reverse, bool save_workspace) {
  const Mode mode = parse_mode(mode_str);
  const LayerShape s = check_layer_args("rnn_layer", mode, input, batch_sizes, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr);
  const auto dtype = input.scalar_type();
  const auto mopts = input.options().dtype(math_type(dtype));
  const int64_t P = s.state(), GH = num_gates(mode) * s.hidden;
  const bool lstm = mode == Mode::kLSTM;

  const Tensor x = as_math(input), h0 = as_math(hx), wi = as_math(w_ih), wh = as_math(w_hh);
  const auto c0 = lstm ? as_math(cx) : std::nullopt;
  const auto bi = as_math(b_ih), bh = as_math(b_hh), wr = as_math(w_hr);
  // Transposed once per call, read by every step's GEMM (4 MB each at H = 512); for fp32 brgemm packed
  // into gate-blocked panels (lstm_params.h), so that a step's tile of units reads one contiguous block.
  const auto mtype = math_type(dtype);
  const int64_t gb = kGateBlock && mtype == at::kFloat ? gate_block(mode) : 0;
  const int64_t GHp = gb ? (s.hidden + gb - 1) / gb * num_gates(mode) * gb : GH;
  Tensor wi_t = scratch(kWihT, {s.input_size, GHp}, mtype), wh_t = scratch(kWhhT, {P, GHp}, mtype);
  // One parallel region for the time loop: its workers pack their own panels there (forward_persistent).
  const bool one_region = s.rows > 0 && one_region_forward(mode, s.batch, s.hidden, s.proj, gb);
  if (gb) {
    if (!one_region) {
      pack_gate_blocked(wi, num_gates(mode), s.hidden, gb, wi_t);
      pack_gate_blocked(wh, num_gates(mode), s.hidden, gb, wh_t);
    }
  } else {
    wi_t.copy_(wi.t());
    wh_t.copy_(wh.t());
  }
  Tensor wr_t = wr ? scratch(kWhrT, {s.hidden, P}, mtype).copy_(wr->t()) : Tensor();
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = P;
  Tensor output = at::empty(out_shape, mopts);
  Tensor hy = at::empty({s.batch, P}, mopts);
  Tensor cy = lstm ? at::empty({s.batch, s.hidden}, mopts) : at::empty({0}, input.options());
  Tensor workspace = save_workspace
                         ? WorkspacePool::get().empty({s.rows, workspace_layout(mode, s.hidden, s.proj).width}, mopts)
                         : at::empty({0}, mopts);
  // Input projection in chunks of ~256 rows: large enough for an efficient GEMM, small enough to stay
  // in L2 until the steps read it (a whole-sequence buffer is 32 MB at T = 128, B = 32, 4H = 2048).
  const int64_t chunk_steps = std::max<int64_t>(1, 256 / std::max<int64_t>(1, s.batch));
  Tensor gates_x = scratch(kGatesX, {std::min(s.rows, chunk_steps * s.batch), GHp}, mtype);
  Tensor gates_h = scratch(kGatesH, {s.batch, GHp}, mtype);
  Tensor h_state = scratch(kHState, {2, s.batch, P}, mtype);
  Tensor c_state = lstm ? scratch(kCState, {s.batch, s.hidden}, mtype) : Tensor();
  Tensor r_state = s.proj > 0 ? scratch(kRState, {s.batch, s.hidden}, mtype) : Tensor();

  LayerParams p;
  fill_layer(p, s, reverse);
  p.dtype = to_dtype(dtype);
  p.chunk_steps = chunk_steps;
  p.gate_block = gb;
  p.one_region = one_region;
  p.input = x.data_ptr();
  p.h0 = h0.data_ptr();
  p.c0 = ptr(c0);
  p.w_ih = wi.data_ptr();
  p.w_hh = wh.data_ptr();
  p.b_ih = ptr(bi);
  p.b_hh = ptr(bh);
  p.w_hr = ptr(wr);
  p.w_ih_t = wi_t.data_ptr();
  p.w_hh_t = wh_t.data_ptr();
  p.w_hr_t = wr ? wr_t.data_ptr() : nullptr;
  p.output = output.data_ptr();
  p.hy = hy.data_ptr();
  p.cy = lstm ? cy.data_ptr() : nullptr;
  p.workspace = save_workspace ? workspace.data_ptr() : nullptr;
  p.gates_x = gates_x.data_ptr();
  p.gates_h = gates_h.data_ptr();
  p.h_state = h_state.data_ptr();
  p.c_state = lstm ? c_state.data_ptr() : nullptr;
  p.r_state = s.proj > 0 ? r_state.data_ptr() : nullptr;
  if (s.rows > 0) {
    p.dtype == DType::kFloat64 ? layer_forward<double>(p) : layer_forward<float>(p);
  } else {
    hy.copy_(h0);
    if (lstm) cy.copy_(*c0);
  }
  return {to_result(output, dtype), to_result(hy, dtype), lstm ? to_result(cy, dtype) : cy, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rnn_layer_backward_cpu(
    const std::optional<Tensor>& grad_output, const std::optional<Tensor>& grad_hy,
    const std::optional<Tensor>& grad_cy, const Tensor& input, const std::optional<Tensor>& batch_sizes,
    const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& w_hr,
    const Tensor& workspace, c10::string_view mode_str, bool reverse, bool has_bias, bool input_grad) {
  const Mode mode = parse_mode(mode_str);
  const bool lstm = mode == Mode::kLSTM, gru = mode == Mode::kGRU;
  const LayerShape s = check_layer_args("rnn_layer_backward", mode, input, batch_sizes, hx, std::nullopt, w_ih, w_hh,
                                        std::nullopt, std::nullopt, w_hr, /*check_cx=*/false);
  const char* op = "rnn_layer_backward";
  const auto dtype = input.scalar_type();
  const auto mtype = math_type(dtype);
  const auto mopts = input.options().dtype(mtype);
  const int64_t P = s.state(), H = s.hidden, GH = num_gates(mode) * H;
  const int64_t width = workspace_layout(mode, H, s.proj).width;
  TORCH_CHECK(workspace.scalar_type() == mtype && workspace.sizes() == c10::IntArrayRef({s.rows, width}), op,
              ": workspace must be the ", mtype, " tensor of shape ", shape_str({s.rows, width}),
              " that rnn_layer returned with save_workspace=True, got ", workspace.scalar_type(), " ",
              shape_str(workspace.sizes()));
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = P;
  SameKind same(op, input, "input");
  auto grad_arg = [&](const std::optional<Tensor>& g, c10::IntArrayRef shape, const char* name) {
    if (!g.has_value()) return std::optional<Tensor>();
    same(*g, name);
    CHECK_SHAPE(*g, shape);
    return std::optional<Tensor>(as_math(*g));
  };
  const auto g_out = grad_arg(grad_output, out_shape, "grad_output");
  const auto g_hy = grad_arg(grad_hy, {s.batch, P}, "grad_hy");
  const auto g_cy = lstm ? grad_arg(grad_cy, {s.batch, H}, "grad_cy") : std::nullopt;

  const Tensor x = as_math(input), wi = as_math(w_ih), wh = as_math(w_hh), ws = workspace.contiguous();
  const auto wr = as_math(w_hr);
  Tensor grad_input = input_grad ? at::empty(input.sizes(), mopts) : at::empty({0}, input.options());
  Tensor grad_h0 = at::empty({s.batch, P}, mopts);
  Tensor grad_c0 = lstm ? at::empty({s.batch, H}, mopts) : at::empty({0}, input.options());
  Tensor grad_w_ih = at::empty({GH, s.input_size}, mopts), grad_w_hh = at::empty({GH, P}, mopts);
  Tensor grad_w_hr = s.proj > 0 ? at::empty({P, H}, mopts) : at::empty({0}, input.options());
  // Per-chunk scratch: chunk_steps * B rows of gate gradients. ~512 rows, twice the forward's chunk: the
  // chunk's weight-gradient GEMMs accumulate into W^T (4 MB each at H = 512) once per chunk, so longer
  // chunks halve that traffic, and K = 512 is where brgemm's weight-gradient tiles run best (see
  // lstm_gemm_cpu.h). The chunks only group the backward's GEMMs; the forward's need not match.
  const int64_t chunk_steps = std::max<int64_t>(1, 512 / std::max<int64_t>(1, s.batch));
  const int64_t chunk_rows = std::min(s.rows, chunk_steps * s.batch);
  Tensor dgx = scratch(kGradGatesX, {chunk_rows, GH}, mtype);
  Tensor dgh = gru ? scratch(kGradGatesH, {chunk_rows, GH}, mtype) : dgx;
  Tensor dh = scratch(kGradH, {s.batch, P}, mtype), dc = scratch(kGradC, {s.batch, H}, mtype);
  Tensor dh_all = s.proj > 0 ? scratch(kGradHAll, {chunk_rows, P}, mtype) : Tensor();
  Tensor dr = s.proj > 0 ? scratch(kGradR, {s.batch, H}, mtype) : Tensor();
  Tensor grad_b_ih = has_bias ? at::empty({GH}, mopts) : at::empty({0}, input.options());
  Tensor grad_b_hh = has_bias ? at::empty({GH}, mopts) : at::empty({0}, input.options());

  LayerBwdParams q;
  fill_layer(q.fwd, s, reverse);
  q.fwd.dtype = to_dtype(dtype);
  q.fwd.chunk_steps = chunk_steps;
  q.fwd.input = x.data_ptr();
  q.fwd.w_ih = wi.data_ptr();
  q.fwd.w_hh = wh.data_ptr();
  q.fwd.w_hr = ptr(wr);
  q.fwd.workspace = ws.data_ptr();
  q.grad_output = ptr(g_out);
  q.grad_hy = ptr(g_hy);
  q.grad_cy = ptr(g_cy);
  q.grad_input = input_grad ? grad_input.data_ptr() : nullptr;
  q.grad_h0 = grad_h0.data_ptr();
  q.grad_c0 = lstm ? grad_c0.data_ptr() : nullptr;
  q.grad_w_ih = grad_w_ih.data_ptr();
  q.grad_w_hh = grad_w_hh.data_ptr();
  q.grad_w_hr = s.proj > 0 ? grad_w_hr.data_ptr() : nullptr;
  q.grad_gates_x = dgx.data_ptr();
  q.grad_gates_h = dgh.data_ptr();
  q.grad_h = dh.data_ptr();
  q.grad_c = dc.data_ptr();
  q.grad_h_all = s.proj > 0 ? dh_all.data_ptr() : nullptr;
  q.grad_r = s.proj > 0 ? dr.data_ptr() : nullptr;
  q.grad_b_ih = has_bias ? grad_b_ih.data_ptr() : nullptr;
  q.grad_b_hh = has_bias ? grad_b_hh.data_ptr() : nullptr;
  if (s.rows > 0) {
    q.fwd.dtype == DType::kFloat64 ? layer_backward<double>(q) : layer_backward<float>(q);
  } else {
    for (Tensor* t : {&grad_input, &grad_w_ih, &grad_w_hh, &grad_w_hr, &grad_b_ih, &grad_b_hh}) t->zero_();
    g_hy ? grad_h0.copy_(*g_hy) : grad_h0.zero_();
    if (lstm) g_cy ? grad_c0.copy_(*g_cy) : grad_c0.zero_();
  }
  return {to_result(grad_input, dtype), to_result(grad_h0, dtype), to_result(grad_c0, dtype),
          to_result(grad_w_ih, dtype), to_result(grad_w_hh, dtype), to_result(grad_b_ih, dtype),
          to_result(grad_b_hh, dtype), to_result(grad_w_hr, dtype)};
}

// ---- the cells' GEMMs: out = input weight^T with weight [N, K] as nn.LSTMCell stores it ---------------

template <typename Fn>
void dispatch_math(at::ScalarType t, const Fn& fn) {
  t == at::kDouble ? fn(double()) : fn(float());
}

Tensor rnn_linear_cpu(const Tensor& input, const Tensor& weight) {
  const char* op = "rnn_linear";
  SameKind same(op, input, "input");
  same(weight, "weight");
  TORCH_CHECK(input.dim() == 2, op, ": input must be [batch, in_features], got ", shape_str(input.sizes()));
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == input.size(1), op, ": weight must be [out_features, ",
              input.size(1), "] (in_features of input ", shape_str(input.sizes()), "), got ", shape_str(weight.sizes()));
  const int64_t B = input.size(0), K = input.size(1), N = weight.size(0);
  const auto dtype = input.scalar_type();
  const auto mtype = math_type(dtype);
  const Tensor x = as_math(input), w = as_math(weight);
  Tensor out = at::empty({B, N}, input.options().dtype(mtype));
  if (B == 0 || N == 0) return to_result(out, dtype);
  if (K == 0) return to_result(out.zero_(), dtype);
  // One step is not worth a fork/join below 64 MFLOP per thread (parallel_steps).
  const bool par = parallel_steps(B, N, K);
  dispatch_math(mtype, [&](auto v) {
    using T = decltype(v);
#if FASTDL_RNN_BRGEMM
    if constexpr (std::is_same_v<T, float>) {
      cpu::linear_nt(B, N, K, x.data_ptr<T>(), K, w.data_ptr<T>(), K, out.data_ptr<T>(), N, par);
      return;
    }
#endif
    gemm<T>(false, true, B, N, K, x.data_ptr<T>(), K, w.data_ptr<T>(), K, false, out.data_ptr<T>(), N, par);
  });
  return to_result(out, dtype);
}

// ---- single cells: the op bodies are in rnn_cell_ops.h, shared with CUDA ----------------------------

void cell_fwd_cpu(const CellFwdParams& p) {
  p.dtype == DType::kFloat64 ? cpu::cell_forward<double>(p) : cpu::cell_forward<float>(p);
}
void cell_bwd_cpu(const CellBwdParams& p) {
  p.dtype == DType::kFloat64 ? cpu::cell_backward<double>(p) : cpu::cell_backward<float>(p);
}

}  // namespace
}  // namespace fastdl::rnn

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("rnn_layer", &fastdl::rnn::rnn_layer_cpu);
  m.impl("rnn_layer_backward", &fastdl::rnn::rnn_layer_backward_cpu);
  m.impl("rnn_linear", &fastdl::rnn::rnn_linear_cpu);
  FASTDL_REGISTER_RNN_CELL_IMPLS(m, fastdl::rnn::cell_fwd_cpu, fastdl::rnn::cell_bwd_cpu);
}
