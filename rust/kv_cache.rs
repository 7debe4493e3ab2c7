//! The fixed-capacity KV cache: sized once at load from `max_inference_len`, never grown.

/// Keys and values of every layer for positions `0..capacity`.
pub struct KvCache {
    k: Vec<f32>, // (n_layers, capacity, kv_dim)
    v: Vec<f32>, // (n_layers, capacity, kv_dim)
    n_layers: usize,
    capacity: usize,
    kv_dim: usize,
}

impl KvCache {
    /// The memory is reserved zeroed; the OS backs pages only as positions are written.
    pub fn new(n_layers: usize, capacity: usize, kv_dim: usize) -> KvCache {
        let len = n_layers * capacity * kv_dim;
        KvCache { k: vec![0.0; len], v: vec![0.0; len], n_layers, capacity, kv_dim }
    }

    /// Bytes of K and V together.
    pub fn bytes_for(n_layers: usize, capacity: usize, kv_dim: usize) -> usize {
        2 * n_layers * capacity * kv_dim * std::mem::size_of::<f32>()
    }

    pub fn bytes(&self) -> usize {
        Self::bytes_for(self.n_layers, self.capacity, self.kv_dim)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn offset(&self, layer: usize, pos: usize) -> usize {
        assert!(
            layer < self.n_layers && pos < self.capacity,
            "KV cache: position {pos} past capacity {}",
            self.capacity
        );
        (layer * self.capacity + pos) * self.kv_dim
    }

    /// Writes the key and value rows (each `kv_dim` long) of `pos` in `layer`.
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let o = self.offset(layer, pos);
        self.k[o..o + self.kv_dim].copy_from_slice(k);
        self.v[o..o + self.kv_dim].copy_from_slice(v);
    }

    /// Keys of `layer` at positions `first..=last`, `(last - first + 1, kv_dim)`.
    pub fn keys(&self, layer: usize, first: usize, last: usize) -> &[f32] {
        &self.k[self.offset(layer, first)..self.offset(layer, last) + self.kv_dim]
    }

    /// Values of `layer` at positions `first..=last`, `(last - first + 1, kv_dim)`.
    pub fn values(&self, layer: usize, first: usize, last: usize) -> &[f32] {
        &self.v[self.offset(layer, first)..self.offset(layer, last) + self.kv_dim]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_land_where_they_are_read() {
        let mut c = KvCache::new(2, 5, 3);
        assert_eq!(c.bytes(), 2 * 2 * 5 * 3 * 4);
        c.store(1, 4, &[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]);
        c.store(1, 3, &[7.0, 8.0, 9.0], &[0.0; 3]);
        assert_eq!(c.keys(1, 3, 4), &[7.0, 8.0, 9.0, 1.0, 2.0, 3.0]);
        assert_eq!(c.values(1, 4, 4), &[4.0, 5.0, 6.0]);
        assert_eq!(c.keys(0, 4, 4), &[0.0; 3]);
    }

    #[test]
    #[should_panic(expected = "past capacity")]
    fn writing_past_capacity_is_refused() {
        KvCache::new(1, 2, 1).store(0, 2, &[0.0], &[0.0]);
    }
}
