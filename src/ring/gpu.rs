//! The GPU ring (opt-in only, nothing else calls it; the in-process ring, `ring_merge.cu` and
//! a world-one [`RingRank`] are **verified on an H200 (2026-12-04)**, the NCCL ring over
//! several GPUs is **not verified**): the
//! per-rank step plans of [`super::plan`] executed with the dense kernels on row views of the
//! shards, each piece's `(o, lse)` merged into an f32 running state on the GPU
//! (`kernels/ring_merge.cu`), the final write in the output dtype.
//!
//! Two drivers execute the same plans with the same step code (`RingAttention::gpu_step`):
//! - [`RingAttention::forward_gpu_in_process`]: every rank on one GPU (its own compute and
//!   communication streams, its own ring buffers), the transfers as device-to-device copies
//!   on the receiver's communication stream. The whole ring, overlap included, on one GPU.
//! - [`RingRank::run`]: one rank of a real ring, its transfers through a [`RingComm`](super::comm::RingComm)
//!   (NCCL with the `nccl` feature, see [`super::comm`]).
//!
//! Streams and events: step `t`'s transfers are queued on the communication stream before
//! step `t`'s pieces on the compute stream; a receive waits (event) for the compute that last
//! read its target buffer, a computing step waits (event) for the receive that delivered its
//! shard. No host synchronisation inside the loop; the caller's stream joins both streams at
//! the end. K/V shards must be contiguous `[batch, L_r, heads_kv, head_dim]` (they travel as
//! flat buffers); q and out take any strides the dense kernels take.

use super::plan::{KvBuffer, PlannedStep, RankPlan, TransferCount};
use super::slots::SlotTable;
use super::{RingAttention, RingLayout, RingShape};
use crate::dense::FlashAttention;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::gpu::{DeviceBuffer, check_gpu_positions, check_half, cuda_call};
use crate::layout::{Strided, Strides};
use crate::mask::Mask;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr,
    ValidAsZeroBits,
};
use std::sync::Arc;

/// Element types of the GPU ring: f16 and bf16 (the dense kernels' types); with the `nccl`
/// feature also NCCL's element types.
#[cfg(not(feature = "nccl"))]
pub trait RingElement: Element + DeviceRepr + ValidAsZeroBits {}
#[cfg(not(feature = "nccl"))]
impl<T: Element + DeviceRepr + ValidAsZeroBits> RingElement for T {}
/// Element types of the GPU ring: f16 and bf16 (the dense kernels' types); with the `nccl`
/// feature also NCCL's element types.
#[cfg(feature = "nccl")]
pub trait RingElement: Element + DeviceRepr + ValidAsZeroBits + cudarc::nccl::NcclType {}
#[cfg(feature = "nccl")]
impl<T: Element + DeviceRepr + ValidAsZeroBits + cudarc::nccl::NcclType> RingElement for T {}

/// One rank's device arguments: `q`, `out` `[batch, L_r, heads_q, head_dim]` (strides),
/// `k`, `v` contiguous `[batch, L_r, heads_kv, head_dim]`, `lse` `[batch, heads_q, L_r]`.
pub struct RankBuffers<'a, T> {
    /// This rank's queries, `[batch, L_r, heads_q, head_dim]` with strides.
    pub q: Strided<&'a CudaSlice<T>>,
    /// This rank's keys, contiguous `[batch, L_r, heads_kv, head_dim]`.
    pub k: &'a CudaSlice<T>,
    /// This rank's values, contiguous `[batch, L_r, heads_kv, head_dim]`.
    pub v: &'a CudaSlice<T>,
    /// This rank's output, `[batch, L_r, heads_q, head_dim]` with strides.
    pub out: Strided<&'a mut CudaSlice<T>>,
    /// Optional LSE output, `[batch, heads_q, L_r]` f32, natural log.
    pub lse: Option<&'a mut CudaSlice<f32>>,
}

/// What a GPU ring launched (host-side counts; timings are the bench's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingGpuReport {
    /// K/V shard transfers, all ranks.
    pub transfers: TransferCount,
    /// Dense piece launches (one merge launch each), all ranks.
    pub pieces: usize,
    /// Steps that computed, all ranks.
    pub computing_steps: usize,
}

/// How a GPU ring rank combines its pieces' partial results `(o, lse)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RingMerge {
    /// Each piece's output merged into an f32 running state right after the piece
    /// (`la_ring_merge`): per piece row, the piece read (2 bytes per channel) and the state
    /// read and written (8). Memory: `batch * heads_q * L_r * (head_dim + 1)` f32 and the
    /// largest piece's output. **Verified on an H200 (2026-12-04).**
    #[default]
    Running,
    /// Each piece writes its output into a slot of its own; one launch per rank combines
    /// every row's slots at the end (`la_ring_gather`): per piece row 2 bytes per channel
    /// read (a fifth of `Running`'s merge traffic) and one launch per piece instead of two.
    /// Memory: the sum over the rank's pieces of `rows * batch * heads_q * (2 head_dim + 4)`
    /// bytes (about `world / 2` to `world` shards' outputs for a causal ring). **Not yet run
    /// on a GPU.**
    Deferred,
}

/// A rank's device-side working set: the merge state and two ring buffers for K and V.
pub(crate) struct RankState<T> {
    merge: RankMerge<T>,
    ring_k: [CudaSlice<T>; 2],
    ring_v: [CudaSlice<T>; 2],
}

/// A rank's merge state, per [`RingMerge`].
enum RankMerge<T> {
    Running(MergeState<T>),
    Deferred(DeferredMerge<T>),
}

/// [`RingMerge::Deferred`]'s device state: the slots of [`SlotTable`] and its tables.
#[cfg_attr(not(longattn_cuda), allow(dead_code))]
struct DeferredMerge<T> {
    table: SlotTable,
    o: CudaSlice<T>,
    lse: CudaSlice<f32>,
    slots: CudaSlice<i64>,
    segments: CudaSlice<i32>,
    list: CudaSlice<i32>,
}

impl<T: RingElement> RankMerge<T> {
    /// Empties the state before a run (the deferred slots are overwritten by the pieces).
    fn reset(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        match self {
            RankMerge::Running(st) => st.reset(stream),
            RankMerge::Deferred(_) => Ok(()),
        }
    }

    /// Runs piece `slot` of the rank's plan (`attn`; its queries are rows `row0..` of the
    /// shard) and merges it (running) or leaves it in its slot (deferred), on `stream`.
    #[allow(clippy::too_many_arguments)]
    fn run_piece<I: DeviceBuffer<T>>(
        &mut self,
        stream: &Arc<CudaStream>,
        slot: usize,
        attn: &FlashAttention,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        shape: RingShape,
        row0: usize,
        len: usize,
    ) -> Result<()> {
        match self {
            RankMerge::Running(st) => st.add_piece(stream, attn, q, k, v, shape, row0, len),
            RankMerge::Deferred(dm) => {
                let [oo, lo, _, rows] = dm.table.slot(slot);
                let strides = Strides::contiguous(rows, shape.heads_q, shape.head_dim);
                let mut o = dm.o.slice_mut(oo..oo + attn.out_len());
                let mut lse = dm.lse.slice_mut(lo..lo + attn.lse_len());
                attn.forward_gpu::<T, _, _>(
                    stream,
                    q,
                    k,
                    v,
                    Strided::new(&mut o, strides),
                    Some(&mut lse),
                )
            }
        }
    }

    /// Writes the combined result (`len` rows) into `out` (and `lse`) on `stream`.
    fn finalize(
        &self,
        stream: &Arc<CudaStream>,
        out: &mut Strided<&mut CudaSlice<T>>,
        lse: Option<&mut CudaSlice<f32>>,
        shape: RingShape,
        len: usize,
    ) -> Result<()> {
        match self {
            RankMerge::Running(st) => st.finalize(stream, out, lse, shape, len),
            RankMerge::Deferred(dm) => {
                cuda_call!(launch::gather::<T>, stream, dm, out, lse, shape, len)
            }
        }
    }
}

/// The f32 running state `(o [batch, heads_q, L_r, head_dim], lse [batch, heads_q, L_r])`
/// and one piece's scratch `(o [batch, rows, heads_q, head_dim], lse [batch, heads_q,
/// rows])` for the largest piece.
pub(crate) struct MergeState<T> {
    acc_o: CudaSlice<f32>,
    acc_lse: CudaSlice<f32>,
    piece_o: CudaSlice<T>,
    piece_lse: CudaSlice<f32>,
    /// `batch * heads_q * L_r`: the state's rows.
    rows: usize,
    head_dim: usize,
}

impl<T: RingElement> MergeState<T> {
    /// An empty state of `len` rows (per batch entry and head) with scratch for pieces of up
    /// to `piece_rows` rows, allocated and set to empty on `stream`.
    pub(crate) fn new(
        stream: &Arc<CudaStream>,
        shape: RingShape,
        len: usize,
        piece_rows: usize,
    ) -> Result<Self> {
        let mut acc = Self::alloc(stream, shape, len, piece_rows)?;
        acc.reset(stream)?;
        Ok(acc)
    }

    /// [`MergeState::new`] without the reset (zeroed memory; [`MergeState::reset`] before
    /// the first piece).
    fn alloc(
        stream: &Arc<CudaStream>,
        shape: RingShape,
        len: usize,
        piece_rows: usize,
    ) -> Result<Self> {
        let RingShape {
            batch,
            heads_q,
            head_dim: d,
            ..
        } = shape;
        let rows = batch * heads_q * len;
        let piece_rows = piece_rows.max(1);
        Ok(MergeState {
            acc_o: stream.alloc_zeros::<f32>((rows * d).max(1))?,
            acc_lse: stream.alloc_zeros::<f32>(rows.max(1))?,
            piece_o: stream.alloc_zeros::<T>(batch * piece_rows * heads_q * d)?,
            piece_lse: stream.alloc_zeros::<f32>(batch * heads_q * piece_rows)?,
            rows,
            head_dim: d,
        })
    }

    /// Sets the state to empty (`o` 0, `lse` -inf) on `stream`.
    fn reset(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        cuda_call!(
            launch::state_init,
            stream,
            &mut self.acc_o,
            &mut self.acc_lse,
            self.rows,
            self.head_dim
        )
    }

    /// Runs `attn` (its queries are rows `row0..row0 + sq` of the state) into the scratch
    /// and merges its `(o, lse)` into the state, on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_piece<I: DeviceBuffer<T>>(
        &mut self,
        stream: &Arc<CudaStream>,
        attn: &FlashAttention,
        q: Strided<&I>,
        k: Strided<&I>,
        v: Strided<&I>,
        shape: RingShape,
        row0: usize,
        len: usize,
    ) -> Result<()> {
        let sq = attn.max_seqlen_q();
        let po_strides = Strides::contiguous(sq, shape.heads_q, shape.head_dim);
        attn.forward_gpu::<T, _, _>(
            stream,
            q,
            k,
            v,
            Strided::new(&mut self.piece_o, po_strides),
            Some(&mut self.piece_lse),
        )?;
        cuda_call!(
            launch::merge::<T>,
            stream,
            &self.piece_o,
            po_strides,
            &self.piece_lse,
            &mut self.acc_o,
            &mut self.acc_lse,
            shape,
            sq,
            len,
            row0,
        )
    }

    /// Writes the state (`len` rows) into `out` (and `lse`) on `stream`.
    pub(crate) fn finalize(
        &self,
        stream: &Arc<CudaStream>,
        out: &mut Strided<&mut CudaSlice<T>>,
        lse: Option<&mut CudaSlice<f32>>,
        shape: RingShape,
        len: usize,
    ) -> Result<()> {
        cuda_call!(
            launch::finalize::<T>,
            stream,
            &self.acc_o,
            &self.acc_lse,
            out,
            lse,
            shape,
            len
        )
    }
}

/// The checks every GPU ring entry point runs first: f16 or bf16, and the global sequence
/// length (which bounds every shard's and piece's positions) within
/// [`crate::gpu::GPU_MAX_POSITIONS`].
fn check_ring_gpu<T: Element>(layout: &RingLayout) -> Result<()> {
    check_half(T::DTYPE, "the GPU ring takes", "ring")?;
    check_gpu_positions("the GPU ring", &[("seqlen", layout.seqlen())])
}

impl RingAttention {
    /// Checks the GPU ring's arguments: [`RingAttention::check_shards`] (K/V taken as
    /// contiguous shards) and f16 or bf16.
    fn check_gpu<T: Element>(&self, ranks: &[RankBuffers<'_, T>]) -> Result<()> {
        check_ring_gpu::<T>(&self.layout)?;
        let qd: Vec<_> = ranks
            .iter()
            .map(|b| (b.q.data.len(), b.q.strides))
            .collect();
        let od: Vec<_> = ranks
            .iter()
            .map(|b| (b.out.data.len(), b.out.strides))
            .collect();
        let kd: Vec<_> = ranks
            .iter()
            .enumerate()
            .map(|(r, b)| (b.k.len(), self.kv_strides(r)))
            .collect();
        let vd: Vec<_> = ranks
            .iter()
            .enumerate()
            .map(|(r, b)| (b.v.len(), self.kv_strides(r)))
            .collect();
        let lse: Vec<usize> = ranks
            .iter()
            .filter_map(|b| b.lse.as_ref().map(|l| l.len()))
            .collect();
        let lse = match lse.len() {
            0 => None,
            x if x == ranks.len() => Some(lse),
            _ => {
                return Err(Error::Shape(
                    "ring: give an lse buffer for every rank or for none".into(),
                ));
            }
        };
        self.check_shards(&qd, &kd, &vd, &od, lse.as_deref())
    }

    /// Allocates rank `r`'s working set on `stream` (zeroed; the state is reset by each
    /// run).
    fn rank_state<T: RingElement>(
        &self,
        r: usize,
        plan: &RankPlan,
        merge: RingMerge,
        stream: &Arc<CudaStream>,
    ) -> Result<RankState<T>> {
        let cap = (0..self.layout.world())
            .map(|s| self.kv_len(s))
            .max()
            .unwrap_or(0)
            .max(1);
        let len = self.layout.shard_len(r);
        let merge = match merge {
            RingMerge::Running => RankMerge::Running(MergeState::alloc(
                stream,
                self.shape,
                len,
                plan.max_piece_rows(),
            )?),
            RingMerge::Deferred => {
                let table = SlotTable::new(plan, self.shape, len)?;
                RankMerge::Deferred(DeferredMerge {
                    o: stream.alloc_zeros::<T>(table.o_elems.max(1))?,
                    lse: stream.alloc_zeros::<f32>(table.lse_elems.max(1))?,
                    slots: stream.clone_htod(&nonempty(&table.slots))?,
                    segments: stream.clone_htod(&table.segments)?,
                    list: stream.clone_htod(&nonempty(&table.list))?,
                    table,
                })
            }
        };
        Ok(RankState {
            merge,
            ring_k: [stream.alloc_zeros::<T>(cap)?, stream.alloc_zeros::<T>(cap)?],
            ring_v: [stream.alloc_zeros::<T>(cap)?, stream.alloc_zeros::<T>(cap)?],
        })
    }

    /// Every piece of `plan` as a dense problem, `[step][piece]`, built once per driver.
    fn plan_problems(&self, plan: &RankPlan) -> Result<Vec<Vec<FlashAttention>>> {
        plan.steps
            .iter()
            .map(|s| s.pieces.iter().map(|p| self.piece_attention(p)).collect())
            .collect()
    }

    /// Queues one planned step's pieces of rank `r` on `stream`: each piece (`problems[i]`
    /// is `step.pieces[i]`'s dense problem) as a dense call on row views of `q` and of the
    /// held shard `(k, v)` (whose shard is `step.source`), combined by `merge`. Returns the
    /// launches.
    #[allow(clippy::too_many_arguments)]
    fn gpu_step<T: RingElement>(
        &self,
        r: usize,
        step: &PlannedStep,
        problems: &[FlashAttention],
        stream: &Arc<CudaStream>,
        q: &Strided<&CudaSlice<T>>,
        k: CudaView<'_, T>,
        v: CudaView<'_, T>,
        merge: &mut RankMerge<T>,
    ) -> Result<usize> {
        let ks = self.kv_strides(step.source);
        let row = |s: &Strides, r0: usize| (r0 as i64 * s.seq) as usize;
        let len = self.layout.shard_len(r);
        let first = match merge {
            RankMerge::Deferred(dm) => dm.table.step_first[step.step],
            RankMerge::Running(_) => 0,
        };
        for (i, (piece, attn)) in step.pieces.iter().zip(problems).enumerate() {
            let qv = q.data.slice(row(&q.strides, piece.q_rows.start)..);
            let kv = k.slice(row(&ks, piece.k_rows.start)..);
            let vv = v.slice(row(&ks, piece.k_rows.start)..);
            merge.run_piece(
                stream,
                first + i,
                attn,
                Strided::new(&qv, q.strides),
                Strided::new(&kv, ks),
                Strided::new(&vv, ks),
                self.shape,
                piece.q_rows.start,
                len,
            )?;
        }
        Ok(step.pieces.len())
    }

    /// **Verified on an H200 (2026-12-04).** The whole ring on one GPU: rank `r`'s buffers are
    /// `ranks[r]`; each rank gets its own compute and communication streams and ring
    /// buffers, and the transfers are device-to-device copies on the receiver's
    /// communication stream, overlapping the compute exactly as a multi-GPU ring would.
    /// Ordered after the work already queued on `stream`; `stream` waits for the whole ring
    /// (nothing is synchronised on the host). Equal to single-device attention over the
    /// whole sequence within the dense tolerance.
    ///
    /// One-shot: it builds an [`InProcessRing`] (streams, buffers, plans) for this call.
    /// cudarc synchronises the whole context when a context gets its first extra stream
    /// (event tracking), so a call on a context without other streams first waits for the
    /// device; a caller that runs the ring more than once keeps an [`InProcessRing`].
    pub fn forward_gpu_in_process<T: RingElement>(
        &self,
        stream: &Arc<CudaStream>,
        ranks: &mut [RankBuffers<'_, T>],
    ) -> Result<RingGpuReport> {
        // Validated before anything is allocated.
        self.check_gpu::<T>(ranks)?;
        InProcessRing::new(self, stream)?.forward(stream, ranks)
    }
}

/// The in-process ring's reusable working set: per rank a compute and a communication stream,
/// the merge state ([`RingMerge`]) and two ring buffers, and every rank's plan with each
/// piece's dense problem, built once by [`InProcessRing::new`] or
/// [`InProcessRing::with_merge`].
/// [`InProcessRing::forward`] then only queues work (no allocation, no stream creation, no
/// host synchronisation), which is what an engine (or a bench) repeating the ring wants.
/// The ring's kernels and schedule are **verified on an H200 (2026-12-04)**; running one
/// working set for several calls is **not yet run on a GPU**.
pub struct InProcessRing<T> {
    ring: RingAttention,
    plans: Vec<RankPlan>,
    /// `[rank][step][piece]`: the pieces' dense problems.
    problems: Vec<Vec<Vec<FlashAttention>>>,
    transfers: TransferCount,
    compute: Vec<Arc<CudaStream>>,
    comm: Vec<Arc<CudaStream>>,
    states: Vec<RankState<T>>,
    /// Recorded on the caller's stream after the last call (or the allocation): every
    /// stream of the next call waits for it, so a call on another stream never overwrites a
    /// buffer the previous call still reads.
    done: CudaEvent,
}

impl<T: RingElement> InProcessRing<T> {
    /// Plans `ring` and allocates its working set on `stream`'s context (ordered on
    /// `stream`), merging with [`RingMerge::Running`]: per rank `batch * heads_q * L_r *
    /// (head_dim + 1)` f32 of state, the largest piece's scratch and four buffers of the
    /// largest K/V shard.
    pub fn new(ring: &RingAttention, stream: &Arc<CudaStream>) -> Result<Self> {
        Self::with_merge(ring, stream, RingMerge::Running)
    }

    /// [`InProcessRing::new`] with the pieces combined by `merge` (see [`RingMerge`] for each
    /// one's memory).
    pub fn with_merge(
        ring: &RingAttention,
        stream: &Arc<CudaStream>,
        merge: RingMerge,
    ) -> Result<Self> {
        check_ring_gpu::<T>(&ring.layout)?;
        let plans = ring.plans()?;
        let transfers = RingAttention::check_plans(&plans)?;
        let problems = plans
            .iter()
            .map(|p| ring.plan_problems(p))
            .collect::<Result<Vec<_>>>()?;
        let ctx = stream.context();
        let start = stream.record_event(None)?;
        let n = plans.len();
        let (mut compute, mut comm, mut states) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (r, plan) in plans.iter().enumerate() {
            let (c, m) = (ctx.new_stream()?, ctx.new_stream()?);
            c.wait(&start)?;
            states.push(ring.rank_state::<T>(r, plan, merge, &c)?);
            stream.join(&c)?;
            compute.push(c);
            comm.push(m);
        }
        let done = stream.record_event(None)?;
        Ok(InProcessRing {
            ring: ring.clone(),
            plans,
            problems,
            transfers,
            compute,
            comm,
            states,
            done,
        })
    }

    /// The ring this working set runs.
    pub fn ring(&self) -> &RingAttention {
        &self.ring
    }

    /// Runs the ring of [`RingAttention::forward_gpu_in_process`] on this working set:
    /// ordered after the work queued on `stream` and after this working set's previous call;
    /// `stream` waits for the whole ring.
    pub fn forward(
        &mut self,
        stream: &Arc<CudaStream>,
        ranks: &mut [RankBuffers<'_, T>],
    ) -> Result<RingGpuReport> {
        self.run(stream, ranks, None)
    }

    /// [`InProcessRing::forward`] with timing events around every step's compute and every
    /// transfer (a bench's view of the overlap; the events cost a few microseconds per step).
    pub fn forward_timed(
        &mut self,
        stream: &Arc<CudaStream>,
        ranks: &mut [RankBuffers<'_, T>],
    ) -> Result<(RingGpuReport, RingTimeline)> {
        let n = self.plans.len();
        let mut timeline = RingTimeline {
            start: None,
            compute: (0..n).map(|_| (0..n).map(|_| None).collect()).collect(),
            copy: (0..n).map(|_| (0..n).map(|_| None).collect()).collect(),
        };
        let report = self.run(stream, ranks, Some(&mut timeline))?;
        Ok((report, timeline))
    }

    /// The ring, timed into `timeline` when given.
    fn run(
        &mut self,
        stream: &Arc<CudaStream>,
        ranks: &mut [RankBuffers<'_, T>],
        mut timeline: Option<&mut RingTimeline>,
    ) -> Result<RingGpuReport> {
        let ring = &self.ring;
        ring.check_gpu::<T>(ranks)?;
        let n = self.plans.len();
        let plans = &self.plans;
        let states = &mut self.states;
        let (compute, comm) = (&self.compute, &self.comm);
        // Timing events where timed (cudarc's default events carry no timestamps).
        let flags = timeline
            .is_some()
            .then_some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = stream.record_event(flags)?;
        for r in 0..n {
            for s in [&compute[r], &comm[r]] {
                s.wait(&start)?;
                s.wait(&self.done)?;
            }
            states[r].merge.reset(&compute[r])?;
        }
        // [rank]: the event recorded after the receive of the shard of step t (t >= 1), and
        // after each computing step.
        let mut arrived: Vec<Vec<Option<CudaEvent>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut computed: Vec<Vec<Option<CudaEvent>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let (mut pieces, mut computing_steps) = (0, 0);
        for t in 0..n {
            // Transfers of step t first, so that the copies start with the compute.
            for r in 0..n {
                let st = &plans[r].steps[t];
                let Some(rv) = st.recv else { continue };
                let from = rv.peer;
                let send = plans[from].steps[t].send.ok_or_else(|| {
                    Error::Shape(format!("ring plan: rank {from} step {t} sends nothing"))
                })?;
                let KvBuffer::Ring(dst) = rv.buffer else {
                    return Err(Error::Shape("ring plan: receive into a local shard".into()));
                };
                let m = &comm[r];
                if let Some(e) = st.recv_after_compute.and_then(|x| computed[r][x].as_ref()) {
                    m.wait(e)?;
                }
                // The copy out of the target buffer into the next rank at step t - 1.
                if t >= 1
                    && let Some(e) = arrived[(r + 1) % n][t].as_ref()
                {
                    m.wait(e)?;
                }
                // The sender's buffer is filled.
                if let (KvBuffer::Ring(_), Some(e)) = (send.buffer, arrived[from][t].as_ref()) {
                    m.wait(e)?;
                }
                let len = ring.kv_len(send.shard);
                // The sender's buffers and the receiver's ring buffers belong to different
                // ranks (a transfer needs world >= 2, and goes from r - 1 to r).
                let (src_state, dst_state) = pair_mut(states, from, r)?;
                let (src_k, src_v): (CudaView<'_, T>, CudaView<'_, T>) = match send.buffer {
                    KvBuffer::Local => (ranks[from].k.slice(..len), ranks[from].v.slice(..len)),
                    KvBuffer::Ring(b) => (
                        src_state.ring_k[b].slice(..len),
                        src_state.ring_v[b].slice(..len),
                    ),
                };
                let RankState { ring_k, ring_v, .. } = dst_state;
                let (mut dk, mut dv) = (ring_k[dst].slice_mut(..), ring_v[dst].slice_mut(..));
                let copy_start = flags.map(|f| m.record_event(Some(f))).transpose()?;
                copy_dtod::<T>(m, &src_k, &mut dk, len)?;
                copy_dtod::<T>(m, &src_v, &mut dv, len)?;
                let done = m.record_event(flags)?;
                if let (Some(tl), Some(begin)) = (timeline.as_deref_mut(), copy_start) {
                    tl.copy[r][t + 1] = Some((begin, m.record_event(flags)?));
                }
                arrived[r][t + 1] = Some(done);
            }
            for r in 0..n {
                let st = &plans[r].steps[t];
                if !st.computes() {
                    continue;
                }
                let c = &compute[r];
                if st.compute_after_recv {
                    let e = arrived[r][t].as_ref().ok_or_else(|| {
                        Error::Shape(format!("ring plan: rank {r} step {t} has no receive"))
                    })?;
                    c.wait(e)?;
                }
                let RankState {
                    merge,
                    ring_k,
                    ring_v,
                } = &mut states[r];
                let len = ring.kv_len(st.source);
                let (k, v) = match st.kv {
                    KvBuffer::Local => (ranks[r].k.slice(..len), ranks[r].v.slice(..len)),
                    KvBuffer::Ring(b) => (ring_k[b].slice(..len), ring_v[b].slice(..len)),
                };
                let problems = &self.problems[r][t];
                let step_start = flags.map(|f| c.record_event(Some(f))).transpose()?;
                pieces += ring.gpu_step(r, st, problems, c, &ranks[r].q, k, v, merge)?;
                computing_steps += 1;
                let done = c.record_event(flags)?;
                if let (Some(tl), Some(begin)) = (timeline.as_deref_mut(), step_start) {
                    tl.compute[r][t] = Some((begin, c.record_event(flags)?));
                }
                computed[r][t] = Some(done);
            }
        }
        for (r, b) in ranks.iter_mut().enumerate() {
            let len = ring.layout.shard_len(r);
            states[r].merge.finalize(
                &compute[r],
                &mut b.out,
                b.lse.as_deref_mut(),
                ring.shape,
                len,
            )?;
            stream.join(&compute[r])?;
            stream.join(&comm[r])?;
        }
        self.done = stream.record_event(None)?;
        if let Some(tl) = timeline {
            tl.start = Some(start);
        }
        Ok(RingGpuReport {
            transfers: self.transfers.clone(),
            pieces,
            computing_steps,
        })
    }
}

/// The timing events of one [`InProcessRing::forward_timed`] run; [`RingTimeline::steps`]
/// reads them (waiting for the run).
pub struct RingTimeline {
    start: Option<CudaEvent>,
    /// `[rank][step]`: start and end of the step's pieces on the rank's compute stream.
    compute: Vec<Vec<Option<(CudaEvent, CudaEvent)>>>,
    /// `[rank][step]`: start and end of the copy that delivered the step's shard.
    copy: Vec<Vec<Option<(CudaEvent, CudaEvent)>>>,
}

/// One computing step of one rank, timed on the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RingStepTime {
    /// The rank.
    pub rank: usize,
    /// The ring step.
    pub step: usize,
    /// From the step's first piece to its last merge.
    pub compute_ms: f32,
    /// From the end of the rank's previous computing step (or the run's start) to this
    /// step's start: the time the compute stream stood still waiting for the step's shard
    /// (or for the host to queue the step).
    pub wait_ms: f32,
    /// The copy that delivered the step's shard (0 for the rank's own shard).
    pub copy_ms: f32,
}

impl RingTimeline {
    /// Every computing step's times, by rank then step (waits for the run to finish).
    pub fn steps(&self) -> Result<Vec<RingStepTime>> {
        let start = self
            .start
            .as_ref()
            .ok_or_else(|| Error::Shape("ring timeline: the run did not finish".into()))?;
        let mut out = Vec::new();
        for (rank, (steps, copies)) in self.compute.iter().zip(&self.copy).enumerate() {
            let mut prev_end = start;
            for (step, (times, copy)) in steps.iter().zip(copies).enumerate() {
                let Some((begin, end)) = times else { continue };
                out.push(RingStepTime {
                    rank,
                    step,
                    compute_ms: begin.elapsed_ms(end)?,
                    wait_ms: prev_end.elapsed_ms(begin)?.max(0.0),
                    copy_ms: match copy {
                        Some((a, b)) => a.elapsed_ms(b)?,
                        None => 0.0,
                    },
                });
                prev_end = end;
            }
        }
        Ok(out)
    }

    /// The share of the copy time hidden behind compute: `1 - sum(wait) / sum(copy)` over
    /// the steps that waited for a copy, clamped to `[0, 1]` (1 when nothing was copied).
    pub fn overlap(steps: &[RingStepTime]) -> f64 {
        let copy: f64 = steps.iter().map(|s| s.copy_ms as f64).sum();
        if copy <= 0.0 {
            return 1.0;
        }
        let exposed: f64 = steps
            .iter()
            .filter(|s| s.copy_ms > 0.0)
            .map(|s| s.wait_ms.min(s.copy_ms) as f64)
            .sum();
        (1.0 - exposed / copy).clamp(0.0, 1.0)
    }
}

/// `xs`, or one zero where it is empty (a device table is never a null allocation).
fn nonempty<X: Copy + Default>(xs: &[X]) -> Vec<X> {
    if xs.is_empty() {
        vec![X::default()]
    } else {
        xs.to_vec()
    }
}

/// `(&xs[a], &mut xs[b])` for `a != b`.
fn pair_mut<X>(xs: &mut [X], a: usize, b: usize) -> Result<(&X, &mut X)> {
    if a == b || a.max(b) >= xs.len() {
        return Err(Error::Shape(format!(
            "ring transfer from rank {a} to rank {b}: not two distinct ranks"
        )));
    }
    if a < b {
        let (lo, hi) = xs.split_at_mut(b);
        Ok((&lo[a], &mut hi[0]))
    } else {
        let (lo, hi) = xs.split_at_mut(a);
        Ok((&hi[0], &mut lo[b]))
    }
}

/// `len` elements of `src` into `dst` on `stream`; the uses of both buffers are recorded on
/// `stream` after the copy (cudarc's event tracking).
fn copy_dtod<T>(
    stream: &Arc<CudaStream>,
    src: &CudaView<'_, T>,
    dst: &mut CudaViewMut<'_, T>,
    len: usize,
) -> Result<()> {
    if dst.len() < len || src.len() < len {
        return Err(Error::Shape(format!(
            "ring transfer: {len} elements from a buffer of {} into one of {}",
            src.len(),
            dst.len()
        )));
    }
    let (s, _src_guard) = src.device_ptr(stream);
    let (d, _dst_guard) = dst.device_ptr_mut(stream);
    let bytes = len * std::mem::size_of::<T>();
    // SAFETY: both views hold at least `len` elements of the same context, and the copy is
    // ordered on `stream` after the events that make `src` ready and `dst` free.
    unsafe { cudarc::driver::result::memcpy_dtod_async(d, s, bytes, stream.cu_stream()) }?;
    Ok(())
}

/// One rank of a real ring (one process per GPU, or one thread per GPU of a process): its
/// plan and its pieces' dense problems. **Verified on an H200 (2026-12-04) for world 1
/// ([`super::SelfComm`]) only; the NCCL ring over several GPUs is not verified.**
pub struct RingRank<'c, C: super::comm::RingComm> {
    attn: RingAttention,
    comm: &'c C,
    plan: RankPlan,
    /// `[step][piece]`: the pieces' dense problems.
    problems: Vec<Vec<FlashAttention>>,
}

/// A rank's reusable working set for [`RingRank::run_in`]: the f32 running state, the piece
/// scratch and two ring buffers (**not yet run on a GPU** across several calls).
pub struct RingRankWorkspace<T> {
    state: RankState<T>,
    /// What the buffers were sized for: the ring (layout, shape, mask) and the rank.
    sized_for: (RingLayout, RingShape, Mask, usize),
    /// Recorded on the caller's stream after the last run (or the allocation).
    done: CudaEvent,
}

impl<'c, C: super::comm::RingComm> RingRank<'c, C> {
    /// Rank `comm.rank()` of `attn`'s ring (the world must be the communicator's).
    pub fn new(attn: &RingAttention, comm: &'c C) -> Result<Self> {
        if comm.world() != attn.layout.world() {
            return Err(Error::Shape(format!(
                "ring rank: communicator world {} for a layout of {} ranks",
                comm.world(),
                attn.layout.world()
            )));
        }
        let plan = attn.rank_plan(comm.rank())?;
        Ok(RingRank {
            problems: attn.plan_problems(&plan)?,
            attn: attn.clone(),
            comm,
            plan,
        })
    }

    /// This rank's step plan.
    pub fn plan(&self) -> &RankPlan {
        &self.plan
    }

    /// This rank's working set, allocated on `stream` (ordered there), merging with
    /// [`RingMerge::Running`]: `batch * heads_q * L_r * (head_dim + 1)` f32 of state, the
    /// largest piece's scratch and four buffers of the largest K/V shard.
    pub fn workspace<T: RingElement>(
        &self,
        stream: &Arc<CudaStream>,
    ) -> Result<RingRankWorkspace<T>> {
        self.workspace_with(stream, RingMerge::Running)
    }

    /// [`RingRank::workspace`] with the pieces combined by `merge`.
    pub fn workspace_with<T: RingElement>(
        &self,
        stream: &Arc<CudaStream>,
        merge: RingMerge,
    ) -> Result<RingRankWorkspace<T>> {
        check_ring_gpu::<T>(&self.attn.layout)?;
        let state = self
            .attn
            .rank_state::<T>(self.plan.rank, &self.plan, merge, stream)?;
        let a = &self.attn;
        Ok(RingRankWorkspace {
            state,
            sized_for: (a.layout, a.shape, a.mask, self.plan.rank),
            done: stream.record_event(None)?,
        })
    }

    /// Checks one run's buffers: `k`, `v` the contiguous shard, every extent against the
    /// rank's shapes, f16 or bf16.
    fn check_buffers<T: RingElement>(&self, bufs: &RankBuffers<'_, T>) -> Result<()> {
        let attn = &self.attn;
        let r = self.plan.rank;
        let kv_len = attn.kv_len(r);
        let (kl, vl) = (bufs.k.len(), bufs.v.len());
        if kl != kv_len || vl != kv_len {
            return Err(Error::Shape(format!(
                "ring rank {r}: k and v must hold the contiguous shard ({kv_len} elements), not \
                 {kl} and {vl}"
            )));
        }
        check_ring_gpu::<T>(&attn.layout)?;
        let len = attn.layout.shard_len(r);
        let RingShape {
            batch,
            heads_q,
            heads_kv,
            head_dim,
        } = attn.shape;
        crate::layout::check_attention_args(
            &format!("[{r}]"),
            [
                (bufs.q.data.len(), &bufs.q.strides),
                (kl, &attn.kv_strides(r)),
                (vl, &attn.kv_strides(r)),
                (bufs.out.data.len(), &bufs.out.strides),
            ],
            [batch, len, heads_q, head_dim],
            [batch, len, heads_kv, head_dim],
            bufs.lse
                .as_ref()
                .map(|l| (l.len(), attn.lse_len(r), "[batch, heads_q, L_r]")),
        )
    }

    /// **Verified on an H200 for world 1 only (NCCL multi-GPU not verified).** Runs this
    /// rank's ring with a working set of its own (validated first, then allocated): see
    /// [`RingRank::run_in`]. Returns the dense launches.
    pub fn run<T: RingElement>(
        &self,
        stream: &Arc<CudaStream>,
        bufs: RankBuffers<'_, T>,
    ) -> Result<usize> {
        self.check_buffers(&bufs)?;
        let mut ws = self.workspace::<T>(stream)?;
        self.run_in(&mut ws, stream, bufs)
    }

    /// Runs this rank's ring on `ws`: pieces on `stream` (ordered after the work queued there
    /// and after `ws`'s previous run), transfers on the communicator's stream; `stream` waits
    /// for both at the end. Every rank of the world must call it (the transfers pair up).
    /// Returns the dense launches.
    pub fn run_in<T: RingElement>(
        &self,
        ws: &mut RingRankWorkspace<T>,
        stream: &Arc<CudaStream>,
        mut bufs: RankBuffers<'_, T>,
    ) -> Result<usize> {
        self.check_buffers(&bufs)?;
        let attn = &self.attn;
        let r = self.plan.rank;
        if ws.sized_for != (attn.layout, attn.shape, attn.mask, r) {
            return Err(Error::Shape(format!(
                "ring rank {r}: the workspace was built for another ring or rank ({:?})",
                ws.sized_for
            )));
        }
        let len = attn.layout.shard_len(r);
        let m = self.comm.stream();
        let start = stream.record_event(None)?;
        for s in [stream, m] {
            s.wait(&start)?;
            s.wait(&ws.done)?;
        }
        let st = &mut ws.state;
        st.merge.reset(stream)?;
        let n = self.plan.world;
        let mut arrived: Vec<Option<CudaEvent>> = (0..n).map(|_| None).collect();
        let mut computed: Vec<Option<CudaEvent>> = (0..n).map(|_| None).collect();
        let mut launched = 0;
        for (t, step) in self.plan.steps.iter().enumerate() {
            if let Some(e) = step.recv_after_compute.and_then(|x| computed[x].as_ref()) {
                m.wait(e)?;
            }
            if step.send.is_some() || step.recv.is_some() {
                let len_s = step.send.map(|s| attn.kv_len(s.shard)).unwrap_or(0);
                let len_r = step.recv.map(|s| attn.kv_len(s.shard)).unwrap_or(0);
                let RankState { ring_k, ring_v, .. } = &mut *st;
                let [rk0, rk1] = ring_k;
                let [rv0, rv1] = ring_v;
                // The send's buffer and the receive's buffer are never the same one.
                let (send_k, send_v, recv_k, recv_v) = match (step.kv, step.recv.map(|x| x.buffer))
                {
                    (KvBuffer::Local, Some(KvBuffer::Ring(0)) | None) => {
                        (bufs.k.slice(..len_s), bufs.v.slice(..len_s), rk0, rv0)
                    }
                    (KvBuffer::Ring(0), Some(KvBuffer::Ring(1)) | None) => {
                        (rk0.slice(..len_s), rv0.slice(..len_s), rk1, rv1)
                    }
                    (KvBuffer::Ring(1), Some(KvBuffer::Ring(0)) | None) => {
                        (rk1.slice(..len_s), rv1.slice(..len_s), rk0, rv0)
                    }
                    other => {
                        return Err(Error::Shape(format!(
                            "ring rank {r} step {t}: buffers {other:?}"
                        )));
                    }
                };
                self.comm.exchange(
                    step.send.map(|_| [send_k, send_v]),
                    step.recv
                        .map(|_| [recv_k.slice_mut(..len_r), recv_v.slice_mut(..len_r)]),
                )?;
                if step.recv.is_some() && t + 1 < n {
                    arrived[t + 1] = Some(m.record_event(None)?);
                }
            }
            if step.computes() {
                if step.compute_after_recv {
                    let e = arrived[t].as_ref().ok_or_else(|| {
                        Error::Shape(format!("ring plan: rank {r} step {t} has no receive"))
                    })?;
                    stream.wait(e)?;
                }
                let kv_len = attn.kv_len(step.source);
                let RankState {
                    merge,
                    ring_k,
                    ring_v,
                } = &mut *st;
                let (k, v) = match step.kv {
                    KvBuffer::Local => (bufs.k.slice(..kv_len), bufs.v.slice(..kv_len)),
                    KvBuffer::Ring(b) => (ring_k[b].slice(..kv_len), ring_v[b].slice(..kv_len)),
                };
                let problems = &self.problems[t];
                launched += attn.gpu_step(r, step, problems, stream, &bufs.q, k, v, merge)?;
                computed[t] = Some(stream.record_event(None)?);
            }
        }
        st.merge.finalize(
            stream,
            &mut bufs.out,
            bufs.lse.as_deref_mut(),
            attn.shape,
            len,
        )?;
        stream.join(m)?;
        ws.done = stream.record_event(None)?;
        Ok(launched)
    }
}

#[cfg(longattn_cuda)]
mod launch {
    use super::{RingElement, RingShape};
    use crate::error::Result;
    use crate::gpu::{check_launch, ffi, la_dtype, ptr_mut_or_null};
    use crate::layout::{Strided, Strides};
    use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
    use std::sync::Arc;

    pub(super) fn state_init(
        stream: &Arc<CudaStream>,
        acc_o: &mut CudaSlice<f32>,
        acc_lse: &mut CudaSlice<f32>,
        rows: usize,
        head_dim: usize,
    ) -> Result<()> {
        let (o, _s1) = acc_o.device_ptr_mut(stream);
        let (l, _s2) = acc_lse.device_ptr_mut(stream);
        // SAFETY: acc_o holds rows * head_dim floats and acc_lse rows (rank_state sizes
        // them); ordered on `stream`.
        let code = unsafe {
            ffi::la_ring_state_init(
                o as *mut f32,
                l as *mut f32,
                rows as i64,
                head_dim as i32,
                crate::gpu::launch_stream(stream)? as _,
            )
        };
        check_launch("la_ring_state_init", code)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn merge<T: RingElement>(
        stream: &Arc<CudaStream>,
        piece_o: &CudaSlice<T>,
        o_strides: Strides,
        piece_lse: &CudaSlice<f32>,
        acc_o: &mut CudaSlice<f32>,
        acc_lse: &mut CudaSlice<f32>,
        shape: RingShape,
        rows: usize,
        len: usize,
        row0: usize,
    ) -> Result<()> {
        let (po, _s1) = piece_o.device_ptr(stream);
        let (pl, _s2) = piece_lse.device_ptr(stream);
        let (ao, _s3) = acc_o.device_ptr_mut(stream);
        let (al, _s4) = acc_lse.device_ptr_mut(stream);
        let params = ffi::LaRingMergeParams {
            o: po as *const _,
            lse: pl as *const f32,
            acc_o: ao as *mut f32,
            acc_lse: al as *mut f32,
            o_batch_stride: o_strides.batch,
            o_row_stride: o_strides.seq,
            o_head_stride: o_strides.head,
            batch: shape.batch as i32,
            heads: shape.heads_q as i32,
            head_dim: shape.head_dim as i32,
            rows: rows as i32,
            len: len as i32,
            row0: row0 as i32,
            dtype: la_dtype(T::DTYPE),
        };
        // SAFETY: the piece buffers hold [batch, rows, heads_q, head_dim] / [batch, heads_q,
        // rows] (the dense call's extents were checked), the state [batch, heads_q, len,
        // head_dim] with row0 + rows <= len (pieces lie in the shard).
        let code = unsafe { ffi::la_ring_merge(&params, crate::gpu::launch_stream(stream)? as _) };
        check_launch("la_ring_merge", code)
    }

    pub(super) fn gather<T: RingElement>(
        stream: &Arc<CudaStream>,
        dm: &super::DeferredMerge<T>,
        out: &mut Strided<&mut CudaSlice<T>>,
        lse: Option<&mut CudaSlice<f32>>,
        shape: RingShape,
        len: usize,
    ) -> Result<()> {
        let (so, _s1) = dm.o.device_ptr(stream);
        let (sl, _s2) = dm.lse.device_ptr(stream);
        let (slots, _s3) = dm.slots.device_ptr(stream);
        let (segments, _s4) = dm.segments.device_ptr(stream);
        let (list, _s5) = dm.list.device_ptr(stream);
        let strides = out.strides;
        let (op, _s6) = out.data.device_ptr_mut(stream);
        let (lp, _s7) = ptr_mut_or_null(lse, stream);
        let params = ffi::LaRingGatherParams {
            slots_o: so as *const _,
            slots_lse: sl as *const f32,
            slots: slots as *const i64,
            segments: segments as *const i32,
            slot_list: list as *const i32,
            out: op as *mut _,
            lse: lp as *mut f32,
            out_batch_stride: strides.batch,
            out_row_stride: strides.seq,
            out_head_stride: strides.head,
            segment_count: (dm.table.segments.len() / 4) as i32,
            batch: shape.batch as i32,
            heads: shape.heads_q as i32,
            len: len as i32,
            head_dim: shape.head_dim as i32,
            dtype: la_dtype(T::DTYPE),
        };
        // SAFETY: the slot buffers hold the table's o_elems / lse_elems, every slot and
        // segment of the table lies in them and in [0, len) (SlotTable::new, tested), the
        // pieces wrote every slot before this launch on `stream`; out / lse were checked
        // against [batch, len, heads_q, head_dim] / [batch, heads_q, len].
        let code = unsafe { ffi::la_ring_gather(&params, crate::gpu::launch_stream(stream)? as _) };
        check_launch("la_ring_gather", code)
    }

    pub(super) fn finalize<T: RingElement>(
        stream: &Arc<CudaStream>,
        acc_o: &CudaSlice<f32>,
        acc_lse: &CudaSlice<f32>,
        out: &mut Strided<&mut CudaSlice<T>>,
        lse: Option<&mut CudaSlice<f32>>,
        shape: RingShape,
        len: usize,
    ) -> Result<()> {
        let (ao, _s1) = acc_o.device_ptr(stream);
        let (al, _s2) = acc_lse.device_ptr(stream);
        let strides = out.strides;
        let (op, _s3) = out.data.device_ptr_mut(stream);
        let (lp, _s4) = ptr_mut_or_null(lse, stream);
        let params = ffi::LaRingFinalizeParams {
            acc_o: ao as *const f32,
            acc_lse: al as *const f32,
            out: op as *mut _,
            lse: lp as *mut f32,
            out_batch_stride: strides.batch,
            out_row_stride: strides.seq,
            out_head_stride: strides.head,
            batch: shape.batch as i32,
            heads: shape.heads_q as i32,
            len: len as i32,
            head_dim: shape.head_dim as i32,
            dtype: la_dtype(T::DTYPE),
        };
        // SAFETY: out's extent was checked against [batch, len, heads_q, head_dim] and its
        // strides, lse's length against [batch, heads_q, len]; the state is that size.
        let code =
            unsafe { ffi::la_ring_finalize(&params, crate::gpu::launch_stream(stream)? as _) };
        check_launch("la_ring_finalize", code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Sharding;

    /// The ring's global length past the GPU's position limit is refused by name before
    /// any device work (the CPU ring takes it); the limit itself is taken.
    #[test]
    fn ring_seqlen_past_the_gpu_limit_is_refused() {
        let layout = |n| RingLayout::new(n, 2, Sharding::Zigzag).unwrap();
        let e = check_ring_gpu::<half::bf16>(&layout(i32::MAX as usize));
        assert!(
            matches!(&e, Err(Error::Unsupported(m)) if m.contains("seqlen")),
            "{e:?}"
        );
        check_ring_gpu::<half::bf16>(&layout(crate::gpu::GPU_MAX_POSITIONS)).unwrap();
    }
}
