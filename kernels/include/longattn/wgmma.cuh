// Inline-PTX wrappers for the Hopper warpgroup MMA (wgmma.mma_async, sm_90a only): m64nNk16
// with f32 accumulators and f16/bf16 inputs, N = 64, 128, 176, 192, 256, and m64nNk32 with e4m3
// inputs (MmaE4m3), N = 64, 128, 256. Only instantiate these from code
// compiled for sm_90a (guard with __CUDA_ARCH_FEAT_SM90_ALL).
//
// Accumulator fragment (PTX ISA, "wgmma .m64nNk16 register fragment D"), per thread of the
// warpgroup, w = warp in group, g = lane / 4, t = lane % 4: register 4i + 2r + e holds
// row 16w + g + 8r, column 8i + 2t + e. The A fragment from registers (4 x b32, two 16-bit
// elements each, lower index in the low half) is the mma.sync m16n8k16 A fragment of warp w's
// 16 rows: reg0 (g, 2t..), reg1 (g+8, 2t..), reg2 (g, 2t+8..), reg3 (g+8, 2t+8..).
//
// Shared-memory operands use 64-bit matrix descriptors (make_desc) over the 128-byte swizzle:
// rows of 128 bytes, 8 rows per 1024-byte atom, 16-byte chunk c of row r stored at chunk
// c ^ (r % 8). Atoms must be 1024-byte aligned.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "longattn/common.cuh"

namespace longattn {
namespace wgmma {

// Descriptor: start address >> 4 (bits 0-13), leading byte offset >> 4 (16-29), stride byte
// offset >> 4 (32-45), base offset 0 (49-51), swizzle mode 1 = 128B (62-63).
//   K-major operand (rows of K contiguous): LBO unused (1), SBO = byte stride between 8-row
//     groups along M/N; step K by 16 elements by adding 32 bytes to the start address.
//   MN-major operand (transposed, rows are K indices): LBO = byte stride between 64-element
//     atoms along M/N, SBO = byte stride between 8-row groups along K.
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_addr, uint32_t lbo_bytes,
                                              uint32_t sbo_bytes) {
  return (uint64_t)((smem_addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo_bytes >> 4) & 0x3FFF) << 16) |
         ((uint64_t)((sbo_bytes >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// K-major descriptor of a tile whose rows are one swizzle row of kRowBytes each: 128 (mode 1,
// make_desc above) or 64 (mode 2: 8 rows per 512-byte atom, atoms 512-byte aligned, 16-byte
// chunk c of row r stored at chunk c ^ ((r / 2) % 4)). SBO = 8 rows; step K by adding bytes to
// the start address. The FP8 kernel's 64-channel Q and K tiles are 64-byte rows.
template <int kRowBytes>
__device__ __forceinline__ uint64_t make_desc_k_major(uint32_t smem_addr) {
  static_assert(kRowBytes == 128 || kRowBytes == 64, "a 128- or 64-byte swizzle row");
  constexpr uint64_t kMode = kRowBytes == 128 ? 1 : 2;
  return (uint64_t)((smem_addr & 0x3FFFF) >> 4) | (1ull << 16) |
         ((uint64_t)((8 * kRowBytes) >> 4) << 32) | (kMode << 62);
}

// Orders earlier register writes (accumulators, A fragments) before the next wgmma.
__device__ __forceinline__ void fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N committed wgmma groups of this warpgroup are pending.
template <int N> __device__ __forceinline__ void wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of these registers across the preceding asm (the
// wgmma wait): every later use depends on this statement's outputs.
template <int N> __device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Ordinary shared-memory writes (cp.async included) made visible to the async proxy (wgmma).
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Mma<T, N>::ss<kScaleD>(d, a_desc, b_desc): d = A B (+ d if kScaleD), A (64x16) and B (16xN)
// from shared memory, both K-major. Mma<T, N>::rs_bt(d, a, b_desc): d += A B with A from
// registers and B MN-major (transposed) in shared memory.
template <typename T, int N> struct Mma;

// The ten specialisations differ only in the PTX type, N and the operand numbering, so one
// macro writes them. Operands: the N / 2 accumulators d[] are %0 .. %(N/2 - 1); then ss takes
// the two descriptors and the scale-d flag, rs_bt the four A registers, the B descriptor and a
// constant 1 (its scale-d is always on).
#define LA_WG_D8(i)                                                                          \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define LA_WG_D32 LA_WG_D8(0), LA_WG_D8(8), LA_WG_D8(16), LA_WG_D8(24)
#define LA_WG_D64 LA_WG_D32, LA_WG_D8(32), LA_WG_D8(40), LA_WG_D8(48), LA_WG_D8(56)
#define LA_WG_D88 LA_WG_D64, LA_WG_D8(64), LA_WG_D8(72), LA_WG_D8(80)
#define LA_WG_D96 LA_WG_D88, LA_WG_D8(88)
#define LA_WG_D128 \
  LA_WG_D96, LA_WG_D8(96), LA_WG_D8(104), LA_WG_D8(112), LA_WG_D8(120)
#define LA_WG_R32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define LA_WG_R64 \
  LA_WG_R32 \
  ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define LA_WG_R88 \
  LA_WG_R64 \
  ", %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87"
#define LA_WG_R96 \
  LA_WG_R88 \
  ", %88, %89, %90, %91, %92, %93, %94, %95"
#define LA_WG_R128 \
  LA_WG_R96 \
  ", %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, " \
  "%111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, " \
  "%126, %127"
// T, PTX element type, N, accumulator count (N / 2), its register list and operand list, and
// the operand numbers after the accumulators: n0 = N / 2, n1 .. n5 = n0 + 1 .. n0 + 5.
#define LA_WG_MMA(T, PTX, N, NACC, REGS, DOPS, n0, n1, n2, n3, n4, n5)                      \
  template <> struct Mma<T, N> {                                                           \
    template <int kScaleD>                                                                 \
    static __device__ __forceinline__ void ss(float (&d)[NACC], uint64_t a, uint64_t b) {  \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #n2 ", 0;\n"                        \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " "          \
                   "{" REGS "}, %" #n0 ", %" #n1 ", p, 1, 1, 0, 0;\n}\n"                      \
                   : DOPS                                                                  \
                   : "l"(a), "l"(b), "r"(kScaleD));                                        \
    }                                                                                      \
    static __device__ __forceinline__ void rs_bt(float (&d)[NACC], const uint32_t (&a)[4], \
                                                 uint64_t b) {                             \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #n5 ", 0;\n"                        \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " "          \
                   "{" REGS "}, {%" #n0 ", %" #n1 ", %" #n2 ", %" #n3 "}, %" #n4              \
                   ", p, 1, 1, 1;\n}\n"                                                     \
                   : DOPS                                                                  \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));          \
    }                                                                                      \
  };

LA_WG_MMA(__half, "f16", 64, 32, LA_WG_R32, LA_WG_D32, 32, 33, 34, 35, 36, 37)
LA_WG_MMA(__half, "f16", 128, 64, LA_WG_R64, LA_WG_D64, 64, 65, 66, 67, 68, 69)
LA_WG_MMA(__half, "f16", 176, 88, LA_WG_R88, LA_WG_D88, 88, 89, 90, 91, 92, 93)
LA_WG_MMA(__half, "f16", 192, 96, LA_WG_R96, LA_WG_D96, 96, 97, 98, 99, 100, 101)
LA_WG_MMA(__half, "f16", 256, 128, LA_WG_R128, LA_WG_D128, 128, 129, 130, 131, 132, 133)
LA_WG_MMA(__nv_bfloat16, "bf16", 64, 32, LA_WG_R32, LA_WG_D32, 32, 33, 34, 35, 36, 37)
LA_WG_MMA(__nv_bfloat16, "bf16", 128, 64, LA_WG_R64, LA_WG_D64, 64, 65, 66, 67, 68, 69)
LA_WG_MMA(__nv_bfloat16, "bf16", 176, 88, LA_WG_R88, LA_WG_D88, 88, 89, 90, 91, 92, 93)
LA_WG_MMA(__nv_bfloat16, "bf16", 192, 96, LA_WG_R96, LA_WG_D96, 96, 97, 98, 99, 100, 101)
LA_WG_MMA(__nv_bfloat16, "bf16", 256, 128, LA_WG_R128, LA_WG_D128, 128, 129, 130, 131, 132, 133)


// MmaE4m3<N>::ss<kScaleD>(d, a_desc, b_desc): d = A B (+ d if kScaleD), e4m3 operands, A (64x32)
// and B (32xN) from shared memory, both K-major (8-bit wgmma has no transpose bit). rs(d, a,
// b_desc): d += A B with A from registers (4 x b32, four e4m3 each: the mma.sync m16n8k32 A
// fragment of warp w's 16 rows, reg0 (g, 4t..), reg1 (g+8, 4t..), reg2 (g, 16+4t..), reg3
// (g+8, 16+4t..)) and B K-major in shared memory. Operands as for Mma.
template <int N> struct MmaE4m3;
#define LA_WG_MMA_E4M3(N, NACC, REGS, DOPS, n0, n1, n2, n3, n4, n5)                          \
  template <> struct MmaE4m3<N> {                                                          \
    template <int kScaleD>                                                                 \
    static __device__ __forceinline__ void ss(float (&d)[NACC], uint64_t a, uint64_t b) {  \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #n2 ", 0;\n"                        \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k32.f32.e4m3.e4m3 "                 \
                   "{" REGS "}, %" #n0 ", %" #n1 ", p, 1, 1;\n}\n"                            \
                   : DOPS                                                                  \
                   : "l"(a), "l"(b), "r"(kScaleD));                                        \
    }                                                                                      \
    static __device__ __forceinline__ void rs(float (&d)[NACC], const uint32_t (&a)[4],    \
                                              uint64_t b) {                                \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #n5 ", 0;\n"                        \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k32.f32.e4m3.e4m3 "                 \
                   "{" REGS "}, {%" #n0 ", %" #n1 ", %" #n2 ", %" #n3 "}, %" #n4 ", p, 1, 1;\n}\n" \
                   : DOPS                                                                  \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));          \
    }                                                                                      \
  };

LA_WG_MMA_E4M3(64, 32, LA_WG_R32, LA_WG_D32, 32, 33, 34, 35, 36, 37)
LA_WG_MMA_E4M3(128, 64, LA_WG_R64, LA_WG_D64, 64, 65, 66, 67, 68, 69)
LA_WG_MMA_E4M3(256, 128, LA_WG_R128, LA_WG_D128, 128, 129, 130, 131, 132, 133)

#undef LA_WG_MMA_E4M3
#undef LA_WG_MMA
#undef LA_WG_R128
#undef LA_WG_R96
#undef LA_WG_R88
#undef LA_WG_R64
#undef LA_WG_R32
#undef LA_WG_D128
#undef LA_WG_D96
#undef LA_WG_D88
#undef LA_WG_D64
#undef LA_WG_D32
#undef LA_WG_D8

// ---- The online softmax's steps on a consumer's accumulator fragments ---------------------
// Scores s into log2 units: s * scale_log2, or under a softcap cap_post * tanh(s * cap_pre)
// (cap_pre = scale / softcap, cap_post = softcap * log2(e)).
template <int N>
__device__ __forceinline__ void scale_scores(float (&s)[N], bool softcap, float cap_pre,
                                             float cap_post, float scale_log2) {
  if (softcap) {
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] = cap_post * tanhf(s[i] * cap_pre);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] *= scale_log2;
  }
}

// Rescales the thread's two rows of O: registers 4 i, 4 i + 1 by alpha[0] (row g), 4 i + 2,
// 4 i + 3 by alpha[1] (row g + 8).
template <int N>
__device__ __forceinline__ void scale_rows(float (&o)[N], const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < N / 4; ++i) {
    o[4 * i + 0] *= alpha[0];
    o[4 * i + 1] *= alpha[0];
    o[4 * i + 2] *= alpha[1];
    o[4 * i + 3] *= alpha[1];
  }
}

// P (the exponentials in the S registers) as the 16-bit A fragments of O += P V: the S
// accumulators of n8 blocks 2 kk and 2 kk + 1 are the A fragment of k16 step kk.
template <typename T, int kSteps>
__device__ __forceinline__ void pack_p(uint32_t (&pf)[kSteps][4], const float (&s)[8 * kSteps]) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    pf[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
    pf[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
    pf[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
    pf[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

}  // namespace wgmma
}  // namespace longattn
