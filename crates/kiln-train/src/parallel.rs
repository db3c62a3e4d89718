//! The data-parallel side of a step: which rows of the global batch a rank trains on, how the flat gradient
//! vector is cut into buckets that are reduced while the backward pass goes on, which piece of the weights a rank
//! updates under ZeRO, and which rank is persistently slower than the rest.
//!
//! The global batch of a step is `world × accumulation × micro_batch` rows, numbered in one sequence that does not
//! depend on the world size: rank `r` trains on rows `r·A·M .. (r+1)·A·M`, micro-batch `k` on the `k`-th `M` of
//! them. A run resumed on another number of ranks therefore sees exactly the data it would have seen.

use std::ops::Range;

/// Each rank's piece of a bucket is a multiple of this many elements, so that pieces start on 256-byte boundaries
/// in fp32 and 128 in bf16 (what vectorised kernels and NCCL's fast paths want).
pub const PIECE_ALIGN: usize = 64;

/// The multiple to which the flat parameter and gradient vectors are padded for `world` ranks.
pub fn padding_multiple(world: usize) -> usize {
    world * PIECE_ALIGN
}

/// Global index of row `row` of micro-batch `micro` on `rank`.
pub fn global_row(rank: usize, micro: usize, row: usize, accumulation: usize, micro_batch: usize) -> u64 {
    ((rank * accumulation + micro) * micro_batch + row) as u64
}

/// How the gradient vector (`0..len`, `len` a multiple of [`padding_multiple`]) is reduced.
#[derive(Clone, Debug, PartialEq)]
pub struct Buckets {
    /// In the order the backward pass completes them: from the end of the vector (the last block) to the start
    /// (the embeddings), each a multiple of `world × PIECE_ALIGN` long.
    pub ranges: Vec<Range<usize>>,
    world: usize,
    rank: usize,
}

impl Buckets {
    /// Buckets of about `bucket_elems` elements over `0..len`.
    pub fn new(len: usize, world: usize, rank: usize, bucket_elems: usize) -> Buckets {
        let unit = padding_multiple(world);
        assert!(len % unit == 0, "the gradient vector is padded to a multiple of {unit}");
        let size = bucket_elems.next_multiple_of(unit).max(unit);
        let mut ranges = Vec::new();
        let mut end = len;
        while end > 0 {
            let start = end.saturating_sub(size);
            ranges.push(start..end);
            end = start;
        }
        Buckets { ranges, world, rank }
    }

    /// Buckets of the given ranges (in the order the backward pass completes them), each a multiple of `world ×
    /// PIECE_ALIGN` long: ZeRO stage 2's, one per unit of the model.
    pub fn from_ranges(ranges: Vec<Range<usize>>, world: usize, rank: usize) -> Buckets {
        let unit = padding_multiple(world);
        assert!(ranges.iter().all(|r| r.len() % unit == 0), "every bucket is padded to a multiple of {unit}");
        Buckets { ranges, world, rank }
    }

    /// The ranges this rank updates under ZeRO: its piece of every bucket.
    pub fn owned_pieces(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.ranges.iter().map(|b| {
            let piece = b.len() / self.world;
            b.start + self.rank * piece..b.start + (self.rank + 1) * piece
        })
    }
}

/// Launches the reduction of each bucket once the backward pass has finished every gradient in it.
#[derive(Default)]
pub struct BucketCursor {
    next: usize,
}

impl BucketCursor {
    /// The buckets (indices into [`Buckets::ranges`]) that became complete now that every gradient from
    /// `ready_from` to the end is final.
    pub fn advance(&mut self, buckets: &Buckets, ready_from: usize) -> Range<usize> {
        let first = self.next;
        while self.next < buckets.ranges.len() && buckets.ranges[self.next].start >= ready_from {
            self.next += 1;
        }
        first..self.next
    }
}

/// Names a rank whose step is persistently slower than the others': slower than `SLOWER` times the median of the
/// ranks for `STEPS` consecutive steps.
pub struct Stragglers {
    streak: Vec<u32>,
    sorted: Vec<f64>,
}

const SLOWER: f64 = 1.2;
const STEPS: u32 = 5;

impl Stragglers {
    pub fn new(world: usize) -> Self {
        Stragglers { streak: vec![0; world], sorted: Vec::with_capacity(world) }
    }

    /// Takes each rank's compute time of a step; returns a rank that has just become a straggler, with its time and
    /// the median's. A rank is named once per streak.
    pub fn observe(&mut self, times: &[f64]) -> Option<(usize, f64, f64)> {
        self.sorted.clear();
        self.sorted.extend_from_slice(times);
        self.sorted.sort_by(f64::total_cmp);
        let median = self.sorted[self.sorted.len() / 2];
        let mut named = None;
        for (rank, (&time, streak)) in times.iter().zip(&mut self.streak).enumerate() {
            *streak = if time > SLOWER * median { *streak + 1 } else { 0 };
            if *streak == STEPS && named.is_none() {
                named = Some((rank, time, median));
            }
        }
        named
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_vector_from_the_end_in_aligned_pieces() {
        let unit = padding_multiple(3);
        let buckets = Buckets::new(10 * unit, 3, 1, 4 * unit - 5);
        assert_eq!(buckets.ranges, vec![6 * unit..10 * unit, 2 * unit..6 * unit, 0..2 * unit]);
        let pieces: Vec<_> = buckets.owned_pieces().collect();
        let third = unit / 3;
        assert_eq!(pieces[0], 6 * unit + 4 * third..6 * unit + 8 * third);
        assert_eq!(pieces[2], 2 * third..4 * third);
        // Over all ranks the pieces tile the vector exactly once.
        let mut covered = vec![0; 10 * unit];
        for rank in 0..3 {
            for piece in Buckets::new(10 * unit, 3, rank, 4 * unit - 5).owned_pieces() {
                assert_eq!(piece.len() % PIECE_ALIGN, 0);
                covered[piece].iter_mut().for_each(|c| *c += 1);
            }
        }
        assert!(covered.iter().all(|&c| c == 1));
    }

    #[test]
    fn a_bucket_launches_only_when_the_backward_pass_has_passed_its_start() {
        let buckets = Buckets::new(4 * PIECE_ALIGN, 1, 0, PIECE_ALIGN);
        let mut cursor = BucketCursor::default();
        assert!(cursor.advance(&buckets, 4 * PIECE_ALIGN - 1).is_empty());
        let a = PIECE_ALIGN;
        let last = cursor.advance(&buckets, 2 * a + 7);
        assert_eq!((last.clone(), &buckets.ranges[last.start]), (0..1, &(3 * a..4 * a)));
        let rest: Vec<_> = cursor.advance(&buckets, 0).map(|i| buckets.ranges[i].clone()).collect();
        assert_eq!(rest, vec![2 * a..3 * a, a..2 * a, 0..a]);
        assert!(cursor.advance(&buckets, 0).is_empty());
    }

    #[test]
    fn rows_are_numbered_independently_of_the_world_size() {
        // 2 ranks × 2 micro-batches × 3 rows and 1 rank × 4 micro-batches × 3 rows cover the same 12 rows.
        let mut two: Vec<u64> =
            (0..2).flat_map(|r| (0..2).flat_map(move |k| (0..3).map(move |i| global_row(r, k, i, 2, 3)))).collect();
        let one: Vec<u64> = (0..4).flat_map(|k| (0..3).map(move |i| global_row(0, k, i, 4, 3))).collect();
        two.sort();
        assert_eq!(two, one);
        assert_eq!(one, (0..12).collect::<Vec<_>>());
    }

    #[test]
    fn a_persistently_slow_rank_is_named_once() {
        let mut s = Stragglers::new(3);
        let mut named = Vec::new();
        for step in 0..12 {
            let slow = if step == 7 { 1.0 } else { 2.0 };
            if let Some(found) = s.observe(&[1.0, slow, 1.05]) {
                named.push((step, found.0));
            }
        }
        // Slow from step 0: named at step 4; the streak breaks at step 7 and reaches 5 again at step 12 (not seen).
        assert_eq!(named, vec![(4, 1)]);
    }
}
