//! The per-rank ring step plans (CPU): sends meet receives, a window moves only the shards
//! it needs, buffers ping-pong safely, and executing the plans literally over CPU buffers
//! (transfers as copies) equals the CPU ring and single-device attention.

mod common;

use common::ring::ring_shape;
use common::{random_vec, rng};
use longattn::*;

fn ring(seqlen: usize, world: usize, sharding: Sharding, opts: &AttentionOptions) -> RingAttention {
    let layout = RingLayout::new(seqlen, world, sharding).unwrap();
    let shape = ring_shape(1, 2, 1, 8);
    RingAttention::new(layout, shape, opts).unwrap()
}

fn window(tokens: usize) -> AttentionOptions {
    AttentionOptions::default().with_window(Window::causal_tokens(tokens).unwrap())
}

#[test]
fn window_4k_over_8_ranks_receives_only_needed_shards() {
    // 16k tokens, 8 ranks of 2k, causal window of 4k tokens: rank r needs shards r - 1 and
    // r - 2 (its first token sees 4k back), nothing else; rank 0 needs nothing.
    let attn = ring(16384, 8, Sharding::Contiguous, &window(4096));
    let plans = attn.plans().unwrap();
    let count = RingAttention::check_plans(&plans).unwrap();
    assert_eq!(count.received, vec![0, 1, 2, 2, 2, 2, 2, 2]);
    assert_eq!(count.total, 13);
    assert_eq!(count.unskipped, 56);
    for p in &plans {
        let r = p.rank;
        let want: Vec<usize> = (1..=2.min(r)).map(|d| r - d).collect();
        assert_eq!(p.received(), want, "rank {r}");
        let computes: Vec<usize> = (0..=2.min(r)).collect();
        assert_eq!(p.computing_steps(), computes, "rank {r}");
        // Sends: its own shard (needed by r + 1, r + 2 if they exist) and the shard it
        // received at step 1 (needed by r + 1), nothing else.
        let sent = p.sent();
        assert!(sent.len() <= 2, "rank {r} sends {sent:?}");
    }
}

#[test]
fn window_4k_over_8_ranks_of_16k_receives_only_from_the_neighbour() {
    // The target case: 8 ranks x 16k tokens, causal window of 4k tokens: rank r
    // needs only shard r - 1 (its first token sees 4k back, inside its neighbour's 16k),
    // which it receives at step 1 and computes on; every later step and transfer is skipped.
    let attn = ring(8 * 16384, 8, Sharding::Contiguous, &window(4096));
    let plans = attn.plans().unwrap();
    let count = RingAttention::check_plans(&plans).unwrap();
    assert_eq!(count.received, vec![0, 1, 1, 1, 1, 1, 1, 1]);
    assert_eq!(count.total, 7);
    for p in &plans {
        let r = p.rank;
        let want: Vec<usize> = r.checked_sub(1).into_iter().collect();
        assert_eq!(p.received(), want, "rank {r}");
        assert_eq!(
            p.computing_steps(),
            (0..=1.min(r)).collect::<Vec<_>>(),
            "rank {r}"
        );
        let sent: Vec<usize> = if r + 1 < 8 { vec![r] } else { vec![] };
        assert_eq!(p.sent(), sent, "rank {r}");
        // One dense piece per computing step: the band of the local shard, then the
        // neighbour's last 4k keys against the first 4k - 1 rows.
        for s in &p.steps {
            assert!(
                s.pieces.len() <= 1,
                "rank {r} step {}: {:?}",
                s.step,
                s.pieces
            );
        }
    }
}

#[test]
fn causal_contiguous_skips_future_steps_and_transfers() {
    let attn = ring(64, 4, Sharding::Contiguous, &AttentionOptions::causal());
    let plans = attn.plans().unwrap();
    let count = RingAttention::check_plans(&plans).unwrap();
    // Rank r needs shards 0..=r: it receives r shards; the last rank sends nothing.
    assert_eq!(count.received, vec![0, 1, 2, 3]);
    assert!(plans[3].sent().is_empty());
    for p in &plans {
        assert_eq!(p.computing_steps(), (0..=p.rank).collect::<Vec<_>>());
    }
}

#[test]
fn full_mask_moves_every_shard_and_buffers_ping_pong() {
    for world in [1, 2, 3, 5, 8] {
        let attn = ring(37, world, Sharding::Zigzag, &AttentionOptions::default());
        let plans = attn.plans().unwrap();
        let count = RingAttention::check_plans(&plans).unwrap();
        assert_eq!(count.total, count.unskipped, "world {world}");
        for p in &plans {
            for s in &p.steps {
                let want = if s.step == 0 {
                    KvBuffer::Local
                } else {
                    KvBuffer::Ring((s.step - 1) % 2)
                };
                assert_eq!(s.kv, want);
                assert_eq!(s.source, attn.layout().kv_source(p.rank, s.step));
                if let Some(rv) = s.recv {
                    // Never into the buffer computed on now; after the compute that last
                    // read the target buffer (the previous step on it).
                    assert_ne!(rv.buffer, s.kv);
                    assert_eq!(rv.buffer, KvBuffer::Ring(s.step % 2));
                    let expect = s.step.checked_sub(1).filter(|&t| t >= 1);
                    assert_eq!(
                        s.recv_after_compute, expect,
                        "rank {} step {}",
                        p.rank, s.step
                    );
                }
                assert_eq!(s.compute_after_recv, s.step > 0 && s.computes());
            }
        }
    }
}

#[test]
fn every_planned_compute_has_its_shard_delivered() {
    let opts = [
        AttentionOptions::default(),
        AttentionOptions::causal(),
        window(3),
        window(11).with_sinks(2),
        AttentionOptions::default().with_window(Window::new(Some(4), Some(6))),
        AttentionOptions::default()
            .with_window(Window::new(None, Some(2)))
            .with_sinks(1),
    ];
    for sharding in [Sharding::Contiguous, Sharding::Zigzag, Sharding::Stripe] {
        for world in [1, 2, 3, 4, 7] {
            for o in &opts {
                let attn = ring(29, world, sharding, o);
                // rank_plan errors if a computing step's shard is never received.
                let plans = attn.plans().unwrap();
                RingAttention::check_plans(&plans).unwrap();
            }
        }
    }
}

/// Executes the plans over CPU buffers and checks against forward_cpu: identical bits (the
/// same pieces merged in the same order).
fn planned_equals_ring<T: Element>(
    seqlen: usize,
    world: usize,
    sharding: Sharding,
    o: &AttentionOptions,
    shape: RingShape,
) {
    let layout = RingLayout::new(seqlen, world, sharding).unwrap();
    let attn = RingAttention::new(layout, shape, o).unwrap();
    let RingShape {
        batch,
        heads_q,
        heads_kv,
        head_dim: d,
    } = shape;
    let mut g = rng(seqlen as u64 * 31 + world as u64);
    let q = random_vec::<T>(&mut g, batch * seqlen * heads_q * d);
    let k = random_vec::<T>(&mut g, batch * seqlen * heads_kv * d);
    let v = random_vec::<T>(&mut g, batch * seqlen * heads_kv * d);
    let qs = layout.shard(&q, batch, heads_q * d).unwrap();
    let ks = layout.shard(&k, batch, heads_kv * d).unwrap();
    let vs = layout.shard(&v, batch, heads_kv * d).unwrap();
    let qv: Vec<_> = (0..world)
        .map(|r| {
            Strided::new(
                &qs[r][..],
                Strides::contiguous(layout.shard_len(r), heads_q, d),
            )
        })
        .collect();
    fn kvs_of<'a, T>(x: &'a [Vec<T>], attn: &RingAttention) -> Vec<Strided<&'a [T]>> {
        (0..x.len())
            .map(|r| Strided::new(&x[r][..], attn.kv_strides(r)))
            .collect::<Vec<_>>()
    }
    let mut want: Vec<Vec<T>> = (0..world)
        .map(|r| vec![T::default(); attn.out_len(r)])
        .collect();
    let mut want_lse: Vec<Vec<f32>> = (0..world).map(|r| vec![0.0; attn.lse_len(r)]).collect();
    {
        let mut outs: Vec<_> = want
            .iter_mut()
            .enumerate()
            .map(|(r, o)| {
                Strided::new(
                    &mut o[..],
                    Strides::contiguous(layout.shard_len(r), heads_q, d),
                )
            })
            .collect();
        let mut l: Vec<&mut [f32]> = want_lse.iter_mut().map(|x| &mut x[..]).collect();
        attn.forward_cpu(
            &qv,
            &kvs_of(&ks, &attn),
            &kvs_of(&vs, &attn),
            &mut outs,
            Some(&mut l),
        )
        .unwrap();
    }
    let mut got: Vec<Vec<T>> = (0..world)
        .map(|r| vec![T::default(); attn.out_len(r)])
        .collect();
    let mut got_lse: Vec<Vec<f32>> = (0..world).map(|r| vec![0.0; attn.lse_len(r)]).collect();
    let count = {
        let mut outs: Vec<_> = got
            .iter_mut()
            .enumerate()
            .map(|(r, o)| {
                Strided::new(
                    &mut o[..],
                    Strides::contiguous(layout.shard_len(r), heads_q, d),
                )
            })
            .collect();
        let mut l: Vec<&mut [f32]> = got_lse.iter_mut().map(|x| &mut x[..]).collect();
        let kr: Vec<&[T]> = ks.iter().map(|x| &x[..]).collect();
        let vr: Vec<&[T]> = vs.iter().map(|x| &x[..]).collect();
        attn.forward_cpu_planned(&qv, &kr, &vr, &mut outs, Some(&mut l))
            .unwrap()
    };
    assert!(count.total <= count.unskipped);
    let what = format!("{sharding:?} world {world} seqlen {seqlen} {o:?}");
    for r in 0..world {
        let g: Vec<f64> = got[r].iter().map(|x| x.to_f64()).collect();
        let w: Vec<f64> = want[r].iter().map(|x| x.to_f64()).collect();
        assert_eq!(g, w, "{what}: rank {r} output");
        let gl: Vec<u32> = got_lse[r].iter().map(|x| x.to_bits()).collect();
        let wl: Vec<u32> = want_lse[r].iter().map(|x| x.to_bits()).collect();
        assert_eq!(gl, wl, "{what}: rank {r} lse");
    }
}

#[test]
fn planned_execution_equals_cpu_ring() {
    let shape = ring_shape(2, 4, 2, 16);
    let opts = [
        AttentionOptions::default(),
        AttentionOptions::causal(),
        window(5),
        window(9).with_sinks(3),
        AttentionOptions::default().with_window(Window::new(Some(3), Some(2))),
    ];
    for sharding in [Sharding::Contiguous, Sharding::Zigzag, Sharding::Stripe] {
        for world in [1, 2, 3, 4, 8] {
            for o in &opts {
                // Lengths not divisible by the world.
                planned_equals_ring::<f32>(43, world, sharding, o, shape);
            }
        }
    }
    planned_equals_ring::<f16>(50, 4, Sharding::Zigzag, &AttentionOptions::causal(), shape);
    planned_equals_ring::<bf16>(35, 3, Sharding::Stripe, &window(7), shape);
}

/// The torchrun-style bootstrap on 127.0.0.1: rank 0 hands its id to three other ranks
/// (bounded in time; no NCCL needed).
#[test]
fn bootstrap_shares_the_id_over_tcp() {
    use longattn::ring::comm::{Bootstrap, NCCL_ID_BYTES};
    use std::time::Duration;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let world = 4;
    let boot = |rank: usize| {
        let vars = [
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.to_string()),
        ];
        Bootstrap::from_vars(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
            .unwrap()
    };
    assert_eq!(boot(2).local_rank, 2);
    let id: [u8; NCCL_ID_BYTES] = std::array::from_fn(|i| (i * 7 + 3) as u8);
    let timeout = Duration::from_secs(20);
    let clients: Vec<_> = (1..world)
        .map(|r| {
            let b = boot(r);
            std::thread::spawn(move || b.fetch_id(timeout))
        })
        .collect();
    boot(0).serve_id(&listener, id, timeout).unwrap();
    for c in clients {
        assert_eq!(c.join().unwrap().unwrap(), id);
    }
}

/// Rank 0's server answers a peer that sends a rank outside the world, or closes after a
/// partial rank, with an error (no panic, no hang); a world of none or a non-zero rank
/// cannot serve.
#[test]
fn bootstrap_server_refuses_bad_peers() {
    use longattn::ring::comm::{Bootstrap, NCCL_ID_BYTES};
    use std::io::Write;
    use std::time::Duration;
    let id = [7u8; NCCL_ID_BYTES];
    let timeout = Duration::from_secs(20);
    let boot = |rank, world, port| Bootstrap {
        rank,
        world,
        local_rank: rank,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    for peer_sends in [&5u32.to_le_bytes()[..], &[1u8, 0][..]] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bytes = peer_sends.to_vec();
        let peer = std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(&bytes).unwrap();
            // Closing the connection ends a partial rank.
        });
        let served = boot(0, 2, port).serve_id(&listener, id, timeout);
        peer.join().unwrap();
        assert!(served.is_err(), "{peer_sends:?}: {served:?}");
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    for (rank, world) in [(0, 0), (1, 2)] {
        let served = boot(rank, world, 1).serve_id(&listener, id, Duration::from_millis(50));
        assert!(served.is_err(), "rank {rank} of {world}");
    }
}

#[test]
fn bootstrap_reads_torchrun_variables_and_rejects_bad_ones() {
    use longattn::ring::comm::Bootstrap;
    let get = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let b = Bootstrap::from_vars(get(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
    ]))
    .unwrap();
    assert_eq!(
        (b.rank, b.world, b.local_rank, b.master_port),
        (3, 8, 1, 29500)
    );
    assert_eq!(b.master_addr, "127.0.0.1");
    assert!(Bootstrap::from_vars(get(&[("RANK", "8"), ("WORLD_SIZE", "8")])).is_err());
    assert!(Bootstrap::from_vars(get(&[("WORLD_SIZE", "8")])).is_err());
    assert!(Bootstrap::from_vars(get(&[("RANK", "x"), ("WORLD_SIZE", "8")])).is_err());
    assert!(
        Bootstrap::from_vars(get(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_PORT", "70000")
        ]))
        .is_err()
    );
    // LONGATTN_RING_PORT (torchrun's store holds MASTER_PORT) wins over MASTER_PORT.
    let b = Bootstrap::from_vars(get(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_PORT", "29500"),
        ("LONGATTN_RING_PORT", "29517"),
    ]))
    .unwrap();
    assert_eq!(b.master_port, 29517);
    assert!(
        Bootstrap::from_vars(get(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LONGATTN_RING_PORT", "0")
        ]))
        .is_err()
    );
    // A rank that never gets an answer times out instead of hanging.
    let lonely = Bootstrap::from_vars(get(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_PORT", "9"),
    ]))
    .unwrap();
    assert!(
        lonely
            .fetch_id(std::time::Duration::from_millis(300))
            .is_err()
    );
}
