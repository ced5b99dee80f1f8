// The mask on the device, the GPU twin of src/mask.rs: a FlashAttention window (left, right)
// plus `sinks` leading keys (causal is the window (-1, 0)), and the key tiles a block of rows
// must visit (schedule.cuh turns them into a key-tile schedule).
#pragma once

#include "longattn/common.cuh"

namespace longattn {

// FlashAttention window (left, right), -1 = unbounded, plus `sinks` leading keys that obey
// the right bound. `diag = i + sk - sq` aligns the diagonal bottom-right.
struct Mask {
  int left, right, sinks;

  __host__ __device__ __forceinline__ bool visible(int i, int j, int sq, int sk) const {
    if (j < 0 || j >= sk) return false;
    const long long diag = (long long)i + sk - sq;
    if (right >= 0 && j > diag + right) return false;
    const bool in_left = left < 0 || j >= diag - left;
    return in_left || j < sinks;
  }

  // Key tiles that rows [row_begin, row_end) must visit, as two ranges of tile indices:
  // sink tiles [0, sink_tiles) then window tiles [first, last). Mirrors Mask::key_tiles.
  __host__ __device__ __forceinline__ void key_tiles(int row_begin, int row_end, int sq, int sk,
                                                     int block_n, int &sink_tiles, int &first,
                                                     int &last) const {
    const long long d = (long long)sk - sq;
    long long lo = left >= 0 ? (long long)row_begin + d - left : 0;
    if (lo < 0) lo = 0;
    long long hi = right >= 0 ? (long long)row_end - 1 + d + right + 1 : sk;
    if (hi > sk) hi = sk;
    long long sink_end = sinks < sk ? sinks : sk;
    if (right >= 0 && sink_end > (long long)row_end - 1 + d + right + 1)
      sink_end = (long long)row_end - 1 + d + right + 1;
    if (sink_end < 0) sink_end = 0;
    sink_tiles = (int)((sink_end + block_n - 1) / block_n);
    if (hi <= lo || row_end <= row_begin) {
      first = last = sink_tiles;
      return;
    }
    first = (int)(lo / block_n);
    if (first < sink_tiles) first = sink_tiles;
    last = (int)((hi + block_n - 1) / block_n);
    if (last < first) last = first;
  }
};

}  // namespace longattn
