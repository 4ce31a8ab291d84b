// The emulator (see emu_runtime.h). Threads are ucontext fibers; the scheduler runs every runnable
// thread of the block until it blocks at a collective, then executes the collectives whose
// participants have all arrived. Semantics follow the PTX ISA: mma.m16n8k16 and ldmatrix fragment
// layouts (section "Warp Level Matrix Multiply-Accumulate Instructions"), cp.async groups with
// zero-fill (a group's copies land when the issuing thread waits for it: the latest moment allowed,
// so a missing wait or barrier reads stale data or trips the race check).
//
// Race check: every shared-memory byte remembers its last writer and its readers since the last
// __syncthreads (and the __syncwarp count of the accessing warp); an access by another thread that
// no barrier orders after the previous conflicting one is reported.
#include "emu_runtime.h"

#include <cuda_runtime_api.h>
#include <ucontext.h>
#include <vector_functions.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>

namespace fastdl::flash_attn {
// The kernels' `extern __shared__ unsigned char flash_smem[]`.
constexpr int kSmemCap = 228 * 1024;
alignas(128) unsigned char flash_smem[kSmemCap];
}  // namespace fastdl::flash_attn

namespace emu {
namespace {

using fastdl::flash_attn::flash_smem;
using fastdl::flash_attn::kSmemCap;

enum class St { kRun, kBar, kWarp, kDone };
enum class Op { kNone, kLdm, kMma, kShfl, kShflFrom, kSyncWarp };

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  bool pred;
};

struct Thr {
  ucontext_t ctx;
  std::vector<char> stack;
  uint3 idx;
  int tid = 0;
  St st = St::kDone;
  Op op = Op::kNone;
  // ldmatrix
  const unsigned char* addr = nullptr;
  uint32_t* out = nullptr;
  int num = 0;
  bool trans = false;
  // mma
  float* d = nullptr;
  const uint32_t* a = nullptr;
  uint32_t b0 = 0, b1 = 0;
  bool bf16 = false;
  // shfl
  float fval = 0, fres = 0;
  int lane_mask = 0;
  int src_lane = 0;
  // cp.async
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
};

struct Shadow {
  int16_t writer;
  int32_t w_epoch, w_wepoch;
  int32_t r_epoch, r_wepoch;
  uint64_t readers[4];
};

constexpr size_t kStack = 256 * 1024;

ucontext_t g_sched;
std::vector<Thr> g_thr;
Thr* g_cur = nullptr;
uint3 g_block;
dim3 g_bdim, g_gdim;
int g_nthreads = 0;
int g_smem_bytes = 0;
int32_t g_epoch = 0;
std::vector<int32_t> g_wepoch;
std::string g_error;
const std::function<void()>* g_body = nullptr;
std::vector<Shadow> g_shadow(kSmemCap);
Stats g_stats;
int g_sched_mode = 0;
uint32_t g_seed = 1;

std::vector<std::pair<uintptr_t, uintptr_t>> g_read_ranges, g_write_ranges;
std::vector<std::pair<uintptr_t, int>> g_writes;

void fail(const std::string& msg) {
  if (g_error.empty()) {
    std::ostringstream os;
    os << msg << " [block (" << g_block.x << "," << g_block.y << "," << g_block.z << ")";
    if (g_cur) os << " thread " << g_cur->tid;
    os << "]";
    g_error = os.str();
  }
}

void yield() { swapcontext(&g_cur->ctx, &g_sched); }

int warp_of(int tid) { return tid / 32; }

bool in_smem(const void* p, size_t n) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= flash_smem && c + n <= flash_smem + g_smem_bytes;
}

bool ordered(int other, int32_t epoch, int32_t wepoch, int tid) {
  if (epoch < g_epoch) return true;
  return warp_of(other) == warp_of(tid) && wepoch < g_wepoch[warp_of(tid)];
}

void smem_read(int tid, const void* p, size_t n, const char* what) {
  if (!in_smem(p, n)) {
    std::ostringstream os;
    os << what << ": shared read out of bounds at offset " << (static_cast<const unsigned char*>(p) - flash_smem)
       << " (+" << n << ") of " << g_smem_bytes;
    fail(os.str());
    return;
  }
  const size_t off = static_cast<const unsigned char*>(p) - flash_smem;
  for (size_t i = off; i < off + n; ++i) {
    Shadow& s = g_shadow[i];
    if (s.writer >= 0 && s.writer != tid && !ordered(s.writer, s.w_epoch, s.w_wepoch, tid)) {
      std::ostringstream os;
      os << what << ": read-after-write race on shared offset " << i << " (written by thread " << s.writer
         << " in the same barrier interval)";
      fail(os.str());
      return;
    }
    if (s.r_epoch != g_epoch) {
      s.r_epoch = g_epoch;
      std::memset(s.readers, 0, sizeof(s.readers));
    }
    s.readers[tid / 64] |= uint64_t(1) << (tid % 64);
    s.r_wepoch = g_wepoch[warp_of(tid)];
  }
}

void smem_write(int tid, const void* p, size_t n, const char* what) {
  if (!in_smem(p, n)) {
    std::ostringstream os;
    os << what << ": shared write out of bounds at offset " << (static_cast<const unsigned char*>(p) - flash_smem)
       << " (+" << n << ") of " << g_smem_bytes;
    fail(os.str());
    return;
  }
  const size_t off = static_cast<const unsigned char*>(p) - flash_smem;
  for (size_t i = off; i < off + n; ++i) {
    Shadow& s = g_shadow[i];
    if (s.writer >= 0 && s.writer != tid && !ordered(s.writer, s.w_epoch, s.w_wepoch, tid)) {
      std::ostringstream os;
      os << what << ": write-after-write race on shared offset " << i << " (thread " << s.writer << ")";
      fail(os.str());
      return;
    }
    if (s.r_epoch == g_epoch) {
      for (int w = 0; w < 4; ++w) {
        uint64_t m = s.readers[w];
        while (m) {
          const int r = w * 64 + __builtin_ctzll(m);
          m &= m - 1;
          if (r == tid) continue;
          if (warp_of(r) == warp_of(tid) && s.r_wepoch < g_wepoch[warp_of(tid)]) continue;
          std::ostringstream os;
          os << what << ": write-after-read race on shared offset " << i << " (read by thread " << r
             << " in the same barrier interval)";
          fail(os.str());
          return;
        }
      }
    }
    s.writer = static_cast<int16_t>(tid);
    s.w_epoch = g_epoch;
    s.w_wepoch = g_wepoch[warp_of(tid)];
    s.r_epoch = -1;
  }
}

bool in_ranges(const std::vector<std::pair<uintptr_t, uintptr_t>>& ranges, const void* p, size_t n) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  for (const auto& [lo, hi] : ranges)
    if (a >= lo && a + n <= hi) return true;
  return false;
}

void global_read_check(const void* p, size_t n, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % n != 0) fail(std::string(what) + ": misaligned global read");
  if (!in_ranges(g_read_ranges, p, n)) fail(std::string(what) + ": global read outside every input tensor");
}

void global_write_check(const void* p, size_t n, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % n != 0) fail(std::string(what) + ": misaligned global write");
  if (!in_ranges(g_write_ranges, p, n)) fail(std::string(what) + ": global write outside every output tensor");
}

float h2f(uint16_t u) {
  _Float16 h;
  std::memcpy(&h, &u, 2);
  return static_cast<float>(h);
}
float bf2f(uint16_t u) {
  const uint32_t w = uint32_t(u) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}

void run_ldmatrix(Thr** lanes) {
  Thr& l0 = *lanes[0];
  const int num = l0.num;
  const bool trans = l0.trans;
  for (int l = 0; l < 32; ++l) {
    if (lanes[l]->num != num || lanes[l]->trans != trans) {
      fail("ldmatrix: lanes disagree on the shape");
      return;
    }
  }
  for (int i = 0; i < 8 * num; ++i) {
    const unsigned char* a = lanes[i]->addr;
    if (reinterpret_cast<uintptr_t>(a) % 16 != 0) {
      fail("ldmatrix: row address not 16-byte aligned");
      return;
    }
    smem_read(lanes[i]->tid, a, 16, "ldmatrix");
    if (!g_error.empty()) return;
  }
  g_stats.ldmatrix++;
  for (int l = 0; l < 32; ++l) {
    for (int r = 0; r < num; ++r) {
      uint16_t lo, hi;
      if (!trans) {
        const unsigned char* row = lanes[r * 8 + l / 4]->addr;
        std::memcpy(&lo, row + 4 * (l % 4), 2);
        std::memcpy(&hi, row + 4 * (l % 4) + 2, 2);
      } else {
        const unsigned char* row0 = lanes[r * 8 + 2 * (l % 4)]->addr;
        const unsigned char* row1 = lanes[r * 8 + 2 * (l % 4) + 1]->addr;
        std::memcpy(&lo, row0 + 2 * (l / 4), 2);
        std::memcpy(&hi, row1 + 2 * (l / 4), 2);
      }
      lanes[l]->out[r] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

void run_mma(Thr** lanes) {
  const bool bf16 = lanes[0]->bf16;
  auto dec = [&](uint32_t w, int half) {
    const uint16_t u = static_cast<uint16_t>(half ? (w >> 16) : (w & 0xffff));
    return bf16 ? bf2f(u) : h2f(u);
  };
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const Thr& t = *lanes[l];
    if (t.bf16 != bf16) {
      fail("mma: lanes disagree on the type");
      return;
    }
    const int g = l / 4, q = l % 4;
    A[g][2 * q] = dec(t.a[0], 0);
    A[g][2 * q + 1] = dec(t.a[0], 1);
    A[g + 8][2 * q] = dec(t.a[1], 0);
    A[g + 8][2 * q + 1] = dec(t.a[1], 1);
    A[g][2 * q + 8] = dec(t.a[2], 0);
    A[g][2 * q + 9] = dec(t.a[2], 1);
    A[g + 8][2 * q + 8] = dec(t.a[3], 0);
    A[g + 8][2 * q + 9] = dec(t.a[3], 1);
    B[2 * q][g] = dec(t.b0, 0);
    B[2 * q + 1][g] = dec(t.b0, 1);
    B[2 * q + 8][g] = dec(t.b1, 0);
    B[2 * q + 9][g] = dec(t.b1, 1);
    C[g][2 * q] = t.d[0];
    C[g][2 * q + 1] = t.d[1];
    C[g + 8][2 * q] = t.d[2];
    C[g + 8][2 * q + 1] = t.d[3];
  }
  float D[16][8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double acc = 0;
      for (int k = 0; k < 16; ++k) acc += double(A[i][k]) * double(B[k][j]);
      D[i][j] = static_cast<float>(acc + double(C[i][j]));
    }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, q = l % 4;
    float* d = lanes[l]->d;
    d[0] = D[g][2 * q];
    d[1] = D[g][2 * q + 1];
    d[2] = D[g + 8][2 * q];
    d[3] = D[g + 8][2 * q + 1];
  }
  g_stats.mma++;
}

void entry(int tid) {
  (*g_body)();
  Thr& t = g_thr[tid];
  if (!t.open.empty()) fail("cp.async copies issued but never committed");
  t.st = St::kDone;
  // returns to g_sched through uc_link
}

void run_cta() {
  const int n = g_nthreads;
  for (int tid = 0; tid < n; ++tid) {
    Thr& t = g_thr[tid];
    t.tid = tid;
    t.idx = make_uint3(tid % g_bdim.x, (tid / g_bdim.x) % g_bdim.y, tid / (g_bdim.x * g_bdim.y));
    t.st = St::kRun;
    t.op = Op::kNone;
    t.groups.clear();
    t.open.clear();
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.data();
    t.ctx.uc_stack.ss_size = t.stack.size();
    t.ctx.uc_link = &g_sched;
    makecontext(&t.ctx, reinterpret_cast<void (*)()>(entry), 1, tid);
  }
  std::memset(flash_smem, 0xff, g_smem_bytes);  // NaN in fp16 and bf16: reads of unwritten memory show
  for (int i = 0; i < g_smem_bytes; ++i) {
    g_shadow[i].writer = -1;
    g_shadow[i].r_epoch = -1;
  }
  g_epoch = 0;
  g_wepoch.assign((n + 31) / 32, 0);
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  uint32_t rng = g_seed * 2654435761u + g_block.x * 97 + g_block.y * 31 + g_block.z;
  while (g_error.empty()) {
    if (g_sched_mode == 1) {
      std::reverse(order.begin(), order.end());
    } else if (g_sched_mode == 2) {
      for (int i = n - 1; i > 0; --i) {
        rng = rng * 1664525u + 1013904223u;
        std::swap(order[i], order[(rng >> 8) % (i + 1)]);
      }
    }
    for (int tid : order) {
      Thr& t = g_thr[tid];
      if (t.st != St::kRun) continue;
      g_cur = &t;
      swapcontext(&g_sched, &t.ctx);
      g_cur = nullptr;
      if (!g_error.empty()) break;
    }
    if (!g_error.empty()) break;
    int done = 0, bar = 0;
    for (int tid = 0; tid < n; ++tid) {
      done += g_thr[tid].st == St::kDone;
      bar += g_thr[tid].st == St::kBar;
    }
    if (done == n) break;
    bool progress = false;
    for (int w = 0; w * 32 < n; ++w) {
      Thr* lanes[32];
      int waiting = 0, exited = 0;
      for (int l = 0; l < 32; ++l) {
        lanes[l] = &g_thr[w * 32 + l];
        waiting += lanes[l]->st == St::kWarp;
        exited += lanes[l]->st == St::kDone;
      }
      if (waiting == 0) continue;
      if (waiting != 32) {
        if (exited > 0) fail("warp collective while lanes of the warp have exited");
        continue;  // other lanes still running towards it, or at __syncthreads (checked below)
      }
      const Op op = lanes[0]->op;
      for (int l = 1; l < 32; ++l)
        if (lanes[l]->op != op) fail("lanes of a warp wait at different collectives");
      if (!g_error.empty()) break;
      switch (op) {
        case Op::kLdm: run_ldmatrix(lanes); break;
        case Op::kMma: run_mma(lanes); break;
        case Op::kShfl:
          for (int l = 0; l < 32; ++l) {
            if (lanes[l]->lane_mask != lanes[0]->lane_mask) fail("shfl: lanes disagree on the mask");
            lanes[l]->fres = lanes[l ^ lanes[l]->lane_mask]->fval;
          }
          break;
        case Op::kShflFrom:
          for (int l = 0; l < 32; ++l) {
            const int s = lanes[l]->src_lane;
            lanes[l]->fres = (s >= 0 && s < 32) ? lanes[s]->fval : lanes[l]->fval;
          }
          break;
        case Op::kSyncWarp: g_wepoch[w]++; break;
        default: fail("unknown collective");
      }
      for (int l = 0; l < 32; ++l) lanes[l]->st = St::kRun;
      progress = true;
    }
    if (!g_error.empty()) break;
    if (progress) continue;
    if (bar == n - done) {
      if (done > 0) {
        fail("__syncthreads reached while other threads of the block have exited");
        break;
      }
      for (int tid = 0; tid < n; ++tid) g_thr[tid].st = St::kRun;
      g_epoch++;
      for (auto& e : g_wepoch) e++;
      g_stats.syncs++;
      continue;
    }
    fail("deadlock: threads wait at __syncthreads while others wait at warp collectives");
  }
}

void wait_warp(Op op) {
  g_cur->op = op;
  g_cur->st = St::kWarp;
  yield();
}

}  // namespace

const uint3& thread_idx() { return g_cur->idx; }
const uint3& block_idx() { return g_block; }
const dim3& block_dim() { return g_bdim; }
const dim3& grid_dim() { return g_gdim; }

void sync_threads() {
  g_cur->st = St::kBar;
  yield();
}

void sync_warp() { wait_warp(Op::kSyncWarp); }

float shfl_xor(float v, int lane_mask) {
  g_cur->fval = v;
  g_cur->lane_mask = lane_mask;
  wait_warp(Op::kShfl);
  return g_cur->fres;
}

float shfl_from(float v, int src_lane) {
  g_cur->fval = v;
  g_cur->src_lane = src_lane;
  wait_warp(Op::kShflFrom);
  return g_cur->fres;
}

unsigned char* shared_base() { return flash_smem; }
void shared_read(const void* p, size_t bytes) { smem_read(g_cur->tid, p, bytes, "shared load"); }
void shared_write(const void* p, size_t bytes) { smem_write(g_cur->tid, p, bytes, "shared store"); }

void ldmatrix(uint32_t* out, int num, bool trans, const void* smem_addr) {
  g_cur->addr = static_cast<const unsigned char*>(smem_addr);
  g_cur->out = out;
  g_cur->num = num;
  g_cur->trans = trans;
  wait_warp(Op::kLdm);
}

void mma_16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1, bool is_bf16) {
  g_cur->d = d;
  g_cur->a = a;
  g_cur->b0 = b0;
  g_cur->b1 = b1;
  g_cur->bf16 = is_bf16;
  wait_warp(Op::kMma);
}

void cp_async_16(void* smem, const void* gmem, bool pred) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0) fail("cp.async: shared address not 16-byte aligned");
  if (!in_smem(smem, 16)) fail("cp.async: shared destination out of bounds");
  if (pred) global_read_check(gmem, 16, "cp.async");
  g_cur->open.push_back({static_cast<unsigned char*>(smem), static_cast<const unsigned char*>(gmem), pred});
}

void cp_async_commit() {
  g_cur->groups.push_back(std::move(g_cur->open));
  g_cur->open.clear();
}

void cp_async_wait(int n) {
  auto& groups = g_cur->groups;
  while (static_cast<int>(groups.size()) > n) {
    for (const Copy& c : groups.front()) {
      smem_write(g_cur->tid, c.dst, 16, "cp.async");
      if (c.pred) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    }
    groups.erase(groups.begin());
  }
}

uint4 ld_shared_16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("ld_shared_16: misaligned");
  smem_read(g_cur->tid, p, 16, "ld_shared_16");
  uint4 v{};
  if (in_smem(p, 16)) std::memcpy(&v, p, 16);
  return v;
}

void st_shared_16(void* p, uint4 v) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail("st_shared_16: misaligned");
  smem_write(g_cur->tid, p, 16, "st_shared_16");
  if (in_smem(p, 16)) std::memcpy(p, &v, 16);
}

void st_shared_4(void* p, uint32_t v) {

  if (reinterpret_cast<uintptr_t>(p) % 4 != 0) fail("st_shared_4: misaligned");
  smem_write(g_cur->tid, p, 4, "st_shared_4");
  if (in_smem(p, 4)) std::memcpy(p, &v, 4);
}

uint4 ld_global_16(const void* p) {
  global_read_check(p, 16, "ld_global_16");
  uint4 v{};
  if (g_error.empty()) std::memcpy(&v, p, 16);
  return v;
}

void st_global_16(void* p, uint4 v) {
  global_write_check(p, 16, "st_global_16");
  if (g_error.empty()) std::memcpy(p, &v, 16);
  g_writes.push_back({reinterpret_cast<uintptr_t>(p), 16});
}

float ld_global_f32(const float* p) {
  global_read_check(p, 4, "ld_global_f32");
  return g_error.empty() ? *p : 0.0f;
}

void st_global_f32(float* p, float v) {
  global_write_check(p, 4, "st_global_f32");
  if (g_error.empty()) *p = v;
  g_writes.push_back({reinterpret_cast<uintptr_t>(p), 4});
}

const std::vector<std::pair<uintptr_t, int>>& writes() { return g_writes; }
void clear_writes() { g_writes.clear(); }

int launch(const std::function<void()>& body, dim3 grid, int threads, int smem_bytes) {
  if (threads <= 0 || threads > 1024 || threads % 32 != 0) throw std::runtime_error("emu: bad block size");
  if (smem_bytes > kSmemCap) throw std::runtime_error("emu: shared memory request too large");
  g_stats.launches++;
  g_stats.max_smem = std::max<int64_t>(g_stats.max_smem, smem_bytes);
  g_body = &body;
  g_bdim = dim3(threads, 1, 1);
  g_gdim = grid;
  g_nthreads = threads;
  g_smem_bytes = smem_bytes;
  if (static_cast<int>(g_thr.size()) < threads) {
    g_thr.resize(threads);
    for (auto& t : g_thr)
      if (t.stack.size() != kStack) t.stack.resize(kStack);
  }
  g_error.clear();
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block = make_uint3(x, y, z);
        run_cta();
        g_stats.ctas++;
        if (!g_error.empty()) throw std::runtime_error("emu: " + g_error);
      }
  return 0;
}

void clear_ranges() {
  g_read_ranges.clear();
  g_write_ranges.clear();
}
void add_read_range(const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  g_read_ranges.push_back({a, a + bytes});
}
void add_write_range(const void* p, size_t bytes) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  g_write_ranges.push_back({a, a + bytes});
  g_read_ranges.push_back({a, a + bytes});
}

Stats& stats() { return g_stats; }

void set_schedule(int mode, uint32_t seed) {
  g_sched_mode = mode;
  g_seed = seed;
}

}  // namespace emu

// FASTDL_CUDA_CHECK prints errors with it; the emulator has no CUDA runtime.
extern "C" const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "emulated CUDA error";
}
