// Internal launcher entry points of each dense kernel (one translation unit each); the
// public la_dense_forward in dense.cu dispatches among them.
#pragma once

#include "longattn/dense.h"

namespace longattn {
cudaError_t dense_simt_forward(const LaDenseParams &p, cudaStream_t stream);
bool dense_mma_supports(const LaDenseParams &p);
cudaError_t dense_mma_forward(const LaDenseParams &p, cudaStream_t stream);
// Hopper wgmma kernel (sm_90a code only): false unless the device is compute capability 9.0.
bool dense_wgmma_supports(const LaDenseParams &p);
cudaError_t dense_wgmma_forward(const LaDenseParams &p, cudaStream_t stream);
}  // namespace longattn
