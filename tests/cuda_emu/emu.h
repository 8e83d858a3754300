// Minimal SIMT emulator: runs CUDA kernels on the host, one ucontext fiber per CUDA thread, blocks one after
// another. __syncthreads / warp shuffles / ballot are real barriers among the fibers; a deadlock (divergent
// barrier or full-mask shuffle) aborts. Two thread schedules (see warp_serial). Only for logic testing of
// csrc/cuda on a machine without a GPU.
#pragma once
#include <cuda_runtime_api.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

namespace emu {

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread (kernels keep arrays in "registers")

struct Barrier {
  int count = 0, expected = 0;
  unsigned gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  bool done = false;
  Barrier* wait = nullptr;
  unsigned wait_gen = 0;
  dim3 tid;
  int flat = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  Barrier block_bar;
  std::vector<Barrier> warp_bar;
  std::vector<uint64_t> slots;  // one per thread
  Fiber* cur = nullptr;
  dim3 bid, bdim, gdim;
  std::vector<char> dyn;
};

inline Block*& blk() {
  static Block* b = nullptr;
  return b;
}

inline void yield() { swapcontext(&blk()->cur->ctx, &blk()->sched); }

inline void arrive(Barrier& bar) {
  const unsigned g = bar.gen;
  if (++bar.count == bar.expected) {
    bar.count = 0;
    ++bar.gen;
    return;
  }
  Fiber* f = blk()->cur;
  f->wait = &bar;
  f->wait_gen = g;
  yield();
}

inline Barrier& warp_barrier() { return blk()->warp_bar[blk()->cur->flat / 32]; }
inline int lane() { return blk()->cur->flat % 32; }

template <class T>
T exchange(T v, int src_lane) {
  Block* b = blk();
  const int w = b->cur->flat / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b->slots[b->cur->flat] = bits;
  arrive(warp_barrier());
  T out = v;
  if (src_lane >= 0 && src_lane < 32) {
    const uint64_t r = b->slots[w * 32 + src_lane];
    std::memcpy(&out, &r, sizeof(T));
  }
  arrive(warp_barrier());
  return out;
}

inline void* dyn_smem() { return blk()->dyn.data(); }

// Scheduling order of the threads of a block, read at every launch from AD_EMU_SCHEDULE:
//   (unset)      round robin: every thread runs to its next barrier (block or warp) in turn, so all warps reach a
//                point before any warp goes past its next warp shuffle;
//   warp-serial  warp by warp: a warp runs (its lanes round robin at warp barriers) until all its lanes wait at a
//                block barrier, then the next warp. Both are legal CUDA schedules; a kernel whose answer differs
//                between them reads shared memory that another warp writes without a block barrier between.
inline bool warp_serial() {
  const char* s = std::getenv("AD_EMU_SCHEDULE");
  return s != nullptr && std::strcmp(s, "warp-serial") == 0;
}

template <class F>
void launch_impl(dim3 grid, dim3 block, size_t smem, F& body) {
  const int nthreads = block.x * block.y * block.z;
  if (nthreads % 32 != 0) { std::fprintf(stderr, "emu: block size must be a multiple of 32\n"); std::abort(); }
  for (unsigned bz = 0; bz < grid.z; ++bz)
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block b;
      b.bid = dim3(bx, by, bz);
      b.bdim = block;
      b.gdim = grid;
      b.dyn.assign(smem + 16, char(0x7f));  // poison (0x7f7f7f7f = large float)
      b.fibers.resize(nthreads);
      b.block_bar.expected = nthreads;
      b.warp_bar.resize(nthreads / 32);
      for (auto& w : b.warp_bar) w.expected = 32;
      b.slots.assign(nthreads, 0);
      blk() = &b;
      static F* body_ptr;
      body_ptr = &body;
      for (int t = 0; t < nthreads; ++t) {
        Fiber& f = b.fibers[t];
        f.flat = t;
        f.tid = dim3(t % block.x, 0, 0);
        static std::vector<std::vector<char>> stacks;  // reused by every block: allocating (and zeroing)
        if (stacks.size() <= size_t(t)) stacks.resize(t + 1);  // 128+ stacks per block dominated the run time
        if (stacks[t].empty()) stacks[t].resize(kStackBytes);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[t].data();
        f.ctx.uc_stack.ss_size = stacks[t].size();
        f.ctx.uc_link = &b.sched;
        makecontext(&f.ctx, (void (*)())+[]() {
          (*body_ptr)();
          blk()->cur->done = true;
        }, 0);
      }
      // Runs fiber f to its next barrier; false when it is done or still waiting.
      auto step = [&b](Fiber& f) {
        if (f.done) return false;
        if (f.wait != nullptr) {
          if (f.wait->gen == f.wait_gen) return false;
          f.wait = nullptr;
        }
        b.cur = &f;
        swapcontext(&b.sched, &f.ctx);
        return true;
      };
      const bool serial = warp_serial();
      for (;;) {
        bool progressed = false;
        if (!serial) {
          for (auto& f : b.fibers) progressed |= step(f);
        } else {
          for (int w0 = 0; w0 < nthreads; w0 += 32)
            for (bool again = true; again;) {  // this warp until all its lanes wait at a block barrier
              again = false;
              for (int t = w0; t < w0 + 32; ++t) again |= step(b.fibers[t]);
              progressed |= again;
            }
        }
        bool all_done = true;
        for (auto& f : b.fibers) all_done &= f.done;
        if (all_done) break;
        if (!progressed) {
          std::fprintf(stderr, "emu: deadlock in block (%u,%u,%u)\n", bx, by, bz);
          std::abort();
        }
      }
      blk() = nullptr;
    }
}

template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  auto body = [&]() { kernel(args...); };
  launch_impl(grid, block, smem, body);
}

}  // namespace emu

#define threadIdx (emu::blk()->cur->tid)
#define blockIdx (emu::blk()->bid)
#define blockDim (emu::blk()->bdim)
#define gridDim (emu::blk()->gdim)

inline void __syncthreads() { emu::arrive(emu::blk()->block_bar); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::arrive(emu::warp_barrier()); }
template <class T>
T __shfl_xor_sync(unsigned, T v, int o) { return emu::exchange(v, emu::lane() ^ o); }
template <class T>
T __shfl_sync(unsigned, T v, int src) { return emu::exchange(v, src); }
template <class T>
T __shfl_up_sync(unsigned, T v, int d) {
  const int l = emu::lane();
  return emu::exchange(v, l - d >= 0 ? l - d : l);
}
inline unsigned __ballot_sync(unsigned, bool p) {
  // Every lane publishes its bit, then reads all 32.
  emu::Block* b = emu::blk();
  const int w = b->cur->flat / 32;
  b->slots[b->cur->flat] = p ? 1 : 0;
  emu::arrive(emu::warp_barrier());
  unsigned m = 0;
  for (int i = 0; i < 32; ++i) m |= unsigned(b->slots[w * 32 + i] & 1) << i;
  emu::arrive(emu::warp_barrier());
  return m;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <class T>
T __ldg(const T* p) { return *p; }
