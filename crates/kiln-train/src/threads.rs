//! A [`Communicator`] for ranks that are threads of one process: how the CPU engine trains data-parallel
//! (`kiln train --backend cpu --ranks N`), so that every data-parallel code path runs without a GPU.
//!
//! Each rank copies its tensor into its own host slot; once all have arrived, each rank sums the slots it needs in
//! rank order 0, 1, …, so every rank computes bit-identical sums whatever the threads' timing. Operations complete
//! before they return (there is no device to overlap with), so [`Communicator::wait`] has nothing to do. While the
//! engine captures a graph, an operation on tensors is recorded into it ([`Backend::capture_host`]) and carried out
//! at each replay, so that `train.graphs` runs with several ranks on the CPU engine as on GPUs.
//!
//! A rank that drops its communicator (because it failed, or finished) releases the others: their next wait for
//! it returns an error naming it instead of blocking, and so does a wait longer than the timeout.

use crate::{Hooks, Summary, Trainer};
use kiln_core::comm::piece;
use kiln_core::{Backend, Communicator, Config, Error, Result, Tensor};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Trains on `world` ranks that are threads of this process, on the CPU engine's model of them: each with the
/// backend `make_backend(rank)` returns and a communicator of [`group`]. See [`train_ranks`]; a job of one rank
/// runs on the calling thread alone, with a communicator that does nothing.
pub fn train<B: Backend>(
    config: &Config,
    world: usize,
    make_backend: impl Fn(usize) -> Result<B> + Sync,
    resume: Option<&Path>,
    hooks: &mut Hooks,
    write_outputs: bool,
) -> Result<Summary> {
    if world == 1 {
        let mut trainer = Trainer::new(config, make_backend(0)?)?;
        if let Some(dir) = resume {
            trainer.resume(dir)?;
        }
        return trainer.run(hooks, write_outputs);
    }
    let make_rank = thread_ranks(world, Duration::from_secs(config.dist.timeout_s), make_backend);
    train_ranks(config, world, make_rank, resume, hooks, write_outputs)
}

/// One rank of a job: its engine and its communicator with the other ranks.
pub type Rank<B> = (B, Box<dyn Communicator<B>>);

/// How [`run_ranks`] makes each of `world` ranks that are threads of this process: with the backend
/// `make_backend(rank)` returns and its communicator of one [`group`] (whose waits give up after `timeout`).
pub fn thread_ranks<B: Backend>(
    world: usize,
    timeout: Duration,
    make_backend: impl Fn(usize) -> Result<B> + Sync,
) -> impl Fn(usize, &Arc<AtomicBool>) -> Result<Rank<B>> + Sync {
    let comms: Mutex<Vec<Option<ThreadComm>>> = Mutex::new(group(world, timeout).into_iter().map(Some).collect());
    // A rank whose engine cannot start never takes its communicator: the others learn of the failure from `failed`,
    // raised once its error is recorded, and so report that error rather than the rank's absence.
    move |rank, failed| {
        let backend = make_backend(rank)?;
        let mut comm = comms.lock().unwrap_or_else(|p| p.into_inner())[rank].take().expect("each rank is made once");
        comm.member.failed = Some(failed.clone());
        Ok((backend, Box::new(comm)))
    }
}

/// Trains on `world` ranks that are threads of this process (one per GPU, say), each with the engine and the
/// communicator `make_rank(rank, failed)` returns; `resume` continues them all from that checkpoint. Rank 0 runs on
/// the calling thread with `hooks`, and its summary is returned. Failures are handled as [`run_ranks`] says.
pub fn train_ranks<B: Backend>(
    config: &Config,
    world: usize,
    make_rank: impl Fn(usize, &Arc<AtomicBool>) -> Result<Rank<B>> + Sync,
    resume: Option<&Path>,
    hooks: &mut Hooks,
    write_outputs: bool,
) -> Result<Summary> {
    let train_rank = |rank: usize, failures: &Failures, hooks: &mut Hooks| -> Option<Summary> {
        let mut trainer =
            match make_rank(rank, failures.flag()).and_then(|(b, comm)| Trainer::with_comm(config, b, comm)) {
                Ok(trainer) => trainer,
                Err(e) => return failures.record(e),
            };
        let resumed = resume.map_or(Ok(0), |dir| trainer.resume(dir));
        match resumed.and_then(|_| trainer.run(hooks, write_outputs)) {
            Ok(summary) => Some(summary),
            Err(e) => failures.record(e),
        }
    };
    let stop = hooks.stop.clone();
    run_ranks(
        world,
        |failures| train_rank(0, failures, hooks),
        |rank, failures| {
            train_rank(rank, failures, &mut Hooks { stop: stop.clone(), on_step: None });
        },
    )
}

/// What the ranks of [`run_ranks`] share about failing: a flag raised when any rank has failed (which a
/// communicator that cannot otherwise notice, such as NCCL's, watches), and the first rank's error.
pub struct Failures {
    flag: Arc<AtomicBool>,
    first: Mutex<Option<Error>>,
}

impl Failures {
    /// The flag raised when any rank has failed.
    pub fn flag(&self) -> &Arc<AtomicBool> {
        &self.flag
    }

    /// Records a rank's error and raises the flag; returns `None`, for the rank to return. A rank calls it while it
    /// still holds its engine and communicator: the others then learn that it failed before its communicator
    /// goes, and its error, rather than their report of its leaving, is the one returned.
    pub fn record<T>(&self, e: Error) -> Option<T> {
        self.flag.store(true, Ordering::Relaxed);
        self.first.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        None
    }
}

/// Runs `world` ranks as threads of this process: rank 0 as `lead` on the calling thread, whose result is
/// returned, and every other rank `r` as `rank(r, …)` on a thread of its own. A rank that fails records its error
/// in the [`Failures`] it is given (so does one whose thread cannot start) and returns `None`; one that panics
/// raises the flag, and its panic goes on once the others have ended. The others stop at their next collective, and
/// the error of the first rank to fail is returned.
pub fn run_ranks<T>(
    world: usize,
    lead: impl FnOnce(&Failures) -> Option<T>,
    rank: impl Fn(usize, &Failures) + Sync,
) -> Result<T> {
    let failures = Failures { flag: Arc::new(AtomicBool::new(false)), first: Mutex::new(None) };
    let lead = std::thread::scope(|s| {
        for r in 1..world {
            let (failures, rank) = (&failures, &rank);
            let spawned = std::thread::Builder::new().name(format!("rank {r}")).spawn_scoped(s, move || {
                let _raise_on_panic = RaiseOnPanic(&failures.flag);
                rank(r, failures)
            });
            if let Err(e) = spawned {
                failures.record::<()>(failure(format!("cannot start a thread for rank {r}: {e}")));
            }
        }
        let _raise_on_panic = RaiseOnPanic(&failures.flag);
        lead(&failures)
    });
    match failures.first.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(error) => Err(error),
        None => Ok(lead.expect("rank 0 either succeeded or recorded its failure")),
    }
}

/// Raises the flag if the thread unwinds from a panic, so that the other ranks stop instead of waiting for it.
struct RaiseOnPanic<'a>(&'a AtomicBool);

impl Drop for RaiseOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

struct Gate {
    /// Ranks waiting at the current barrier, and how many barriers have opened.
    arrived: usize,
    generation: u64,
    /// The first rank that left the group.
    left: Option<usize>,
}

struct Shared {
    world: usize,
    gate: Mutex<Gate>,
    opened: Condvar,
    slots: Vec<RwLock<Vec<f32>>>,
    host_slots: Vec<RwLock<Vec<f64>>>,
    timeout: Duration,
}

/// One rank's end of a [`group`].
pub struct ThreadComm {
    member: Member,
}

/// What a rank's operations need of the group: a copy of it goes into each operation a graph records.
#[derive(Clone)]
struct Member {
    rank: usize,
    shared: Arc<Shared>,
    /// Raised when any rank of the job has failed, before or after it joined the group.
    failed: Option<Arc<AtomicBool>>,
    /// Nanoseconds the rank has waited at barriers since [`Communicator::waited`] last took them.
    waited: Arc<AtomicU64>,
    /// The rank's sums, before they are copied to its tensor (one operation of a rank runs at a time).
    sums: Arc<Mutex<Vec<f32>>>,
}

/// Communicators for `world` ranks that are threads of this process. A rank that waits longer than `timeout` for
/// the others gives up with an error.
pub fn group(world: usize, timeout: Duration) -> Vec<ThreadComm> {
    let shared = Arc::new(Shared {
        world,
        gate: Mutex::new(Gate { arrived: 0, generation: 0, left: None }),
        opened: Condvar::new(),
        slots: (0..world).map(|_| RwLock::new(Vec::new())).collect(),
        host_slots: (0..world).map(|_| RwLock::new(Vec::new())).collect(),
        timeout,
    });
    let member =
        |rank| Member { rank, shared: shared.clone(), failed: None, waited: Arc::default(), sums: Arc::default() };
    (0..world).map(|rank| ThreadComm { member: member(rank) }).collect()
}

fn failure(message: String) -> Error {
    Error::backend("ranks", message)
}

impl Member {
    /// Waits until every rank has reached the same barrier.
    fn barrier(&self) -> Result<()> {
        let entered = Instant::now();
        let passed = self.pass_barrier();
        self.waited.fetch_add(entered.elapsed().as_nanos() as u64, Ordering::Relaxed);
        passed
    }

    fn pass_barrier(&self) -> Result<()> {
        let s = &self.shared;
        // A rank that panicked while holding the lock has left; its Drop reports it.
        let mut gate = s.gate.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rank) = gate.left {
            return Err(failure(format!("rank {rank} left the job, so rank {} stops too", self.rank)));
        }
        gate.arrived += 1;
        if gate.arrived == s.world {
            gate.arrived = 0;
            gate.generation += 1;
            s.opened.notify_all();
            return Ok(());
        }
        let generation = gate.generation;
        let deadline = Instant::now() + s.timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(failure(format!(
                    "rank {} waited {} s for the other ranks in a collective operation; giving up",
                    self.rank,
                    s.timeout.as_secs()
                )));
            }
            // Woken when the barrier opens or a rank leaves; a failure flagged elsewhere is seen within a slice.
            let slice = (deadline - now).min(Duration::from_millis(20));
            gate = s.opened.wait_timeout(gate, slice).unwrap_or_else(|p| p.into_inner()).0;
            if gate.generation != generation {
                return Ok(());
            }
            if let Some(rank) = gate.left {
                return Err(failure(format!("rank {rank} left the job, so rank {} stops too", self.rank)));
            }
            if self.failed.as_ref().is_some_and(|f| f.load(Ordering::Relaxed)) {
                return Err(failure(format!("another rank failed, so rank {} stops too", self.rank)));
            }
        }
    }

    /// Leaves `t` in this rank's slot, then waits for the others to have left theirs.
    fn deposit<B: Backend + ?Sized>(&self, backend: &mut B, t: Tensor) -> Result<()> {
        {
            let mut slot = self.shared.slots[self.rank].write().unwrap_or_else(|p| p.into_inner());
            slot.resize(t.len, 0.0);
            backend.download(t, &mut slot)?;
        }
        self.barrier()
    }

    /// Sums elements `range` of every rank's slot, in rank order, into `sums`.
    fn sum_slots(&self, sums: &mut Vec<f32>, range: std::ops::Range<usize>) {
        sums.clear();
        for (rank, slot) in self.shared.slots.iter().enumerate() {
            let slot = slot.read().unwrap_or_else(|p| p.into_inner());
            if rank == 0 {
                sums.extend_from_slice(&slot[range.clone()]);
            } else {
                sums.iter_mut().zip(&slot[range.clone()]).for_each(|(s, x)| *s += x);
            }
        }
    }
}

impl ThreadComm {
    /// Carries out `op` on this rank's engine with the rank's buffer of sums, or records it into the graph the engine
    /// is capturing, to be carried out so at each replay.
    fn run<B: Backend>(
        &mut self,
        backend: &mut B,
        op: impl Fn(&Member, &mut B, &mut Vec<f32>) -> Result<()> + Send + 'static,
    ) -> Result<()> {
        let member = self.member.clone();
        let run = move |b: &mut B| op(&member, b, &mut member.sums.lock().unwrap_or_else(|p| p.into_inner()));
        match backend.capturing() {
            true => backend.capture_host(Box::new(run)),
            false => run(backend),
        }
    }
}

impl<B: Backend> Communicator<B> for ThreadComm {
    fn rank(&self) -> usize {
        self.member.rank
    }

    fn world(&self) -> usize {
        self.member.shared.world
    }

    fn all_reduce_host(&mut self, _: &mut B, values: &mut [f64]) -> Result<()> {
        let m = &self.member;
        {
            let mut slot = m.shared.host_slots[m.rank].write().unwrap_or_else(|p| p.into_inner());
            slot.clear();
            slot.extend_from_slice(values);
        }
        m.barrier()?;
        values.fill(0.0);
        for slot in &m.shared.host_slots {
            let slot = slot.read().unwrap_or_else(|p| p.into_inner());
            values.iter_mut().zip(slot.iter()).for_each(|(v, x)| *v += x);
        }
        // Nobody may overwrite a slot before every rank has read it.
        m.barrier()
    }

    fn all_reduce(&mut self, backend: &mut B, t: Tensor) -> Result<()> {
        self.run(backend, move |m, b, sums| {
            m.deposit(b, t)?;
            m.sum_slots(sums, 0..t.len);
            b.upload(t, sums)?;
            m.barrier()
        })
    }

    fn reduce_scatter(&mut self, backend: &mut B, t: Tensor, into: Tensor) -> Result<()> {
        self.run(backend, move |m, b, sums| {
            m.deposit(b, t)?;
            let mine = piece(t, m.shared.world, m.rank);
            m.sum_slots(sums, mine.offset - t.offset..mine.offset - t.offset + mine.len);
            b.upload(into, sums)?;
            m.barrier()
        })
    }

    fn all_gather(&mut self, backend: &mut B, t: Tensor, from: Tensor) -> Result<()> {
        self.run(backend, move |m, b, _| {
            m.deposit(b, from)?;
            for (rank, slot) in m.shared.slots.iter().enumerate() {
                let mine = piece(t, m.shared.world, rank);
                if mine != from {
                    b.upload(mine, &slot.read().unwrap_or_else(|p| p.into_inner()))?;
                }
            }
            m.barrier()
        })
    }

    fn wait(&mut self, _: &mut B) -> Result<()> {
        Ok(())
    }

    fn waited(&mut self) -> Duration {
        Duration::from_nanos(self.member.waited.swap(0, Ordering::Relaxed))
    }

    /// Its operations on tensors are recorded into the engine's graph (which an engine that cannot run host work in
    /// its graphs refuses, failing the capture).
    fn capturable(&self) -> bool {
        true
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        let shared = &self.member.shared;
        let mut gate = shared.gate.lock().unwrap_or_else(|p| p.into_inner());
        gate.left.get_or_insert(self.member.rank);
        shared.opened.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Role;
    use kiln_cpu::CpuBackend;

    /// Runs `f` on `world` threads, each with its own CPU backend and communicator; returns their results in rank
    /// order.
    fn on_ranks<T: Send>(
        world: usize,
        f: impl Fn(&mut CpuBackend<f32>, &mut ThreadComm) -> Result<T> + Sync,
    ) -> Vec<Result<T>> {
        let comms = group(world, Duration::from_secs(10));
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|mut comm| {
                    let f = &f;
                    s.spawn(move || f(&mut CpuBackend::new(), &mut comm))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn rank_values(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| (rank * 1000 + i) as f32 * 0.5 + 0.25).collect()
    }

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank() {
        let results = on_ranks(3, |b, comm| {
            let t = b.alloc(9, Role::Grad)?;
            b.upload(t, &rank_values(comm.member.rank, 9))?;
            Communicator::<CpuBackend<f32>>::all_reduce(comm, b, t)?;
            let mut host = [0.0; 9];
            b.download(t, &mut host)?;
            let mut counts = [comm.member.rank as f64, 1.0];
            Communicator::<CpuBackend<f32>>::all_reduce_host(comm, b, &mut counts)?;
            Ok((host, counts))
        });
        let expected: Vec<f32> = (0..9).map(|i| (0..3).map(|r| rank_values(r, 9)[i]).sum()).collect();
        for result in results {
            let (host, counts) = result.unwrap();
            assert_eq!(host.to_vec(), expected);
            assert_eq!(counts, [3.0, 3.0]);
        }
    }

    #[test]
    fn reduce_scatter_then_all_gather_is_an_all_reduce() {
        let results = on_ranks(4, |b, comm| {
            let t = b.alloc(12, Role::Param)?;
            b.upload(t, &rank_values(comm.member.rank, 12))?;
            let mine = piece(t, 4, comm.member.rank);
            Communicator::<CpuBackend<f32>>::reduce_scatter(comm, b, t, mine)?;
            Communicator::<CpuBackend<f32>>::all_gather(comm, b, t, mine)?;
            let mut host = vec![0.0; 12];
            b.download(t, &mut host)?;
            Ok(host)
        });
        let expected: Vec<f32> = (0..12).map(|i| (0..4).map(|r| rank_values(r, 12)[i]).sum()).collect();
        for result in results {
            assert_eq!(result.unwrap(), expected);
        }
    }

    #[test]
    fn a_rank_counts_its_waits_for_the_others_in_replayed_collectives_too() {
        // Rank 1 arrives late at each all-reduce: once run as called, once replayed from a graph.
        let late = Duration::from_millis(200);
        let results = on_ranks(2, |b, comm| {
            let t = b.alloc(4, Role::Grad)?;
            b.upload(t, &rank_values(comm.member.rank, 4))?;
            b.begin_capture()?;
            Communicator::<CpuBackend<f32>>::all_reduce(comm, b, t)?;
            let graph = b.end_capture()?;
            let mut waits = Vec::new();
            for replayed in [false, true] {
                // Both ranks set out together.
                Communicator::<CpuBackend<f32>>::all_reduce_host(comm, b, &mut [0.0])?;
                Communicator::<CpuBackend<f32>>::waited(comm);
                if comm.member.rank == 1 {
                    std::thread::sleep(late);
                }
                match replayed {
                    false => Communicator::<CpuBackend<f32>>::all_reduce(comm, b, t)?,
                    true => b.replay(graph)?,
                }
                waits.push(Communicator::<CpuBackend<f32>>::waited(comm));
            }
            Ok(waits)
        });
        let waits: Vec<Vec<Duration>> = results.into_iter().map(Result::unwrap).collect();
        for (early, late_one) in waits[0].iter().zip(&waits[1]) {
            assert!(early.saturating_sub(*late_one) > late / 2, "rank 0 waited for rank 1: {waits:?}");
        }
    }

    #[test]
    fn a_rank_that_leaves_releases_the_others_with_an_error() {
        let started = Instant::now();
        let results = on_ranks(3, |b, comm| {
            if comm.member.rank == 1 {
                return Err(Error::Invalid("rank 1 fails before the collective".into()));
            }
            let mut values = [1.0];
            Communicator::<CpuBackend<f32>>::all_reduce_host(comm, b, &mut values)
        });
        assert!(started.elapsed() < Duration::from_secs(5), "the others must not wait for the timeout");
        for (rank, result) in results.into_iter().enumerate() {
            let message = result.unwrap_err().to_string();
            if rank != 1 {
                assert!(message.contains("rank 1 left the job"), "{message}");
            }
        }
    }

    #[test]
    fn a_missing_rank_times_out() {
        let mut comms = group(2, Duration::from_millis(200));
        let _absent = comms.pop();
        let mut b = CpuBackend::<f32>::new();
        let err = Communicator::<CpuBackend<f32>>::all_reduce_host(&mut comms[0], &mut b, &mut [1.0]).unwrap_err();
        assert!(err.to_string().contains("giving up"), "{err}");
    }
}
