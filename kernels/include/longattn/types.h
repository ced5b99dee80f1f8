/* longattn: the C types every family's params share (element types, the stream handle).
 * No CUDA header is included here so that bindgen needs only a plain C toolchain. */
#ifndef LONGATTN_TYPES_H
#define LONGATTN_TYPES_H

#ifndef __CUDACC__
typedef struct CUstream_st *cudaStream_t;
#endif

/* Element type of a params struct's tensors (q/k/v/o, a cache, the merge's o).
 * LA_F8E4M3 (OCP FP8 e4m3, "e4m3fn": no infinities, max 448) is a cache type only (kv_dtype
 * of the paged params), with a dequantisation scale per kv head. */
typedef enum LaDtype { LA_F16 = 0, LA_BF16 = 1, LA_F32 = 2, LA_F8E4M3 = 3 } LaDtype;

#endif
