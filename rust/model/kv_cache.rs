//! The fixed-capacity KV cache: sized once at load, never grown.
//!
//! Each layer has its own capacity. A global layer keeps every position of a sequence
//! (`max_inference_len`); a sliding layer only needs the last `sliding_window` positions, so it
//! keeps a ring: position `p` lives in slot `p % capacity`, and the keys a query reads come as
//! two slices, oldest first, when they wrap around the end. A ring remembers which position each
//! slot holds, so that a caller can tell whether the positions it wants to reuse survived.

use crate::error::{Error, Result};
use crate::kernels::half::{f16_to_f32_slice, f32_to_f16};
use crate::model::config::{Config, LayerType};
use crate::model::forward::CHUNK;

/// How keys and values are held: f32 (exact), or IEEE half (half the bytes; rounded to nearest
/// even when stored, converted back exactly when read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    pub fn parse(s: &str) -> Result<KvDtype> {
        match s {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            other => Err(Error::InvalidArgument(format!("kv_dtype must be \"f32\" or \"f16\", got {other:?}"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    /// Bytes of one value.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

/// The cache's rows in their type.
enum Rows {
    F32 { k: Vec<f32>, v: Vec<f32> },
    F16 { k: Vec<u16>, v: Vec<u16> },
}

/// One position's key and value rows as stored.
pub enum Row<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [u16], &'a [u16]),
}

/// Keys and values of every layer.
pub struct KvCache {
    rows: Rows,
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
    pub fn for_model(c: &Config, max_len: usize, dtype: KvDtype) -> KvCache {
        KvCache::new(&Self::capacities(c, max_len), c.kv_dim(), max_len, dtype)
    }

    /// Bytes of [`KvCache::for_model`].
    pub fn bytes_for_model(c: &Config, max_len: usize, dtype: KvDtype) -> usize {
        Self::bytes_for(&Self::capacities(c, max_len), c.kv_dim(), max_len, dtype)
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
    pub fn new(capacities: &[usize], kv_dim: usize, positions: usize, dtype: KvDtype) -> KvCache {
        let mut starts = Vec::with_capacity(capacities.len());
        let mut len = 0;
        for &c in capacities {
            starts.push(len);
            len += c * kv_dim;
        }
        let tags = capacities.iter().map(|&c| if c < positions { vec![u32::MAX; c] } else { Vec::new() }).collect();
        let rows = match dtype {
            KvDtype::F32 => Rows::F32 { k: vec![0.0; len], v: vec![0.0; len] },
            KvDtype::F16 => Rows::F16 { k: vec![0; len], v: vec![0; len] },
        };
        KvCache { rows, capacities: capacities.to_vec(), starts, kv_dim, positions, tags }
    }

    /// Bytes of K and V together (and of the rings' slot tags) for layers of these capacities.
    pub fn bytes_for(capacities: &[usize], kv_dim: usize, positions: usize, dtype: KvDtype) -> usize {
        let rings: usize = capacities.iter().filter(|&&c| c < positions).sum();
        2 * capacities.iter().sum::<usize>() * kv_dim * dtype.bytes() + rings * std::mem::size_of::<u32>()
    }

    pub fn bytes(&self) -> usize {
        Self::bytes_for(&self.capacities, self.kv_dim, self.positions, self.dtype())
    }

    pub fn dtype(&self) -> KvDtype {
        match self.rows {
            Rows::F32 { .. } => KvDtype::F32,
            Rows::F16 { .. } => KvDtype::F16,
        }
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

    /// Marks `pos`'s slot of `layer` as holding it; returns the slot's offset in floats.
    fn claim(&mut self, layer: usize, pos: usize) -> usize {
        assert!(pos < self.positions, "KV cache: position {pos} past the {} of a sequence", self.positions);
        let tags = &mut self.tags[layer];
        if !tags.is_empty() {
            let n = tags.len();
            tags[pos % n] = pos as u32;
        }
        self.offset(layer, pos)
    }

    /// Writes the key and value rows (each `kv_dim` long) of `pos` in `layer`, over whatever
    /// position held its slot (as halves in an f16 cache).
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let o = self.claim(layer, pos);
        let d = self.kv_dim;
        match &mut self.rows {
            Rows::F32 { k: kc, v: vc } => {
                kc[o..o + d].copy_from_slice(k);
                vc[o..o + d].copy_from_slice(v);
            }
            Rows::F16 { k: kc, v: vc } => {
                kc[o..o + d].iter_mut().zip(k).for_each(|(h, &x)| *h = f32_to_f16(x));
                vc[o..o + d].iter_mut().zip(v).for_each(|(h, &x)| *h = f32_to_f16(x));
            }
        }
    }

    /// The rows of `pos` in `layer` as stored (for state files).
    pub fn row(&self, layer: usize, pos: usize) -> Row<'_> {
        let (o, d) = (self.offset(layer, pos), self.kv_dim);
        match &self.rows {
            Rows::F32 { k, v } => Row::F32(&k[o..o + d], &v[o..o + d]),
            Rows::F16 { k, v } => Row::F16(&k[o..o + d], &v[o..o + d]),
        }
    }

    /// Writes rows as stored (from a state file of this cache's type); `store` otherwise.
    pub fn store_row(&mut self, layer: usize, pos: usize, row: Row<'_>) {
        let o = self.claim(layer, pos);
        let d = self.kv_dim;
        match (&mut self.rows, row) {
            (Rows::F32 { k, v }, Row::F32(rk, rv)) => {
                k[o..o + d].copy_from_slice(rk);
                v[o..o + d].copy_from_slice(rv);
            }
            (Rows::F16 { k, v }, Row::F16(rk, rv)) => {
                k[o..o + d].copy_from_slice(rk);
                v[o..o + d].copy_from_slice(rv);
            }
            _ => panic!("KV cache: a row of another type"),
        }
    }

    /// The rows of positions `first..=last` of `layer`, oldest first, as two slices (the second
    /// empty unless the range wraps around the ring).
    fn rows<'a, T>(&self, data: &'a [T], layer: usize, first: usize, last: usize) -> [&'a [T]; 2] {
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

    /// Keys of `layer` at positions `first..=last`, `(last - first + 1, kv_dim)` in two slices:
    /// the cache's own rows when it holds f32, else converted into `buf`.
    pub fn keys<'a>(&'a self, layer: usize, first: usize, last: usize, buf: &'a mut Vec<f32>) -> [&'a [f32]; 2] {
        match &self.rows {
            Rows::F32 { k, .. } => self.rows(k, layer, first, last),
            Rows::F16 { k, .. } => Self::widened(self.rows(k, layer, first, last), buf),
        }
    }

    /// Values of `layer` at positions `first..=last`, as `keys`.
    pub fn values<'a>(&'a self, layer: usize, first: usize, last: usize, buf: &'a mut Vec<f32>) -> [&'a [f32]; 2] {
        match &self.rows {
            Rows::F32 { v, .. } => self.rows(v, layer, first, last),
            Rows::F16 { v, .. } => Self::widened(self.rows(v, layer, first, last), buf),
        }
    }

    fn widened<'a>(halves: [&[u16]; 2], buf: &'a mut Vec<f32>) -> [&'a [f32]; 2] {
        let n = halves[0].len() + halves[1].len();
        buf.resize(n, 0.0);
        let (a, b) = buf.split_at_mut(halves[0].len());
        f16_to_f32_slice(halves[0], a);
        f16_to_f32_slice(halves[1], b);
        [&buf[..n], &[]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_land_where_they_are_read() {
        let mut c = KvCache::new(&[5, 5], 3, 5, KvDtype::F32);
        let b = &mut Vec::new();
        assert_eq!(c.bytes(), 2 * 2 * 5 * 3 * 4);
        c.store(1, 4, &[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]);
        c.store(1, 3, &[7.0, 8.0, 9.0], &[0.0; 3]);
        assert_eq!(c.keys(1, 3, 4, b), [&[7.0, 8.0, 9.0, 1.0, 2.0, 3.0][..], &[]]);
        assert_eq!(c.values(1, 4, 4, b)[0], &[4.0, 5.0, 6.0]);
        assert_eq!(c.keys(0, 4, 4, b)[0], &[0.0; 3]);
    }

    #[test]
    fn a_ring_keeps_the_last_positions_and_splits_a_wrapped_range() {
        // Layer 0 holds 3 positions, layer 1 all 8.
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut c = KvCache::new(&[3, 8], 1, 8, dtype);
            let b = &mut Vec::new();
            assert_eq!(c.bytes(), 2 * 11 * dtype.bytes() + 3 * 4);
            assert!(!c.holds(0, 0, 1) && c.holds(1, 0, 8));
            for pos in 0..8 {
                for layer in 0..2 {
                    c.store(layer, pos, &[pos as f32], &[-(pos as f32)]);
                }
            }
            // Positions 5, 6, 7 sit in slots 2, 0, 1.
            // (f16 gives them back as one slice, the ring's two joined.)
            assert_eq!(c.keys(0, 5, 7, b).concat(), [5.0, 6.0, 7.0]);
            assert_eq!(c.values(0, 6, 7, b).concat(), [-6.0, -7.0]);
            assert_eq!(c.keys(1, 0, 7, b)[0], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
            // The ring knows what it lost: positions 5..8 are there, 4 is not; rewriting 3 gives
            // its slot back to 3 (and takes it from 6).
            assert!(c.holds(0, 5, 8) && !c.holds(0, 4, 8));
            c.store(0, 3, &[3.0], &[-3.0]);
            assert!(c.holds(0, 3, 4) && !c.holds(0, 6, 7) && c.holds(0, 7, 8));
        }
    }

    #[test]
    fn an_f16_cache_holds_halves() {
        let mut c = KvCache::new(&[4], 2, 4, KvDtype::F16);
        c.store(0, 1, &[1.0 / 3.0, 70000.0], &[-0.1, 1e-8]);
        let b = &mut Vec::new();
        // Rounded to the nearest half: 0.33325195, inf (above 65504), -0.099975586, 0 (below
        // half the smallest subnormal, 2^-25).
        assert_eq!(c.keys(0, 1, 1, b)[0], &[0.333_251_95, f32::INFINITY]);
        assert_eq!(c.values(0, 1, 1, b)[0], &[-0.099_975_586, 0.0]);
        assert!(matches!(c.row(0, 1), Row::F16(&[0x3555, 0x7C00], _)));
    }

    #[test]
    #[should_panic(expected = "past the 8 of a sequence")]
    fn writing_past_the_sequence_is_refused() {
        KvCache::new(&[3, 8], 1, 8, KvDtype::F32).store(1, 8, &[0.0], &[0.0]);
    }

    #[test]
    #[should_panic(expected = "exceed 3 slots")]
    fn reading_more_than_a_ring_holds_is_refused() {
        KvCache::new(&[3], 1, 8, KvDtype::F32).keys(0, 0, 3, &mut Vec::new());
    }
}
