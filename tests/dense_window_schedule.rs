//! The Hopper window kernel's tile ranges (`kernels/dense_wgmma_window.cu`, not yet run on a
//! GPU), checked on the CPU: its blocks load `Mask::key_tiles` of their 128 query rows in
//! 64-key tiles, and each 64-row consumer computes only tiles `[lo, hi)` of that schedule, the
//! hull of the tiles its rows' reach touches (`consumer_rows` / `consumer_needs` there,
//! mirrored by `consumer_range` here). For random shapes and masks (windows with and without
//! a right side, sinks, seqlen_q != seqlen_k both ways, fully masked rows) every visible
//! (row, key) pair of a consumer must fall in a tile of its range; and on the benchmark's
//! causal windows the computed pairs per visible pair are the ones the kernel's design
//! counts on (W + 64 keys per row in steady state, against W + 128 for the Hopper kernel).
//! The persistent dense walk (`DenseKernel::HopperPersistent`) is the same code with 128-key
//! tiles: its ranges are checked the same way.

mod common;

use common::rng;
use longattn::*;
use rand::Rng;

const BLOCK_M: usize = 128;
const CONSUMER_ROWS: usize = 64;
/// The window kernel's key tile.
const BLOCK_N: usize = 64;
/// The persistent dense walk's key tile (the Hopper kernel's).
const PERSISTENT_BLOCK_N: usize = 128;

/// The block's key tiles of `bn` keys (tile indices, in visiting order) for query rows
/// `[m0, m0 + 128)`.
fn block_tiles(mask: &Mask, m0: usize, sq: usize, sk: usize, bn: usize) -> Vec<usize> {
    mask.key_tiles(m0..(m0 + BLOCK_M).min(sq), sq, sk, bn)
        .iter()
        .collect()
}

/// Positions `[lo, hi)` in `tiles` (of `bn` keys) that consumer `wg` of the block at `m0`
/// computes: the kernel's rule (reach of the consumer's first and last valid rows, sink keys
/// below `sinks`), empty when it needs none.
fn consumer_range(
    mask: &Mask,
    (tiles, bn): (&[usize], usize),
    m0: usize,
    wg: usize,
    sq: usize,
    sk: usize,
) -> (usize, usize) {
    let first = m0 + CONSUMER_ROWS * wg;
    let last = (first + CONSUMER_ROWS - 1).min(sq.saturating_sub(1));
    if first >= sq || sk == 0 {
        return (tiles.len(), tiles.len());
    }
    let shift = sk as i64 - sq as i64;
    let mut reach_hi = sk as i64 - 1;
    if let Some(r) = mask.window.right {
        reach_hi = reach_hi.min(last as i64 + shift + r as i64);
    }
    let reach_lo = match mask.window.left {
        Some(l) => (first as i64 + shift - l as i64).max(0),
        None => 0,
    };
    let needs = |t: usize| {
        let n0 = (t * bn) as i64;
        n0 <= reach_hi && (n0 + bn as i64 > reach_lo || n0 < mask.sinks as i64)
    };
    let needed: Vec<usize> = (0..tiles.len()).filter(|&k| needs(tiles[k])).collect();
    match (needed.first(), needed.last()) {
        (Some(&lo), Some(&hi)) => (lo, hi + 1),
        _ => (tiles.len(), tiles.len()),
    }
}

/// One side of a window: unbounded a quarter of the time, else 0-299 keys.
fn random_side(r: &mut impl Rng) -> Option<usize> {
    match r.random_range(0..4) {
        0 => None,
        _ => Some(r.random_range(0..300usize)),
    }
}

fn random_mask(r: &mut impl Rng) -> Mask {
    let left = random_side(r);
    let right = match r.random_range(0..3) {
        0 => Some(0),
        _ => random_side(r),
    };
    let sinks = if r.random_bool(0.3) {
        r.random_range(1..100)
    } else {
        0
    };
    Mask::new(Window::new(left, right), sinks)
}

#[test]
fn every_visible_pair_is_in_its_consumers_range() {
    let mut r = rng(16);
    for case in 0..300 {
        let sq = r.random_range(1..700usize);
        let sk = r.random_range(0..700usize);
        let mask = random_mask(&mut r);
        let bn = [BLOCK_N, PERSISTENT_BLOCK_N][case % 2];
        for m0 in (0..sq).step_by(BLOCK_M) {
            let tiles = block_tiles(&mask, m0, sq, sk, bn);
            for wg in 0..2 {
                let (lo, hi) = consumer_range(&mask, (&tiles, bn), m0, wg, sq, sk);
                assert!(lo <= hi && hi <= tiles.len());
                let rows = m0 + CONSUMER_ROWS * wg..(m0 + CONSUMER_ROWS * (wg + 1)).min(sq);
                for i in rows {
                    for j in (0..sk).filter(|&j| mask.visible(i, j, sq, sk)) {
                        let pos = tiles.iter().position(|&t| t == j / bn);
                        assert!(
                            pos.is_some_and(|k| (lo..hi).contains(&k)),
                            "case {case}: {mask:?} sq {sq} sk {sk} m0 {m0} consumer {wg}: row \
                             {i} key {j} (tile {} of {bn}) outside {:?} of {tiles:?}",
                            j / bn,
                            lo..hi
                        );
                    }
                }
            }
        }
    }
}

/// Computed (row, key) products per visible pair for one head of length `s` under the causal
/// window of `w` tokens: the window kernel (each consumer's 64 rows x its range's 64-key
/// tiles) and the Hopper kernel (128 rows x its block's 128-key tiles).
fn waste(s: usize, w: usize) -> (f64, f64) {
    let mask = Mask::new(Window::causal_tokens(w).unwrap(), 0);
    let visible: usize = (0..s).map(|i| (i + 1).min(w)).sum();
    let mut window_kernel = 0usize;
    let mut hopper = 0usize;
    for m0 in (0..s).step_by(BLOCK_M) {
        let tiles = block_tiles(&mask, m0, s, s, BLOCK_N);
        for wg in 0..2 {
            let (lo, hi) = consumer_range(&mask, (&tiles, BLOCK_N), m0, wg, s, s);
            window_kernel += (hi - lo) * BLOCK_N * CONSUMER_ROWS;
        }
        hopper += mask.key_tiles(m0..m0 + BLOCK_M, s, s, 128).count() * 128 * BLOCK_M;
    }
    (
        window_kernel as f64 / visible as f64,
        hopper as f64 / visible as f64,
    )
}

#[test]
fn benchmark_windows_compute_w_plus_64_keys_per_row() {
    for s in [16384usize, 65536] {
        for (w, steady_tiles) in [(256usize, 5usize), (1024, 17), (4096, 65)] {
            let (ours, hopper) = waste(s, w);
            println!(
                "window {w} s {s}: computed / visible pairs {ours:.3} (window kernel), {hopper:.3} \
                 (Hopper kernel)"
            );
            // Steady state: (W + 64) / W against (W + 128) / W, within the sequence's start.
            let steady = (w + 64) as f64 / w as f64;
            assert!(
                ours <= steady + 0.01 && ours < hopper,
                "w {w} s {s}: {ours} vs {hopper}"
            );
            // A consumer of an interior block computes W / 64 + 1 tiles of the block's W / 64 + 2.
            let mask = Mask::new(Window::causal_tokens(w).unwrap(), 0);
            let m0 = s / 2;
            let tiles = block_tiles(&mask, m0, s, s, BLOCK_N);
            assert_eq!(tiles.len(), steady_tiles + 1);
            for wg in 0..2 {
                let (lo, hi) = consumer_range(&mask, (&tiles, BLOCK_N), m0, wg, s, s);
                assert_eq!((lo, hi), (wg, wg + steady_tiles), "w {w} consumer {wg}");
            }
        }
    }
}

/// A CPU model of the persistent walk's synchronisation (`window_attention` in
/// `kernels/dense_wgmma_window.cu`, both walks), run before the kernel ever meets a GPU: the
/// barrier program of the producer and of the two consumers is transcribed op for op from the
/// kernel (it follows from the schedule alone: no branch depends on data), then executed under
/// random interleavings with copies completing at random times. mbarriers follow the PTX rules
/// (a phase completes when its arrivals are in and its expected bytes have landed; a parity
/// wait returns once the phase of that parity has completed); named barriers count warpgroup
/// arrivals (`bar.sync` waits, `bar.arrive` does not). Every buffer carries the tag of the copy
/// that filled it, cleared while a copy is in flight: a consumer must find its item's Q and
/// its tile's K/V after each wait and still there when it releases the buffer (no early or
/// late read, no overwrite in use), and the walk must end without deadlock. Change the model
/// with the kernel's barrier code.
mod walk_protocol {
    use std::collections::VecDeque;

    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum Buf {
        Q(usize),
        K(usize),
        V(usize),
    }

    #[derive(Clone, Copy, Debug)]
    enum Op {
        /// Parity wait on an mbarrier, then the buffer must hold the tag.
        Wait(usize, u64, Option<(Buf, u64)>),
        /// mbarrier arrive; the buffer must still hold the tag (its reads are done).
        Arrive(usize, Option<(Buf, u64)>),
        /// `arrive_expect_tx` plus the bulk copy writing `tag` into `buf`.
        Copy(usize, Buf, u64),
        NamedSync(usize),
        NamedArrive(usize),
        /// A read (a wgmma operand, the O staging): the buffer must hold the tag.
        Read(Buf, u64),
    }

    /// One work item as the block sees it: the tile count of its schedule and each
    /// consumer's range `[lo, hi)` (`lo == hi == n` when the consumer needs none).
    #[derive(Clone, Copy, Debug)]
    pub struct Item {
        pub n: usize,
        pub range: [(usize, usize); 2],
    }

    struct Bars {
        stages: usize,
    }
    impl Bars {
        fn q_full(&self, qb: usize) -> usize {
            qb
        }
        fn q_empty(&self, qb: usize) -> usize {
            2 + qb
        }
        fn k_full(&self, st: usize) -> usize {
            4 + st
        }
        fn v_full(&self, st: usize) -> usize {
            4 + self.stages + st
        }
        fn k_empty(&self, st: usize) -> usize {
            4 + 2 * self.stages + st
        }
        fn v_empty(&self, st: usize) -> usize {
            4 + 3 * self.stages + st
        }
        fn count(&self) -> usize {
            4 + 4 * self.stages
        }
        /// Arrivals that complete a phase: 1 for the full barriers (the producer's
        /// `arrive_expect_tx`), 2 warpgroups for the empty ones (`kConsumerThreads`).
        fn arrivals(&self, bar: usize) -> u32 {
            if bar < 2 || (4..4 + 2 * self.stages).contains(&bar) {
                1
            } else {
                2
            }
        }
    }

    const TURN: usize = 1; // named barrier of consumer c's turn: TURN + c

    /// Deliberate bugs in consumer 0's program, to show that the model catches them.
    #[derive(Clone, Copy, Debug)]
    pub enum Mutation {
        /// The last V stage released before its wait (before the copy landed).
        ReleaseLastVBeforeItLands,
        /// No empty turn for an item whose tiles the consumer does not need at all.
        NoTurnWithoutTiles,
        /// Q handed back to the producer before the item's last PV.
        QReleasedBeforeLastPv,
        /// The wait for the first computed tile's K with the other parity (a ring use counted
        /// off by one stage cycle).
        KFullParityFlipped,
    }

    fn producer(items: &[Item], b: &Bars) -> Vec<Op> {
        let s = b.stages as u64;
        let mut ops = Vec::new();
        let (mut c, mut qi) = (0u64, 0u64);
        for it in items {
            let qb = (qi & 1) as usize;
            if qi >= 2 {
                ops.push(Op::Wait(b.q_empty(qb), ((qi >> 1) - 1) & 1, None));
            }
            ops.push(Op::Copy(b.q_full(qb), Buf::Q(qb), qi));
            qi += 1;
            for _ in 0..it.n {
                let st = (c % s) as usize;
                let reuse = ((c / s).wrapping_sub(1)) & 1;
                if c >= s {
                    ops.push(Op::Wait(b.k_empty(st), reuse, None));
                }
                ops.push(Op::Copy(b.k_full(st), Buf::K(st), c));
                if c >= s {
                    ops.push(Op::Wait(b.v_empty(st), reuse, None));
                }
                ops.push(Op::Copy(b.v_full(st), Buf::V(st), c));
                c += 1;
            }
        }
        ops
    }

    fn consumer(items: &[Item], b: &Bars, wg: usize, bug: Option<Mutation>) -> Vec<Op> {
        let bug = if wg == 0 { bug } else { None };
        let s = b.stages as u64;
        let mut ops = Vec::new();
        let take = |ops: &mut Vec<Op>| ops.push(Op::NamedSync(TURN + wg));
        let pass = |ops: &mut Vec<Op>| ops.push(Op::NamedArrive(TURN + 1 - wg));
        if wg == 1 {
            pass(&mut ops);
        }
        let (mut c0, mut qi) = (0u64, 0u64);
        for it in items {
            let qb = (qi & 1) as usize;
            let q = Some((Buf::Q(qb), qi));
            ops.push(Op::Wait(b.q_full(qb), (qi >> 1) & 1, q));
            let (lo, hi) = it.range[wg];
            let n = it.n;
            let st = |t: usize| ((c0 + t as u64) % s) as usize;
            let ph = |t: usize| ((c0 + t as u64) / s) & 1;
            let k = |t: usize| Some((Buf::K(st(t)), c0 + t as u64));
            let v = |t: usize| Some((Buf::V(st(t)), c0 + t as u64));
            let empty_turn = |ops: &mut Vec<Op>| {
                take(ops);
                pass(ops);
            };
            let release = |ops: &mut Vec<Op>, t: usize| {
                ops.push(Op::Wait(b.k_full(st(t)), ph(t), k(t)));
                ops.push(Op::Arrive(b.k_empty(st(t)), k(t)));
                ops.push(Op::Wait(b.v_full(st(t)), ph(t), v(t)));
                ops.push(Op::Arrive(b.v_empty(st(t)), v(t)));
            };
            for t in 0..lo {
                empty_turn(&mut ops);
                release(&mut ops, t);
            }
            if lo < hi {
                if matches!(bug, Some(Mutation::QReleasedBeforeLastPv)) {
                    ops.push(Op::Arrive(b.q_empty(qb), None));
                }
                let flip = matches!(bug, Some(Mutation::KFullParityFlipped)) as u64;
                ops.push(Op::Wait(b.k_full(st(lo)), ph(lo) ^ flip, k(lo)));
                take(&mut ops);
                ops.push(Op::Read(Buf::Q(qb), qi)); // S_lo
                pass(&mut ops);
                ops.push(Op::Arrive(b.k_empty(st(lo)), k(lo)));
                for t in lo + 1..hi {
                    ops.push(Op::Wait(b.k_full(st(t)), ph(t), k(t)));
                    ops.push(Op::Wait(b.v_full(st(t - 1)), ph(t - 1), v(t - 1)));
                    take(&mut ops);
                    ops.push(Op::Read(Buf::Q(qb), qi)); // S_t
                    pass(&mut ops);
                    ops.push(Op::Arrive(b.k_empty(st(t)), k(t)));
                    ops.push(Op::Arrive(b.v_empty(st(t - 1)), v(t - 1)));
                }
                if matches!(bug, Some(Mutation::ReleaseLastVBeforeItLands)) {
                    ops.push(Op::Arrive(b.v_empty(st(hi - 1)), v(hi - 1)));
                }
                ops.push(Op::Wait(b.v_full(st(hi - 1)), ph(hi - 1), v(hi - 1)));
                take(&mut ops);
                pass(&mut ops);
                if !matches!(bug, Some(Mutation::ReleaseLastVBeforeItLands)) {
                    ops.push(Op::Arrive(b.v_empty(st(hi - 1)), v(hi - 1)));
                }
            } else if n > 0 && !matches!(bug, Some(Mutation::NoTurnWithoutTiles)) {
                empty_turn(&mut ops);
            }
            for t in hi..n {
                empty_turn(&mut ops);
                release(&mut ops, t);
            }
            c0 += n as u64;
            ops.push(Op::Read(Buf::Q(qb), qi)); // O staged in the consumer's Q rows
            if !(lo < hi && matches!(bug, Some(Mutation::QReleasedBeforeLastPv))) {
                ops.push(Op::Arrive(b.q_empty(qb), q)); // O staged and written from Q's rows
            }
            qi += 1;
        }
        if wg == 0 {
            take(&mut ops);
        }
        ops
    }

    #[derive(Clone, Copy, Default)]
    struct MBarrier {
        pending: u32,
        tx: u32,
        phase: u64, // completed phases
    }

    #[derive(Clone, Default)]
    struct Named {
        arrived: Vec<usize>, // warpgroups arrived in the current generation
        generation: u64,
    }

    /// Runs the walk under the interleaving `pick` chooses among the enabled steps; panics
    /// on a deadlock or a buffer that does not hold what the reader expects.
    pub fn run(items: &[Item], stages: usize, pick: impl FnMut(usize) -> usize) {
        run_with(items, stages, None, pick)
    }

    /// [`run`] with an optional deliberate bug in consumer 0's program.
    pub fn run_with(
        items: &[Item],
        stages: usize,
        bug: Option<Mutation>,
        mut pick: impl FnMut(usize) -> usize,
    ) {
        let b = Bars { stages };
        let programs = [
            producer(items, &b),
            consumer(items, &b, 0, bug),
            consumer(items, &b, 1, None),
        ];
        let mut pc = [0usize; 3];
        let mut waiting_named: [Option<(usize, u64)>; 3] = [None; 3];
        let mut bars: Vec<MBarrier> = (0..b.count())
            .map(|i| MBarrier {
                pending: b.arrivals(i),
                ..Default::default()
            })
            .collect();
        let mut named = vec![Named::default(); 3];
        let mut bufs: Vec<Option<u64>> = vec![None; 2 + 2 * stages];
        let slot = |buf: Buf| match buf {
            Buf::Q(i) => i,
            Buf::K(i) => 2 + i,
            Buf::V(i) => 2 + stages + i,
        };
        let mut copies: VecDeque<(usize, Buf, u64)> = VecDeque::new();
        let arrive = |bars: &mut Vec<MBarrier>, bar: usize, tx: u32, b: &Bars| {
            let m = &mut bars[bar];
            assert!(m.pending > 0, "barrier {bar}: more arrivals than its count");
            m.pending -= 1;
            m.tx += tx;
            if m.pending == 0 && m.tx == 0 {
                m.phase += 1;
                m.pending = b.arrivals(bar);
            }
        };
        let check = |bufs: &Vec<Option<u64>>, want: Option<(Buf, u64)>, who: usize, op: &Op| {
            if let Some((buf, tag)) = want {
                assert_eq!(
                    bufs[slot(buf)],
                    Some(tag),
                    "actor {who} at {op:?}: {buf:?} does not hold copy {tag}"
                );
            }
        };
        loop {
            // Enabled steps: actors whose next op can run, then in-flight copies landing.
            let mut enabled: Vec<usize> = Vec::new();
            for a in 0..3 {
                if let Some((id, g)) = waiting_named[a] {
                    if named[id].generation > g {
                        enabled.push(a);
                    }
                    continue;
                }
                match programs[a].get(pc[a]) {
                    // Done, or waiting for the phase of that parity to complete.
                    None => {}
                    Some(Op::Wait(bar, parity, _)) if bars[*bar].phase & 1 == *parity => {}
                    Some(_) => enabled.push(a),
                }
            }
            enabled.extend((0..copies.len()).map(|i| 3 + i));
            if enabled.is_empty() {
                let done = (0..3).all(|a| pc[a] == programs[a].len() && waiting_named[a].is_none());
                assert!(
                    done,
                    "deadlock: pcs {pc:?} of {:?}, next ops {:?}",
                    programs.iter().map(|p| p.len()).collect::<Vec<_>>(),
                    (0..3).map(|a| programs[a].get(pc[a])).collect::<Vec<_>>()
                );
                return;
            }
            let choice = enabled[pick(enabled.len())];
            if choice >= 3 {
                let (bar, buf, tag) = copies.remove(choice - 3).unwrap();
                bufs[slot(buf)] = Some(tag);
                let m = &mut bars[bar];
                m.tx -= 1;
                if m.pending == 0 && m.tx == 0 {
                    m.phase += 1;
                    m.pending = b.arrivals(bar);
                }
                continue;
            }
            let a = choice;
            if waiting_named[a].take().is_some() {
                pc[a] += 1;
                continue;
            }
            let op = programs[a][pc[a]];
            match op {
                Op::Read(buf, tag) => {
                    check(&bufs, Some((buf, tag)), a, &op);
                    pc[a] += 1;
                }
                Op::Wait(_, _, want) => {
                    check(&bufs, want, a, &op);
                    pc[a] += 1;
                }
                Op::Arrive(bar, want) => {
                    check(&bufs, want, a, &op);
                    arrive(&mut bars, bar, 0, &b);
                    pc[a] += 1;
                }
                Op::Copy(bar, buf, tag) => {
                    bufs[slot(buf)] = None; // being overwritten
                    arrive(&mut bars, bar, 1, &b);
                    copies.push_back((bar, buf, tag));
                    pc[a] += 1;
                }
                Op::NamedSync(id) | Op::NamedArrive(id) => {
                    let wg = a - 1;
                    let n = &mut named[id];
                    assert!(
                        !n.arrived.contains(&wg),
                        "named barrier {id}: warpgroup {wg} arrived twice in one generation"
                    );
                    n.arrived.push(wg);
                    let g = n.generation;
                    if n.arrived.len() == 2 {
                        n.arrived.clear();
                        n.generation += 1;
                    }
                    if matches!(op, Op::NamedSync(_)) {
                        waiting_named[a] = Some((id, g));
                    } else {
                        pc[a] += 1;
                    }
                }
            }
        }
    }
}

/// The walk's barrier program (model above) over random item lists of random problems, every
/// (key tile, stages) pair the kernel instantiates (`WgWindow64`, `WgWindow128`, `WgWalk192`
/// with 64-key tiles; `WgPersistent64`, `WgPersistent128` with 128), under random
/// interleavings: no deadlock, no buffer read before its copy lands or after it is overwritten.
#[test]
fn persistent_walk_barriers_never_deadlock_or_race() {
    use walk_protocol::{Item, run};
    let mut r = rng(17);
    for case in 0..500 {
        let (bn, stages) = [
            (BLOCK_N, 8),
            (BLOCK_N, 4),
            (BLOCK_N, 2),
            (PERSISTENT_BLOCK_N, 4),
            (PERSISTENT_BLOCK_N, 2),
        ][case % 5];
        let sq = r.random_range(1..900usize);
        let sk = r.random_range(0..900usize);
        let mask = random_mask(&mut r);
        // One block's share of a grid walk: every `grid`-th item from `first`, the query tiles
        // in the kernel's order (last first).
        let q_tiles = sq.div_ceil(BLOCK_M);
        let heads = r.random_range(1..4usize);
        let grid = r.random_range(1..4usize);
        let first = r.random_range(0..grid);
        let items: Vec<Item> = (0..q_tiles * heads)
            .skip(first)
            .step_by(grid)
            .map(|w| {
                let m0 = (q_tiles - 1 - w % q_tiles) * BLOCK_M;
                let tiles = block_tiles(&mask, m0, sq, sk, bn);
                let range = [0, 1].map(|wg| consumer_range(&mask, (&tiles, bn), m0, wg, sq, sk));
                Item {
                    n: tiles.len(),
                    range,
                }
            })
            .collect();
        for _ in 0..3 {
            run(&items, stages, |n| r.random_range(0..n));
        }
    }
}

/// The model can fail: each deliberate bug in consumer 0's program is caught (a deadlock or
/// a buffer assertion), while the unmodified program of the same items runs through.
#[test]
fn the_walk_model_catches_broken_programs() {
    use walk_protocol::{Item, Mutation, run_with};
    let items = vec![
        Item {
            n: 3,
            range: [(0, 3), (1, 3)],
        },
        Item {
            n: 0,
            range: [(0, 0), (0, 0)],
        },
        Item {
            n: 2,
            range: [(2, 2), (0, 2)],
        },
        Item {
            n: 4,
            range: [(0, 4), (0, 4)],
        },
    ];
    // Actors before copies: a copy lands only when no actor can move, so an early read shows.
    run_with(&items, 2, None, |_| 0);
    for m in [
        Mutation::ReleaseLastVBeforeItLands,
        Mutation::NoTurnWithoutTiles,
        Mutation::QReleasedBeforeLastPv,
        Mutation::KFullParityFlipped,
    ] {
        // In order first, then random interleavings: some interleaving must expose the bug.
        let caught = (0..200u64).any(|seed| {
            let mut r = rng(seed);
            let items = &items;
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_with(items, 2, Some(m), |n| {
                    if seed == 0 { 0 } else { r.random_range(0..n) }
                })
            }))
            .is_err()
        });
        assert!(caught, "{m:?} was not caught");
    }
}
