//! Which elements of a parameter allocation a rank's fp32 master copy holds (see
//! [`Backend::keep_master_pieces`](crate::Backend::keep_master_pieces)).
//!
//! A single-GPU run keeps the master copy of every parameter. Under ZeRO stage 1 a rank updates only its pieces of
//! the parameters, so it keeps the master copy of those pieces alone, packed one after another in the order of the
//! allocation: a world of N ranks holds the fp32 weights once between them rather than N times.

use crate::Tensor;
use std::ops::Range;

/// Sorted, disjoint ranges of an allocation's elements, stored one after another in a packed copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pieces {
    /// Each range and where it starts in the packed copy.
    ranges: Vec<(Range<usize>, usize)>,
    packed_len: usize,
}

impl Pieces {
    /// Every element of an allocation of `len`.
    pub fn whole(len: usize) -> Pieces {
        Pieces { ranges: vec![(0..len, 0)], packed_len: len }
    }

    /// The given ranges of an allocation of `len` elements, in any order; empty ranges are dropped. Why they
    /// cannot be kept, if they overlap or reach past the allocation.
    pub fn new(ranges: &[Range<usize>], len: usize) -> Result<Pieces, String> {
        let mut sorted: Vec<Range<usize>> = ranges.iter().filter(|r| !r.is_empty()).cloned().collect();
        sorted.sort_by_key(|r| r.start);
        if let Some(outside) = sorted.iter().find(|r| r.end > len) {
            return Err(format!("piece {outside:?} reaches past the allocation of {len} elements"));
        }
        if let Some(pair) = sorted.windows(2).find(|pair| pair[0].end > pair[1].start) {
            return Err(format!("pieces {:?} and {:?} overlap", pair[0], pair[1]));
        }
        let mut packed_len = 0;
        let ranges = sorted
            .into_iter()
            .map(|r| {
                let start = packed_len;
                packed_len += r.len();
                (r, start)
            })
            .collect();
        Ok(Pieces { ranges, packed_len })
    }

    /// `pieces` of tensor `t` (ranges of its elements), as ranges of its allocation of `allocation_len` elements.
    pub fn of_tensor(t: Tensor, pieces: &[Range<usize>], allocation_len: usize) -> Result<Pieces, String> {
        if let Some(outside) = pieces.iter().find(|p| p.end > t.len) {
            return Err(format!("piece {outside:?} reaches past the tensor of {} elements", t.len));
        }
        let in_allocation: Vec<Range<usize>> = pieces.iter().map(|p| t.offset + p.start..t.offset + p.end).collect();
        Pieces::new(&in_allocation, allocation_len)
    }

    /// Elements of the packed copy.
    pub fn packed_len(&self) -> usize {
        self.packed_len
    }

    /// The parts of `range` that the copy holds, in order: `(element, packed index, length)`.
    pub fn parts(&self, range: Range<usize>) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        self.ranges.iter().filter_map(move |(piece, packed)| {
            let (from, to) = (piece.start.max(range.start), piece.end.min(range.end));
            (from < to).then(|| (from, packed + from - piece.start, to - from))
        })
    }

    /// The packed index of element `range.start` when one piece holds all of `range`.
    pub fn packed_index(&self, range: Range<usize>) -> Option<usize> {
        let (piece, packed) = self.ranges.iter().find(|(p, _)| p.start <= range.start && range.end <= p.end)?;
        Some(packed + range.start - piece.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_pack_in_the_order_of_the_allocation() {
        let pieces = Pieces::new(&[40..60, 0..10, 20..20, 10..15], 100).unwrap();
        assert_eq!(pieces.packed_len(), 35);
        let parts: Vec<_> = pieces.parts(5..50).collect();
        assert_eq!(parts, vec![(5, 5, 5), (10, 10, 5), (40, 15, 10)]);
        assert_eq!(pieces.parts(15..40).count(), 0);
        assert_eq!(pieces.packed_index(42..60), Some(17));
        assert_eq!(pieces.packed_index(0..15), None, "two pieces, even when adjacent, are two updates");
        assert_eq!(pieces.packed_index(55..61), None);
    }

    #[test]
    fn the_whole_allocation_is_one_piece() {
        let whole = Pieces::whole(8);
        assert_eq!(whole.parts(2..7).collect::<Vec<_>>(), vec![(2, 2, 5)]);
        assert_eq!(whole.packed_index(0..8), Some(0));
    }

    #[test]
    fn a_tensors_pieces_are_placed_in_its_allocation() {
        let t = Tensor { buffer: crate::backend::BufferId(0), offset: 100, len: 50 };
        let pieces = Pieces::of_tensor(t, &[10..20, 0..5], 200).unwrap();
        assert_eq!(pieces.parts(0..200).collect::<Vec<_>>(), vec![(100, 0, 5), (110, 5, 10)]);
        assert!(Pieces::of_tensor(t, &[0..1, 45..51], 200).unwrap_err().contains("past the tensor"));
    }

    #[test]
    fn overlapping_or_outlying_pieces_are_refused() {
        assert!(Pieces::new(&[0..10, 5..12], 20).unwrap_err().contains("overlap"));
        assert!(Pieces::new(&[10..12, 15..21], 20).unwrap_err().contains("past the allocation"));
    }
}
