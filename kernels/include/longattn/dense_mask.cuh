// The dense window mask (window (left, right) + sinks; causal is a window) of one warp's 16
// query rows in the m16n8 accumulator layout, for the Problems of mma_attention
// (mma_mainloop.cuh) whose keys are the sequence's positions: dense, block-sparse, paged
// prefill. A thread holds rows g and g + 8 of the warp (g = lane / 4); element [i][e] of a
// score tile starting at key n0 is row g + 8 (e / 2), key n0 + 8 i + 2 tq + e % 2.
// The wgmma mainloops' flat S registers are the same layout (register 4 i + e is element
// [i][e]): WarpWindowMask<WgMaskShape<Tr>> masks them. (dense_wgmma.cu spells the same rule
// out inline: its SASS is verified.)
#pragma once

#include "longattn/common.cuh"
#include "longattn/mask.cuh"

namespace longattn {

template <class Tr>
struct WarpWindowMask {
  // Key j >= 0 is visible to row r iff j <= hi[r] && (j >= lo[r] || j < sinks) (Mask::visible
  // with j < sk folded into hi and lo clamped to [0, sk]).
  int hi[2], lo[2];
  // Diagonals of the warp's first and last valid rows, for the interior-tile test.
  long long diag_first, diag_last;
  int left, right, sinks, sk;

  // Rows warp_row0 + g (+8) of a sequence with sq query rows and sk keys under `mask`.
  __device__ __forceinline__ void prepare(const Mask &mask, int warp_row0, int g, int sq,
                                          int sk_) {
    left = mask.left;
    right = mask.right;
    sinks = mask.sinks;
    sk = sk_;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const long long diag = (long long)(warp_row0 + g + 8 * r) + sk - sq;
      long long hr = sk - 1;
      if (right >= 0) hr = min(hr, diag + right);
      long long lr = 0;
      if (left >= 0) lr = min(max(diag - left, 0LL), (long long)sk);
      hi[r] = (int)max(hr, -1LL);
      lo[r] = (int)lr;
    }
    diag_first = (long long)warp_row0 + sk - sq;
    diag_last = (long long)min(warp_row0 + 15, sq - 1) + sk - sq;
  }

  // The same for rows at query positions pos[0], pos[1] (the GQA-packed tiles of
  // dense_mma_gqa.cu hold several heads per position); `first` and `last` are the smallest
  // and largest valid positions among the warp's rows. prepare() stays written out: calling
  // this from it changes the SASS of the verified kernels that use it (sass-diff, 2026-12-05).
  __device__ __forceinline__ void prepare_positions(const Mask &mask, const int (&pos)[2],
                                                    int first, int last, int sq, int sk_) {
    left = mask.left;
    right = mask.right;
    sinks = mask.sinks;
    sk = sk_;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const long long diag = (long long)pos[r] + sk - sq;
      long long hr = sk - 1;
      if (right >= 0) hr = min(hr, diag + right);
      long long lr = 0;
      if (left >= 0) lr = min(max(diag - left, 0LL), (long long)sk);
      hi[r] = (int)max(hr, -1LL);
      lo[r] = (int)lr;
    }
    diag_first = (long long)first + sk - sq;
    diag_last = (long long)last + sk - sq;
  }

  // Whether every key of the tile [n0, n0 + kBlockN) is visible to every valid row of the
  // warp (hi and lo grow with the row: the first row bounds the right edge, the last the
  // left), so that the tile needs no per-element mask.
  __device__ __forceinline__ bool interior(int n0) const {
    const int n_end = n0 + Tr::kBlockN;
    return n_end <= sk && (right < 0 || (long long)n_end - 1 <= diag_first + right) &&
           (left < 0 || (long long)n0 >= diag_last - left || n_end <= sinks);
  }

  // Sets the masked scores of a boundary tile (keys past sk included) to -inf.
  __device__ __forceinline__ void apply(float (&sc)[Tr::kSBlocks][4], int n0, int tq) const {
    if (interior(n0)) return;
#pragma unroll
    for (int i = 0; i < Tr::kSBlocks; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + 8 * i + 2 * tq + (e & 1), r = e >> 1;
        if (!(j <= hi[r] && (j >= lo[r] || j < sinks))) sc[i][e] = kNegInf;
      }
  }
};

// The shape WarpWindowMask reads, of a wgmma traits type: kBlockN keys, kSBlocks n8 blocks of
// the consumer's kSRegs S registers.
template <class Tr>
struct WgMaskShape {
  static constexpr int kBlockN = Tr::kBlockN;
  static constexpr int kSBlocks = Tr::kSRegs / 4;
};

}  // namespace longattn
