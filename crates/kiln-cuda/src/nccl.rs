//! The [`Communicator`] of GPU ranks: NCCL collectives on a stream of their own.
//!
//! Each collective waits (on the device) for the work queued on the engine's stream before it, then runs on the
//! communication stream, so the engine goes on with the backward pass of earlier layers while the gradients of
//! later ones are being summed. [`Communicator::wait`] is where the host waits for the collectives: it polls
//! rather than blocks, so that NCCL's asynchronous errors, a peer that has gone away (`peer_lost`, raised by the
//! rendezvous watch or by the thread of a failed rank) or the timeout abort the communicator and return an error
//! instead of hanging. It comes right before the step reads its loss, which waits for the device anyway.
//!
//! With one GPU a process, the collectives can be captured into the engine's graphs (`train.graphs`): the
//! communication stream joins the capture through the events that order it after the engine's work, and a wait
//! inside the capture orders the streams only. A replayed graph's collectives run as part of its launch on the
//! engine's stream, so the host's wait watches that stream as well as its own. NCCL's guide advises against graphs
//! with several GPUs a process (a blocking graph launch can keep the others from theirs), so ranks that are threads
//! of one process do not capture.
//!
//! The communicator is non-blocking (NCCL's `blocking = 0`) for the same reason: joining the job, which waits for
//! every rank, returns at once and is polled in the same way, so a rank that never arrives or dies on the way ends
//! the others' wait. NCCL may then answer any call with "in progress"; each such call is polled to its end before
//! the next, as NCCL requires.
//!
//! A parameter tensor of a bf16 engine is gathered in bf16, two bytes a weight: a ZeRO rank's fp32 master copy
//! holds only the pieces it updates.
//!
//! Run on an H100 and an H200 with 1, 2 and 4 processes sharing the GPU (gpu-check's dp steps); there a rank that
//! fails while joining ends the other's wait (dp-init-failure: both exit 1 within 11 s).

use crate::backend::{CudaBackend, DType};
use crate::libraries::Library;
use cudarc::driver::sys::CUstreamCaptureStatus;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::{result as nccl, sys};
use kiln_core::comm::piece;
use kiln_core::{Backend, Communicator, Error, Result, Tensor};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// NCCL's unique id: rank 0 makes it, the rendezvous hands it to the others.
pub const ID_BYTES: usize = 128;

/// Host values summed per round trip through the device in [`Communicator::all_reduce_host`].
const HOST_CHUNK: usize = 1 << 16;

/// After a peer is reported gone, a collective still in flight gets this long to finish: it may have had every
/// contribution already (the peer finished its last step and exited).
const GRACE: Duration = Duration::from_secs(10);

fn failure(message: String) -> Error {
    Error::backend("nccl", message)
}

fn nccl_error(what: &str) -> impl Fn(nccl::NcclError) -> Error + '_ {
    move |e| failure(format!("{what}: {:?}", e.0))
}

/// A new unique id, on the rank that starts a job.
pub fn unique_id() -> Result<[u8; ID_BYTES]> {
    Library::Nccl.require()?;
    let id = nccl::get_uniqueid().map_err(nccl_error("ncclGetUniqueId"))?;
    Ok(id.internal.map(|c| c as u8))
}

/// NCCL's default configuration (NCCL_CONFIG_INITIALIZER of nccl.h: every setting undefined, so NCCL chooses),
/// except that the communicator does not block. `size` and `version` tell a newer NCCL which fields this struct
/// has, so it works with the NCCL of any later release.
fn non_blocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: NCCL_HEADERS_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// NCCL_VERSION(2, 30, 0): the release whose nccl.h cudarc's bindings (feature nccl-02030) were made from.
const NCCL_HEADERS_VERSION: u32 = 2 * 10_000 + 30 * 100;

pub struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    stream: Arc<CudaStream>,
    /// Recorded on the engine's stream before each collective, which the communication stream waits for.
    queued: CudaEvent,
    /// Recorded on the communication stream when the host waits for it.
    done: CudaEvent,
    /// Recorded on the communication stream after each all-gather, which ZeRO stage 3's next block waits for.
    gathered: CudaEvent,
    staging: CudaSlice<f64>,
    staging_ptr: u64,
    peer_lost: Arc<AtomicBool>,
    timeout: Duration,
    aborted: bool,
    /// Whether this process drives this rank alone, so that its collectives may be captured into graphs.
    alone: bool,
    /// Whether a graph has captured collectives of this communicator: aborting it then waits until every such graph
    /// is destroyed.
    captured: bool,
    /// Told when an abort on a thread of its own has finished.
    aborted_on_thread: Option<std::sync::mpsc::Receiver<()>>,
}

/// The communicator, for a thread that aborts it.
#[derive(Clone, Copy)]
struct Aborting(sys::ncclComm_t);

// SAFETY: after `abort` hands the handle over, no other thread uses the communicator.
unsafe impl Send for Aborting {}

impl Aborting {
    fn abort(self) {
        // SAFETY: `self.0` is live, and not used after this.
        let _ = unsafe { nccl::comm_abort(self.0) };
    }
}

// SAFETY: the communicator handle is used by one thread at a time (the rank's), which is all NCCL requires.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins rank `rank` of `world` to the job that `id` names, on `backend`'s GPU. Every rank must call this at
    /// about the same time: NCCL's initialisation waits for all of them. `alone`: this process drives no other rank
    /// of the job (one GPU a process), which graphs of its collectives require.
    pub fn new(
        backend: &CudaBackend,
        id: &[u8; ID_BYTES],
        rank: usize,
        world: usize,
        alone: bool,
        peer_lost: Arc<AtomicBool>,
        timeout: Duration,
    ) -> Result<Self> {
        Library::Nccl.require()?;
        let ctx = backend.stream().context().clone();
        let stream = ctx.new_stream().map_err(|e| failure(format!("creating the communication stream: {e:?}")))?;
        let event = || ctx.new_event(None).map_err(|e| failure(format!("creating an event: {e:?}")));
        let (queued, done, gathered) = (event()?, event()?, event()?);
        let staging = stream
            .alloc_zeros::<f64>(HOST_CHUNK)
            .map_err(|e| failure(format!("allocating {HOST_CHUNK} doubles: {e:?}")))?;
        let staging_ptr = staging.device_ptr(&stream).0;
        let unique = sys::ncclUniqueId { internal: id.map(|b| b as core::ffi::c_char) };
        let mut comm = std::ptr::null_mut();
        ctx.bind_to_thread().map_err(|e| failure(format!("binding the GPU: {e:?}")))?;
        let mut config = non_blocking_config();
        // SAFETY: `comm` and `config` are valid pointers; the id came from ncclGetUniqueId on rank 0.
        let joining =
            unsafe { sys::ncclCommInitRankConfig(&mut comm, world as i32, unique, rank as i32, &mut config).result() }
                .map_err(nccl_error("ncclCommInitRankConfig"))?;
        let mut this = NcclComm {
            comm,
            rank,
            world,
            stream,
            queued,
            done,
            gathered,
            staging,
            staging_ptr,
            peer_lost,
            timeout,
            aborted: false,
            alone,
            captured: false,
            aborted_on_thread: None,
        };
        this.settle("joining the job (ncclCommInitRankConfig)", Ok(joining))?;
        Ok(this)
    }

    fn cu_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as sys::cudaStream_t
    }

    /// An error once the communicator has been aborted: nothing may use it after that.
    fn check_live(&self) -> Result<()> {
        if self.aborted {
            return Err(failure(format!("rank {}: the communicator was aborted", self.rank)));
        }
        Ok(())
    }

    /// Makes the communication stream wait for everything queued on the engine's stream so far (while the engine
    /// captures, this draws the communication stream into its capture).
    fn follow(&mut self, backend: &CudaBackend) -> Result<()> {
        self.check_live()?;
        self.captured |= backend.capturing();
        self.queued.record(backend.stream()).map_err(|e| failure(format!("recording an event: {e:?}")))?;
        self.stream.wait(&self.queued).map_err(|e| failure(format!("ordering the streams: {e:?}")))
    }

    /// Waits on the host for the communication stream.
    fn drain(&mut self) -> Result<()> {
        self.check_live()?;
        self.done.record(&self.stream).map_err(|e| failure(format!("recording an event: {e:?}")))?;
        self.poll("a collective", |this, _| {
            this.done.try_is_complete().map_err(|e| format!("the GPU reported {e:?} during a collective"))
        })
    }

    /// Ends a call to NCCL that returned `status`: when NCCL is still carrying it out, polls until it has.
    fn settle(&mut self, what: &str, status: std::result::Result<nccl::NcclStatus, nccl::NcclError>) -> Result<()> {
        match status {
            Ok(nccl::NcclStatus::InProgress) => self.poll(what, |_, state| Ok(state == sys::ncclResult_t::ncclSuccess)),
            Ok(_) => Ok(()),
            Err(e) => Err(self.abort(format!("{what}: {:?}", e.0))),
        }
    }

    /// Polls `done` (given NCCL's asynchronous state of the communicator) until it says so, watching for NCCL's
    /// errors, lost peers and the timeout; any of them aborts the communicator.
    fn poll(
        &mut self,
        what: &str,
        mut done: impl FnMut(&Self, sys::ncclResult_t) -> std::result::Result<bool, String>,
    ) -> Result<()> {
        let started = Instant::now();
        let mut lost_at: Option<Instant> = None;
        loop {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: `comm` is live until Drop (or an abort, after which nothing polls).
            let queried = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if queried != sys::ncclResult_t::ncclSuccess {
                return Err(self.abort(format!("ncclCommGetAsyncError reported {queried:?} during {what}")));
            }
            if !matches!(state, sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress) {
                return Err(self.abort(format!("NCCL reported {state:?} during {what}")));
            }
            match done(self, state) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(why) => return Err(self.abort(why)),
            }
            if self.peer_lost.load(Ordering::Relaxed) {
                let since = *lost_at.get_or_insert_with(Instant::now);
                if since.elapsed() > GRACE {
                    return Err(self.abort("another rank of the job has gone away".into()));
                }
            }
            if started.elapsed() > self.timeout {
                return Err(
                    self.abort(format!("{what} did not finish within {} s (dist.timeout_s)", self.timeout.as_secs()))
                );
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Whether the engine may be ordered after the communication stream: always, unless the engine is capturing and
    /// its capture holds no work of the communication stream (which joins it at its first collective). Then there is
    /// nothing of the capture to order after: the stream's events are eager ones, which a capturing stream may not
    /// wait for (CUDA_ERROR_STREAM_CAPTURE_ISOLATION), and the host waited for the work they mark before the capture
    /// began.
    fn has_work_to_order(&self, backend: &CudaBackend) -> Result<bool> {
        self.check_live()?;
        if !backend.capturing() {
            return Ok(true);
        }
        let status = self.stream.capture_status().map_err(|e| failure(format!("querying a capture: {e:?}")))?;
        Ok(status == CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE)
    }

    /// Aborts the communicator (NCCL then stops its kernels) and describes why, for every rank's error message.
    fn abort(&mut self, why: String) -> Error {
        self.abort_once();
        failure(format!("rank {} stops: {why}", self.rank))
    }

    /// Aborts the communicator unless it was. ncclCommAbort stops the kernels at once, but returns only when every
    /// graph that captured its collectives has been destroyed; those are the engine's, which this rank drops after
    /// the error, so with graphs the abort finishes on a thread of its own.
    fn abort_once(&mut self) {
        if self.aborted {
            return;
        }
        self.aborted = true;
        let comm = Aborting(self.comm);
        if !self.captured {
            return comm.abort();
        }
        let (finished, told) = std::sync::mpsc::channel();
        let aborting = move || {
            comm.abort();
            let _ = finished.send(());
        };
        match std::thread::Builder::new().name("nccl abort".into()).spawn(aborting) {
            Ok(_) => self.aborted_on_thread = Some(told),
            Err(_) => comm.abort(),
        }
    }

    /// The addresses of `t` and of `part` (one rank's piece of it: this rank's piece of `t` itself, or a tensor
    /// apart from `t` of a piece's length and type), their NCCL type and the piece's length.
    fn piece_operands(
        &self,
        backend: &CudaBackend,
        op: &str,
        t: Tensor,
        part: Tensor,
    ) -> Result<(u64, u64, sys::ncclDataType_t, usize)> {
        let mine = piece(t, self.world, self.rank);
        let ((whole, ty, _), (at, part_ty, _)) = (Self::operand(backend, t)?, Self::operand(backend, part)?);
        if part.len != mine.len || part_ty != ty {
            return Err(failure(format!("{op} of {t:?} with {part:?}: not one piece of it, of its type")));
        }
        if part != mine && part.overlaps(&t) {
            return Err(failure(format!("{op} with {part:?}, which overlaps {t:?} elsewhere than in place")));
        }
        Ok((whole, at, ty, mine.len))
    }

    /// `(address, NCCL type, element size)` of `t`, as the engine computes with it.
    fn operand(backend: &CudaBackend, t: Tensor) -> Result<(u64, sys::ncclDataType_t, usize)> {
        let (ptr, dtype) = backend.comm_view(t)?;
        match dtype {
            DType::F32 => Ok((ptr, sys::ncclDataType_t::ncclFloat32, 4)),
            DType::Bf16 => Ok((ptr, sys::ncclDataType_t::ncclBfloat16, 2)),
            DType::U32 => Err(failure(format!("{t:?} holds token ids: nothing to reduce"))),
        }
    }
}

impl Communicator<CudaBackend> for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_host(&mut self, _: &mut CudaBackend, values: &mut [f64]) -> Result<()> {
        self.check_live()?;
        // Host values depend on nothing queued on the engine, so this does not wait for it: the engine can still
        // be finishing the previous step while the ranks agree on the next one's numbers.
        for chunk in values.chunks_mut(HOST_CHUNK) {
            self.stream
                .memcpy_htod(&*chunk, &mut self.staging.slice_mut(..chunk.len()))
                .map_err(|e| failure(format!("copying to the GPU: {e:?}")))?;
            let p = self.staging_ptr as *mut core::ffi::c_void;
            // SAFETY: the staging buffer holds HOST_CHUNK doubles, at least chunk.len().
            let status = unsafe {
                nccl::all_reduce(
                    p,
                    p,
                    chunk.len(),
                    sys::ncclDataType_t::ncclFloat64,
                    sys::ncclRedOp_t::ncclSum,
                    self.comm,
                    self.cu_stream(),
                )
            };
            self.settle("ncclAllReduce", status)?;
            // Only once the sum has finished may the host copy wait on the stream.
            self.drain()?;
            self.stream
                .memcpy_dtoh(&self.staging.slice(..chunk.len()), chunk)
                .map_err(|e| failure(format!("copying from the GPU: {e:?}")))?;
            self.drain()?;
        }
        Ok(())
    }

    fn all_reduce(&mut self, backend: &mut CudaBackend, t: Tensor) -> Result<()> {
        self.follow(backend)?;
        let (ptr, ty, _) = Self::operand(backend, t)?;
        let p = ptr as *mut core::ffi::c_void;
        // SAFETY: `comm_view` checked that `t` lies inside its allocation.
        let status =
            unsafe { nccl::all_reduce(p, p, t.len, ty, sys::ncclRedOp_t::ncclSum, self.comm, self.cu_stream()) };
        self.settle("ncclAllReduce", status)
    }

    fn reduce_scatter(&mut self, backend: &mut CudaBackend, t: Tensor, into: Tensor) -> Result<()> {
        self.follow(backend)?;
        let (whole, recv, ty, count) = self.piece_operands(backend, "reduce_scatter", t, into)?;
        // SAFETY: `piece_operands` checked both tensors; `into` is this rank's piece of `t` (in place, as NCCL allows)
        // or apart from it.
        let status = unsafe {
            nccl::reduce_scatter(
                whole as *const _,
                recv as *mut _,
                count,
                ty,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.cu_stream(),
            )
        };
        self.settle("ncclReduceScatter", status)
    }

    fn all_gather(&mut self, backend: &mut CudaBackend, t: Tensor, from: Tensor) -> Result<()> {
        self.follow(backend)?;
        let (whole, send, ty, count) = self.piece_operands(backend, "all_gather", t, from)?;
        // SAFETY: as in reduce_scatter.
        let status =
            unsafe { nccl::all_gather(send as *const _, whole as *mut _, count, ty, self.comm, self.cu_stream()) };
        self.settle("ncclAllGather", status)?;
        self.gathered.record(&self.stream).map_err(|e| failure(format!("recording an event: {e:?}")))
    }

    fn order_gathers(&mut self, backend: &mut CudaBackend) -> Result<()> {
        if !self.has_work_to_order(backend)? {
            return Ok(());
        }
        backend.stream().wait(&self.gathered).map_err(|e| failure(format!("ordering the streams: {e:?}")))
    }

    fn order(&mut self, backend: &mut CudaBackend) -> Result<()> {
        if !self.has_work_to_order(backend)? {
            return Ok(());
        }
        self.done.record(&self.stream).map_err(|e| failure(format!("recording an event: {e:?}")))?;
        backend.stream().wait(&self.done).map_err(|e| failure(format!("ordering the streams: {e:?}")))
    }

    fn wait(&mut self, backend: &mut CudaBackend) -> Result<()> {
        if backend.capturing() {
            return self.order(backend);
        }
        // Once the host has seen both streams' work end, whatever it queues next comes after it.
        self.follow(backend)?;
        self.drain()
    }

    fn capturable(&self) -> bool {
        self.alone
    }
}

impl Drop for NcclComm {
    /// Aborts rather than destroys: a communicator is dropped either after the last collective has been waited
    /// for, when the two are the same, or because this rank failed, when ncclCommDestroy would wait for
    /// operations that need the other ranks (which are waiting for this one).
    fn drop(&mut self) {
        self.abort_once();
        // The engine, and with it the graphs, went first (the trainer holds it before the communicator), so the abort
        // ends now: its thread is waited for, lest the process exit inside NCCL. A bounded wait all the same.
        if let Some(told) = self.aborted_on_thread.take() {
            let _ = told.recv_timeout(GRACE);
        }
    }
}
