//! A tiny deterministic pseudo-random generator (SplitMix64) for sensor noise and fault draws.
//!
//! Not cryptographic. The same seed always yields the same sequence on every target, so a
//! simulated node is reproducible from its seed, and the core needs neither `rand` nor an allocator.
//!
//! Tested below against the reference SplitMix64 outputs and for the range of [`SplitMix64::next_f64`].

/// SplitMix64 (Steele, Lea, Flood 2014): one `u64` of state, full period 2^64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.state)
    }

    /// Uniform in `[0, 1)`, with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[-half_width, half_width)`.
    pub fn symmetric(&mut self, half_width: f64) -> f64 {
        (self.next_f64() * 2.0 - 1.0) * half_width
    }

    /// True with probability `p` (`p <= 0` never, `p >= 1` always).
    pub fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// Uniform in `0..n`; `n` must be non-zero (returns 0 for `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

/// The SplitMix64 finaliser: also a good way to derive independent seeds from one seed.
pub const fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_splitmix64_sequence() {
        // Reference values for seed 1234567 (from the original C implementation).
        let mut r = SplitMix64::new(1_234_567);
        assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(r.next_u64(), 3_203_168_211_198_807_973);
        assert_eq!(r.next_u64(), 9_817_491_932_198_370_423);
    }

    #[test]
    fn next_f64_stays_in_the_unit_interval_and_chance_honours_its_bounds() {
        let mut r = SplitMix64::new(7);
        for _ in 0..10_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
            assert!(!r.chance(0.0));
            assert!(r.chance(1.0));
            assert!(r.below(3) < 3);
        }
    }
}
