//! The communicator seam of the GPU ring and the torchrun-style bootstrap of real ranks.
//! [`SelfComm`] (world 1) is **verified on an H200 (2026-12-04)**; the NCCL backend has
//! **not been built or run on a GPU** (unverified).
//!
//! [`RingComm`] is what a rank driver ([`super::gpu::RingRank`]) needs from a transport: its
//! rank, the world, the stream transfers run on, and one `exchange` per step (send the held
//! K/V to the next rank and receive the next K/V from the previous one, paired so that a ring
//! of them cannot deadlock). Backends:
//! - `NcclComm` (cargo feature `nccl`): NCCL point-to-point through cudarc, one per rank,
//!   from a bootstrap ([`Bootstrap`], one process per GPU) or for every local GPU of one
//!   process (`NcclComm::local_ring`).
//! - [`SelfComm`]: a world of one (no transfers), to run a rank driver alone.
//! - The in-process ring ([`super::RingAttention::forward_gpu_in_process`]): every rank on one
//!   GPU, the transfers as device-to-device copies; it drives all ranks itself, so it needs no
//!   `RingComm`.
//!
//! **libnccl**: cudarc loads NCCL at run time (`dlopen`) under the names `libnccl.so`,
//! `libnccl.so.<CUDA major>` and a few others, but not `libnccl.so.2`, the name the PyPI
//! wheel (`nvidia-nccl-cu13`, `site-packages/nvidia/nccl/lib/libnccl.so.2`) and the system
//! packages ship. Make a `libnccl.so` link to it in a directory on `LD_LIBRARY_PATH` before the
//! process starts, e.g.
//! `mkdir -p ~/.local/nccl && ln -sf $SITE/nvidia/nccl/lib/libnccl.so.2 ~/.local/nccl/libnccl.so
//! && export LD_LIBRARY_PATH=~/.local/nccl:$LD_LIBRARY_PATH` (system installs usually ship
//! `libnccl.so` with the `-dev` package). `nccl_available` (feature `nccl`) checks before a communicator is
//! made, so a missing library is an error, not cudarc's panic.

use crate::error::{Error, Result};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::gpu::RingElement;

/// A rank's transport for the ring.
pub trait RingComm {
    /// This rank's index in the ring, `0..world`.
    fn rank(&self) -> usize;
    /// Number of ranks in the ring.
    fn world(&self) -> usize;
    /// The stream the transfers are queued on (the rank driver orders it with events).
    fn stream(&self) -> &Arc<CudaStream>;
    /// Queues on [`RingComm::stream`], as one group: send `send` (K, V) to rank `rank + 1`
    /// and receive `recv` (K, V) from rank `rank - 1` (modulo the world). Either may be
    /// absent; the peers' calls must match (the step plans guarantee it).
    fn exchange<T: RingElement>(
        &self,
        send: Option<[CudaView<'_, T>; 2]>,
        recv: Option<[CudaViewMut<'_, T>; 2]>,
    ) -> Result<()>;
}

/// A world of one rank: nothing to send or receive.
pub struct SelfComm {
    stream: Arc<CudaStream>,
}

impl SelfComm {
    /// The single rank, queuing (nothing) on `stream`.
    pub fn new(stream: Arc<CudaStream>) -> Self {
        SelfComm { stream }
    }
}

impl RingComm for SelfComm {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    fn exchange<T: RingElement>(
        &self,
        send: Option<[CudaView<'_, T>; 2]>,
        recv: Option<[CudaViewMut<'_, T>; 2]>,
    ) -> Result<()> {
        if send.is_some() || recv.is_some() {
            return Err(Error::Shape("a world of one rank has no transfers".into()));
        }
        Ok(())
    }
}

/// Bytes of an NCCL unique id (`ncclUniqueId`).
pub const NCCL_ID_BYTES: usize = 128;

/// A rank's place in a multi-process run, read torchrun-style from the environment
/// (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, and
/// `LONGATTN_RING_PORT`). Rank 0 hands the NCCL unique id to every other rank over TCP
/// ([`Bootstrap::share_id`]); this part needs no NCCL and no GPU. Under torchrun, whose own
/// store already listens on `MASTER_PORT` on rank 0's node, set `LONGATTN_RING_PORT` (the
/// same on every rank) to a free port for the id server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    /// This process's rank (`RANK`).
    pub rank: usize,
    /// Number of ranks (`WORLD_SIZE`).
    pub world: usize,
    /// The GPU of this rank on its node.
    pub local_rank: usize,
    /// Address of rank 0 (`MASTER_ADDR`), which serves the NCCL id.
    pub master_addr: String,
    /// Port of rank 0's id server (`LONGATTN_RING_PORT`, else `MASTER_PORT`).
    pub master_port: u16,
}

impl Bootstrap {
    /// From the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From any variable source (`get(name)`); `LOCAL_RANK` defaults to `RANK`,
    /// `MASTER_ADDR` to `127.0.0.1`, the port to `LONGATTN_RING_PORT`, else `MASTER_PORT`,
    /// else 29500 (torchrun's default).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |name: &str, default: Option<usize>| -> Result<usize> {
            match get(name) {
                Some(v) => v.trim().parse().map_err(|_| {
                    Error::InvalidOption(format!("{name}={v:?} is not a non-negative integer"))
                }),
                None => default.ok_or_else(|| {
                    Error::InvalidOption(format!("{name} is not set (torchrun-style launch)"))
                }),
            }
        };
        let rank = num("RANK", None)?;
        let world = num("WORLD_SIZE", None)?;
        let local_rank = num("LOCAL_RANK", Some(rank))?;
        let port_var = match get("LONGATTN_RING_PORT") {
            Some(_) => "LONGATTN_RING_PORT",
            None => "MASTER_PORT",
        };
        let port = num(port_var, Some(29500))?;
        if world == 0 || rank >= world || port == 0 || port > u16::MAX as usize {
            return Err(Error::InvalidOption(format!(
                "RANK={rank} must be below WORLD_SIZE={world} (>= 1) and {port_var}={port} \
                 in 1..=65535"
            )));
        }
        Ok(Bootstrap {
            rank,
            world,
            local_rank,
            master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port: port as u16,
        })
    }

    fn master(&self) -> Result<SocketAddr> {
        (self.master_addr.as_str(), self.master_port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| {
                Error::InvalidOption(format!(
                    "MASTER_ADDR {}:{} does not resolve",
                    self.master_addr, self.master_port
                ))
            })
    }

    /// The id exchange: rank 0 (which passes `Some(id)`) listens on `MASTER_ADDR:MASTER_PORT`
    /// and sends the id to every other rank; the others (`None`) connect, retrying until
    /// `timeout`, and receive it. Every rank returns the id.
    pub fn share_id(
        &self,
        id: Option<[u8; NCCL_ID_BYTES]>,
        timeout: Duration,
    ) -> Result<[u8; NCCL_ID_BYTES]> {
        match (self.rank, id) {
            (0, Some(id)) => {
                let listener = TcpListener::bind(self.master()?).map_err(|e| {
                    io_err(
                        "bind MASTER_ADDR and the id port (under torchrun, whose store holds \
                             MASTER_PORT, set LONGATTN_RING_PORT to a free port on every rank)",
                        e,
                    )
                })?;
                self.serve_id(&listener, id, timeout)?;
                Ok(id)
            }
            (0, None) => Err(Error::InvalidOption("rank 0 must provide the id".into())),
            (_, Some(_)) => Err(Error::InvalidOption("only rank 0 provides the id".into())),
            (_, None) => self.fetch_id(timeout),
        }
    }

    /// Rank 0's side on a bound listener: answers `world - 1` distinct ranks, each
    /// connection sending its rank (u32 little endian) and receiving the id.
    pub fn serve_id(
        &self,
        listener: &TcpListener,
        id: [u8; NCCL_ID_BYTES],
        timeout: Duration,
    ) -> Result<()> {
        // The fields are public: a world of none (or a server that is not rank 0) would
        // index `seen` out of bounds or underflow `left` below.
        if self.world == 0 || self.rank != 0 {
            return Err(Error::InvalidOption(format!(
                "bootstrap: rank {} of a world of {} cannot serve the id (rank 0 does)",
                self.rank, self.world
            )));
        }
        let deadline = Instant::now() + timeout;
        listener
            .set_nonblocking(true)
            .map_err(|e| io_err("listener", e))?;
        let mut seen = vec![false; self.world];
        seen[0] = true;
        let mut left = self.world - 1;
        while left > 0 {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(|e| io_err("accept", e))?;
                    let rest = deadline.saturating_duration_since(Instant::now());
                    s.set_read_timeout(Some(rest.max(Duration::from_millis(1))))
                        .map_err(|e| io_err("accept", e))?;
                    let mut b = [0u8; 4];
                    s.read_exact(&mut b).map_err(|e| io_err("read rank", e))?;
                    let r = u32::from_le_bytes(b) as usize;
                    if r >= self.world || seen[r] {
                        return Err(Error::InvalidOption(format!(
                            "bootstrap: rank {r} connected twice or is outside the world of {}",
                            self.world
                        )));
                    }
                    seen[r] = true;
                    s.write_all(&id).map_err(|e| io_err("send id", e))?;
                    left -= 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(Error::InvalidOption(format!(
                            "bootstrap: {left} ranks did not connect within {timeout:?}"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(io_err("accept", e)),
            }
        }
        Ok(())
    }

    /// A non-zero rank's side: connects to rank 0 (retrying until `timeout`), sends its
    /// rank, receives the id.
    pub fn fetch_id(&self, timeout: Duration) -> Result<[u8; NCCL_ID_BYTES]> {
        let deadline = Instant::now() + timeout;
        let addr = self.master()?;
        let mut s = loop {
            let rest = deadline.saturating_duration_since(Instant::now());
            match TcpStream::connect_timeout(&addr, rest.max(Duration::from_millis(1))) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(io_err("connect to MASTER_ADDR:MASTER_PORT", e));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let rest = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(rest.max(Duration::from_millis(1))))
            .map_err(|e| io_err("connect", e))?;
        s.write_all(&(self.rank as u32).to_le_bytes())
            .map_err(|e| io_err("send rank", e))?;
        let mut id = [0u8; NCCL_ID_BYTES];
        s.read_exact(&mut id).map_err(|e| io_err("receive id", e))?;
        Ok(id)
    }
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::InvalidOption(format!("bootstrap: {what}: {e}"))
}

/// Whether libnccl can be loaded under one of the names cudarc tries (see the module docs).
#[cfg(feature = "nccl")]
pub fn nccl_available() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

#[cfg(feature = "nccl")]
fn nccl_err(e: cudarc::nccl::result::NcclError) -> Error {
    Error::Cuda(format!("nccl: {e:?}"))
}

#[cfg(feature = "nccl")]
fn require_nccl() -> Result<()> {
    if nccl_available() {
        return Ok(());
    }
    Err(Error::NoGpu(
        "libnccl could not be loaded: cudarc looks for libnccl.so (not libnccl.so.2, the \
         PyPI wheel's name); link libnccl.so to it in a directory on LD_LIBRARY_PATH (see \
         longattn::ring::comm)"
            .into(),
    ))
}

/// NCCL transport of one rank (cargo feature `nccl`). **Not verified: never run on a GPU.**
#[cfg(feature = "nccl")]
pub struct NcclComm {
    comm: cudarc::nccl::Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as no two threads use
// it at once (NCCL's rule); `NcclComm` is not `Sync`, so moving it to the thread that
// drives its rank (one thread per GPU, `local_ring`) keeps every use on one thread.
#[cfg(feature = "nccl")]
unsafe impl Send for NcclComm {}

#[cfg(feature = "nccl")]
impl NcclComm {
    /// A fresh NCCL unique id (rank 0 makes it and shares it with [`Bootstrap::share_id`]).
    pub fn new_id() -> Result<[u8; NCCL_ID_BYTES]> {
        require_nccl()?;
        let id = cudarc::nccl::Id::new().map_err(nccl_err)?;
        Ok(id.internal().map(|c| c as u8))
    }

    /// Rank `rank` of `world` over `stream` (the communication stream; its context is the
    /// rank's GPU) with the id every rank shares. Blocks until all ranks joined.
    pub fn from_rank(
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        id: [u8; NCCL_ID_BYTES],
    ) -> Result<Self> {
        require_nccl()?;
        let id = cudarc::nccl::Id::uninit(id.map(|b| b as std::ffi::c_char));
        let comm =
            cudarc::nccl::Comm::from_rank(stream.clone(), rank, world, id).map_err(nccl_err)?;
        Ok(NcclComm { comm, stream })
    }

    /// One process per GPU: the bootstrap from the environment, the id shared by rank 0,
    /// the communicator on a new stream of `ctx` (the GPU `LOCAL_RANK`, opened by the
    /// caller).
    pub fn from_bootstrap(
        boot: &Bootstrap,
        ctx: &Arc<cudarc::driver::CudaContext>,
        timeout: Duration,
    ) -> Result<Self> {
        let id = if boot.rank == 0 {
            Some(Self::new_id()?)
        } else {
            None
        };
        let id = boot.share_id(id, timeout)?;
        Self::from_rank(ctx.new_stream()?, boot.rank, boot.world, id)
    }

    /// One process driving every GPU of `streams` (one communication stream per GPU, rank
    /// `i` on `streams[i]`). Run the ranks from one thread each ([`super::gpu::RingRank`]):
    /// NCCL's grouped send/receive of neighbouring ranks must be in flight together.
    pub fn local_ring(streams: Vec<Arc<CudaStream>>) -> Result<Vec<Self>> {
        require_nccl()?;
        let comms = cudarc::nccl::Comm::from_devices(streams.clone()).map_err(nccl_err)?;
        Ok(comms
            .into_iter()
            .zip(streams)
            .map(|(comm, stream)| NcclComm { comm, stream })
            .collect())
    }
}

#[cfg(feature = "nccl")]
impl RingComm for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world(&self) -> usize {
        self.comm.world_size()
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    fn exchange<T: RingElement>(
        &self,
        send: Option<[CudaView<'_, T>; 2]>,
        recv: Option<[CudaViewMut<'_, T>; 2]>,
    ) -> Result<()> {
        let n = self.world();
        let (next, prev) = ((self.rank() + 1) % n, (self.rank() + n - 1) % n);
        // One group: the send to the next rank and the receive from the previous one are
        // matched by NCCL together, so a ring of blocking sends cannot deadlock.
        let group = || -> Result<()> {
            let mut g = self.comm.group();
            if let Some([k, v]) = send {
                g.send(k, next as i32).map_err(nccl_err)?;
                g.send(v, next as i32).map_err(nccl_err)?;
            }
            if let Some([k, v]) = recv {
                g.recv(k, prev as i32).map_err(nccl_err)?;
                g.recv(v, prev as i32).map_err(nccl_err)?;
            }
            drop(g);
            Ok(())
        };
        // cudarc's `Group` unwraps ncclGroupStart and, in its drop, ncclGroupEnd, which is
        // where NCCL reports a failed peer or a bad argument: caught here, so that an NCCL
        // failure is this call's error rather than a panic through the rank's driver. The
        // closure's state (views, the group) is dropped either way.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(group)).unwrap_or_else(|p| {
            let why = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("panic");
            Err(Error::Cuda(format!("nccl group send/recv: {why}")))
        })
    }
}
