// Internal launcher entry points of each dense kernel (one translation unit each); the
// public la_dense_forward in dense.cu dispatches among them.
#pragma once

#include "longattn/dense.h"

namespace longattn {
cudaError_t dense_simt_forward(const LaDenseParams &p, cudaStream_t stream);
bool dense_mma_supports(const LaDenseParams &p);
cudaError_t dense_mma_forward(const LaDenseParams &p, cudaStream_t stream);
}  // namespace longattn
