//! A fast 64-bit digest of bytes: the checksums of state files and the model fingerprint.
//!
//! Not cryptographic: it detects damage (truncation, flipped bits, a file of another model), not
//! forgery. Four independent lanes take 8 bytes each per 32-byte stripe (multiply, rotate: the
//! mixing of xxHash64's round, with its published primes), so a megabyte costs well under a
//! millisecond; the lanes are folded and finished with MurmurHash3's 64-bit avalanche. The
//! value depends only on the bytes and the order they were given in, not on how they were
//! split across `update` calls, nor on the host's endianness.

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;

#[derive(Clone)]
pub struct Digest {
    lanes: [u64; 4],
    /// Bytes of an unfinished stripe.
    pending: [u8; 32],
    pending_len: usize,
    total: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Digest::new(0)
    }
}

fn round(lane: u64, word: u64) -> u64 {
    lane.wrapping_add(word.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1)
}

/// MurmurHash3's fmix64.
fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^ (h >> 33)
}

impl Digest {
    pub fn new(seed: u64) -> Digest {
        Digest {
            lanes: [seed.wrapping_add(P1), seed ^ P2, seed.rotate_left(17), seed.wrapping_sub(P1)],
            pending: [0; 32],
            pending_len: 0,
            total: 0,
        }
    }

    fn stripe(&mut self, s: &[u8]) {
        for (lane, w) in self.lanes.iter_mut().zip(s.chunks_exact(8)) {
            *lane = round(*lane, u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.pending_len > 0 {
            let take = (32 - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if self.pending_len < 32 {
                return;
            }
            let p = self.pending;
            self.stripe(&p);
            self.pending_len = 0;
        }
        let mut stripes = bytes.chunks_exact(32);
        for s in &mut stripes {
            self.stripe(s);
        }
        let rest = stripes.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// A length-prefixed field, so that `("ab", "c")` and `("a", "bc")` differ.
    pub fn field(&mut self, bytes: &[u8]) {
        self.update(&(bytes.len() as u64).to_le_bytes());
        self.update(bytes);
    }

    pub fn u64(&mut self, v: u64) {
        self.update(&v.to_le_bytes());
    }

    pub fn finish(&self) -> u64 {
        let mut h = self.lanes.iter().enumerate().fold(self.total, |h, (i, &l)| {
            (h ^ round(0, l)).rotate_left(27 + i as u32).wrapping_mul(P1).wrapping_add(P2)
        });
        for &b in &self.pending[..self.pending_len] {
            h = (h ^ (b as u64).wrapping_mul(P2)).rotate_left(11).wrapping_mul(P1);
        }
        avalanche(h)
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> u64 {
        let mut d = Digest::default();
        d.update(bytes);
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_does_not_matter_and_every_bit_does() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let whole = Digest::of(&data);
        for cut in [0, 1, 31, 32, 33, 500, 999, 1000] {
            let mut d = Digest::default();
            d.update(&data[..cut]);
            d.update(&data[cut..]);
            assert_eq!(d.finish(), whole, "cut at {cut}");
        }
        for bit in [0, 7, 8 * 31, 8 * 32 + 3, 8 * 999 + 7] {
            let mut flipped = data.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(Digest::of(&flipped), whole, "bit {bit}");
        }
        assert_ne!(Digest::of(&data[..999]), whole);
        assert_ne!(Digest::of(&[0]), Digest::of(&[0, 0]));
        assert_ne!(Digest::new(1).finish(), Digest::new(2).finish());
        // A value fixed here, so that a change of the function (which would orphan every state
        // file written before it) is a deliberate one.
        assert_eq!(Digest::of(b"gemma_rs"), 0x16FD_C28C_E741_9C5B);
    }
}
