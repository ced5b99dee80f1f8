// Host side of the Hopper kernels' bulk tensor copies (TMA): the driver's tensor-map encoder
// (looked up through the runtime, no libcuda link) and the 4-D maps of the dense params' Q, K
// and V (head_dim, rows, heads, batch), and the launch of a Hopper kernel. Shared by the
// Hopper kernels (*_wgmma*.cu).
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "longattn/dense.h"

namespace longattn {
namespace tma_host {

using EncodeTiled = CUresult (*)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                 const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                 const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled through the runtime (no libcuda link), looked up once;
// null if the driver lacks it.
inline EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void *ptr = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(ptr);
  }();
  return fn;
}

// One operand as a 4-D tensor (head_dim, rows, heads, batch) with byte strides, boxes of 64
// channels x box_rows rows (x box_heads heads: the GQA-packed kernel maps q with rows and heads
// swapped, boxes of {64, group heads, positions}). Returns false where the copy engine cannot
// address it (a null or not 16-byte aligned pointer, no rows, a stride that is not a multiple
// of 16 bytes or is 0 over more than one index, an extent the map cannot hold). head_dim must
// be a multiple of `channel_multiple`: 64 for kernels whose tiles hold head_dim channels
// exactly; 8 (16-byte rows) for kernels that pad head_dim to their tile, the copy engine
// zero-filling the channels past head_dim.
struct OperandShape {
  const void *base;
  long long rows, heads, batch;
  long long row_stride, head_stride, batch_stride;  // elements
};

inline bool operand_mappable(const OperandShape &x, int head_dim, int channel_multiple = 64) {
  auto stride_ok = [](long long stride, long long extent) {
    return extent <= 1 || (stride > 0 && (stride * 2) % 16 == 0 && stride * 2 < (1LL << 40));
  };
  // A map needs a base and at least one row: an operand without rows (no keys at all; its
  // buffer may be null or shorter than one row) has nothing the copy engine could load.
  return x.base != nullptr && x.rows > 0 && (reinterpret_cast<uintptr_t>(x.base) % 16) == 0 &&
         head_dim > 0 && head_dim % channel_multiple == 0 && head_dim % 8 == 0 &&
         x.rows < (1LL << 31) && x.heads < (1LL << 31) && x.batch < (1LL << 31) &&
         stride_ok(x.row_stride, x.rows) && stride_ok(x.head_stride, x.heads) &&
         stride_ok(x.batch_stride, x.batch);
}

inline bool encode_operand(CUtensorMap *map, const OperandShape &x, LaDtype dtype, int head_dim,
                           int box_rows, int channel_multiple = 64, int box_heads = 1) {
  const EncodeTiled encode = encode_tiled();
  if (encode == nullptr || !operand_mappable(x, head_dim, channel_multiple)) return false;
  // Strides of extent-1 dimensions are never stepped; give them any valid value.
  auto stride_bytes = [](long long stride, long long extent) {
    return (cuuint64_t)(extent <= 1 ? 16 : stride * 2);
  };
  const cuuint64_t dims[4] = {(cuuint64_t)head_dim, (cuuint64_t)max(x.rows, 1LL),
                              (cuuint64_t)max(x.heads, 1LL), (cuuint64_t)max(x.batch, 1LL)};
  const cuuint64_t strides[3] = {stride_bytes(x.row_stride, x.rows),
                                 stride_bytes(x.head_stride, x.heads),
                                 stride_bytes(x.batch_stride, x.batch)};
  const cuuint32_t box[4] = {64, (cuuint32_t)box_rows, (cuuint32_t)box_heads, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type =
      dtype == LA_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, 4, const_cast<void *>(x.base), dims, strides, box, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Q, K, V of `p` as tensors: fixed lengths are (batch, seqlen) with the batch stride; packed
// batches are one sequence of total rows (each block adds its sequence's first row).
inline OperandShape q_shape(const LaDenseParams &p) {
  const bool packed = p.cu_seqlens_q != nullptr;
  return {p.q, packed ? p.total_q : p.seqlen_q, p.heads_q, packed ? 1 : p.batch,
          p.q_row_stride, p.q_head_stride, p.q_batch_stride};
}
inline OperandShape kv_shape(const LaDenseParams &p, const void *base, long long row_stride,
                      long long head_stride, long long batch_stride) {
  const bool packed = p.cu_seqlens_k != nullptr;
  return {base, packed ? p.total_k : p.seqlen_k, p.heads_kv, packed ? 1 : p.batch, row_stride,
          head_stride, batch_stride};
}

inline bool tensors_mappable(const LaDenseParams &p, int channel_multiple = 64) {
  return encode_tiled() != nullptr && operand_mappable(q_shape(p), p.head_dim, channel_multiple) &&
         operand_mappable(kv_shape(p, p.k, p.k_row_stride, p.k_head_stride, p.k_batch_stride),
                          p.head_dim, channel_multiple) &&
         operand_mappable(kv_shape(p, p.v, p.v_row_stride, p.v_head_stride, p.v_batch_stride),
                          p.head_dim, channel_multiple);
}

// Why the copy engine cannot address q, k and v of `p`, or nullptr.
inline const char *tensors_unmappable_reason(const LaDenseParams &p, int channel_multiple = 64) {
  return tensors_mappable(p, channel_multiple) ? nullptr
                             : "the TMA copy engine cannot address q/k/v (it needs bases aligned "
                               "to 16 bytes, at least one key, and strides that are positive "
                               "multiples of 16 bytes for every dimension longer than 1)";
}

// sm_90a code runs on compute capability 9.0 only: other devices would load a Hopper
// kernel's empty sm_80 body (the device check of every Hopper launcher).
inline bool is_sm90(int major, int minor) { return major == 9 && minor == 0; }

// The three tensor maps of a dense problem (Q, K, V as [batch, rows, heads, head_dim] with
// element strides, boxes of 64 channels x block_m or block_n rows), passed to a kernel by value
// (__grid_constant__).
struct QkvMaps {
  CUtensorMap q, k, v;
};

// Encodes `maps` for `p` (Q boxes of block_m rows, K/V boxes of block_n rows); false where the
// copy engine cannot address an operand. `channel_multiple` as for operand_mappable.
// Encodes the K and V maps of `maps` for `p` (boxes of block_n rows); false where the copy
// engine cannot address one. `channel_multiple` as for operand_mappable.
inline bool encode_kv(QkvMaps *maps, const LaDenseParams &p, int head_dim, int block_n,
                      int channel_multiple = 64) {
  return encode_operand(&maps->k,
                        kv_shape(p, p.k, p.k_row_stride, p.k_head_stride, p.k_batch_stride),
                        p.dtype, head_dim, block_n, channel_multiple) &&
         encode_operand(&maps->v,
                        kv_shape(p, p.v, p.v_row_stride, p.v_head_stride, p.v_batch_stride),
                        p.dtype, head_dim, block_n, channel_multiple);
}

inline bool encode_qkv(QkvMaps *maps, const LaDenseParams &p, int head_dim, int block_m,
                       int block_n, int channel_multiple = 64) {
  return encode_operand(&maps->q, q_shape(p), p.dtype, head_dim, block_m, channel_multiple) &&
         encode_kv(maps, p, head_dim, block_n, channel_multiple);
}

// Launches a Hopper kernel with traits Tr (Tr::kThreads threads, Tr::kSmemBytes of dynamic
// shared memory, its limit raised first) over `grid`. The caller has checked the device
// (device_unsupported_reason with is_sm90).
template <class Tr, class Kernel, class... Args>
cudaError_t launch(Kernel kernel, dim3 grid, cudaStream_t stream, const Args &...args) {
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace tma_host
}  // namespace longattn
