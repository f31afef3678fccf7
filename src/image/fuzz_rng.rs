//! The fixed-seed generator of the bounded random-input tests (`oci`, `unpack::fuzz`): a failure
//! reproduces from its seed.

/// xorshift64*.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len())]
    }
    pub fn digest(&mut self) -> String {
        let hex: String = (0..64)
            .map(|_| char::from(b"0123456789abcdef"[self.below(16)]))
            .collect();
        format!("sha256:{hex}")
    }
}
