//! How the ranks of a data-parallel job combine what they computed.
//!
//! Every rank runs the same model on its own part of the batch; a [`Communicator`] sums their gradients (or, for
//! ZeRO stage 1, hands each rank the sum of its own piece and later shares the pieces' updated weights), and
//! sums the few host numbers that every rank must agree on (token counts, losses, norms, "stop now").
//!
//! Operations on tensors may run asynchronously on the device, in issue order, overlapping the work queued after
//! them: [`Communicator::wait`] makes work queued afterwards wait for them. Every rank must issue the same
//! operations in the same order with the same sizes. A communicator whose peers fail or disappear returns an
//! error from its next operation instead of waiting for ever.

use crate::backend::{Backend, Tensor};
use crate::error::Result;

pub trait Communicator<B: Backend + ?Sized> {
    /// This process's (or thread's) index in the job, `0..world`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;

    /// Sums `values` over all ranks, in place; every rank receives bit-identical sums. Waits for the result.
    fn all_reduce_host(&mut self, backend: &mut B, values: &mut [f64]) -> Result<()>;

    /// Every rank's `mine` (of the same length on each), rank after rank, on every rank: each rank's values in its
    /// own slot of a host sum, the others' slots zero.
    fn gather_host(&mut self, backend: &mut B, mine: &[f64]) -> Result<Vec<f64>> {
        let mut all = vec![0.0; mine.len() * self.world()];
        let start = mine.len() * self.rank();
        all[start..start + mine.len()].copy_from_slice(mine);
        self.all_reduce_host(backend, &mut all)?;
        Ok(all)
    }

    /// Starts summing `t` over all ranks, in place.
    fn all_reduce(&mut self, backend: &mut B, t: Tensor) -> Result<()>;

    /// Starts summing `t` over all ranks, keeping on each rank only its own piece: on rank `r`, `into` (`t.len /
    /// world` elements) receives the sum of every rank's piece `r` of `t` (see [`piece`]). `into` is that piece of
    /// `t` itself (in place: the rest of `t` is then left unspecified) or a tensor apart from `t`. `t.len` is a
    /// multiple of the world size.
    fn reduce_scatter(&mut self, backend: &mut B, t: Tensor, into: Tensor) -> Result<()>;

    /// Starts copying rank `r`'s `from` into piece `r` of every rank's `t`, for every rank `r`. `from` is this rank's
    /// piece of `t` itself (in place) or a tensor apart from `t` of a piece's length and type. `t.len` is a multiple
    /// of the world size. A parameter tensor of a mixed-precision engine is gathered in the
    /// precision the forward pass reads: a ZeRO rank's master copy holds only the pieces it updates (see
    /// [`Backend::keep_master_pieces`]; checkpoints gather the pieces from their owners).
    fn all_gather(&mut self, backend: &mut B, t: Tensor, from: Tensor) -> Result<()>;

    /// Makes the work queued after this call wait for every operation started before it. Outside a capture the host
    /// waits too, for those operations and everything queued on the engine before the call (a replayed graph's
    /// collectives among it), so that a failed peer or the timeout ends the wait with an error.
    fn wait(&mut self, backend: &mut B) -> Result<()>;

    /// The time the host has spent waiting for the other ranks in this communicator's operations since the last
    /// call: a rank's own work, which names a straggler, is its time without it. Zero where the host does not wait
    /// for them (a GPU's collectives, whose ranks are timed on the device instead).
    fn waited(&mut self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// Whether its operations on tensors and [`Communicator::wait`] can be captured into a graph of the engine's
    /// (see [`Backend::begin_capture`]): they then queue work on the engine and nothing on the host, and a `wait`
    /// inside the capture orders the engine's work only; the next `wait` outside it is the host's.
    fn capturable(&self) -> bool {
        false
    }

    /// As [`Communicator::wait`], without the host waiting where the engine can order its own queues (a GPU's
    /// streams): for the points inside a pass where work depends on a collective. A failure of such a collective
    /// surfaces at the next `wait`.
    fn order(&mut self, backend: &mut B) -> Result<()> {
        self.wait(backend)
    }

    /// As [`Communicator::order`], for the all-gathers started before this call and what was started before them,
    /// not the reductions started after the last gather: ZeRO stage 3's next block needs its weights, while the
    /// gradients of the block before may still be summed.
    fn order_gathers(&mut self, backend: &mut B) -> Result<()> {
        self.order(backend)
    }
}

/// Piece `rank` of `world` equal pieces of `t` (whose length is a multiple of `world`).
pub fn piece(t: Tensor, world: usize, rank: usize) -> Tensor {
    let len = t.len / world;
    t.slice(rank * len, len)
}

/// The communicator of a job of one rank: every operation leaves the data as it is.
pub struct Solo;

impl<B: Backend + ?Sized> Communicator<B> for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_reduce_host(&mut self, _: &mut B, _: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn all_reduce(&mut self, _: &mut B, _: Tensor) -> Result<()> {
        Ok(())
    }

    fn reduce_scatter(&mut self, backend: &mut B, t: Tensor, into: Tensor) -> Result<()> {
        // One rank's piece is the whole of `t`.
        if into != t {
            backend.zero(into)?;
            backend.add(into, t)?;
        }
        Ok(())
    }

    fn all_gather(&mut self, backend: &mut B, t: Tensor, from: Tensor) -> Result<()> {
        // One rank's piece is the whole of `t`. (Through the host: one rank that shards its weights gains nothing.)
        if from != t {
            let mut values = vec![0.0; from.len];
            backend.download(from, &mut values)?;
            backend.upload(t, &values)?;
        }
        Ok(())
    }

    fn wait(&mut self, _: &mut B) -> Result<()> {
        Ok(())
    }

    /// Its reduce-scatter queues engine work; an all-gather from a separate piece goes through the host, which a
    /// capture refuses.
    fn capturable(&self) -> bool {
        true
    }
}
