// The one shared-memory swizzle of the tensor-core kernels: 16-byte chunk c of row r is
// stored at chunk c ^ (r % 8) (only the low 3 bits of c change), so the same chunk of 8
// consecutive rows, which one ldmatrix 8x8 matrix reads, falls in 8 different bank groups.
// It is also the copy engine's CU_TENSOR_MAP_SWIZZLE_128B, so the TMA/wgmma kernel's
// 128-byte panels use it unchanged. Two layouts use it:
// - row-major tiles (rows, kRowElems) of the mma.sync kernels (swizzled_elem);
// - panels of 64 elements (128 bytes) of the wgmma kernel: a (kRows, 128 B) array per
//   panel, panels kRows * 128 bytes apart (panel_offset).
// ldmatrix_offset_* give a lane's part of an ldmatrix.x4 address in a row-major tile.
#pragma once

#include <stdint.h>

namespace longattn {

__device__ __forceinline__ int swizzle_chunk(int row, int chunk) { return chunk ^ (row & 7); }

// Element offset of chunk `chunk` (8 elements) of `row` in a row-major (rows, kRowElems) tile.
template <int kRowElems>
__device__ __forceinline__ int swizzled_elem(int row, int chunk) {
  return row * kRowElems + (swizzle_chunk(row, chunk) << 3);
}

// Byte offset of chunk `chunk` of `row` in a (kRows, 64 * panels) tile of 2-byte elements in
// the panel layout.
template <int kRows>
__device__ __forceinline__ uint32_t panel_offset(int row, int chunk) {
  return (uint32_t)((chunk >> 3) * (kRows * 128) + row * 128 + (swizzle_chunk(row, chunk & 7) << 4));
}

// Byte offset of this lane's row address, within a row-major swizzled tile of T with
// kRowElems per row, for an ldmatrix.x4 of the 16 rows from row0 and chunks 2 j, 2 j + 1
// (of every 8) whose four 8x8 matrices are (rows 0-7 | 8-15) x (chunk 2j), then the same for
// chunk 2j + 1: lane row row0 + lane % 16, chunk 2 j + lane / 16. That is an A fragment, or
// with .trans a B fragment of a k16 step over those 16 rows. The row's low 3 bits are
// lane % 8 when row0 % 8 == 0, so the swizzle depends on the lane only.
template <int kRowElems, typename T>
__device__ __forceinline__ uint32_t ldmatrix_offset_rows16(int lane, int row0, int j) {
  return ((row0 + (lane & 15)) * kRowElems + (((2 * j + (lane >> 4)) ^ (lane & 7)) << 3)) *
         sizeof(T);
}

// The same for matrices (rows 0-7) x (chunk 2j | 2j + 1), then (rows 8-15) x (chunk 2j | 2j
// + 1): lane row row0 + lane % 8 + 8 (lane / 16), chunk 2 j + (lane / 8) % 2; two B fragments
// of a k16 step over the 16 rows as n (K of Q K^T), or with .trans two A fragments. col0
// (elements) shifts every chunk, before the swizzle.
template <int kRowElems, typename T>
__device__ __forceinline__ uint32_t ldmatrix_offset_rows8x2(int lane, int row0, int col0, int j) {
  return ((row0 + (lane & 7) + ((lane >> 4) << 3)) * kRowElems + col0 +
          (((2 * j + ((lane >> 3) & 1)) ^ (lane & 7)) << 3)) *
         sizeof(T);
}

}  // namespace longattn
