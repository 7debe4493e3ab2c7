//! The fixed-capacity KV cache: sized once at load, never grown.
//!
//! Each layer has its own capacity. A global layer keeps every position of a sequence
//! (`max_inference_len`); a sliding layer only needs the last `sliding_window` positions, so it
//! keeps a ring: position `p` lives in slot `p % capacity`, and the keys a query reads come as
//! two slices, oldest first, when they wrap around the end. A ring remembers which position each
//! slot holds, so that a caller can tell whether the positions it wants to reuse survived.

use crate::model::config::{Config, LayerType};
use crate::model::forward::CHUNK;

/// Keys and values of every layer.
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    /// Positions each layer holds.
    capacities: Vec<usize>,
    /// Where each layer starts in `k` and `v`, in floats.
    starts: Vec<usize>,
    kv_dim: usize,
    /// Positions of a sequence: `0..positions` (what a global layer holds).
    positions: usize,
    /// For each layer that is a ring (capacity below `positions`): the position each slot
    /// last received, `u32::MAX` when none.
    tags: Vec<Vec<u32>>,
}

impl KvCache {
    /// The cache of a model of config `c` for sequences of at most `max_len` tokens.
    pub fn for_model(c: &Config, max_len: usize) -> KvCache {
        KvCache::new(&Self::capacities(c, max_len), c.kv_dim(), max_len)
    }

    /// Bytes of [`KvCache::for_model`].
    pub fn bytes_for_model(c: &Config, max_len: usize) -> usize {
        Self::bytes_for(&Self::capacities(c, max_len), c.kv_dim(), max_len)
    }

    /// Positions each layer holds for sequences of `max_len` tokens: all of them on a global
    /// layer; on a sliding one, the window plus `CHUNK - 1` (a chunk writes its keys before its
    /// first query reads the window behind it), as a ring.
    pub fn capacities(c: &Config, max_len: usize) -> Vec<usize> {
        c.layer_types
            .iter()
            .map(|t| match t {
                LayerType::Global => max_len,
                LayerType::Sliding => max_len.min(c.sliding_window + CHUNK - 1),
            })
            .collect()
    }

    /// Rows each layer needs of a sequence of `n` tokens so that the next token can be computed
    /// (what a state file keeps): every position on a global layer, the last `sliding_window`
    /// on a sliding one.
    pub fn live_rows(c: &Config, n: usize) -> Vec<usize> {
        c.layer_types
            .iter()
            .map(|t| match t {
                LayerType::Global => n,
                LayerType::Sliding => n.min(c.sliding_window),
            })
            .collect()
    }

    /// Layers holding `capacities` positions each, of sequences of at most `positions` tokens.
    /// The memory is reserved zeroed; the OS backs pages only as slots are written.
    pub fn new(capacities: &[usize], kv_dim: usize, positions: usize) -> KvCache {
        let mut starts = Vec::with_capacity(capacities.len());
        let mut len = 0;
        for &c in capacities {
            starts.push(len);
            len += c * kv_dim;
        }
        let tags = capacities.iter().map(|&c| if c < positions { vec![u32::MAX; c] } else { Vec::new() }).collect();
        KvCache {
            k: vec![0.0; len],
            v: vec![0.0; len],
            capacities: capacities.to_vec(),
            starts,
            kv_dim,
            positions,
            tags,
        }
    }

    /// Bytes of K and V together (and of the rings' slot tags) for layers of these capacities.
    pub fn bytes_for(capacities: &[usize], kv_dim: usize, positions: usize) -> usize {
        let rings: usize = capacities.iter().filter(|&&c| c < positions).sum();
        2 * capacities.iter().sum::<usize>() * kv_dim * std::mem::size_of::<f32>() + rings * std::mem::size_of::<u32>()
    }

    pub fn bytes(&self) -> usize {
        Self::bytes_for(&self.capacities, self.kv_dim, self.positions)
    }

    /// Whether `layer` still holds positions `first..last` as last written (a ring may have
    /// given their slots to other positions since).
    pub fn holds(&self, layer: usize, first: usize, last: usize) -> bool {
        let tags = &self.tags[layer];
        tags.is_empty() || (first..last).all(|p| tags[p % tags.len()] == p as u32)
    }

    /// Floats of one key (and of one value) row.
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Positions of a sequence.
    pub fn positions(&self) -> usize {
        self.positions
    }

    fn offset(&self, layer: usize, pos: usize) -> usize {
        self.starts[layer] + (pos % self.capacities[layer]) * self.kv_dim
    }

    /// Writes the key and value rows (each `kv_dim` long) of `pos` in `layer`, over whatever
    /// position held its slot.
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        assert!(pos < self.positions, "KV cache: position {pos} past the {} of a sequence", self.positions);
        let tags = &mut self.tags[layer];
        if !tags.is_empty() {
            let n = tags.len();
            tags[pos % n] = pos as u32;
        }
        let o = self.offset(layer, pos);
        self.k[o..o + self.kv_dim].copy_from_slice(k);
        self.v[o..o + self.kv_dim].copy_from_slice(v);
    }

    /// The rows of positions `first..=last` of `layer`, oldest first, as two slices (the second
    /// empty unless the range wraps around the ring).
    fn rows<'a>(&self, data: &'a [f32], layer: usize, first: usize, last: usize) -> [&'a [f32]; 2] {
        let cap = self.capacities[layer];
        assert!(first <= last && last - first < cap, "KV cache: positions {first}..={last} exceed {cap} slots");
        let (a, b) = (self.offset(layer, first), self.offset(layer, last) + self.kv_dim);
        if a < b {
            [&data[a..b], &[]]
        } else {
            let (start, end) = (self.starts[layer], self.starts[layer] + cap * self.kv_dim);
            [&data[a..end], &data[start..b]]
        }
    }

    /// Keys of `layer` at positions `first..=last`, `(last - first + 1, kv_dim)` in two slices.
    pub fn keys(&self, layer: usize, first: usize, last: usize) -> [&[f32]; 2] {
        self.rows(&self.k, layer, first, last)
    }

    /// Values of `layer` at positions `first..=last`, as `keys`.
    pub fn values(&self, layer: usize, first: usize, last: usize) -> [&[f32]; 2] {
        self.rows(&self.v, layer, first, last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_land_where_they_are_read() {
        let mut c = KvCache::new(&[5, 5], 3, 5);
        assert_eq!(c.bytes(), 2 * 2 * 5 * 3 * 4);
        c.store(1, 4, &[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]);
        c.store(1, 3, &[7.0, 8.0, 9.0], &[0.0; 3]);
        assert_eq!(c.keys(1, 3, 4), [&[7.0, 8.0, 9.0, 1.0, 2.0, 3.0][..], &[]]);
        assert_eq!(c.values(1, 4, 4)[0], &[4.0, 5.0, 6.0]);
        assert_eq!(c.keys(0, 4, 4)[0], &[0.0; 3]);
    }

    #[test]
    fn a_ring_keeps_the_last_positions_and_splits_a_wrapped_range() {
        // Layer 0 holds 3 positions, layer 1 all 8.
        let mut c = KvCache::new(&[3, 8], 1, 8);
        assert_eq!(c.bytes(), 2 * 11 * 4 + 3 * 4);
        assert!(!c.holds(0, 0, 1) && c.holds(1, 0, 8));
        for pos in 0..8 {
            for layer in 0..2 {
                c.store(layer, pos, &[pos as f32], &[-(pos as f32)]);
            }
        }
        // Positions 5, 6, 7 sit in slots 2, 0, 1.
        assert_eq!(c.keys(0, 5, 7), [&[5.0][..], &[6.0, 7.0][..]]);
        assert_eq!(c.values(0, 6, 7), [&[-6.0, -7.0][..], &[]]);
        assert_eq!(c.keys(1, 0, 7)[0], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        // The ring knows what it lost: positions 5..8 are there, 4 is not; rewriting 3 gives
        // its slot back to 3 (and takes it from 6).
        assert!(c.holds(0, 5, 8) && !c.holds(0, 4, 8));
        c.store(0, 3, &[3.0], &[-3.0]);
        assert!(c.holds(0, 3, 4) && !c.holds(0, 6, 7) && c.holds(0, 7, 8));
    }

    #[test]
    #[should_panic(expected = "past the 8 of a sequence")]
    fn writing_past_the_sequence_is_refused() {
        KvCache::new(&[3, 8], 1, 8).store(1, 8, &[0.0], &[0.0]);
    }

    #[test]
    #[should_panic(expected = "exceed 3 slots")]
    fn reading_more_than_a_ring_holds_is_refused() {
        KvCache::new(&[3], 1, 8).keys(0, 0, 3);
    }
}
