// Tensor-core dense kernel (mma.sync m16n8k16, sm_80+): not yet written; AUTO falls back
// to the SIMT kernel while dense_mma_supports returns false.
#include "longattn/dispatch.cuh"

namespace longattn {
bool dense_mma_supports(const LaDenseParams &) { return false; }
cudaError_t dense_mma_forward(const LaDenseParams &, cudaStream_t) { return cudaErrorNotSupported; }
}  // namespace longattn
