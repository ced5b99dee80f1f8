//! The per-rank step plan of a ring: for one rank, which shard it holds at every step, in
//! which buffer, which dense pieces run there, and which transfers (send to the next rank,
//! receive from the previous one) are issued during that step, with the dependencies that
//! make double buffering safe. A pure data structure decided from the layout and the mask
//! alone ([`RingAttention::schedule`]), tested on the CPU; the GPU drivers
//! ([`super::gpu`]) execute it as it stands, and [`RingAttention::forward_cpu_planned`]
//! executes it over CPU buffers (the transfers as copies between the ranks' buffers), which
//! checks the plan end to end against [`RingAttention::forward_cpu`].
//!
//! Buffers: at step 0 a rank computes on its own K/V shard ([`KvBuffer::Local`]); the shard
//! of step `t >= 1` arrives during step `t - 1` into ring buffer `(t - 1) % 2`
//! ([`KvBuffer::Ring`]), so the receive of step `t` never overwrites the buffer computed on
//! at step `t`. It overwrites the buffer of step `t - 1`, which is why a receive waits for
//! the compute of step `t - 1` ([`PlannedStep::recv_after_compute`]) and for the send out of
//! that buffer at step `t - 1` (issued earlier on the same communication stream, so ordered
//! there). A step's compute waits for the receive of the previous step
//! ([`PlannedStep::compute_after_recv`]). These are the only waits: no host synchronisation
//! inside the loop.

use super::{RingAttention, RingPiece, RingSchedule};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{Strided, Strides};

/// Where a rank's K/V shard of one step lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvBuffer {
    /// The rank's own `k`, `v` arguments (step 0).
    Local,
    /// Ring buffer 0 or 1 (double buffering), sized for the largest shard.
    Ring(usize),
}

/// One point-to-point transfer of a shard (K and V) between neighbouring ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Transfer {
    /// The other rank: the next one for a send, the previous one for a receive.
    pub peer: usize,
    /// The shard moved (the rank that owns it originally).
    pub shard: usize,
    /// The sender's buffer for a send, the receiver's for a receive.
    pub buffer: KvBuffer,
}

/// What one rank does at one ring step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    /// Step index, `0..world`.
    pub step: usize,
    /// The shard the rank holds at this step ([`super::RingLayout::kv_source`]).
    pub source: usize,
    /// Where that shard lives.
    pub kv: KvBuffer,
    /// The dense problems of this step (empty: the step is skipped, nothing is launched).
    pub pieces: Vec<RingPiece>,
    /// Sent to the next rank during this step (the shard held now), if a later rank needs it.
    pub send: Option<Transfer>,
    /// Received from the previous rank during this step (the shard of step `step + 1`), if
    /// this rank or a later one needs it.
    pub recv: Option<Transfer>,
    /// The step whose compute must finish before `recv` overwrites its buffer (the last
    /// computing step that read that buffer), if any.
    pub recv_after_compute: Option<usize>,
    /// Whether this step's compute waits for the receive issued during the previous step
    /// (true when the step computes on a ring buffer).
    pub compute_after_recv: bool,
}

impl PlannedStep {
    /// Whether the step launches any piece (not skipped).
    pub fn computes(&self) -> bool {
        !self.pieces.is_empty()
    }
}

/// One rank's whole ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankPlan {
    /// The rank this plan belongs to.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// One entry per ring step, in order.
    pub steps: Vec<PlannedStep>,
}

impl RankPlan {
    /// Shards this rank receives, in order.
    pub fn received(&self) -> Vec<usize> {
        self.steps
            .iter()
            .filter_map(|s| s.recv.map(|t| t.shard))
            .collect()
    }
    /// Shards this rank sends, in order.
    pub fn sent(&self) -> Vec<usize> {
        self.steps
            .iter()
            .filter_map(|s| s.send.map(|t| t.shard))
            .collect()
    }
    /// Steps that launch pieces.
    pub fn computing_steps(&self) -> Vec<usize> {
        self.steps
            .iter()
            .filter(|s| s.computes())
            .map(|s| s.step)
            .collect()
    }
    /// Most query rows of any piece (the size of the per-piece scratch output).
    pub fn max_piece_rows(&self) -> usize {
        self.steps
            .iter()
            .flat_map(|s| s.pieces.iter().map(|p| p.q_rows.len()))
            .max()
            .unwrap_or(0)
    }
}

/// Transfers of a plan set, for the tests and the bench.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferCount {
    /// `[rank]`: shards received.
    pub received: Vec<usize>,
    /// Shards moved in all.
    pub total: usize,
    /// Shards a ring without skipping would move (`world * (world - 1)`).
    pub unskipped: usize,
}

impl RingAttention {
    /// The step plan of rank `rank` (see the module docs of [`super::plan`]).
    pub fn rank_plan(&self, rank: usize) -> Result<RankPlan> {
        let n = self.layout.world();
        if rank >= n {
            // Refused before the schedule (O(world * seqlen)) is computed.
            return Err(Error::Shape(format!(
                "ring plan: rank {rank} of a world of {n}"
            )));
        }
        self.rank_plan_with(rank, &self.schedule())
    }

    /// [`RingAttention::rank_plan`] from a schedule already computed (`self.schedule()`).
    pub fn rank_plan_with(&self, rank: usize, schedule: &RingSchedule) -> Result<RankPlan> {
        let n = self.layout.world();
        if rank >= n {
            return Err(Error::Shape(format!(
                "ring plan: rank {rank} of a world of {n}"
            )));
        }
        let kv_of = |t: usize| {
            if t == 0 {
                KvBuffer::Local
            } else {
                KvBuffer::Ring((t - 1) % 2)
            }
        };
        let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
        let mut steps = Vec::with_capacity(n);
        let mut last_compute_on: [Option<usize>; 2] = [None, None];
        for t in 0..n {
            let source = self.layout.kv_source(rank, t);
            let pieces = if schedule.compute[rank][t] {
                self.pieces(rank, t)
            } else {
                Vec::new()
            };
            let kv = kv_of(t);
            let (send, recv) = if t + 1 < n {
                let incoming = self.layout.kv_source(rank, t + 1);
                (
                    schedule.send[t][source].then_some(Transfer {
                        peer: next,
                        shard: source,
                        buffer: kv,
                    }),
                    schedule.send[t][incoming].then_some(Transfer {
                        peer: prev,
                        shard: incoming,
                        buffer: kv_of(t + 1),
                    }),
                )
            } else {
                (None, None)
            };
            let recv_after_compute = match recv.map(|r| r.buffer) {
                Some(KvBuffer::Ring(b)) => last_compute_on[b],
                _ => None,
            };
            if let (KvBuffer::Ring(b), false) = (kv, pieces.is_empty()) {
                last_compute_on[b] = Some(t);
            }
            let compute_after_recv = matches!(kv, KvBuffer::Ring(_)) && !pieces.is_empty();
            steps.push(PlannedStep {
                step: t,
                source,
                kv,
                pieces,
                send,
                recv,
                recv_after_compute,
                compute_after_recv,
            });
        }
        // The recv of step t - 1 targets the buffer of step t: a computing step on a ring
        // buffer always has its shard delivered (the schedule sends a shard to every rank
        // that needs it, and to every rank in between).
        for t in 1..n {
            if steps[t].computes() && steps[t - 1].recv.is_none() {
                return Err(Error::Shape(format!(
                    "ring plan: rank {rank} computes at step {t} without receiving shard {}",
                    steps[t].source
                )));
            }
        }
        Ok(RankPlan {
            rank,
            world: n,
            steps,
        })
    }

    /// Every rank's plan.
    pub fn plans(&self) -> Result<Vec<RankPlan>> {
        let schedule = self.schedule();
        (0..self.layout.world())
            .map(|r| self.rank_plan_with(r, &schedule))
            .collect()
    }

    /// Checks that a set of plans is consistent (every send meets the matching receive on
    /// the next rank at the same step, and the reverse) and counts the transfers.
    pub fn check_plans(plans: &[RankPlan]) -> Result<TransferCount> {
        let n = plans.len();
        for p in plans {
            for s in &p.steps {
                let peer = &plans[(p.rank + 1) % n].steps[s.step];
                let matched = match (s.send, peer.recv) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.shard == b.shard && b.peer == p.rank,
                    _ => false,
                };
                if !matched {
                    return Err(Error::Shape(format!(
                        "ring plan: rank {} step {} sends {:?}, rank {} receives {:?}",
                        p.rank,
                        s.step,
                        s.send,
                        (p.rank + 1) % n,
                        peer.recv
                    )));
                }
            }
        }
        let received: Vec<usize> = plans.iter().map(|p| p.received().len()).collect();
        Ok(TransferCount {
            total: received.iter().sum(),
            received,
            unskipped: n * n.saturating_sub(1),
        })
    }

    /// The ring over simulated ranks that executes [`RingAttention::plans`] literally: every
    /// rank has its own two ring buffers; at each step the planned pieces run on the buffer
    /// the plan names (checked to hold the planned shard), then the planned transfers copy
    /// the sender's buffer into the receiver's. Equal to [`RingAttention::forward_cpu`] (the
    /// same pieces merged in the same order), it checks the plans the GPU drivers execute.
    /// The K/V shards must be contiguous (the GPU ring sends them as flat buffers). Returns
    /// the transfer count.
    pub fn forward_cpu_planned<T: Element>(
        &self,
        q: &[Strided<&[T]>],
        k: &[&[T]],
        v: &[&[T]],
        out: &mut [Strided<&mut [T]>],
        mut lse: Option<&mut [&mut [f32]]>,
    ) -> Result<TransferCount> {
        let n = self.layout.world();
        let kv_strides: Vec<Strides> = (0..n).map(|r| self.kv_strides(r)).collect();
        let kd: Vec<_> = (0..n).map(|r| (k[r].len(), kv_strides[r])).collect();
        let vd: Vec<_> = (0..n).map(|r| (v[r].len(), kv_strides[r])).collect();
        let qd: Vec<_> = q.iter().map(|x| (x.data.len(), x.strides)).collect();
        let od: Vec<_> = out.iter().map(|x| (x.data.len(), x.strides)).collect();
        let lse_lens: Option<Vec<usize>> =
            lse.as_deref().map(|l| l.iter().map(|x| x.len()).collect());
        self.check_shards(&qd, &kd, &vd, &od, lse_lens.as_deref())?;
        let plans = self.plans()?;
        let count = Self::check_plans(&plans)?;
        let cap = (0..n).map(|r| self.kv_len(r)).max().unwrap_or(0);
        // [rank][buffer]: (shard held, k, v).
        type Slot<T> = (Option<usize>, Vec<T>, Vec<T>);
        let mut ring: Vec<[Slot<T>; 2]> = (0..n)
            .map(|_| {
                std::array::from_fn(|_| (None, vec![T::default(); cap], vec![T::default(); cap]))
            })
            .collect();
        let mut states: Vec<(Vec<f32>, Vec<f32>)> = (0..n).map(|r| self.empty_state(r)).collect();
        for t in 0..n {
            for (r, plan) in plans.iter().enumerate() {
                let st = &plan.steps[t];
                if !st.computes() {
                    continue;
                }
                let len = self.kv_len(st.source);
                let (ks, vs): (&[T], &[T]) = match st.kv {
                    KvBuffer::Local => (k[r], v[r]),
                    KvBuffer::Ring(b) => {
                        let (held, kb, vb) = &ring[r][b];
                        if *held != Some(st.source) {
                            return Err(Error::Shape(format!(
                                "ring plan: rank {r} step {t} expects shard {} in buffer {b}, \
                                 which holds {held:?}",
                                st.source
                            )));
                        }
                        (&kb[..len], &vb[..len])
                    }
                };
                let s = kv_strides[st.source];
                let (o, l) = &mut states[r];
                for piece in &st.pieces {
                    self.merge_piece_cpu(
                        r,
                        piece,
                        &q[r],
                        &Strided::new(ks, s),
                        &Strided::new(vs, s),
                        o,
                        l,
                    )?;
                }
            }
            // Transfers of step t (after the compute in this simulation; on the GPU they
            // overlap it, which the double buffering makes equivalent).
            let moves: Vec<(usize, usize, KvBuffer, Transfer)> = plans
                .iter()
                .filter_map(|p| p.steps[t].recv.map(|rv| (p.rank, rv.peer, rv.buffer, rv)))
                .map(|(r, from, buf, rv)| (r, from, buf, plans[from].steps[t].send.unwrap_or(rv)))
                .collect();
            let mut staged = Vec::new();
            for &(_, from, _, send) in &moves {
                let len = self.kv_len(send.shard);
                let (kk, vv) = match send.buffer {
                    KvBuffer::Local => (k[from][..len].to_vec(), v[from][..len].to_vec()),
                    KvBuffer::Ring(b) => {
                        let (held, kb, vb) = &ring[from][b];
                        if *held != Some(send.shard) {
                            return Err(Error::Shape(format!(
                                "ring plan: rank {from} step {t} sends shard {} from buffer {b}, \
                                 which holds {held:?}",
                                send.shard
                            )));
                        }
                        (kb[..len].to_vec(), vb[..len].to_vec())
                    }
                };
                staged.push((send.shard, kk, vv));
            }
            for ((r, _, buf, _), (shard, kk, vv)) in moves.into_iter().zip(staged) {
                let KvBuffer::Ring(b) = buf else {
                    return Err(Error::Shape(
                        "ring plan: receive into the local shard".into(),
                    ));
                };
                let slot = &mut ring[r][b];
                slot.0 = Some(shard);
                slot.1[..kk.len()].copy_from_slice(&kk);
                slot.2[..vv.len()].copy_from_slice(&vv);
            }
        }
        for (r, (o, l)) in states.into_iter().enumerate() {
            self.store_state_cpu(
                r,
                &o,
                &l,
                &mut out[r],
                lse.as_deref_mut().map(|x| &mut *x[r]),
            );
        }
        Ok(count)
    }

    /// Strides of rank `rank`'s contiguous K/V shard `[batch, L_r, heads_kv, head_dim]`.
    pub fn kv_strides(&self, rank: usize) -> Strides {
        Strides::contiguous(
            self.layout.shard_len(rank),
            self.shape.heads_kv,
            self.shape.head_dim,
        )
    }
}
