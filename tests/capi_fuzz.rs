//! Randomised robustness of the C API (`include/longattn.h`): every `extern "C"` entry point
//! gets thousands of seeded descriptors, tables and buffers, some valid, most of them one or
//! a few fields away from a valid case (sizes 0, 1, odd, near `usize`/`i32`/`i64` limits and
//! near overflow of their products, negative and zero strides, NULL pointers, buffers claimed
//! 1, half or all elements short, misaligned or overlapping outputs, bad dtype codes and
//! policy codes, varlen offsets, block tables and block masks with bad entries, NaN and
//! infinite scales). Every call must return `LONGATTN_OK` or a refusal code (1 to 9) with a
//! message from `longattn_last_error()`: never `LONGATTN_ERR_INTERNAL` (a caught panic; the
//! test profile has overflow checks on), never a crash, and within 2 s (an empty problem
//! declaring huge dims costs nothing). An `Ok` result is finite (an LSE may be `-inf`; with
//! FP8 scales near `f32::MAX / 448` scores may overflow into NaN rows, as documented), and a
//! dense or merge one equals the Rust API's bit for bit. The CUDA entry points get the same
//! arguments where no GPU is usable (here: always) and must refuse them.
//!
//! Buffers are sized from what the descriptor promises (the C side cannot know a pointer's
//! allocation): a claimed length never exceeds the storage behind the pointer, and a table
//! pointer (varlen offsets, block table, mask lists) holds the entries the descriptor
//! implies, or the descriptor's own arithmetic refuses it before it is read. The explicit
//! refusal cases live in `capi.rs`; the Rust API's sweep is `robustness.rs`.

mod common;

use common::rng;
use longattn::capi::*;
use longattn::*;
use rand::Rng;
use rand::rngs::SmallRng;
use std::ffi::{CStr, c_void};
use std::ptr;
use std::time::Instant;

/// The most elements a fuzzed buffer or table holds; a descriptor promising more gets a
/// small buffer (and must refuse it).
const CAP: usize = 1 << 14;

const USIZES: &[usize] = &[
    0,
    1,
    2,
    3,
    5,
    8,
    63,
    64,
    65,
    1 << 16,
    i32::MAX as usize,
    i32::MAX as usize + 1,
    u32::MAX as usize,
    1 << 32,
    (1 << 32) + 1,
    3_037_000_500,
    isize::MAX as usize / 4 + 1,
    isize::MAX as usize,
    isize::MAX as usize + 1,
    usize::MAX / 2 + 1,
    usize::MAX - 1,
    usize::MAX,
];
const I64S: &[i64] = &[
    0,
    1,
    -1,
    -2,
    2,
    3,
    7,
    64,
    i32::MAX as i64,
    i32::MIN as i64,
    i32::MAX as i64 + 1,
    1 << 32,
    -(1 << 32),
    1 << 62,
    i64::MAX,
    i64::MIN,
    i64::MIN + 1,
];
const I32S: &[i32] = &[
    0,
    1,
    -1,
    2,
    3,
    7,
    64,
    1 << 20,
    i32::MAX,
    i32::MAX - 1,
    i32::MIN,
    i32::MIN + 1,
];
const F32S: &[f32] = &[
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-45,
    f32::MIN_POSITIVE,
    1e30,
    f32::MAX,
    -f32::MAX,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::NAN,
    448.0,
    f32::MAX / 448.0,
    f32::MAX / 400.0,
];
const BAD_DTYPES: &[i32] = &[-1, 3, 4, 255, i32::MAX, i32::MIN];

/// A sweep's generator and case count: the fixed `seed` and `n` of CI, or, for longer hunts,
/// `seed` mixed with `LONGATTN_FUZZ_SEED` and `n` times `LONGATTN_FUZZ_SCALE` (a failure
/// prints its case number; rerun with the same variables to reproduce it).
fn sweep(seed: u64, n: u64) -> (SmallRng, u64) {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let extra = var("LONGATTN_FUZZ_SEED").unwrap_or(0);
    let scale = var("LONGATTN_FUZZ_SCALE").unwrap_or(1);
    (
        rng(seed ^ extra.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        n * scale,
    )
}

fn pick<T: Copy>(r: &mut SmallRng, xs: &[T]) -> T {
    xs[r.random_range(0..xs.len())]
}

fn eu(r: &mut SmallRng) -> usize {
    match r.random_bool(0.3) {
        true => r.random_range(0..10),
        false => pick(r, USIZES),
    }
}

fn ei64(r: &mut SmallRng) -> i64 {
    match r.random_bool(0.3) {
        true => r.random_range(-4..40),
        false => pick(r, I64S),
    }
}

fn ei32(r: &mut SmallRng) -> i32 {
    match r.random_bool(0.3) {
        true => r.random_range(-2..20),
        false => pick(r, I32S),
    }
}

/// One random entry of a non-empty table set to an edge value.
fn poke(r: &mut SmallRng, t: &mut [i32]) {
    if !t.is_empty() {
        let i = r.random_range(0..t.len());
        t[i] = ei32(r);
    }
}

fn last_error() -> String {
    // SAFETY: longattn_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(longattn_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A CPU call's status: OK with an empty message, or a refusal code with a message; never
/// `LONGATTN_ERR_INTERNAL`. Returns whether the call succeeded.
fn accept(st: i32, what: &str, case: u64) -> bool {
    let msg = last_error();
    assert!(
        (0..=9).contains(&st),
        "{what} case {case}: status {st} ({msg})"
    );
    if st == LONGATTN_OK {
        assert!(msg.is_empty(), "{what} case {case}: OK with message {msg}");
    } else {
        assert!(
            !msg.is_empty(),
            "{what} case {case}: status {st} without a message"
        );
    }
    st == LONGATTN_OK
}

/// A CPU call that took under 2 s: the problems here are small, or empty however large
/// their declared dims (work is bounded by the buffers, never by a dim alone).
fn quick(t0: Instant, what: &str, case: u64) {
    let took = t0.elapsed();
    assert!(
        took.as_secs_f64() < 2.0,
        "{what} case {case}: took {took:?}"
    );
}

/// A CUDA entry point without a usable GPU: a refusal with a message, never OK.
fn refused(st: i32, what: &str, case: u64) {
    assert!(
        !accept(st, what, case),
        "{what} case {case}: OK without a GPU"
    );
}

/// Whether the CUDA entry points are fuzzed: only where no GPU is usable, so that the
/// host pointers passed as device pointers are never dereferenced.
fn fuzz_cuda(test: &str) -> bool {
    let none = longattn::device::open_gpu(0).is_err();
    if !none {
        println!("{test}: a GPU is usable, the CUDA entry points are not fuzzed");
    }
    none
}

/// Element size of a `longattn_dtype` code (an unknown code: f32-sized buffers).
fn dtype_bytes(code: i32) -> usize {
    match code {
        1 | 2 => 2,
        _ => 4,
    }
}

/// How a buffer is filled: elements of a dtype code in [-1, 1), e4m3 codes, LSE values
/// (finite, sometimes -inf) or zeros (outputs).
#[derive(Debug, Clone, Copy)]
enum Fill {
    Elem(i32),
    Fp8,
    Lse,
    Zero(usize),
}

impl Fill {
    fn bytes(self) -> usize {
        match self {
            Fill::Elem(code) => dtype_bytes(code),
            Fill::Fp8 => 1,
            Fill::Lse => 4,
            Fill::Zero(b) => b,
        }
    }
}

/// One fuzzed host buffer: 8-byte aligned storage (or a view into another buffer's storage:
/// an overlapping output), a byte offset into it (1: misaligned), the claimed length in
/// elements (never more than the storage holds past the offset), strides, or NULL.
struct Buf {
    mem: Vec<u64>,
    es: usize,
    off: usize,
    len: usize,
    null: bool,
    at: Option<*mut u8>,
    strides: CStrides,
}

const NO_STRIDES: CStrides = CStrides {
    batch: 0,
    seq: 0,
    head: 0,
};

impl Buf {
    /// `need` elements (or a few when `need` is unknown or above [`CAP`]), sometimes claimed
    /// short, NULL or misaligned.
    fn new(r: &mut SmallRng, fill: Fill, need: Option<usize>, strides: CStrides) -> Buf {
        let fallback = r.random_range(0..64);
        let n = need.filter(|&n| n <= CAP).unwrap_or(fallback);
        let es = fill.bytes();
        let mut b = Buf {
            mem: vec![0u64; (n * es).div_ceil(8) + 1],
            es,
            off: 0,
            len: n,
            null: false,
            at: None,
            strides,
        };
        b.fill(r, fill);
        match r.random_range(0..100) {
            0..=2 => b.len = n.saturating_sub(1),
            3 => b.len = 0,
            4 => b.len = n / 2,
            5 => b.null = true,
            6 if es > 1 => b.off = 1,
            _ => {}
        }
        b
    }

    fn fill(&mut self, r: &mut SmallRng, fill: Fill) {
        let es = self.es;
        let mut bytes = Vec::with_capacity(self.mem.len() * 8);
        while bytes.len() + es <= self.mem.len() * 8 {
            let x: f32 = r.random_range(-1.0..1.0);
            match fill {
                Fill::Elem(1) => bytes.extend(f16::from_f32(x).to_bits().to_le_bytes()),
                Fill::Elem(2) => bytes.extend(bf16::from_f32(x).to_bits().to_le_bytes()),
                Fill::Elem(_) => bytes.extend(x.to_le_bytes()),
                Fill::Fp8 => bytes.push(F8E4M3::from_f32(2.0 * x).to_bits()),
                Fill::Lse => match r.random_bool(0.1) {
                    true => bytes.extend(f32::NEG_INFINITY.to_le_bytes()),
                    false => bytes.extend((4.0 * x).to_le_bytes()),
                },
                Fill::Zero(b) => bytes.extend(std::iter::repeat_n(0u8, b)),
            }
        }
        for (w, c) in self.mem.iter_mut().zip(bytes.chunks(8)) {
            let mut le = [0u8; 8];
            le[..c.len()].copy_from_slice(c);
            *w = u64::from_le_bytes(le);
        }
    }

    fn ptr(&mut self) -> *mut c_void {
        match (self.null, self.at) {
            (true, _) => ptr::null_mut(),
            (false, Some(p)) => p.cast(),
            (false, None) => self
                .mem
                .as_mut_ptr()
                .cast::<u8>()
                .wrapping_add(self.off)
                .cast(),
        }
    }

    /// Elements the storage holds past the pointer.
    fn cap(&self) -> usize {
        match self.at {
            Some(_) => self.len,
            None => (self.mem.len() * 8 - self.off) / self.es,
        }
    }

    fn t(&mut self) -> CTensor {
        CTensor {
            data: self.ptr(),
            len: self.len,
            strides: self.strides,
        }
    }

    fn tm(&mut self) -> CTensorMut {
        CTensorMut {
            data: self.ptr(),
            len: self.len,
            strides: self.strides,
        }
    }

    fn f32_ptr(&mut self) -> *mut f32 {
        self.ptr().cast()
    }

    /// `[start, end)` of the claimed bytes.
    fn range(&mut self) -> (usize, usize) {
        let p = self.ptr() as usize;
        (p, p + self.len * self.es)
    }

    /// The claimed elements as f32 (2-byte elements of `dtype` code 1: f16, else bf16).
    fn values(&mut self, dtype: i32) -> Vec<f32> {
        if self.null {
            return vec![];
        }
        let (len, es) = (self.len, self.es);
        // SAFETY: the pointer holds `len * es` initialised bytes (own or aliased storage).
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr().cast::<u8>(), len * es) };
        bytes
            .chunks_exact(es)
            .map(|c| match (es, dtype) {
                (2, 1) => f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
                (2, _) => bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
                (1, _) => F8E4M3::from_bits(c[0]).to_f32(),
                _ => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            })
            .collect()
    }

    /// After an OK call: every element passes `fine` (see [`FINITE`], [`LSE`], [`ANY`]).
    /// Not checked: a buffer placed in another's storage by [`alias`] (where the call does
    /// not write, it holds that buffer's bytes, of another type).
    fn check_written(&mut self, dtype: i32, fine: fn(f32) -> bool, what: &str, case: u64) {
        if self.at.is_some() {
            return;
        }
        for (i, x) in self.values(dtype).into_iter().enumerate() {
            assert!(fine(x), "{what} case {case}: element {i} is {x}");
        }
    }
}

/// An output of finite inputs within the output type's range.
const FINITE: fn(f32) -> bool = f32::is_finite;
/// An LSE: finite, or -inf for a row that sees no key.
const LSE: fn(f32) -> bool = |x| x.is_finite() || x == f32::NEG_INFINITY;
/// Any value: FP8 scales up to `f32::MAX / 448` let scores and sums overflow f32, and
/// overflowing scores give NaN rows (docs/semantics.md, "NaN and Inf policy").
const ANY: fn(f32) -> bool = |_| true;

/// Whether two claimed byte ranges share a byte.
fn meet(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Points `dst` into `src`'s storage (an output overlapping an input or another output),
/// claiming what fits there; returns whether the claimed ranges meet (the call must then
/// refuse).
fn alias(r: &mut SmallRng, dst: &mut Buf, src: &mut Buf) -> bool {
    if src.null {
        return false;
    }
    let room = src.mem.len() * 8;
    let off = r.random_range(0..room / dst.es) * dst.es;
    dst.null = false;
    dst.len = dst.len.min((room - off) / dst.es);
    dst.at = Some(src.mem.as_mut_ptr().cast::<u8>().wrapping_add(off));
    let d = dst.range();
    meet(d, src.range())
}

/// Elements `[batch, rows, heads, head_dim]` with these strides reach (None: a negative
/// stride or more than `usize`).
fn reach(s: CStrides, batch: usize, rows: usize, heads: usize, d: usize) -> Option<usize> {
    if batch == 0 || rows == 0 || heads == 0 || d == 0 {
        return Some(0);
    }
    if s.batch < 0 || s.seq < 0 || s.head < 0 {
        return None;
    }
    let term = |n: usize, st: i64| (n as i128 - 1).checked_mul(st as i128);
    let last = term(batch, s.batch)?
        .checked_add(term(rows, s.seq)?)?
        .checked_add(term(heads, s.head)?)?
        .checked_add(d as i128)?;
    usize::try_from(last).ok()
}

/// Strides of `[batch, rows, heads, head_dim]` with `pad` unused elements after each head.
fn contiguous(rows: usize, heads: usize, d: usize, pad: usize) -> CStrides {
    let s = Strides::contiguous(rows, heads, d + pad);
    CStrides {
        batch: s.batch,
        seq: s.seq,
        head: s.head,
    }
}

/// One strides field set to an edge value.
fn poke_strides(r: &mut SmallRng, s: &mut CStrides) {
    match r.random_range(0..3) {
        0 => s.batch = ei64(r),
        1 => s.seq = ei64(r),
        _ => s.head = ei64(r),
    }
}

/// A host table pointer for `t` when the call reads `need` entries: `t` grown (by `pad`) or
/// cut to `need`; any pointer when the call's own checks refuse `need` before reading (None:
/// it overflows; above `isize::MAX` bytes); NULL when `null` or when `need` is above [`CAP`].
fn wire<T: Copy>(
    r: &mut SmallRng,
    t: &mut Vec<T>,
    need: Option<usize>,
    null: bool,
    pad: impl Fn(&mut SmallRng) -> T,
) -> *const T {
    match need {
        _ if null => ptr::null(),
        None => t.as_ptr(),
        Some(n) if n > isize::MAX as usize / std::mem::size_of::<T>() => t.as_ptr(),
        Some(n) if n > CAP => ptr::null(),
        Some(n) => {
            while t.len() < n {
                let x = pad(r);
                t.push(x);
            }
            t.truncate(n);
            t.as_ptr()
        }
    }
}

fn small_or_edge(r: &mut SmallRng) -> i32 {
    match r.random_bool(0.7) {
        true => r.random_range(0..8),
        false => ei32(r),
    }
}

/// Offsets of sequences of `lens` elements.
fn offsets(lens: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &n in lens {
        cu.push(cu.last().unwrap() + n as i32);
    }
    cu
}

/// The last offset of a table (the packed rows it promises), 0 if negative or absent.
fn total(t: &[i32]) -> usize {
    t.last().copied().unwrap_or(0).max(0) as usize
}

/// `n` calls of `mutate` with `n` 0 (10%), 1 (60%) or 2 to 4.
fn mutations(r: &mut SmallRng, mut mutate: impl FnMut(&mut SmallRng)) {
    let n = match r.random_range(0..10) {
        0 => 0,
        1..=6 => 1,
        _ => r.random_range(2..=4),
    };
    for _ in 0..n {
        mutate(r);
    }
}

fn checked_product(xs: &[usize]) -> Option<usize> {
    xs.iter().try_fold(1usize, |a, &x| a.checked_mul(x))
}

fn random_options(r: &mut SmallRng) -> (f32, f32, i64, i64, usize) {
    let scale = match r.random_bool(0.7) {
        true => 0.0,
        false => r.random_range(0.05..1.0),
    };
    let softcap = match r.random_bool(0.8) {
        true => 0.0,
        false => r.random_range(2.0..30.0),
    };
    let (wl, wr) = match r.random_range(0..3) {
        0 => (-1, -1),
        1 => (r.random_range(0..6), -1),
        _ => (r.random_range(-1..6), r.random_range(-1..4)),
    };
    (scale, softcap, wl, wr, r.random_range(0..3))
}

// ---- Dense-shaped calls: dense, dense FP8, block-sparse, MoBA, neighborhood ----------------

/// The q, k, v, out and LSE buffers of one call, sized from the needs the descriptor implies,
/// with an output sometimes pointed into another buffer.
struct Qkv {
    q: Buf,
    k: Buf,
    v: Buf,
    out: Buf,
    lse: Buf,
    /// An output overlaps an input or the other output: the call must refuse.
    overlap: bool,
}

impl Qkv {
    /// `input`, `kv_input`: q and k, v elements; `out_dtype`; strides of q, k, v, out; elements q, k, v,
    /// out and the LSE need (None: unknown or too many).
    fn new(
        r: &mut SmallRng,
        (input, kv_input, out_dtype): (Fill, Fill, i32),
        strides: [CStrides; 4],
        mut needs: [Option<usize>; 5],
        lse: bool,
    ) -> Qkv {
        // Bounded work: a problem with many query and key elements gets small buffers (and
        // must refuse them).
        if needs[0].unwrap_or(0).saturating_mul(needs[1].unwrap_or(0)) > 1 << 22 {
            needs = [None; 5];
        }
        let [qs, ks, vs, os] = strides;
        let mut c = Qkv {
            q: Buf::new(r, input, needs[0], qs),
            k: Buf::new(r, kv_input, needs[1], ks),
            v: Buf::new(r, kv_input, needs[2], vs),
            out: Buf::new(r, Fill::Zero(dtype_bytes(out_dtype)), needs[3], os),
            lse: Buf::new(r, Fill::Zero(4), needs[4], NO_STRIDES),
            overlap: false,
        };
        c.lse.null = !lse || c.lse.null;
        c.overlap = match r.random_range(0..100) {
            0 => alias(r, &mut c.out, &mut c.q),
            1 => alias(r, &mut c.out, &mut c.v),
            2 if lse => alias(r, &mut c.lse, &mut c.k),
            3 if lse => alias(r, &mut c.lse, &mut c.out),
            _ => false,
        };
        c
    }

    fn args(&mut self) -> (CTensor, CTensor, CTensor, CTensorMut, *mut f32, usize) {
        (
            self.q.t(),
            self.k.t(),
            self.v.t(),
            self.out.tm(),
            self.lse.f32_ptr(),
            self.lse.len,
        )
    }

    /// After an OK call: no overlap was missed, the output is finite and the LSE finite or
    /// -inf (anything with `extreme` FP8 scales).
    fn check_ok(&mut self, out_dtype: i32, extreme: bool, what: &str, case: u64) {
        assert!(
            !self.overlap,
            "{what} case {case}: overlapping output accepted"
        );
        let (out, lse) = if extreme { (ANY, ANY) } else { (FINITE, LSE) };
        self.out.check_written(out_dtype, out, what, case);
        self.lse.check_written(0, lse, what, case);
    }
}

#[derive(Debug, Clone)]
struct DenseCase {
    d: CDenseDesc,
    cu: Option<[Vec<i32>; 2]>,
    cu_null: [bool; 2],
    dtype: i32,
    strides: [CStrides; 4],
    lse: bool,
    null_desc: bool,
}

fn dense_valid(r: &mut SmallRng) -> DenseCase {
    let hkv = r.random_range(1..=2);
    let hq = hkv * r.random_range(1..=2);
    let d = pick(r, &[1, 2, 3, 4, 8, 16]);
    let batch = r.random_range(1..=3);
    let (sq, sk) = (r.random_range(1..=6), r.random_range(0..=8));
    let cu = r.random_bool(0.3).then(|| {
        let lq: Vec<usize> = (0..batch).map(|_| r.random_range(0..=5)).collect();
        let lk: Vec<usize> = (0..batch).map(|_| r.random_range(0..=7)).collect();
        [offsets(&lq), offsets(&lk)]
    });
    let (rq, rk) = match &cu {
        Some(c) => (total(&c[0]), total(&c[1])),
        None => (sq, sk),
    };
    let pad = if r.random_bool(0.2) {
        r.random_range(1..=3)
    } else {
        0
    };
    let (qs, ks) = (contiguous(rq, hq, d, pad), contiguous(rk, hkv, d, pad));
    let (scale, softcap, window_left, window_right, sinks) = random_options(r);
    DenseCase {
        d: CDenseDesc {
            batch,
            heads_q: hq,
            heads_kv: hkv,
            head_dim: d,
            seqlen_q: sq,
            seqlen_k: sk,
            cu_seqlens_q: ptr::null(),
            cu_seqlens_k: ptr::null(),
            scale,
            softcap,
            window_left,
            window_right,
            causal: r.random_range(0..2),
            sinks,
        },
        cu,
        cu_null: [false; 2],
        dtype: r.random_range(0..3),
        strides: [qs, ks, ks, qs],
        lse: r.random_bool(0.7),
        null_desc: false,
    }
}

fn mutate_dense(r: &mut SmallRng, c: &mut DenseCase) {
    let d = &mut c.d;
    match r.random_range(0..25) {
        0 => d.batch = eu(r),
        1 => d.heads_q = eu(r),
        2 => d.heads_kv = eu(r),
        3 => d.head_dim = eu(r),
        4 => d.seqlen_q = eu(r),
        5 => d.seqlen_k = eu(r),
        6 | 7 => match &mut c.cu {
            Some(cu) => {
                let i = r.random_range(0..2);
                poke(r, &mut cu[i])
            }
            None => c.cu = Some([vec![0, 2], vec![0, 3]]),
        },
        8 => c.cu_null[r.random_range(0..2)] = true,
        9 => d.scale = pick(r, F32S),
        10 => d.softcap = pick(r, F32S),
        11 => d.window_left = ei64(r),
        12 => d.window_right = ei64(r),
        13 => d.causal = ei32(r),
        14 => d.sinks = eu(r),
        15 => c.dtype = pick(r, BAD_DTYPES),
        16..=19 => {
            let i = r.random_range(0..4);
            poke_strides(r, &mut c.strides[i])
        }
        20 => c.lse = !c.lse,
        21 => c.null_desc = true,
        22 => {
            // An empty problem declaring many heads: must cost nothing.
            d.heads_q = pick(r, &[1 << 20, i32::MAX as usize - 1, i32::MAX as usize]);
            d.heads_kv = if r.random_bool(0.5) { 1 } else { d.heads_q / 2 };
            match &mut c.cu {
                Some(cu) => cu[0].iter_mut().for_each(|x| *x = 0),
                None => d.seqlen_q = 0,
            }
        }
        _ => c.cu = None,
    }
}

/// The descriptor with its varlen tables wired (see [`wire`]).
fn wire_dense(r: &mut SmallRng, c: &mut DenseCase) -> CDenseDesc {
    let mut d = c.d;
    if let Some(cu) = &mut c.cu {
        let need = d.batch.checked_add(1);
        d.cu_seqlens_q = wire(r, &mut cu[0], need, c.cu_null[0], small_or_edge);
        d.cu_seqlens_k = wire(r, &mut cu[1], need, c.cu_null[1], small_or_edge);
    }
    d
}

fn desc_ptr<T>(d: &T, null: bool) -> *const T {
    match null {
        true => ptr::null(),
        false => d,
    }
}

/// Whether a problem's declared work (query rows x keys x heads x head_dim) is small enough
/// to run: zero strides let tiny buffers describe a valid problem of any size, which is only
/// slow (the CUDA entry points still get it).
fn affordable(dims: &[usize]) -> bool {
    checked_product(dims).is_some_and(|w| w <= 1 << 26)
}

/// Elements q, k, v, out and the LSE of a wired dense descriptor need, and whether its
/// declared work is [`affordable`].
fn dense_needs(d: &CDenseDesc, c: &DenseCase) -> ([Option<usize>; 5], bool) {
    let varlen = !d.cu_seqlens_q.is_null() && !d.cu_seqlens_k.is_null();
    let (b, rq, rk) = match (&c.cu, varlen) {
        (Some(cu), true) => (1, total(&cu[0]), total(&cu[1])),
        _ => (d.batch, d.seqlen_q, d.seqlen_k),
    };
    let [qs, ks, vs, os] = c.strides;
    let (hq, hkv, hd) = (d.heads_q, d.heads_kv, d.head_dim);
    let needs = [
        reach(qs, b, rq, hq, hd),
        reach(ks, b, rk, hkv, hd),
        reach(vs, b, rk, hkv, hd),
        reach(os, b, rq, hq, hd),
        checked_product(&[b, hq, rq]),
    ];
    // Varlen: every sequence's rows and keys are at most the totals.
    (needs, affordable(&[b, rq, rk, hq, hd]))
}

/// The Rust API on the same input as an OK dense C call: its output and LSE as f32.
fn rust_dense<T: Element>(d: &CDenseDesc, c: &DenseCase, b: &mut Qkv) -> (Vec<f32>, Vec<f32>) {
    let seqlens = match (&c.cu, d.cu_seqlens_q.is_null()) {
        (Some(cu), false) => SeqLens::Varlen {
            cu_seqlens_q: &cu[0],
            cu_seqlens_k: &cu[1],
        },
        _ => SeqLens::Fixed {
            seqlen_q: d.seqlen_q,
            seqlen_k: d.seqlen_k,
        },
    };
    let shape = AttentionShape {
        batch: d.batch,
        heads_q: d.heads_q,
        heads_kv: d.heads_kv,
        head_dim: d.head_dim,
        seqlens,
    };
    let mut options = AttentionOptions::default()
        .with_window(Window::from_flash(d.window_left, d.window_right).unwrap())
        .with_causal(d.causal != 0)
        .with_sinks(d.sinks);
    if d.scale != 0.0 {
        options = options.with_scale(d.scale);
    }
    if d.softcap != 0.0 {
        options = options.with_softcap(d.softcap);
    }
    let attn = FlashAttention::new(&shape, &options).unwrap();
    let slice = |b: &mut Buf| -> Vec<T> {
        // SAFETY: `len` initialised elements of `T` (the C call accepted them).
        unsafe { std::slice::from_raw_parts(b.ptr().cast::<T>(), b.len) }.to_vec()
    };
    let (q, k, v) = (slice(&mut b.q), slice(&mut b.k), slice(&mut b.v));
    let mut out = vec![T::from_f32(0.0); b.out.len];
    let mut lse = vec![0f32; if b.lse.null { 0 } else { b.lse.len }];
    let st = |x: CStrides| Strides {
        batch: x.batch,
        seq: x.seq,
        head: x.head,
    };
    attn.forward_cpu(
        Strided::new(&q[..], st(b.q.strides)),
        Strided::new(&k[..], st(b.k.strides)),
        Strided::new(&v[..], st(b.v.strides)),
        Strided::new(&mut out[..], st(b.out.strides)),
        (!b.lse.null).then_some(&mut lse[..]),
    )
    .unwrap();
    (out.iter().map(|x| x.to_f32()).collect(), lse)
}

/// Which dense-shaped entry point a sweep calls.
#[derive(Debug, Clone, Copy, PartialEq)]
enum DenseEntry {
    Dense,
    Fp8,
    BlockSparse,
    Moba,
}

#[derive(Debug, Clone)]
struct MaskCase {
    m: CBlockMask,
    offsets: Vec<i32>,
    indices: Vec<i32>,
    full: Option<Vec<u8>>,
    null: [bool; 3],
}

/// A valid block mask for a dense case: per-list random sorted key blocks.
fn mask_valid(r: &mut SmallRng, c: &DenseCase) -> MaskCase {
    let (mq, mk) = match &c.cu {
        Some(cu) => {
            let max = |t: &[i32]| t.windows(2).map(|w| (w[1] - w[0]) as usize).max();
            (max(&cu[0]).unwrap_or(0), max(&cu[1]).unwrap_or(0))
        }
        None => (c.d.seqlen_q, c.d.seqlen_k),
    };
    let (bm, bn) = (r.random_range(1..=4), r.random_range(1..=5));
    let batch = if r.random_bool(0.5) { 1 } else { c.d.batch };
    let heads = if r.random_bool(0.5) { 1 } else { c.d.heads_q };
    let (nqb, nkb) = (mq.div_ceil(bm), mk.div_ceil(bn));
    let mut offsets = vec![0];
    let mut indices = vec![];
    for _ in 0..batch * heads * nqb {
        indices.extend((0..nkb as i32).filter(|_| r.random_bool(0.6)));
        offsets.push(indices.len() as i32);
    }
    let full = r
        .random_bool(0.6)
        .then(|| indices.iter().map(|_| r.random_range(0..2)).collect());
    MaskCase {
        m: CBlockMask {
            batch,
            heads,
            num_q_blocks: nqb,
            num_k_blocks: nkb,
            block_m: bm,
            block_n: bn,
            offsets: ptr::null(),
            indices: ptr::null(),
            full: ptr::null(),
            nnz: indices.len(),
        },
        offsets,
        indices,
        full,
        null: [false; 3],
    }
}

fn mutate_mask(r: &mut SmallRng, c: &mut MaskCase) {
    let m = &mut c.m;
    match r.random_range(0..17) {
        0 => m.batch = eu(r),
        1 => m.heads = eu(r),
        2 => m.num_q_blocks = eu(r),
        3 => m.num_k_blocks = eu(r),
        4 => m.block_m = eu(r),
        5 => m.block_n = eu(r),
        6 => m.nnz = eu(r),
        7 | 8 => poke(r, &mut c.offsets),
        9 | 10 => poke(r, &mut c.indices),
        11 => {
            c.full = match c.full {
                Some(_) => None,
                None => Some(vec![1; c.indices.len()]),
            }
        }
        12..=14 => c.null[r.random_range(0..3)] = true,
        15 if c.indices.len() >= 2 => {
            // Unsorted or duplicated entries.
            let i = r.random_range(1..c.indices.len());
            c.indices[i] = c.indices[i - 1].wrapping_sub(r.random_range(0..2));
        }
        _ => m.nnz = m.nnz.wrapping_add(1),
    }
}

/// The mask with its tables wired; its address (NULL when `null[2]`).
fn wire_mask(r: &mut SmallRng, c: &mut MaskCase) -> CBlockMask {
    let mut m = c.m;
    let lists = checked_product(&[m.batch, m.heads, m.num_q_blocks]);
    let lists = lists.filter(|&n| n <= i32::MAX as usize);
    m.offsets = wire(
        r,
        &mut c.offsets,
        lists.map(|n| n + 1),
        c.null[0],
        small_or_edge,
    );
    m.indices = wire(r, &mut c.indices, Some(m.nnz), c.null[1], small_or_edge);
    if let Some(full) = &mut c.full {
        m.full = wire(r, full, Some(m.nnz), false, |r| r.random_range(0..3));
    }
    m
}

/// One dense-shaped sweep: `n` random cases through `entry`'s CPU call (an OK dense one
/// compared with the Rust API) and, without a GPU, its CUDA call.
fn dense_sweep(entry: DenseEntry, seed: u64, n: u64) {
    let what = format!("{entry:?}");
    let cuda = fuzz_cuda(&what);
    let (mut r, n) = sweep(seed, n);
    let mut oks = 0;
    for case in 0..n {
        let mut c = dense_valid(&mut r);
        if entry == DenseEntry::Fp8 {
            c.dtype = r.random_range(1..3);
        }
        let mut mask = mask_valid(&mut r, &c);
        let mut moba = CMobaConfig {
            block_n: r.random_range(1..=4),
            top_k: r.random_range(1..=4),
        };
        let mut descales: [Vec<f32>; 3] =
            std::array::from_fn(|_| (0..c.d.batch * c.d.heads_kv).map(|_| 0.5).collect());
        let mut descale_null = [false; 3];
        mutations(&mut r, |r| match (entry, r.random_range(0..4)) {
            (DenseEntry::BlockSparse, 0) => mutate_mask(r, &mut mask),
            (DenseEntry::Moba, 0) => match r.random_bool(0.5) {
                true => moba.block_n = eu(r),
                false => moba.top_k = eu(r),
            },
            (DenseEntry::Fp8, 0) => match r.random_range(0..3) {
                0 => descale_null[r.random_range(0..3)] = true,
                _ => {
                    let t = &mut descales[r.random_range(0..3)];
                    if !t.is_empty() {
                        let i = r.random_range(0..t.len());
                        t[i] = pick(r, F32S);
                    }
                }
            },
            _ => mutate_dense(r, &mut c),
        });
        let d = wire_dense(&mut r, &mut c);
        let dp = desc_ptr(&d, c.null_desc);
        let m = wire_mask(&mut r, &mut mask);
        let mp = desc_ptr(&m, mask.null[2]);
        let input = match entry {
            DenseEntry::Fp8 => Fill::Fp8,
            _ => Fill::Elem(c.dtype),
        };
        let (needs, run_cpu) = dense_needs(&d, &c);
        let mut b = Qkv::new(&mut r, (input, input, c.dtype), c.strides, needs, c.lse);
        let dn = checked_product(&[d.batch, d.heads_kv]);
        let ds: [*const f32; 3] =
            std::array::from_fn(|i| wire(&mut r, &mut descales[i], dn, descale_null[i], |_| 1.0));
        let ds = CFp8Descales {
            q: ds[0],
            k: ds[1],
            v: ds[2],
        };
        let (mut ol, mut ll) = (0, 0);
        // SAFETY (every call below): the descriptor's tables and the buffers hold what they
        // claim (see `wire` and `Buf`).
        accept(
            unsafe { longattn_dense_sizes(dp, &mut ol, &mut ll) },
            "dense_sizes",
            case,
        );
        let (q, k, v, out, lse, lse_len) = b.args();
        let t0 = Instant::now();
        let st = match run_cpu {
            false => LONGATTN_OK, // not run (see `affordable`)
            true => unsafe {
                match entry {
                    DenseEntry::Dense => {
                        longattn_dense_forward_cpu(dp, c.dtype, q, k, v, out, lse, lse_len)
                    }
                    DenseEntry::Fp8 => {
                        longattn_dense_fp8_forward_cpu(dp, c.dtype, q, k, v, ds, out, lse, lse_len)
                    }
                    DenseEntry::BlockSparse => longattn_block_sparse_forward_cpu(
                        dp, mp, c.dtype, q, k, v, out, lse, lse_len,
                    ),
                    DenseEntry::Moba => {
                        longattn_moba_forward_cpu(dp, moba, c.dtype, q, k, v, out, lse, lse_len)
                    }
                }
            },
        };
        quick(t0, &what, case);
        if run_cpu && accept(st, &what, case) {
            oks += 1;
            let ctx = format!("{what} {d:?} descales {descales:?} moba {moba:?} {m:?}");
            let huge = descales.iter().flatten().any(|&x| x > 1e4);
            b.check_ok(c.dtype, huge, &ctx, case);
            // (An output in another buffer's storage starts with that buffer's bytes where
            // the strides leave gaps: compared only when in its own zeroed storage.)
            if entry == DenseEntry::Dense && b.out.at.is_none() && b.lse.at.is_none() {
                let (want_out, want_lse) = match c.dtype {
                    0 => rust_dense::<f32>(&d, &c, &mut b),
                    1 => rust_dense::<f16>(&d, &c, &mut b),
                    _ => rust_dense::<bf16>(&d, &c, &mut b),
                };
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&b.out.values(c.dtype)), bits(&want_out), "case {case}");
                assert_eq!(bits(&b.lse.values(0)), bits(&want_lse), "case {case}");
            }
        }
        if cuda {
            let (dev, stream) = (r.random_range(-1..2), ptr::null_mut());
            let st = unsafe {
                match entry {
                    DenseEntry::Dense => longattn_dense_forward_cuda(
                        dp, c.dtype, q, k, v, out, lse, lse_len, dev, stream,
                    ),
                    DenseEntry::Fp8 => longattn_dense_fp8_forward_cuda(
                        dp, c.dtype, q, k, v, ds, out, lse, lse_len, dev, stream,
                    ),
                    DenseEntry::BlockSparse => longattn_block_sparse_forward_cuda(
                        dp, mp, c.dtype, q, k, v, out, lse, lse_len, dev, stream,
                    ),
                    DenseEntry::Moba => longattn_moba_forward_cuda(
                        dp, moba, c.dtype, q, k, v, out, lse, lse_len, dev, stream,
                    ),
                }
            };
            refused(st, &what, case);
        }
    }
    println!("{what}: {oks} of {n} cases OK");
    assert!(oks * 20 > n, "{what}: too few valid cases ({oks} of {n})");
}

#[test]
fn c_api_fuzz_dense() {
    dense_sweep(DenseEntry::Dense, 0xD0, 30000);
}

#[test]
fn c_api_fuzz_dense_fp8() {
    dense_sweep(DenseEntry::Fp8, 0xF8, 20000);
}

#[test]
fn c_api_fuzz_block_sparse() {
    dense_sweep(DenseEntry::BlockSparse, 0xB5, 30000);
}

#[test]
fn c_api_fuzz_moba() {
    dense_sweep(DenseEntry::Moba, 0x30BA, 20000);
}

// ---- Neighborhood ----------------------------------------------------------------------------

#[test]
fn c_api_fuzz_neighborhood() {
    let cuda = fuzz_cuda("neighborhood");
    let (mut r, n) = sweep(0x4A, 30000);
    let mut oks = 0;
    for case in 0..n {
        let hkv = r.random_range(1..=2);
        let hd = pick(&mut r, &[1, 2, 4, 8, 16]);
        let mut d = CNeighborhoodDesc {
            batch: r.random_range(1..=2),
            heads_q: hkv * r.random_range(1..=2),
            heads_kv: hkv,
            head_dim: hd,
            rank: r.random_range(1..=3),
            dims: std::array::from_fn(|_| {
                let length = r.random_range(1..=5);
                let kernel = r.random_range(1..=length);
                let dilation = r.random_range(1..=length / kernel);
                let causal = r.random_range(0..2);
                let stride = match causal {
                    0 => r.random_range(0..=kernel),
                    _ => 1,
                };
                CNeighborhoodDim {
                    length,
                    kernel,
                    dilation,
                    stride,
                    causal,
                }
            }),
            scale: 0.0,
            softcap: 0.0,
        };
        let mut dtype = r.random_range(0..3);
        let mut lse = r.random_bool(0.7);
        let mut null_desc = false;
        let tokens = |d: &CNeighborhoodDesc| {
            let lens: Vec<usize> = d.dims[..d.rank.min(3)].iter().map(|x| x.length).collect();
            checked_product(&lens)
        };
        let t0 = tokens(&d).unwrap();
        let mut strides = [
            contiguous(t0, d.heads_q, hd, 0),
            contiguous(t0, hkv, hd, 0),
            contiguous(t0, hkv, hd, 0),
            contiguous(t0, d.heads_q, hd, 0),
        ];
        mutations(&mut r, |r| match r.random_range(0..16) {
            0 => d.batch = eu(r),
            1 => d.heads_q = eu(r),
            2 => d.heads_kv = eu(r),
            3 => d.head_dim = eu(r),
            4 => d.rank = eu(r),
            5..=9 => {
                let x = &mut d.dims[r.random_range(0..3)];
                match r.random_range(0..5) {
                    0 => x.length = eu(r),
                    1 => x.kernel = eu(r),
                    2 => x.dilation = eu(r),
                    3 => x.stride = eu(r),
                    _ => x.causal = ei32(r),
                }
            }
            10 => d.scale = pick(r, F32S),
            11 => d.softcap = pick(r, F32S),
            12 => dtype = pick(r, BAD_DTYPES),
            13 => lse = !lse,
            14 => null_desc = true,
            _ => {
                let i = r.random_range(0..4);
                poke_strides(r, &mut strides[i])
            }
        });
        let t = tokens(&d).unwrap_or(usize::MAX);
        let (b, hq, hkv, hd) = (d.batch, d.heads_q, d.heads_kv, d.head_dim);
        let needs = [
            reach(strides[0], b, t, hq, hd),
            reach(strides[1], b, t, hkv, hd),
            reach(strides[2], b, t, hkv, hd),
            reach(strides[3], b, t, hq, hd),
            checked_product(&[b, hq, t]),
        ];
        let mut work = vec![b, t, hq, hd];
        work.extend(d.dims[..d.rank.min(3)].iter().map(|x| x.kernel));
        let run_cpu = affordable(&work);
        let fill = Fill::Elem(dtype);
        let mut bufs = Qkv::new(&mut r, (fill, fill, dtype), strides, needs, lse);
        let dp = desc_ptr(&d, null_desc);
        let (mut ol, mut ll) = (0, 0);
        // SAFETY (all calls): buffers hold what they claim.
        accept(
            unsafe { longattn_neighborhood_sizes(dp, &mut ol, &mut ll) },
            "neighborhood_sizes",
            case,
        );
        let (q, k, v, out, l, ln) = bufs.args();
        let t0 = Instant::now();
        let st = match run_cpu {
            // SAFETY: buffers hold what they claim.
            true => unsafe { longattn_neighborhood_forward_cpu(dp, dtype, q, k, v, out, l, ln) },
            false => LONGATTN_OK, // not run (see `affordable`)
        };
        quick(t0, "neighborhood", case);
        if run_cpu && accept(st, "neighborhood", case) {
            oks += 1;
            bufs.check_ok(dtype, false, "neighborhood", case);
        }
        if cuda {
            let st = unsafe {
                longattn_neighborhood_forward_cuda(
                    dp,
                    dtype,
                    q,
                    k,
                    v,
                    out,
                    l,
                    ln,
                    0,
                    ptr::null_mut(),
                )
            };
            refused(st, "neighborhood_cuda", case);
        }
    }
    println!("neighborhood: {oks} of {n} cases OK");
    assert!(oks * 20 > n, "too few valid cases ({oks} of {n})");
}

// ---- Paged: decode (plain, FP8, policies), prefill, append -----------------------------------

#[derive(Debug, Clone)]
struct PagedCase {
    d: CPagedDesc,
    table: Vec<i32>,
    seqlens: Vec<i32>,
    /// block_table, seqlens_k, the descriptor itself, cu_seqlens (q or new)
    null: [bool; 4],
    dtype: i32,
    strides: [CStrides; 2],
    lse: bool,
    /// Prefill's varlen query offsets or append's new-token offsets.
    cu: Option<Vec<i32>>,
    scales: [Vec<f32>; 2],
    scale_null: [bool; 2],
}

/// A valid paged case: pages handed out in a shuffled order, sequences of up to
/// `max_pages_per_seq` pages, `q_len` new tokens each (or varlen prefill rows when `varlen`).
fn paged_valid(r: &mut SmallRng, varlen: bool) -> PagedCase {
    let ps = pick(r, &[1, 2, 3, 4, 8]);
    let hkv = r.random_range(1..=2);
    let hq = hkv * r.random_range(1..=2);
    let hd = pick(r, &[1, 2, 4, 8, 16]);
    let (batch, mpps) = (r.random_range(1..=3), r.random_range(1..=3));
    let num_pages = batch * mpps + r.random_range(0..=2);
    let mut perm: Vec<i32> = (0..num_pages as i32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, r.random_range(0..=i));
    }
    let q_len = r.random_range(1..=(mpps * ps).min(2));
    let seqlens: Vec<i32> = (0..batch)
        .map(|_| r.random_range(q_len..=mpps * ps) as i32)
        .collect();
    let cu = varlen.then(|| {
        let lens: Vec<usize> = seqlens
            .iter()
            .map(|&s| r.random_range(0..=(s as usize).min(4)))
            .collect();
        offsets(&lens)
    });
    let rows = cu.as_deref().map_or(q_len, total);
    let pad = if r.random_bool(0.2) { 1 } else { 0 };
    let qs = contiguous(rows, hq, hd, pad);
    let (scale, softcap, window_left, window_right, sinks) = random_options(r);
    PagedCase {
        d: CPagedDesc {
            num_pages,
            page_size: ps,
            heads_kv: hkv,
            head_dim: hd,
            batch,
            block_table: ptr::null(),
            max_pages_per_seq: mpps,
            seqlens_k: ptr::null(),
            heads_q: hq,
            q_len,
            scale,
            softcap,
            window_left,
            window_right,
            sinks,
        },
        table: perm[..batch * mpps].to_vec(),
        seqlens,
        null: [false; 4],
        dtype: r.random_range(0..3),
        strides: [qs, qs],
        lse: r.random_bool(0.7),
        cu,
        scales: std::array::from_fn(|_| (0..hkv).map(|_| r.random_range(0.01..2.0)).collect()),
        scale_null: [false; 2],
    }
}

fn mutate_paged(r: &mut SmallRng, c: &mut PagedCase) {
    let d = &mut c.d;
    match r.random_range(0..29) {
        0 => d.num_pages = eu(r),
        1 => d.page_size = eu(r),
        2 => d.heads_kv = eu(r),
        3 => d.head_dim = eu(r),
        4 => d.batch = eu(r),
        5 => d.max_pages_per_seq = eu(r),
        6 => d.heads_q = eu(r),
        7 => d.q_len = eu(r),
        8 => d.scale = pick(r, F32S),
        9 => d.softcap = pick(r, F32S),
        10 => d.window_left = ei64(r),
        11 => d.window_right = ei64(r),
        12 => d.sinks = eu(r),
        13 | 14 => poke(r, &mut c.table),
        15 | 16 => poke(r, &mut c.seqlens),
        17 => c.null[r.random_range(0..4)] = true,
        18 => c.dtype = pick(r, BAD_DTYPES),
        19 | 20 => {
            let i = r.random_range(0..2);
            poke_strides(r, &mut c.strides[i])
        }
        21 => c.lse = !c.lse,
        22 | 23 => match &mut c.cu {
            Some(cu) => poke(r, cu),
            None => c.cu = Some(vec![0, 1]),
        },
        24 => c.scale_null[r.random_range(0..2)] = true,
        25 => {
            let s = &mut c.scales[r.random_range(0..2)];
            if !s.is_empty() {
                let i = r.random_range(0..s.len());
                s[i] = pick(r, F32S);
            }
        }
        27 => {
            // An empty step declaring many query heads: must cost nothing.
            d.heads_q = pick(r, &[1 << 20, i32::MAX as usize - 1, i32::MAX as usize]);
            d.q_len = 0;
            if let Some(cu) = &mut c.cu {
                cu.iter_mut().for_each(|x| *x = 0);
            }
        }
        26 if !c.table.is_empty() => {
            // Two sequences (or two slots) on one page.
            let i = r.random_range(0..c.table.len());
            c.table[i] = c.table[0];
        }
        _ => c.cu = None,
    }
}

/// The descriptor with its tables wired; also the varlen/new-token offsets (NULL when absent)
/// and the FP8 scales (read before the descriptor is validated: `heads_kv` of them when at
/// most `u16::MAX`).
fn wire_paged(r: &mut SmallRng, c: &mut PagedCase) -> (CPagedDesc, *const i32, [*const f32; 2]) {
    let mut d = c.d;
    let entries = d.batch.checked_mul(d.max_pages_per_seq);
    d.block_table = wire(r, &mut c.table, entries, c.null[0], small_or_edge);
    d.seqlens_k = wire(r, &mut c.seqlens, Some(d.batch), c.null[1], small_or_edge);
    let cu = match &mut c.cu {
        Some(cu) => wire(r, cu, d.batch.checked_add(1), c.null[3], small_or_edge),
        None => ptr::null(),
    };
    let hkv = Some(d.heads_kv).filter(|&h| h <= u16::MAX as usize);
    let scales = [0, 1].map(|i| wire(r, &mut c.scales[i], hkv, c.scale_null[i], |_| 1.0));
    (d, cu, scales)
}

/// Elements one cache buffer and one Quest metadata buffer of a descriptor hold.
fn cache_needs(d: &CPagedDesc) -> (Option<usize>, Option<usize>) {
    (
        checked_product(&[d.num_pages, d.page_size, d.heads_kv, d.head_dim]),
        checked_product(&[d.num_pages, d.heads_kv, d.head_dim]),
    )
}

/// Which paged entry point a case calls.
#[derive(Debug, Clone, Copy)]
enum PagedEntry {
    Decode,
    DecodeFp8,
    Policy,
    PolicyFp8,
    Prefill,
}

#[test]
fn c_api_fuzz_paged() {
    let cuda = fuzz_cuda("paged");
    let (mut r, n) = sweep(0x9A6E, 60000);
    let entries = [
        PagedEntry::Decode,
        PagedEntry::DecodeFp8,
        PagedEntry::Policy,
        PagedEntry::PolicyFp8,
        PagedEntry::Prefill,
    ];
    let mut oks = [0usize; 5];
    for case in 0..n {
        let e = r.random_range(0..entries.len());
        let entry = entries[e];
        let fp8 = matches!(entry, PagedEntry::DecodeFp8 | PagedEntry::PolicyFp8);
        let prefill = matches!(entry, PagedEntry::Prefill);
        let varlen = prefill && r.random_bool(0.4);
        let mut c = paged_valid(&mut r, varlen);
        let hkv = c.d.heads_kv;
        let mut codes: Vec<i32> = (0..hkv).map(|_| r.random_range(0..3)).collect();
        let mut pol = CDecodePolicy {
            heads: ptr::null(),
            streaming_sinks: r.random_range(0..3),
            streaming_window: r.random_range(1..6),
            quest_token_budget: r.random_range(1..12),
            quest_sink_pages: r.random_range(0..2),
            kmin: ptr::null(),
            kmax: ptr::null(),
            meta_len: 0,
        };
        let mut meta_on = [r.random_bool(0.7); 2];
        let mut codes_null = false;
        mutations(&mut r, |r| match r.random_range(0..5) {
            0 if matches!(entry, PagedEntry::Policy | PagedEntry::PolicyFp8) => {
                match r.random_range(0..7) {
                    0 | 1 => poke(r, &mut codes),
                    2 => pol.streaming_sinks = eu(r),
                    3 => pol.streaming_window = eu(r),
                    4 => pol.quest_token_budget = eu(r),
                    5 => pol.quest_sink_pages = eu(r),
                    _ => match r.random_bool(0.5) {
                        true => meta_on[r.random_range(0..2)] ^= true,
                        false => codes_null = true,
                    },
                }
            }
            _ => mutate_paged(r, &mut c),
        });
        let (d, cu, [ks, vs]) = wire_paged(&mut r, &mut c);
        let dp = desc_ptr(&d, c.null[2]);
        let (cache_need, meta_need) = cache_needs(&d);
        let (b, hq, hd) = (d.batch, d.heads_q, d.head_dim);
        let (qb, rows) = match (&c.cu, cu.is_null()) {
            (Some(t), false) if prefill => (1, total(t)),
            _ => (b, d.q_len),
        };
        let needs = [
            reach(c.strides[0], qb, rows, hq, hd),
            cache_need,
            cache_need,
            reach(c.strides[1], qb, rows, hq, hd),
            checked_product(&[qb, hq, rows]),
        ];
        let kv_fill = match fp8 {
            true => Fill::Fp8,
            false => Fill::Elem(c.dtype),
        };
        let fills = (Fill::Elem(c.dtype), kv_fill, c.dtype);
        let strides = [c.strides[0], NO_STRIDES, NO_STRIDES, c.strides[1]];
        let mut bufs = Qkv::new(&mut r, fills, strides, needs, c.lse);
        let mut kmin = Buf::new(&mut r, kv_fill, meta_need, NO_STRIDES);
        let mut kmax = Buf::new(&mut r, kv_fill, meta_need, NO_STRIDES);
        kmin.null |= !meta_on[0];
        kmax.null |= !meta_on[1];
        pol.kmin = kmin.ptr();
        pol.kmax = kmax.ptr();
        pol.meta_len = kmin.len.min(kmax.cap());
        pol.heads = wire(
            &mut r,
            &mut codes,
            Some(d.heads_kv),
            codes_null,
            small_or_edge,
        );
        let pp = &pol as *const CDecodePolicy;
        let cache_len = bufs.k.len.min(bufs.v.cap());
        let (kc, vc) = (bufs.k.ptr().cast_const(), bufs.v.ptr().cast_const());
        let fc = CFp8Cache {
            k_cache: kc,
            v_cache: vc,
            cache_len,
            k_scales: ks,
            v_scales: vs,
        };
        let (mut l1, mut l2, mut l3) = (0, 0, 0);
        // SAFETY (all calls): tables and buffers hold what they claim.
        unsafe {
            accept(
                longattn_paged_sizes(dp, &mut l1, &mut l2, &mut l3),
                "paged_sizes",
                case,
            );
            let st = longattn_paged_prefill_sizes(dp, cu, &mut l1, &mut l2, &mut l3);
            accept(st, "prefill_sizes", case);
            let st = longattn_paged_cache_sizes(dp, &mut l1, &mut l2);
            accept(st, "cache_sizes", case);
        }
        let q = bufs.q.t();
        let out = bufs.out.tm();
        let (l, ln) = (bufs.lse.f32_ptr(), bufs.lse.len);
        let dt = c.dtype;
        let t0 = Instant::now();
        let st = unsafe {
            match entry {
                PagedEntry::Decode => {
                    longattn_paged_decode_cpu(dp, dt, q, kc, vc, cache_len, out, l, ln)
                }
                PagedEntry::DecodeFp8 => longattn_paged_decode_fp8_cpu(dp, dt, q, fc, out, l, ln),
                PagedEntry::Policy => {
                    longattn_paged_decode_policy_cpu(dp, pp, dt, q, kc, vc, cache_len, out, l, ln)
                }
                PagedEntry::PolicyFp8 => {
                    longattn_paged_decode_fp8_policy_cpu(dp, pp, dt, q, fc, out, l, ln)
                }
                PagedEntry::Prefill => {
                    longattn_paged_prefill_cpu(dp, cu, dt, q, kc, vc, cache_len, out, l, ln)
                }
            }
        };
        let what = format!("{entry:?}");
        quick(t0, &what, case);
        if accept(st, &what, case) {
            oks[e] += 1;
            let huge = fp8 && c.scales.iter().flatten().any(|&x| x > 1e4);
            bufs.check_ok(dt, huge, &what, case);
        }
        if cuda {
            let s = ptr::null_mut();
            let st = unsafe {
                match entry {
                    PagedEntry::Decode => {
                        longattn_paged_decode_cuda(dp, dt, q, kc, vc, cache_len, out, l, ln, 0, s)
                    }
                    PagedEntry::DecodeFp8 => {
                        longattn_paged_decode_fp8_cuda(dp, dt, q, fc, out, l, ln, 0, s)
                    }
                    PagedEntry::Policy => longattn_paged_decode_policy_cuda(
                        dp, pp, dt, q, kc, vc, cache_len, out, l, ln, 0, s,
                    ),
                    PagedEntry::PolicyFp8 => {
                        longattn_paged_decode_fp8_policy_cuda(dp, pp, dt, q, fc, out, l, ln, 0, s)
                    }
                    PagedEntry::Prefill => longattn_paged_prefill_cuda(
                        dp, cu, dt, q, kc, vc, cache_len, out, l, ln, 0, s,
                    ),
                }
            };
            refused(st, &what, case);
        }
    }
    println!("paged (decode, fp8, policy, fp8 policy, prefill) OK: {oks:?} of {n}");
    assert!(
        oks.iter().all(|&k| k * 40 > n as usize),
        "too few valid cases: {oks:?}"
    );
}

#[test]
fn c_api_fuzz_paged_append() {
    let cuda = fuzz_cuda("paged_append");
    let (mut r, n) = sweep(0xA99E, 40000);
    let mut oks = [0usize; 2];
    for case in 0..n {
        let fp8 = r.random_bool(0.5);
        let mut c = paged_valid(&mut r, false);
        // New tokens: the last n_b <= seqlens_k[b] positions of each sequence.
        let lens: Vec<usize> = c
            .seqlens
            .iter()
            .map(|&s| r.random_range(0..=(s as usize).min(3)))
            .collect();
        c.cu = Some(offsets(&lens));
        let new_rows = total(c.cu.as_ref().unwrap());
        let (hkv, hd) = (c.d.heads_kv, c.d.head_dim);
        let s = contiguous(new_rows, hkv, hd, 0);
        c.strides = [CStrides { batch: 0, ..s }; 2];
        let mut meta = r.random_bool(0.5);
        mutations(&mut r, |r| match r.random_range(0..10) {
            0 => meta = !meta,
            _ => mutate_paged(r, &mut c),
        });
        let (d, cu, [ks, vs]) = wire_paged(&mut r, &mut c);
        let dp = desc_ptr(&d, c.null[2]);
        let (cache_need, meta_need) = cache_needs(&d);
        let rows = total(c.cu.as_deref().unwrap_or(&[]));
        let new_need = |s| reach(s, 1, rows, d.heads_kv, d.head_dim);
        let input = Fill::Elem(c.dtype);
        let cache_fill = match fp8 {
            true => Fill::Fp8,
            false => Fill::Elem(c.dtype),
        };
        let mut k_new = Buf::new(&mut r, input, new_need(c.strides[0]), c.strides[0]);
        let mut v_new = Buf::new(&mut r, input, new_need(c.strides[1]), c.strides[1]);
        let mut kc = Buf::new(&mut r, cache_fill, cache_need, NO_STRIDES);
        let mut vc = Buf::new(&mut r, cache_fill, cache_need, NO_STRIDES);
        let mut kmin = Buf::new(&mut r, cache_fill, meta_need, NO_STRIDES);
        let mut kmax = Buf::new(&mut r, cache_fill, meta_need, NO_STRIDES);
        kmin.null |= !meta;
        kmax.null |= !meta;
        let overlap = match r.random_range(0..60) {
            0 => alias(&mut r, &mut vc, &mut k_new),
            1 => alias(&mut r, &mut kmin, &mut kc),
            2 if !kmax.null => alias(&mut r, &mut kmax, &mut v_new),
            _ => false,
        };
        let kv = CPagedKvMut {
            k_cache: kc.ptr(),
            v_cache: vc.ptr(),
            cache_len: kc.len.min(vc.cap()),
            kmin: kmin.ptr(),
            kmax: kmax.ptr(),
            meta_len: kmin.len.min(kmax.cap()),
        };
        let (kt, vt, dt) = (k_new.t(), v_new.t(), c.dtype);
        let t0 = Instant::now();
        // SAFETY: tables and buffers hold what they claim.
        let st = unsafe {
            match fp8 {
                true => longattn_paged_append_fp8_cpu(dp, cu, dt, kt, vt, kv, ks, vs),
                false => longattn_paged_append_cpu(dp, cu, dt, kt, vt, kv),
            }
        };
        let what = if fp8 { "append_fp8" } else { "append" };
        quick(t0, what, case);
        if accept(st, what, case) {
            oks[fp8 as usize] += 1;
            assert!(!overlap, "{what} case {case}: overlapping output accepted");
            for b in [&mut kc, &mut vc, &mut kmin, &mut kmax] {
                b.check_written(dt, FINITE, what, case);
            }
        }
        if cuda {
            let s = ptr::null_mut();
            // SAFETY: refused before any buffer is used (no GPU).
            let st = unsafe {
                match fp8 {
                    true => longattn_paged_append_fp8_cuda(dp, cu, dt, kt, vt, kv, ks, vs, 0, s),
                    false => longattn_paged_append_cuda(dp, cu, dt, kt, vt, kv, 0, s),
                }
            };
            refused(st, what, case);
        }
    }
    println!("append (plain, fp8) OK: {oks:?} of {n}");
    assert!(
        oks.iter().all(|&k| k * 20 > n as usize),
        "too few valid cases: {oks:?}"
    );
}

// ---- Merge -------------------------------------------------------------------------------------

/// The Rust API's merge (`into`: in place into a copy of a) of the inputs of an OK C call
/// (`[a.o, a.lse, b.o, b.lse]` as f32): its output and LSE as f32.
fn rust_merge<T: Element>(d: &CMergeDesc, inputs: &[Vec<f32>; 4], into: bool) -> [Vec<f32>; 2] {
    let shape = MergeShape {
        batch: d.batch,
        seqlen: d.seqlen,
        heads: d.heads,
        head_dim: d.head_dim,
    };
    let typed = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
    let [a_o, a_l, b_o, b_l] = inputs;
    let (mut o, mut lse) = (typed(a_o), a_l.clone());
    let b = Partial {
        o: &typed(b_o)[..],
        lse: &b_l[..],
    };
    let done = match into {
        true => shape.merge_into_cpu(
            Partial {
                o: &mut o[..],
                lse: &mut lse[..],
            },
            b,
        ),
        false => {
            let a = typed(a_o);
            let a = Partial {
                o: &a[..],
                lse: &a_l[..],
            };
            let out = Partial {
                o: &mut o[..],
                lse: &mut lse[..],
            };
            shape.merge_cpu(a, b, out)
        }
    };
    done.unwrap();
    [o.iter().map(|x| x.to_f32()).collect(), lse]
}

#[test]
fn c_api_fuzz_merge() {
    let cuda = fuzz_cuda("merge");
    let (mut r, n) = sweep(0x3E6, 40000);
    let mut oks = [0usize; 2];
    for case in 0..n {
        let mut d = CMergeDesc {
            batch: r.random_range(1..=2),
            seqlen: r.random_range(1..=4),
            heads: r.random_range(1..=3),
            head_dim: r.random_range(1..=8),
        };
        let mut dtype = r.random_range(0..3);
        let mut null_desc = false;
        mutations(&mut r, |r| match r.random_range(0..7) {
            0 => d.batch = eu(r),
            1 => d.seqlen = eu(r),
            2 => d.heads = eu(r),
            3 => d.head_dim = eu(r),
            4 => dtype = pick(r, BAD_DTYPES),
            5 => null_desc = true,
            _ => {}
        });
        let o_need = checked_product(&[d.batch, d.seqlen, d.heads, d.head_dim]);
        let l_need = checked_product(&[d.batch, d.heads, d.seqlen]);
        let o = |r: &mut SmallRng, fill| Buf::new(r, fill, o_need, NO_STRIDES);
        let l = |r: &mut SmallRng, fill| Buf::new(r, fill, l_need, NO_STRIDES);
        let (mut ao, mut al) = (o(&mut r, Fill::Elem(dtype)), l(&mut r, Fill::Lse));
        let (mut bo, mut bl) = (o(&mut r, Fill::Elem(dtype)), l(&mut r, Fill::Lse));
        let zero = Fill::Zero(dtype_bytes(dtype));
        let (mut oo, mut ol) = (o(&mut r, zero), l(&mut r, Fill::Zero(4)));
        let into = r.random_bool(0.5);
        let overlap = match r.random_range(0..50) {
            0 if !into => alias(&mut r, &mut oo, &mut ao),
            1 if !into => alias(&mut r, &mut ol, &mut bl),
            2 if !into => alias(&mut r, &mut ol, &mut oo),
            3 if into => alias(&mut r, &mut ao, &mut bo),
            5 if into => alias(&mut r, &mut al, &mut ao),
            4 if !into => {
                // a and b may alias each other.
                alias(&mut r, &mut bo, &mut ao);
                false
            }
            _ => false,
        };
        let part = |o: &mut Buf, l: &mut Buf| CPartial {
            o: o.ptr(),
            o_len: o.len,
            lse: l.f32_ptr(),
            lse_len: l.len,
        };
        let part_mut = |o: &mut Buf, l: &mut Buf| CPartialMut {
            o: o.ptr(),
            o_len: o.len,
            lse: l.f32_ptr(),
            lse_len: l.len,
        };
        let dp = desc_ptr(&d, null_desc);
        let (a, b) = (part(&mut ao, &mut al), part(&mut bo, &mut bl));
        let (out, acc) = (part_mut(&mut oo, &mut ol), part_mut(&mut ao, &mut al));
        let (mut x, mut y) = (0, 0);
        // SAFETY (all calls): buffers hold what they claim.
        accept(
            unsafe { longattn_merge_sizes(dp, &mut x, &mut y) },
            "merge_sizes",
            case,
        );
        let inputs = [
            ao.values(dtype),
            al.values(0),
            bo.values(dtype),
            bl.values(0),
        ];
        let t0 = Instant::now();
        let st = unsafe {
            match into {
                true => longattn_merge_into_cpu(dp, dtype, acc, b),
                false => longattn_merge_cpu(dp, dtype, a, b, out),
            }
        };
        quick(t0, "merge", case);
        if accept(st, "merge", case) {
            oks[into as usize] += 1;
            assert!(!overlap, "merge case {case}: overlapping output accepted");
            let (wo, wl) = match into {
                true => (&mut ao, &mut al),
                false => (&mut oo, &mut ol),
            };
            wo.check_written(dtype, FINITE, "merge", case);
            wl.check_written(0, LSE, "merge", case);
            let want = match dtype {
                0 => rust_merge::<f32>(&d, &inputs, into),
                1 => rust_merge::<f16>(&d, &inputs, into),
                _ => rust_merge::<bf16>(&d, &inputs, into),
            };
            let bits = |x: Vec<f32>| x.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            let [want_o, want_lse] = want;
            assert_eq!(bits(wo.values(dtype)), bits(want_o), "merge case {case}");
            assert_eq!(bits(wl.values(0)), bits(want_lse), "merge case {case}");
        }
        if cuda {
            let s = ptr::null_mut();
            let st = unsafe {
                match into {
                    true => longattn_merge_into_cuda(dp, dtype, acc, b, 0, s),
                    false => longattn_merge_cuda(dp, dtype, a, b, out, 0, s),
                }
            };
            refused(st, "merge_cuda", case);
        }
    }
    println!("merge (merge, into) OK: {oks:?} of {n}");
    assert!(
        oks.iter().all(|&k| k * 20 > n as usize),
        "too few valid cases: {oks:?}"
    );
}

// ---- FP8 quantisation, version, last error ---------------------------------------------------

#[test]
fn c_api_fuzz_fp8_quantize_and_version() {
    // SAFETY: static NUL-terminated strings.
    let version = unsafe { CStr::from_ptr(longattn_version()) };
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    let (mut r, n) = sweep(0xE4, 50000);
    let mut oks = 0;
    for case in 0..n {
        let len = r.random_range(0..40);
        let mut src: Vec<f32> = (0..len + 4)
            .map(|_| match r.random_bool(0.2) {
                true => pick(&mut r, F32S),
                false => r.random_range(-500.0..500.0),
            })
            .collect();
        let mut dst = vec![0u8; len + 16];
        let scale = match r.random_bool(0.3) {
            true => pick(&mut r, F32S),
            false => r.random_range(0.01..4.0),
        };
        // A count the buffers hold, or one the call must refuse from its size alone.
        let count = match r.random_range(0..10) {
            0 => pick(
                &mut r,
                &[isize::MAX as usize / 4 + 1, isize::MAX as usize, usize::MAX],
            ),
            _ => r.random_range(0..=len),
        };
        let sp = match r.random_range(0..30) {
            0 => ptr::null(),
            1 => src.as_ptr().cast::<u8>().wrapping_add(1).cast(),
            _ => src.as_ptr(),
        };
        let (dp, overlap) = match r.random_range(0..30) {
            0 => (ptr::null_mut(), false),
            1 => {
                // dst inside src.
                let off = r.random_range(0..4 * 4);
                let p = src.as_mut_ptr().cast::<u8>().wrapping_add(off);
                let (s, d) = (sp as usize, p as usize);
                let hit = meet(
                    (d, d.saturating_add(count)),
                    (s, s.saturating_add(count.saturating_mul(4))),
                );
                (p, hit && !sp.is_null())
            }
            _ => (dst.as_mut_ptr(), false),
        };
        // SAFETY: `count` floats behind sp and bytes behind dp, or a count refused first.
        let st = unsafe { longattn_fp8_quantize(sp, count, scale, dp) };
        if accept(st, "fp8_quantize", case) {
            oks += 1;
            assert!(!overlap, "case {case}: overlapping dst accepted");
            if dp == dst.as_mut_ptr() && sp == src.as_ptr() {
                for i in 0..count {
                    let want = F8E4M3::from_f32(src[i] / scale).to_bits();
                    assert_eq!(dst[i], want, "case {case}: element {i}");
                }
            }
        }
    }
    println!("fp8_quantize: {oks} of {n} OK");
    assert!(oks * 4 > n, "too few valid cases ({oks} of {n})");
}
