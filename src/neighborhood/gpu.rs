//! `NeighborhoodAttention::forward_gpu`: validation, then the fused tensor-core kernel
//! (`kernels/neighborhood_mma.cu`) where it runs, else the portable one
//! (`kernels/neighborhood.cu`); `forward_gpu_fused` and `forward_gpu_portable` name one.
//!
//! **Verified on an H200 (sm_90a build) on 2026-12-04**: `tests/neighborhood_gpu.rs` passed
//! and compute-sanitizer memcheck was clean (racecheck of the fused test was cut off by its
//! time limit: incomplete). The sm_80 (Ampere) build has not run on a GPU.
//!
//! `forward_gpu_hopper` (`kernels/neighborhood_wgmma.cu`, wgmma + TMA, sm_90a) is compiled
//! but **not yet run on a GPU**: explicit opt-in only, never picked by `forward_gpu`.

#[cfg(longattn_cuda)]
use crate::element::DType;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::gpu::{
    DeviceBuffer, DeviceBufferMut, check_attention_gpu, check_gpu_positions, cuda_call,
};
use crate::layout::{Strided, check_attention_args};
use crate::neighborhood::NeighborhoodAttention;
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use std::sync::Arc;

/// Query tokens per block of the kernel (one warp each); the grid's x extent is the token
/// count over this, at most `i32::MAX`.
const TOKENS_PER_BLOCK: usize = 4;

/// Head dims of the fused tensor-core kernel.
const FUSED_HEAD_DIMS: [usize; 2] = [64, 128];

impl NeighborhoodAttention {
    /// GPU forward pass on `stream` (the caller's; nothing is synchronized) with the fastest
    /// kernel that takes the problem: the fused tensor-core kernel
    /// ([`NeighborhoodAttention::forward_gpu_fused`]) at head_dim 64 and 128 on sm_80+
    /// (4-30x the portable kernel on an H200, 2026-12-04), else the portable one
    /// ([`NeighborhoodAttention::forward_gpu_portable`]). Both verified on an H200 (2026-12-04,
    /// sm_90a build; sm_80 not run).
    ///
    /// `q`, `k`, `v`, `out` are device buffers laid out as for
    /// [`NeighborhoodAttention::forward_cpu`] (`[batch, X, (Y, (Z,)) heads, head_dim]` with
    /// element strides over (batch, token, head)); on the GPU pointers must be 16-byte
    /// aligned, strides multiples of 8 elements, `head_dim` a multiple of 8 up to 256; f16
    /// and bf16 only. `lse`, when given, receives the natural-log LSE in the layout of
    /// [`NeighborhoodAttention::lse_len`].
    pub fn forward_gpu<T, I, O>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<T>,
    {
        self.check_gpu_args::<T>(
            [q.extent(), k.extent(), v.extent(), out.extent()],
            lse.as_ref().map(|l| l.len()),
        )?;
        let schedule = self.device_schedule(stream)?;
        self.run_picked(schedule.as_ref(), stream, q, k, v, out, lse)
    }

    /// GPU forward pass on the portable CUDA-core kernel (`kernels/neighborhood.cu`), whatever
    /// [`NeighborhoodAttention::forward_gpu`] would pick: every valid problem runs (any rank,
    /// kernel, dilation, causal and stride per dim, GQA, softcap, head_dim a multiple of 8 up
    /// to 256). Same arguments and checks as `forward_gpu`.
    pub fn forward_gpu_portable<T, I, O>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<T>,
    {
        self.check_gpu_args::<T>(
            [q.extent(), k.extent(), v.extent(), out.extent()],
            lse.as_ref().map(|l| l.len()),
        )?;
        cuda_call!(launch, self, stream, q, k, v, out, lse)
    }

    /// GPU forward pass with the fused tensor-core kernel (`kernels/neighborhood_mma.cu`,
    /// `mma.sync`, sm_80+): 64-row query tiles of a compact box of one dilation group, only
    /// the key tiles of the [`NeighborhoodSchedule`](super::schedule::NeighborhoodSchedule)
    /// (built on the host and copied to the device on `stream` per call), element mask on
    /// boundary key tiles only. Verified on an H200 (2026-12-04; racecheck incomplete, sm_80
    /// not run); [`NeighborhoodAttention::forward_gpu`] picks it where it runs. Same arguments
    /// and checks as `forward_gpu`; `head_dim` 64 or 128, and a device of compute capability
    /// 8.0 or newer, else `Error::Unsupported`.
    pub fn forward_gpu_fused<T, I, O>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<T>,
    {
        self.check_gpu_args::<T>(
            [q.extent(), k.extent(), v.extent(), out.extent()],
            lse.as_ref().map(|l| l.len()),
        )?;
        if !FUSED_HEAD_DIMS.contains(&self.head_dim) {
            return Err(Error::Unsupported(format!(
                "the fused neighborhood kernel takes head_dim 64 or 128, not {}",
                self.head_dim
            )));
        }
        let sched = DeviceSchedule::upload(&FusedSchedule::new(self)?, stream)?;
        cuda_call!(launch_fused, self, &sched, stream, q, k, v, out, lse)
    }

    /// GPU forward pass with the Hopper kernel (`kernels/neighborhood_wgmma.cu`: wgmma + TMA,
    /// warp-specialised, sm_90a): 128-row query boxes of one dilation group and 128-key boxes
    /// over the union of their windows, each loaded by one bulk tensor copy, shapes from
    /// [`HopperTiles`](super::schedule::HopperTiles). **Compiled, not yet run on a GPU**;
    /// explicit opt-in only ([`NeighborhoodAttention::forward_gpu`] never picks it). Same
    /// arguments and checks as `forward_gpu`, and before any device call
    /// `Error::Unsupported` for: `head_dim` other than 64 or 128, a dilation above 8 or one no
    /// box shape fits (1-D dilation above 2), q/k/v strides the copy engine cannot step
    /// (positive multiples of 8 elements below 2^39 over every extent above 1); at launch,
    /// a device other than compute capability 9.0.
    pub fn forward_gpu_hopper<T, I, O>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<T>,
    {
        self.check_gpu_args::<T>(
            [q.extent(), k.extent(), v.extent(), out.extent()],
            lse.as_ref().map(|l| l.len()),
        )?;
        let tiles = self.hopper_tiles([&q.strides, &k.strides, &v.strides])?;
        cuda_call!(launch_hopper, self, &tiles, stream, q, k, v, out, lse)
    }

    /// The Hopper kernel's box shapes, or why it cannot take this problem with these q/k/v
    /// strides (host-only checks; see [`NeighborhoodAttention::forward_gpu_hopper`]).
    pub(crate) fn hopper_tiles(
        &self,
        strides: [&crate::layout::Strides; 3],
    ) -> Result<super::schedule::HopperTiles> {
        if !FUSED_HEAD_DIMS.contains(&self.head_dim) {
            return Err(Error::Unsupported(format!(
                "the Hopper neighborhood kernel takes head_dim 64 or 128, not {}",
                self.head_dim
            )));
        }
        let tiles = super::schedule::HopperTiles::new(self)?;
        // Every stride the tensor maps step: token, the inner dims' pitches (products of the
        // token stride and lengths), head, and batch (the 3-D launches offset pointers by it).
        let steppable = |stride: i64, extent: usize| {
            extent <= 1 || (stride > 0 && stride % 8 == 0 && stride < (1i64 << 39))
        };
        for (name, s, heads) in [
            ("q", strides[0], self.heads_q),
            ("k", strides[1], self.heads_kv),
            ("v", strides[2], self.heads_kv),
        ] {
            let mut ok = steppable(s.head, heads) && steppable(s.batch, self.batch);
            let mut pitch = s.seq;
            for d in self.dims.iter().rev() {
                ok &= steppable(pitch, d.length);
                pitch = pitch.saturating_mul(d.length as i64);
            }
            if !ok {
                return Err(Error::Unsupported(format!(
                    "the Hopper neighborhood kernel's copy engine cannot step {name}'s strides \
                     {s:?} (positive multiples of 8 elements below 2^39 over every extent above \
                     1, the grid dims' pitches included)"
                )));
            }
        }
        Ok(tiles)
    }

    /// Where the fused kernel applies (head_dim 64 or 128), builds its schedule and copies
    /// it to the device once, on `stream`, for [`NeighborhoodGpuPlan::forward`] (the buffers
    /// and dtype are checked per call, as for `forward_gpu`): per call that saves the host
    /// schedule build (0.5 ms for 1-D 32k tokens, 2 ms for 3-D 16x64x64 on a slow CPU) and
    /// the upload, and makes the call capturable in a CUDA graph.
    pub fn plan_gpu(&self, stream: &Arc<CudaStream>) -> Result<NeighborhoodGpuPlan> {
        self.check_gpu_lengths()?;
        Ok(NeighborhoodGpuPlan {
            attn: self.clone(),
            schedule: self.device_schedule(stream)?,
        })
    }

    /// The fused kernel's schedule on the device, or `None` where the fused kernel does not
    /// apply (head dim, or past its 32-bit indexing: the portable kernel takes those).
    fn device_schedule(&self, stream: &Arc<CudaStream>) -> Result<Option<DeviceSchedule>> {
        if !FUSED_HEAD_DIMS.contains(&self.head_dim) {
            return Ok(None);
        }
        match FusedSchedule::new(self) {
            Ok(s) => Ok(Some(DeviceSchedule::upload(&s, stream)?)),
            Err(Error::Unsupported(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The fused kernel with `schedule` when given and the device runs it, else the portable
    /// kernel; the arguments are already checked (`check_gpu_args`).
    #[allow(clippy::too_many_arguments)]
    fn run_picked<T, I, O>(
        &self,
        schedule: Option<&DeviceSchedule>,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        out: Strided<&mut O>,
        mut lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<T>,
    {
        if let Some(sched) = schedule {
            // Unsupported here means the device (below sm_80, no code for it): fall back.
            let lse_again: Option<&mut dyn DeviceBufferMut<f32>> = match &mut lse {
                Some(l) => Some(&mut **l),
                None => None,
            };
            let out_again = Strided::new(&mut *out.data, out.strides);
            let (q2, k2, v2) = (
                Strided::new(q.data, q.strides),
                Strided::new(k.data, k.strides),
                Strided::new(v.data, v.strides),
            );
            match cuda_call!(
                launch_fused,
                self,
                sched,
                stream,
                q2,
                k2,
                v2,
                out_again,
                lse_again
            ) {
                Err(Error::Unsupported(_)) => {}
                done => return done,
            }
        }
        cuda_call!(launch, self, stream, q, k, v, out, lse)
    }

    /// Each grid dim's length within [`crate::gpu::GPU_MAX_POSITIONS`]: the kernels hold a
    /// position along a dim (and a tile's end) in `int`; the token count itself is 64-bit in
    /// the portable kernel (the fused ones check their own 32-bit indexing and fall back).
    fn check_gpu_lengths(&self) -> Result<()> {
        let lengths: Vec<_> = self
            .dims
            .iter()
            .map(|d| ("grid length", d.length))
            .collect();
        check_gpu_positions("neighborhood attention", &lengths)
    }

    /// Every check of `forward_gpu` that needs no device pointer: the grid lengths, the CPU
    /// path's argument check, then what the kernel supports.
    fn check_gpu_args<T: Element>(
        &self,
        bufs: [(usize, &crate::layout::Strides); 4],
        lse_len: Option<usize>,
    ) -> Result<()> {
        self.check_gpu_lengths()?;
        let n = self.tokens;
        check_attention_args(
            "",
            bufs,
            [self.batch, n, self.heads_q, self.head_dim],
            [self.batch, n, self.heads_kv, self.head_dim],
            lse_len.map(|l| (l, self.lse_len(), "[batch, heads_q, tokens]")),
        )?;
        check_attention_gpu(
            "neighborhood",
            T::DTYPE,
            self.head_dim,
            self.batch,
            self.heads_q,
        )?;
        if n.div_ceil(TOKENS_PER_BLOCK) > i32::MAX as usize {
            return Err(Error::Unsupported(format!(
                "{n} grid tokens: at most {} on the GPU",
                i32::MAX as usize * TOKENS_PER_BLOCK
            )));
        }
        Ok(())
    }
}

/// A neighborhood problem bound to the fused kernel's device-resident schedule (when the
/// fused kernel applies): [`NeighborhoodGpuPlan::forward`] makes no allocation and no
/// host-device copy, so a CUDA graph can capture it. The schedule lives on the stream that
/// built the plan; use the plan on that stream (or order other streams after it). The kernels
/// are verified on an H200 (2026-12-04); the plan path itself awaits its first GPU run.
#[derive(Debug)]
pub struct NeighborhoodGpuPlan {
    attn: NeighborhoodAttention,
    schedule: Option<DeviceSchedule>,
}

impl NeighborhoodGpuPlan {
    /// The validated problem.
    pub fn problem(&self) -> &NeighborhoodAttention {
        &self.attn
    }

    /// Whether [`NeighborhoodGpuPlan::forward`] tries the fused tensor-core kernel (head_dim
    /// 64 or 128, within its 32-bit indexing) before the portable one.
    pub fn uses_fused(&self) -> bool {
        self.schedule.is_some()
    }

    /// [`NeighborhoodAttention::forward_gpu`] without the per-call schedule build and upload:
    /// validation (host only) and one launch on `stream`; the fused kernel where the plan has
    /// its schedule and the device runs it, else the portable kernel.
    pub fn forward<T, I, O>(
        &self,
        stream: &Arc<CudaStream>,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        out: Strided<&mut O>,
        lse: Option<&mut dyn DeviceBufferMut<f32>>,
    ) -> Result<()>
    where
        T: Element + DeviceRepr,
        I: DeviceBuffer<T>,
        O: DeviceBufferMut<T>,
    {
        self.attn.check_gpu_args::<T>(
            [q.extent(), k.extent(), v.extent(), out.extent()],
            lse.as_ref().map(|l| l.len()),
        )?;
        let schedule = self.schedule.as_ref();
        self.attn.run_picked(schedule, stream, q, k, v, out, lse)
    }
}

/// [`FusedSchedule`] on the device (`LaNaSchedule`'s arrays); never empty arrays, so the
/// kernel never sees a null pointer.
#[derive(Debug)]
#[cfg_attr(not(longattn_cuda), allow(dead_code))]
struct DeviceSchedule {
    /// `[num_tiles * 17]`: the host records, flattened.
    tiles: CudaSlice<i32>,
    /// `[key tiles]`: 1 where every valid row of the query tile sees every key of the tile.
    interior: CudaSlice<u8>,
    num_tiles: usize,
    tile_log2: [i32; 3],
}

impl DeviceSchedule {
    fn upload(s: &FusedSchedule, stream: &Arc<CudaStream>) -> Result<Self> {
        let flat: Vec<i32> = s.tiles.iter().flatten().copied().collect();
        let nonempty_i32 = |v: &[i32]| if v.is_empty() { vec![0] } else { v.to_vec() };
        let nonempty_u8 = |v: &[u8]| if v.is_empty() { vec![0] } else { v.to_vec() };
        Ok(DeviceSchedule {
            tiles: stream.clone_htod(&nonempty_i32(&flat))?,
            interior: stream.clone_htod(&nonempty_u8(&s.interior))?,
            num_tiles: s.tiles.len(),
            tile_log2: s.tile_log2,
        })
    }
}

/// The fused kernel's schedule as the C ABI lays it out (`LaNaTile`, `LaNaSchedule` in
/// `kernels/include/longattn/neighborhood.h`), dims padded to three.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(not(longattn_cuda), allow(dead_code))]
struct FusedSchedule {
    /// Per query tile: group, origin, valid, key_start, key_extent (3 each), then the first
    /// key tile and the key-tile count.
    tiles: Vec<[i32; 17]>,
    interior: Vec<u8>,
    tile_log2: [i32; 3],
}

impl FusedSchedule {
    fn new(attn: &NeighborhoodAttention) -> Result<Self> {
        use super::schedule::{MMA_KEY_TILE, MMA_QUERY_ROWS, NeighborhoodSchedule};
        let sched = NeighborhoodSchedule::new(attn, MMA_QUERY_ROWS, MMA_KEY_TILE)?;
        let too_big = |what: &str| {
            Error::Unsupported(format!(
                "the fused neighborhood kernel indexes {what} with 32-bit integers; this \
                 problem needs more (the portable kernel takes it)"
            ))
        };
        let int = |x: usize| i32::try_from(x).ok();
        if int(sched.tiles.len()).is_none() || int(sched.key_tiles.len()).is_none() {
            return Err(too_big("query and key tiles"));
        }
        let mut tiles = Vec::with_capacity(sched.tiles.len());
        for t in &sched.tiles {
            // The kernel's key index n and n + key_tile stay below 2^31.
            if t.key_count()
                .checked_add(MMA_KEY_TILE)
                .and_then(int)
                .is_none()
            {
                return Err(too_big("a query tile's key box"));
            }
            let mut rec = [0i32; 17];
            for a in 0..3 {
                // In-group indices and extents are below the dim's length (an i32).
                rec[a] = t.group[a] as i32;
                rec[3 + a] = t.origin[a] as i32;
                rec[6 + a] = t.valid[a] as i32;
                rec[9 + a] = t.keys[a].start as i32;
                rec[12 + a] = t.keys[a].len() as i32;
            }
            rec[15] = t.key_tiles.start as i32;
            rec[16] = t.key_tiles.len() as i32;
            tiles.push(rec);
        }
        Ok(FusedSchedule {
            tiles,
            interior: sched.key_tiles.iter().map(|k| k.interior as u8).collect(),
            tile_log2: sched.tile.map(|t| t.trailing_zeros() as i32),
        })
    }
}

#[cfg(longattn_cuda)]
#[allow(clippy::too_many_arguments)]
fn launch_fused<T, I, O>(
    attn: &NeighborhoodAttention,
    sched: &DeviceSchedule,
    stream: &Arc<CudaStream>,
    q: Strided<&I>,
    k: Strided<&I>,
    v: Strided<&I>,
    out: Strided<&mut O>,
    lse: Option<&mut dyn DeviceBufferMut<f32>>,
) -> Result<()>
where
    T: Element + DeviceRepr,
    I: DeviceBuffer<T>,
    O: DeviceBufferMut<T>,
{
    use crate::gpu::{check_launch, ffi};
    use cudarc::driver::DevicePtr;
    if attn.out_len() == 0 || sched.num_tiles == 0 {
        return Ok(());
    }
    let (tiles_ptr, _tiles_sync) = sched.tiles.device_ptr(stream);
    let (interior_ptr, _interior_sync) = sched.interior.device_ptr(stream);
    let schedule = ffi::LaNaSchedule {
        tiles: tiles_ptr as *const ffi::LaNaTile,
        interior: interior_ptr as *const u8,
        // Checked to fit i32 by FusedSchedule::new.
        num_tiles: sched.num_tiles as i32,
        tile_log2: sched.tile_log2,
        key_tile: super::schedule::MMA_KEY_TILE as i32,
    };
    launch_with(attn, stream, q, k, v, out, lse, |params, cu_stream| {
        // SAFETY: as in `launch`; the schedule's device arrays stay alive (and their sync
        // guards in scope) until the launch is queued on `stream`.
        let code = unsafe { ffi::la_neighborhood_mma_forward(params, &schedule, cu_stream) };
        if code == ffi::LA_DENSE_KERNEL_UNSUPPORTED as i32 {
            return Err(Error::Unsupported(
                "the fused neighborhood kernel needs a device of compute capability 8.0 or \
                 newer with its shared memory"
                    .into(),
            ));
        }
        check_launch("la_neighborhood_mma_forward", code)
    })
}

#[cfg(longattn_cuda)]
#[allow(clippy::too_many_arguments)]
fn launch_hopper<T, I, O>(
    attn: &NeighborhoodAttention,
    tiles: &super::schedule::HopperTiles,
    stream: &Arc<CudaStream>,
    q: Strided<&I>,
    k: Strided<&I>,
    v: Strided<&I>,
    out: Strided<&mut O>,
    lse: Option<&mut dyn DeviceBufferMut<f32>>,
) -> Result<()>
where
    T: Element + DeviceRepr,
    I: DeviceBuffer<T>,
    O: DeviceBufferMut<T>,
{
    use crate::gpu::{check_launch, ffi};
    let (query_log2, key_log2) = tiles.log2();
    let c_tiles = ffi::LaNaHopperTiles {
        rank: tiles.rank as i32,
        query_log2,
        key_log2,
    };
    launch_with(attn, stream, q, k, v, out, lse, |params, cu_stream| {
        // SAFETY: as in `launch`; `c_tiles` lives until the call returns.
        let code = unsafe { ffi::la_neighborhood_wgmma_forward(params, &c_tiles, cu_stream) };
        if code == ffi::LA_DENSE_KERNEL_UNSUPPORTED as i32 {
            return Err(Error::Unsupported(
                "the Hopper neighborhood kernel needs a device of compute capability 9.0 and \
                 q/k/v the copy engine can address (16-byte aligned)"
                    .into(),
            ));
        }
        check_launch("la_neighborhood_wgmma_forward", code)
    })
}

/// The kernel's params with null pointers: dims padded in front to three (see
/// `kernels/include/longattn/neighborhood.h`), strides and options from `attn`.
#[cfg(longattn_cuda)]
fn params(attn: &NeighborhoodAttention, dtype: DType) -> crate::gpu::ffi::LaNeighborhoodParams {
    use super::schedule::padded_dims;
    let dims = padded_dims(attn);
    let per = |f: &dyn Fn(&super::NeighborhoodDim) -> usize| dims.each_ref().map(|d| f(d) as i32);
    crate::gpu::ffi::LaNeighborhoodParams {
        batch: attn.batch as i32,
        heads_q: attn.heads_q as i32,
        heads_kv: attn.heads_kv as i32,
        head_dim: attn.head_dim as i32,
        length: per(&|d| d.length),
        kernel: per(&|d| d.kernel),
        dilation: per(&|d| d.dilation),
        stride: per(&|d| d.stride),
        causal: per(&|d| d.causal as usize),
        tokens: attn.tokens as i64,
        scale: attn.scale,
        softcap: attn.softcap.unwrap_or(0.0),
        dtype: crate::gpu::la_dtype(dtype),
        ..Default::default()
    }
}

#[cfg(longattn_cuda)]
fn launch<T, I, O>(
    attn: &NeighborhoodAttention,
    stream: &Arc<CudaStream>,
    q: Strided<&I>,
    k: Strided<&I>,
    v: Strided<&I>,
    out: Strided<&mut O>,
    lse: Option<&mut dyn DeviceBufferMut<f32>>,
) -> Result<()>
where
    T: Element + DeviceRepr,
    I: DeviceBuffer<T>,
    O: DeviceBufferMut<T>,
{
    use crate::gpu::{check_launch, ffi};
    launch_with(attn, stream, q, k, v, out, lse, |params, cu_stream| {
        // SAFETY: every pointer in `params` comes from a live cudarc buffer whose extent was
        // checked against the strides; the launch is ordered on `stream`, and the sync
        // guards keep cudarc's event tracking correct until the launch is queued.
        let code = unsafe { ffi::la_neighborhood_forward(params, cu_stream) };
        check_launch("la_neighborhood_forward", code)
    })
}

/// Checks the device pointers of `q`, `k`, `v`, `out` for the kernels' 16-byte vector
/// access, fills the params and runs `call` with them and `stream`'s CUDA stream while the
/// buffers' sync guards are alive.
#[cfg(longattn_cuda)]
#[allow(clippy::too_many_arguments)]
fn launch_with<T, I, O>(
    attn: &NeighborhoodAttention,
    stream: &Arc<CudaStream>,
    q: Strided<&I>,
    k: Strided<&I>,
    v: Strided<&I>,
    out: Strided<&mut O>,
    lse: Option<&mut dyn DeviceBufferMut<f32>>,
    call: impl FnOnce(
        &crate::gpu::ffi::LaNeighborhoodParams,
        crate::gpu::ffi::cudaStream_t,
    ) -> Result<()>,
) -> Result<()>
where
    T: Element + DeviceRepr,
    I: DeviceBuffer<T>,
    O: DeviceBufferMut<T>,
{
    use crate::gpu::{QkvoPtrs, ffi, ptr_mut_or_null};
    if attn.out_len() == 0 {
        return Ok(());
    }
    let ptrs = QkvoPtrs::new(stream, &q, &k, &v, (&mut *out.data, &out.strides))?;
    let (lse_ptr, _lse_sync) = ptr_mut_or_null(lse, stream);
    let params = ffi::LaNeighborhoodParams {
        q: ptrs.q as *const _,
        k: ptrs.k as *const _,
        v: ptrs.v as *const _,
        o: ptrs.o as *mut _,
        lse: lse_ptr as *mut f32,
        q_batch_stride: q.strides.batch,
        q_row_stride: q.strides.seq,
        q_head_stride: q.strides.head,
        k_batch_stride: k.strides.batch,
        k_row_stride: k.strides.seq,
        k_head_stride: k.strides.head,
        v_batch_stride: v.strides.batch,
        v_row_stride: v.strides.seq,
        v_head_stride: v.strides.head,
        o_batch_stride: out.strides.batch,
        o_row_stride: out.strides.seq,
        o_head_stride: out.strides.head,
        ..params(attn, T::DTYPE)
    };
    call(&params, crate::gpu::launch_stream(stream)? as _)
}

/// The C launcher refuses what the Rust API refuses before any CUDA call, so this runs
/// without a GPU.
#[cfg(all(test, longattn_cuda))]
mod c_entry_checks {
    use super::params;
    use crate::dense::AttentionOptions;
    use crate::element::DType;
    use crate::gpu::ffi;
    use crate::neighborhood::{NeighborhoodAttention, NeighborhoodDim, NeighborhoodShape};

    const INVALID_VALUE: i32 = 1; // cudaErrorInvalidValue

    fn valid() -> ffi::LaNeighborhoodParams {
        let dims = [
            NeighborhoodDim::new(9, 3).with_dilation(2),
            NeighborhoodDim::new(7, 4).with_causal(true),
        ];
        let attn = NeighborhoodAttention::new(
            &NeighborhoodShape {
                batch: 2,
                heads_q: 4,
                heads_kv: 2,
                head_dim: 64,
                dims: &dims,
            },
            &AttentionOptions::default(),
        )
        .unwrap();
        params(&attn, DType::BF16)
    }

    #[test]
    fn params_are_padded_to_three_dims() {
        let p = valid();
        assert_eq!(p.length, [1, 9, 7]);
        assert_eq!(p.kernel, [1, 3, 4]);
        assert_eq!(p.dilation, [1, 2, 1]);
        assert_eq!(p.stride, [1, 1, 1]);
        assert_eq!(p.causal, [0, 0, 1]);
        assert_eq!(p.tokens, 63);
    }

    #[test]
    fn entry_refuses_bad_params() {
        let v = valid();
        let mut cases: Vec<(&str, ffi::LaNeighborhoodParams)> = vec![
            ("null pointers with work", v),
            ("heads_kv 0", ffi::LaNeighborhoodParams { heads_kv: 0, ..v }),
            ("gqa ratio", ffi::LaNeighborhoodParams { heads_kv: 3, ..v }),
            (
                "head_dim 12",
                ffi::LaNeighborhoodParams { head_dim: 12, ..v },
            ),
            (
                "head_dim 264",
                ffi::LaNeighborhoodParams { head_dim: 264, ..v },
            ),
            ("batch < 0", ffi::LaNeighborhoodParams { batch: -1, ..v }),
            (
                "f32",
                ffi::LaNeighborhoodParams {
                    dtype: ffi::LaDtype::LA_F32,
                    ..v
                },
            ),
            (
                "scale nan",
                ffi::LaNeighborhoodParams {
                    scale: f32::NAN,
                    ..v
                },
            ),
            ("scale 0", ffi::LaNeighborhoodParams { scale: 0.0, ..v }),
            (
                "softcap nan",
                ffi::LaNeighborhoodParams {
                    softcap: f32::NAN,
                    ..v
                },
            ),
            ("tokens", ffi::LaNeighborhoodParams { tokens: 64, ..v }),
            (
                "stride < 0",
                ffi::LaNeighborhoodParams {
                    k_row_stride: -8,
                    ..v
                },
            ),
        ];
        let mut dim = |name: &'static str, f: &dyn Fn(&mut ffi::LaNeighborhoodParams)| {
            let mut p = v;
            f(&mut p);
            cases.push((name, p));
        };
        dim("kernel * dilation > length", &|p| p.kernel[1] = 5);
        dim("kernel 0", &|p| p.kernel[2] = 0);
        dim("dilation 0", &|p| p.dilation[0] = 0);
        dim("stride > kernel", &|p| p.stride[1] = 4);
        dim("stride on a causal dim", &|p| p.stride[2] = 2);
        dim("causal 2", &|p| p.causal[1] = 2);
        dim("length 0", &|p| p.length[0] = 0);
        for (name, p) in cases {
            // SAFETY: the params are refused before any pointer is read or CUDA is called.
            let code = unsafe { ffi::la_neighborhood_forward(&p, std::ptr::null_mut()) };
            assert_eq!(code, INVALID_VALUE, "{name}");
        }
        // SAFETY: a NULL params pointer is refused.
        let code = unsafe { ffi::la_neighborhood_forward(std::ptr::null(), std::ptr::null_mut()) };
        assert_eq!(code, INVALID_VALUE);
    }

    /// The Hopper entry refuses invalid params and tiles that break `LaNaHopperTiles`'
    /// promises before any CUDA call.
    #[test]
    fn hopper_entry_refuses_bad_tiles() {
        // No work (batch 0): null pointers are valid, so only the tiles decide.
        let v = ffi::LaNeighborhoodParams {
            batch: 0,
            ..valid()
        };
        // Rank 2 (dims 9x7, dilation 2 on the first): 8 x 16 boxes fit (8 * 2 <= 256).
        let good = ffi::LaNaHopperTiles {
            rank: 2,
            query_log2: [0, 3, 4],
            key_log2: [0, 3, 4],
        };
        let bad_tiles = [
            ffi::LaNaHopperTiles { rank: 0, ..good },
            ffi::LaNaHopperTiles { rank: 4, ..good },
            ffi::LaNaHopperTiles {
                query_log2: [0, 3, 3],
                ..good
            },
            ffi::LaNaHopperTiles {
                key_log2: [1, 3, 3],
                ..good
            },
            ffi::LaNaHopperTiles {
                query_log2: [0, 8, -1],
                ..good
            },
            // Rank 1 with a padded dim of length 9.
            ffi::LaNaHopperTiles {
                rank: 1,
                query_log2: [0, 0, 7],
                key_log2: [0, 0, 7],
            },
        ];
        for (i, t) in bad_tiles.iter().enumerate() {
            // SAFETY: refused before any pointer is read or CUDA is called.
            let code = unsafe { ffi::la_neighborhood_wgmma_forward(&v, t, std::ptr::null_mut()) };
            assert_eq!(code, INVALID_VALUE, "bad tiles {i}");
        }
        // SAFETY: no work: success before any CUDA call.
        let code = unsafe { ffi::la_neighborhood_wgmma_forward(&v, &good, std::ptr::null_mut()) };
        assert_eq!(code, 0);
        // Dilation 16 along the first dim: past the copy engine's element stride.
        let mut far = v;
        far.length[1] = 60;
        far.dilation[1] = 16;
        far.tokens = 60 * 7;
        // SAFETY: as above.
        let code = unsafe { ffi::la_neighborhood_wgmma_forward(&far, &good, std::ptr::null_mut()) };
        assert_eq!(code, INVALID_VALUE);
        // Valid tiles, invalid params (null pointers with work).
        let work = valid();
        // SAFETY: as above.
        let code =
            unsafe { ffi::la_neighborhood_wgmma_forward(&work, &good, std::ptr::null_mut()) };
        assert_eq!(code, INVALID_VALUE);
        // SAFETY: NULL pointers are refused.
        let code = unsafe {
            ffi::la_neighborhood_wgmma_forward(std::ptr::null(), &good, std::ptr::null_mut())
        };
        assert_eq!(code, INVALID_VALUE);
    }
}

/// The host-side checks of `forward_gpu`, which need no device.
#[cfg(test)]
mod host_checks {
    use crate::dense::AttentionOptions;
    use crate::error::Error;
    use crate::layout::Strides;
    use crate::neighborhood::{NeighborhoodAttention, NeighborhoodDim, NeighborhoodShape};
    use half::{bf16, f16};

    fn attn(head_dim: usize, batch: usize) -> NeighborhoodAttention {
        let dims = [NeighborhoodDim::new(6, 3), NeighborhoodDim::new(5, 2)];
        attn_over(&dims, head_dim, batch)
    }

    /// Two query heads over one kv head on the grid `dims`.
    fn attn_over(dims: &[NeighborhoodDim], head_dim: usize, batch: usize) -> NeighborhoodAttention {
        NeighborhoodAttention::new(
            &NeighborhoodShape {
                batch,
                heads_q: 2,
                heads_kv: 1,
                head_dim,
                dims,
            },
            &AttentionOptions::default(),
        )
        .unwrap()
    }

    fn bufs(a: &NeighborhoodAttention) -> (usize, Strides, usize, Strides) {
        let (n, d) = (a.tokens(), a.head_dim());
        (
            a.out_len(),
            Strides::contiguous(n, a.heads_q(), d),
            a.batch() * n * a.heads_kv() * d,
            Strides::contiguous(n, a.heads_kv(), d),
        )
    }

    fn check<T: crate::element::Element>(
        a: &NeighborhoodAttention,
        lse: Option<usize>,
    ) -> crate::error::Result<()> {
        let (ql, qs, kl, ks) = bufs(a);
        a.check_gpu_args::<T>([(ql, &qs), (kl, &ks), (kl, &ks), (ql, &qs)], lse)
    }

    #[test]
    fn supported_problems_pass() {
        for d in [8, 24, 32, 64, 128, 136, 256] {
            let a = attn(d, 2);
            check::<bf16>(&a, None).unwrap();
            check::<f16>(&a, Some(a.lse_len())).unwrap();
        }
    }

    #[test]
    fn fused_schedule_records() {
        use super::FusedSchedule;
        use crate::neighborhood::schedule::NeighborhoodSchedule;
        let dims = [
            NeighborhoodDim::new(20, 5).with_dilation(2),
            NeighborhoodDim::new(30, 7).with_causal(true),
        ];
        let a = NeighborhoodAttention::new(
            &NeighborhoodShape {
                batch: 1,
                heads_q: 1,
                heads_kv: 1,
                head_dim: 64,
                dims: &dims,
            },
            &AttentionOptions::default(),
        )
        .unwrap();
        let f = FusedSchedule::new(&a).unwrap();
        let s = NeighborhoodSchedule::new(&a, 64, 64).unwrap();
        assert_eq!(f.tile_log2.iter().sum::<i32>(), 6);
        assert_eq!(f.tile_log2[0], 0, "rank 2: the padded dim has extent 1");
        assert_eq!(f.tiles.len(), s.tiles.len());
        assert_eq!(f.interior.len(), s.key_tiles.len());
        for (rec, t) in f.tiles.iter().zip(&s.tiles) {
            assert_eq!(rec[1..3], [t.group[1] as i32, t.group[2] as i32]);
            assert_eq!(rec[13] * rec[14], t.key_count() as i32);
            assert_eq!(rec[16] as usize, t.key_count().div_ceil(64));
            assert_eq!(rec[15] as usize, t.key_tiles.start);
        }
    }

    #[test]
    fn hopper_refusals_are_decided_on_the_host() {
        let a = attn(64, 2);
        let (_, qs, _, ks) = bufs(&a);
        let tiles = a.hopper_tiles([&qs, &ks, &ks]).unwrap();
        assert_eq!(tiles.rank, 2);
        assert_eq!(tiles.query.iter().product::<usize>(), 128);
        for d in [32, 256] {
            let b = attn(d, 1);
            let (_, qs, _, ks) = bufs(&b);
            assert!(matches!(
                b.hopper_tiles([&qs, &ks, &ks]),
                Err(Error::Unsupported(_))
            ));
        }
        // Strides the copy engine cannot step: not a multiple of 8 elements, zero (broadcast)
        // over more than one entry.
        for bad in [
            Strides { seq: 132, ..qs },
            Strides { head: 0, ..qs },
            Strides { batch: 0, ..qs },
        ] {
            assert!(
                matches!(a.hopper_tiles([&bad, &ks, &ks]), Err(Error::Unsupported(_))),
                "{bad:?}"
            );
        }
        // k/v have one head here: a zero head stride is never stepped, a bad token stride is.
        let zero_head = Strides { head: 0, ..ks };
        a.hopper_tiles([&qs, &zero_head, &zero_head]).unwrap();
        let odd_seq = Strides { seq: 68, ..ks };
        assert!(matches!(
            a.hopper_tiles([&qs, &ks, &odd_seq]),
            Err(Error::Unsupported(_))
        ));
        // Padded rows (a multiple of 8 elements) are fine.
        let padded = Strides {
            seq: qs.seq + 8,
            batch: (qs.seq + 8) * a.tokens() as i64,
            ..qs
        };
        a.hopper_tiles([&padded, &ks, &ks]).unwrap();
    }

    /// A grid dim past the GPU's position limit is refused by name (the CPU takes it); a
    /// token count past it with every dim within is not (the token index is 64-bit).
    #[test]
    fn grid_lengths_past_the_gpu_limit_are_refused() {
        let na = |dims: &[NeighborhoodDim]| attn_over(dims, 64, 1);
        let e = na(&[NeighborhoodDim::new(i32::MAX as usize, 3)]).check_gpu_lengths();
        assert!(
            matches!(&e, Err(Error::Unsupported(m)) if m.contains("grid length")),
            "{e:?}"
        );
        let wide = 1 << 16;
        let long = [NeighborhoodDim::new(wide, 3), NeighborhoodDim::new(wide, 3)];
        na(&long).check_gpu_lengths().unwrap();
    }

    #[test]
    fn unsupported_problems_are_refused() {
        let a = attn(64, 1);
        assert!(matches!(check::<f32>(&a, None), Err(Error::Unsupported(_))));
        for d in [12, 264] {
            assert!(matches!(
                check::<bf16>(&attn(d, 1), None),
                Err(Error::Unsupported(_))
            ));
        }
        assert!(matches!(
            check::<bf16>(&attn(8, 65536), None),
            Err(Error::Unsupported(_))
        ));
        // Wrong LSE length and short buffers: the CPU path's argument errors.
        assert!(check::<bf16>(&a, Some(a.lse_len() - 1)).is_err());
        let (ql, qs, kl, ks) = bufs(&a);
        assert!(
            a.check_gpu_args::<bf16>([(ql, &qs), (kl - 1, &ks), (kl, &ks), (ql, &qs)], None)
                .is_err()
        );
    }
}
