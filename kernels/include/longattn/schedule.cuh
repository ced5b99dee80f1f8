// Key-tile schedules: which key tiles a block of query rows visits, in order. A mainloop
// takes its schedule as a type with
//   int count() const;       // number of key tiles
//   int key0(int t) const;   // first key of tile t (keys [key0, key0 + block_n))
// so that another mask (neighborhoods, block lists, page lists) is another schedule, not
// another mainloop.
#pragma once

#include "longattn/mask.cuh"

namespace longattn {

// Sinks + window (Mask::key_tiles): the sink tiles [0, sink_tiles), then the window's tiles
// [first, last). Tile t is key tile sink t or first + (t - sink_tiles).
struct WindowTiles {
  int sink_tiles, first, last, block_n;

  __device__ __forceinline__ static WindowTiles of(const Mask &mask, int row_begin, int row_end,
                                                   int sq, int sk, int block_n) {
    WindowTiles w;
    w.block_n = block_n;
    mask.key_tiles(row_begin, row_end, sq, sk, block_n, w.sink_tiles, w.first, w.last);
    return w;
  }

  __device__ __forceinline__ int count() const { return sink_tiles + (last - first); }
  // Index of the t-th visited tile among all key tiles of block_n keys.
  __device__ __forceinline__ int tile(int t) const {
    return t < sink_tiles ? t : first + (t - sink_tiles);
  }
  __device__ __forceinline__ int key0(int t) const { return tile(t) * block_n; }
};

}  // namespace longattn
