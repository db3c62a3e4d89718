//! `kiln bench allreduce`: the bus bandwidth of a job's all-reduce, measured as nccl-tests' `all_reduce_perf`
//! measures it, so that the numbers compare with that tool's: for each size, the mean time of an in-place sum of
//! one f32 buffer over every rank, the slowest rank's time, and from it the algorithm and bus bandwidths.

use kiln_core::{Backend, Communicator, Error, Result, Role};
use std::time::Instant;

/// What each rank measures: the sizes in bytes, and the all-reduces run first (not timed) and timed at each.
pub struct Plan {
    pub sizes: Vec<u64>,
    pub warmup: usize,
    pub iters: usize,
}

/// Sizes from `min` to `max` bytes, doubling, as nccl-tests' `-b MIN -e MAX -f 2` (`max` itself only when a
/// doubling reaches it).
pub fn doubling_sizes(min: u64, max: u64) -> Vec<u64> {
    std::iter::successors(Some(min), |&size| size.checked_mul(2)).take_while(|&size| size <= max).collect()
}

/// `--min-bytes` and `--max-bytes`: bytes, with nccl-tests' binary K, M and G (`1M` is 2^20 bytes) or any unit of
/// [`kiln_core::memory::parse_bytes`]; a whole number of f32 elements.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let binary = text.trim().ends_with(['K', 'M', 'G', 'k', 'm', 'g']);
    let bytes = kiln_core::memory::parse_bytes(&if binary { format!("{}iB", text.trim()) } else { text.into() })?;
    if bytes == 0 || bytes % 4 != 0 {
        return Err(format!("{text} is not a whole number of f32 elements (a positive multiple of 4 bytes)"));
    }
    Ok(bytes)
}

/// Algorithm bandwidth, bytes per second: the buffer's size over the time of one all-reduce.
pub fn algorithm_bandwidth(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds
}

/// Bus bandwidth, as nccl-tests defines it for all-reduce: the algorithm bandwidth × 2(n−1)/n, the rate at which
/// each rank's link carries data in a ring all-reduce of `world` ranks, comparable across job sizes and with the
/// hardware's link speed. One rank moves nothing over a bus: 0, as nccl-tests reports it.
pub fn bus_bandwidth(algorithm_bandwidth: f64, world: usize) -> f64 {
    algorithm_bandwidth * 2.0 * (world - 1) as f64 / world as f64
}

/// Elements filled per upload and checked per download: the check needs little host memory whatever the buffer's
/// size.
const CHECK_CHUNK: usize = 1 << 20;

/// The value rank `rank` puts at element `i` before the checked all-reduce: small whole numbers, so that every
/// sum is exact in f32 and any lost, repeated or misplaced piece shows.
fn filled(rank: usize, i: usize) -> f32 {
    ((rank + 1) * (i % 13 + 1)) as f32
}

/// Runs `plan` on this rank: allocates the largest size once, checks one all-reduce of it, then times each size.
/// Returns the mean seconds of one all-reduce at each size, the slowest rank's, on every rank. Every rank of the
/// job must call it with the same plan.
pub fn measure<B: Backend + ?Sized>(backend: &mut B, comm: &mut dyn Communicator<B>, plan: &Plan) -> Result<Vec<f64>> {
    let (rank, world) = (comm.rank(), comm.world());
    let largest = plan.sizes.iter().copied().max().unwrap_or(0);
    if let Some(free) = backend.free_bytes()
        && free < largest
    {
        return Err(Error::Usage(format!(
            "--max-bytes {largest}: the buffer does not fit in the {free} bytes free on rank {rank}'s {}",
            backend.name()
        )));
    }
    let buffer = backend.alloc((largest / 4) as usize, Role::Grad)?;
    let mut host = vec![0.0; CHECK_CHUNK.min(buffer.len)];
    for start in (0..buffer.len).step_by(CHECK_CHUNK) {
        let len = CHECK_CHUNK.min(buffer.len - start);
        host[..len].iter_mut().zip(start..).for_each(|(v, i)| *v = filled(rank, i));
        backend.upload(buffer.slice(start, len), &host[..len])?;
    }
    comm.all_reduce(backend, buffer)?;
    comm.wait(backend)?;
    // Rank 0 checks the sums, and every rank learns its verdict, so that all stop together on a wrong sum rather
    // than the others waiting in the next collective for a rank that left.
    let mut wrong = [if rank == 0 { wrong_sums(backend, buffer, world)? as f64 } else { 0.0 }];
    comm.all_reduce_host(backend, &mut wrong)?;
    if wrong[0] > 0.0 {
        return Err(Error::backend(
            "allreduce",
            format!("{} of {} sums on rank 0 are wrong after one all-reduce of {world} ranks", wrong[0], buffer.len),
        ));
    }
    // This rank's time at each size; the slowest rank's is the job's.
    let mut seconds = vec![0.0; plan.sizes.len()];
    for (s, &bytes) in plan.sizes.iter().enumerate() {
        let t = buffer.slice(0, (bytes / 4) as usize);
        for _ in 0..plan.warmup {
            comm.all_reduce(backend, t)?;
        }
        comm.wait(backend)?;
        backend.synchronize()?;
        // A host collective lines the ranks up, so that no rank's clock starts while it waits for a late one.
        comm.all_reduce_host(backend, &mut [0.0])?;
        let started = Instant::now();
        for _ in 0..plan.iters {
            comm.all_reduce(backend, t)?;
        }
        // Collectives on a device are queued: the clock is read only once they have finished.
        comm.wait(backend)?;
        backend.synchronize()?;
        seconds[s] = started.elapsed().as_secs_f64() / plan.iters as f64;
    }
    let every_rank = comm.gather_host(backend, &seconds)?;
    let slowest = |s: usize| every_rank.iter().skip(s).step_by(plan.sizes.len()).copied().fold(0.0, f64::max);
    Ok((0..plan.sizes.len()).map(slowest).collect())
}

/// How many elements of `buffer`, after one all-reduce of `world` ranks filled by [`filled`], are not the sum.
fn wrong_sums<B: Backend + ?Sized>(backend: &mut B, buffer: kiln_core::Tensor, world: usize) -> Result<usize> {
    let mut host = vec![0.0; CHECK_CHUNK.min(buffer.len)];
    let mut wrong = 0;
    for start in (0..buffer.len).step_by(CHECK_CHUNK) {
        let len = CHECK_CHUNK.min(buffer.len - start);
        backend.download(buffer.slice(start, len), &mut host[..len])?;
        wrong += (start..start + len)
            .zip(&host[..len])
            .filter(|&(i, &sum)| sum != (0..world).map(|rank| filled(rank, i)).sum::<f32>())
            .count();
    }
    Ok(wrong)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Tensor;
    use kiln_core::comm::Solo;
    use kiln_cpu::CpuBackend;

    /// Rank 0 of two whose communicator sums nothing, as a broken transport might.
    struct Unsummed;

    impl<B: Backend + ?Sized> Communicator<B> for Unsummed {
        fn rank(&self) -> usize {
            0
        }

        fn world(&self) -> usize {
            2
        }

        fn all_reduce_host(&mut self, backend: &mut B, values: &mut [f64]) -> Result<()> {
            Communicator::<B>::all_reduce_host(&mut Solo, backend, values)
        }

        fn all_reduce(&mut self, backend: &mut B, t: Tensor) -> Result<()> {
            Communicator::<B>::all_reduce(&mut Solo, backend, t)
        }

        fn reduce_scatter(&mut self, backend: &mut B, t: Tensor, into: Tensor) -> Result<()> {
            Communicator::<B>::reduce_scatter(&mut Solo, backend, t, into)
        }

        fn all_gather(&mut self, backend: &mut B, t: Tensor, from: Tensor) -> Result<()> {
            Communicator::<B>::all_gather(&mut Solo, backend, t, from)
        }

        fn wait(&mut self, backend: &mut B) -> Result<()> {
            Communicator::<B>::wait(&mut Solo, backend)
        }
    }

    #[test]
    fn a_wrong_sum_is_an_error_before_anything_is_timed() {
        let plan = Plan { sizes: vec![1024, 2048], warmup: 1, iters: 1 };
        let err = measure(&mut CpuBackend::<f32>::new(), &mut Unsummed, &plan).unwrap_err();
        assert!(err.to_string().contains("512 of 512 sums on rank 0 are wrong"), "{err}");
        assert_eq!(err.exit_code(), 1);
        let seconds = measure(&mut CpuBackend::<f32>::new(), &mut Solo, &plan).unwrap();
        assert!(seconds.len() == 2 && seconds.iter().all(|&s| s > 0.0), "{seconds:?}");
    }

    #[test]
    fn bus_bandwidth_is_nccl_tests_2_n_minus_1_over_n() {
        let algbw = algorithm_bandwidth(1 << 30, 0.01);
        assert_eq!(algbw, (1u64 << 30) as f64 * 100.0);
        // Two ranks: each link carries the buffer once; eight: 1.75 times; one: nothing.
        assert_eq!(bus_bandwidth(10.0, 2), 10.0);
        assert_eq!(bus_bandwidth(10.0, 8), 17.5);
        assert_eq!(bus_bandwidth(10.0, 1), 0.0);
    }

    #[test]
    fn sizes_double_from_min_to_max_in_nccl_tests_units() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert!(parse_size("6").unwrap_err().contains("multiple of 4"));
        assert!(parse_size("lots").is_err());
        assert_eq!(doubling_sizes(1 << 10, 64 << 10).len(), 7);
        assert_eq!(doubling_sizes(1 << 20, 1 << 30).len(), 11);
        assert_eq!(doubling_sizes(4, 7), vec![4]);
        assert!(doubling_sizes(8, 4).is_empty());
    }
}
