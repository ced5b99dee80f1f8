//! Block-sparse prefill: a dense problem restricted to the key blocks of a CSR block mask
//! (FlexAttention's `BlockMask`, FlashInfer's BSR), `longattn_block_sparse_forward_{cpu,cuda}`
//! over [`BlockSparseAttention`]; and MoBA (per-token block selection, then attention over
//! it), `longattn_moba_forward_{cpu,cuda}`.

use super::{
    CDenseDesc, CTensor, CTensorMut, CallError, DTypeCode, DeviceQkv, Forward, Status, cpu_entry,
    cuda_entry, dense_problem, guarded, host_slice, table,
};
use crate::block_sparse::moba::{GPU_TILE_ROWS, MobaConfig, MobaGpuPlan, moba_attention};
use crate::block_sparse::{BlockMask, BlockMaskDims, BlockMaskError, BlockSparseAttention};
use crate::dense::FlashAttention;
use crate::element::Element;
use crate::error::Error;
use crate::layout::Strided;

/// `longattn_block_mask`: a [`BlockMask`] as C arrays (host, for the CPU and the CUDA
/// calls alike). List `l` of `batch * heads * num_q_blocks` (row-major over `[batch, heads,
/// num_q_blocks]`) is `indices[offsets[l]..offsets[l + 1]]`, strictly increasing key block
/// indices; `full[e] != 0` marks entry `e` full (every element visible, the element mask not
/// applied), 0 partial (the descriptor's causal/window/sinks mask applies inside).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CBlockMask {
    /// Batch entries: the problem's, or 1 (one set of lists for every sequence).
    pub batch: usize,
    /// Query heads: the problem's `heads_q`, or 1 (one set of lists for every head).
    pub heads: usize,
    /// Query blocks per sequence: `ceil(max seqlen_q / block_m)`.
    pub num_q_blocks: usize,
    /// Key blocks per sequence: `ceil(max seqlen_k / block_n)`.
    pub num_k_blocks: usize,
    /// Query rows per query block.
    pub block_m: usize,
    /// Keys per key block.
    pub block_n: usize,
    /// `batch * heads * num_q_blocks + 1` offsets into `indices`.
    pub offsets: *const i32,
    /// `nnz` key block indices, all lists concatenated.
    pub indices: *const i32,
    /// `nnz` flags (nonzero: full), or NULL: every entry partial.
    pub full: *const u8,
    /// Entries in `indices` (and `full`).
    pub nnz: usize,
}

impl From<BlockMaskError> for CallError {
    fn from(e: BlockMaskError) -> Self {
        CallError::Api(Error::from(e))
    }
}

/// Builds the validated problem: the dense problem of `desc` bound to the mask.
///
/// # Safety
/// `desc` as [`dense_problem`]; `mask` NULL or valid, its arrays of the documented lengths.
unsafe fn block_sparse_problem(
    desc: *const CDenseDesc,
    mask: *const CBlockMask,
) -> Result<BlockSparseAttention, CallError> {
    // SAFETY: forwarded contract.
    let attn = unsafe { dense_problem(desc) }?;
    // SAFETY: NULL or valid by the contract.
    let m = unsafe { mask.as_ref() }.ok_or(CallError::Null("mask"))?;
    let dims = BlockMaskDims {
        batch: m.batch,
        heads: m.heads,
        num_q_blocks: m.num_q_blocks,
        num_k_blocks: m.num_k_blocks,
        block_m: m.block_m,
        block_n: m.block_n,
    };
    // At most `i32::MAX` lists: the `+ 1` cannot overflow.
    let lists = dims.num_lists()?;
    // SAFETY: `lists + 1` offsets and `nnz` indices and flags by the contract.
    let (offsets, indices) = unsafe {
        (
            table(m.offsets, lists + 1, "mask.offsets")?,
            table(m.indices, m.nnz, "mask.indices")?,
        )
    };
    let full = match m.full.is_null() {
        true => vec![false; m.nnz],
        // SAFETY: as above.
        false => unsafe { host_slice::<u8>(m.full.cast(), m.nnz, "mask.full") }?
            .iter()
            .map(|&f| f != 0)
            .collect(),
    };
    let mask = BlockMask::from_csr(dims, offsets.to_vec(), indices.to_vec(), full)?;
    Ok(BlockSparseAttention::new(attn, mask)?)
}

/// `longattn_block_sparse_forward_cpu()`: block-sparse attention on host buffers
/// ([`BlockSparseAttention::forward_cpu`]; f32, f16 or bf16): the dense problem of `desc`
/// (buffers, options and sizes as [`super::longattn_dense_forward_cpu`]) visiting only the
/// key blocks `mask` lists.
///
/// # Safety
/// As [`super::longattn_dense_forward_cpu`]; `mask` valid, its arrays of the documented
/// lengths.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_block_sparse_forward_cpu(
    desc: *const CDenseDesc,
    mask: *const CBlockMask,
    dtype: DTypeCode,
    q: CTensor,
    k: CTensor,
    v: CTensor,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor and mask by the contract.
        let bs = unsafe { block_sparse_problem(desc, mask) }?;
        // SAFETY: the buffers as documented.
        unsafe { cpu_entry(&bs, dtype, (q, k, v), out, (lse, lse_len)) }
    })
}

/// `longattn_block_sparse_forward_cuda()`: [`longattn_block_sparse_forward_cpu`] on device
/// buffers of GPU `device`, queued on `stream` as [`super::longattn_dense_forward_cuda`] (the
/// mask stays host arrays, validated, then uploaded on `stream` per call). The tensor-core
/// kernel ([`BlockSparseAttention::forward_gpu`]): f16 or bf16, block sizes multiples of 64,
/// head_dim 64, 128 or 256. **Not yet run on a GPU** through the C API.
///
/// # Safety
/// As [`super::longattn_dense_forward_cuda`]; `mask` as for
/// [`longattn_block_sparse_forward_cpu`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_block_sparse_forward_cuda(
    desc: *const CDenseDesc,
    mask: *const CBlockMask,
    dtype: DTypeCode,
    q: CTensor,
    k: CTensor,
    v: CTensor,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor and mask by the contract.
        let bs = unsafe { block_sparse_problem(desc, mask) }?;
        let gpu = (device, stream);
        // SAFETY: device buffers and stream as documented.
        unsafe { cuda_entry(&bs, dtype, (q, k, v), out, (lse, lse_len), gpu) }
    })
}

/// `longattn_moba_config`: MoBA's two knobs ([`MobaConfig`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct CMobaConfig {
    /// Keys per block (MoBA's chunk size).
    pub block_n: usize,
    /// Blocks per query row, its own block included.
    pub top_k: usize,
}

/// MoBA over a dense problem: each row's blocks selected from `q` and `k`, then attention
/// over them (the problem's options are the element mask applied with the selection).
struct Moba {
    attn: FlashAttention,
    config: MobaConfig,
}

impl Forward for Moba {
    /// [`moba_attention`] (per-token selection, union mask over query tiles of
    /// [`GPU_TILE_ROWS`] rows as the GPU's; the tile height does not change the result),
    /// then its `forward_cpu`.
    fn run_cpu<T: Element>(
        &self,
        q: Strided<&[T]>,
        k: Strided<&[T]>,
        v: Strided<&[T]>,
        out: Strided<&mut [T]>,
        lse: Option<&mut [f32]>,
    ) -> crate::Result<()> {
        let (q_sel, k_sel) = (
            Strided::new(q.data, q.strides),
            Strided::new(k.data, k.strides),
        );
        let bs = moba_attention(&self.attn, &self.config, GPU_TILE_ROWS, q_sel, k_sel)?;
        bs.forward_cpu(q, k, v, out, lse)
    }

    /// A [`MobaGpuPlan`] for this call (scratch allocated on `stream`), then its `forward`.
    fn run_gpu<T: Element + cudarc::driver::DeviceRepr>(
        &self,
        stream: &std::sync::Arc<cudarc::driver::CudaStream>,
        (q, k, v): DeviceQkv<'_, T>,
        out: Strided<&mut cudarc::driver::CudaSlice<T>>,
        lse: Option<&mut dyn crate::DeviceBufferMut<f32>>,
    ) -> crate::Result<()> {
        MobaGpuPlan::new(&self.attn, &self.config, stream)?.forward(stream, q, k, v, out, lse)
    }
}

/// The validated MoBA problem of `desc` and `config`.
///
/// # Safety
/// `desc` as [`dense_problem`].
unsafe fn moba_problem(desc: *const CDenseDesc, config: CMobaConfig) -> Result<Moba, CallError> {
    // SAFETY: forwarded contract.
    let attn = unsafe { dense_problem(desc) }?;
    let config = MobaConfig {
        block_n: config.block_n,
        top_k: config.top_k,
    };
    // Refused before any buffer is read or a GPU opened (the selection checks it again).
    config.check()?;
    Ok(Moba { attn, config })
}

/// `longattn_moba_forward_cpu()`: MoBA on host buffers (f32, f16 or bf16): row `i` attends to
/// the keys of its own key block and of the `top_k - 1` earlier blocks whose mean key scores
/// highest against `q_i` ([`crate::block_sparse::moba`]), under the descriptor's element mask
/// (MoBA's is causal). Buffers, options and sizes as [`super::longattn_dense_forward_cpu`].
///
/// # Safety
/// As [`super::longattn_dense_forward_cpu`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_moba_forward_cpu(
    desc: *const CDenseDesc,
    config: CMobaConfig,
    dtype: DTypeCode,
    q: CTensor,
    k: CTensor,
    v: CTensor,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor by the contract.
        let moba = unsafe { moba_problem(desc, config) }?;
        // SAFETY: the buffers as documented.
        unsafe { cpu_entry(&moba, dtype, (q, k, v), out, (lse, lse_len)) }
    })
}

/// `longattn_moba_forward_cuda()`: [`longattn_moba_forward_cpu`] on device buffers of GPU
/// `device`, queued on `stream` as [`super::longattn_dense_forward_cuda`]: a
/// [`MobaGpuPlan`] per call (gating in f32, so a near-tie may select differently from the
/// CPU's f64 gating). f16 or bf16, head_dim 64, 128 or 256, `min(top_k, key blocks)` at most
/// 32. The MoBA kernels are **not yet run on a GPU**.
///
/// # Safety
/// As [`super::longattn_dense_forward_cuda`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn longattn_moba_forward_cuda(
    desc: *const CDenseDesc,
    config: CMobaConfig,
    dtype: DTypeCode,
    q: CTensor,
    k: CTensor,
    v: CTensor,
    out: CTensorMut,
    lse: *mut f32,
    lse_len: usize,
    device: i32,
    stream: *mut std::ffi::c_void,
) -> Status {
    guarded(|| {
        // SAFETY: NULL or a valid descriptor by the contract.
        let moba = unsafe { moba_problem(desc, config) }?;
        let gpu = (device, stream);
        // SAFETY: device buffers and stream as documented.
        unsafe { cuda_entry(&moba, dtype, (q, k, v), out, (lse, lse_len), gpu) }
    })
}
