//! Deterministic randomness for the shoppers: a SplitMix64 generator and a Zipf sampler.
//!
//! Both strategy runs draw from generators seeded the same way, so their shoppers make the same
//! choices for as long as the outcomes they see agree. No dependency: the sequence must not change
//! when a library upgrades its algorithms.

/// SplitMix64 (Steele, Lea, Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014):
/// 64 bits of state, full period, good enough statistics for load generation.
#[derive(Debug, Clone)]
pub(super) struct Rng(u64);

impl Rng {
    /// A generator whose whole sequence is determined by `seed`.
    pub(super) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, with 53 bits of precision.
    pub(super) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`0` when `n` is 0). The modulo bias is below 2^-40 for the sizes used
    /// here.
    pub(super) fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with probability `p`.
    pub(super) fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// Zipf's law over ranks `1..=n`: rank `k` is drawn with probability `k^-s / H(n, s)`.
///
/// Sampling inverts the cumulative distribution with a binary search (`O(log n)`, 8 bytes of
/// table per rank): exact, and fast enough for millions of draws per second.
#[derive(Debug, Clone)]
pub(super) struct Zipf {
    /// `cdf[k - 1]` = P(rank ≤ k), with `cdf[n - 1]` = 1.
    cdf: Vec<f64>,
    exponent: f64,
}

impl Zipf {
    /// The distribution over `n` ranks with exponent `s` (1.0 is the classic Zipf; web and
    /// catalog popularity is usually measured between 0.8 and 1.2).
    ///
    /// # Panics
    /// If `n` is 0 or `s` is not finite and ≥ 0 (both are checked by the CLI's argument parser).
    pub(super) fn new(n: usize, s: f64) -> Zipf {
        assert!(n > 0, "Zipf over zero ranks");
        assert!(
            s.is_finite() && s >= 0.0,
            "Zipf exponent must be finite and ≥ 0"
        );
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += (k as f64).powf(-s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Zipf { cdf, exponent: s }
    }

    /// The exponent `s`.
    pub(super) fn exponent(&self) -> f64 {
        self.exponent
    }

    /// P(rank = `k`), for `k` in `1..=n` (0 outside).
    #[cfg(test)]
    pub(crate) fn probability(&self, k: usize) -> f64 {
        match k {
            0 => 0.0,
            1 => self.cdf.first().copied().unwrap_or(0.0),
            k if k <= self.cdf.len() => self.cdf[k - 1] - self.cdf[k - 2],
            _ => 0.0,
        }
    }

    /// P(rank ≤ `k`).
    pub(super) fn mass_of_top(&self, k: usize) -> f64 {
        match k {
            0 => 0.0,
            k => self.cdf[k.min(self.cdf.len()) - 1],
        }
    }

    /// One rank in `1..=n`.
    pub(super) fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        let i = self.cdf.partition_point(|&c| c <= u);
        i.min(self.cdf.len() - 1) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_uniform_enough() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut r = Rng::new(1);
        let n = 100_000;
        let mean = (0..n).map(|_| r.unit()).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        let mut buckets = [0u32; 10];
        for _ in 0..n {
            buckets[r.below(10) as usize] += 1;
        }
        for b in buckets {
            assert!((9_000..11_000).contains(&b), "{buckets:?}");
        }
    }

    #[test]
    fn zipf_probabilities_follow_the_law() {
        let z = Zipf::new(10_000, 1.0);
        let h: f64 = (1..=10_000).map(|k| 1.0 / k as f64).sum();
        assert!((z.probability(1) - 1.0 / h).abs() < 1e-12);
        assert!((z.probability(10) - 0.1 / h).abs() < 1e-12);
        assert!((z.probability(1) / z.probability(2) - 2.0).abs() < 1e-9);
        assert_eq!(z.probability(0), 0.0);
        assert_eq!(z.probability(10_001), 0.0);
        assert!((z.mass_of_top(10_000) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn zipf_samples_are_skewed_as_predicted() {
        let z = Zipf::new(10_000, 1.0);
        let mut rng = Rng::new(42);
        let n = 400_000;
        let mut counts = vec![0u32; 10_001];
        for _ in 0..n {
            let k = z.sample(&mut rng);
            assert!((1..=10_000).contains(&k));
            counts[k] += 1;
        }
        // The hottest product gets ~1/H(10000) ≈ 10.2% of the reads.
        let top1 = counts[1] as f64 / n as f64;
        assert!((top1 - z.probability(1)).abs() < 0.005, "top1 {top1}");
        // The 10 hottest get ~30%, the 1 000 hottest (the sale items) ~76%.
        let top10 = counts[1..=10].iter().sum::<u32>() as f64 / n as f64;
        assert!((top10 - z.mass_of_top(10)).abs() < 0.01, "top10 {top10}");
        let top1000 = counts[1..=1000].iter().sum::<u32>() as f64 / n as f64;
        assert!(
            (top1000 - z.mass_of_top(1000)).abs() < 0.01,
            "top1000 {top1000}"
        );
        assert!(top1000 > 0.7, "top1000 {top1000}");
        // Rank 1 is drawn about twice as often as rank 2 and ten times as often as rank 10.
        let ratio = counts[1] as f64 / counts[10] as f64;
        assert!((8.0..12.5).contains(&ratio), "ratio {ratio}");
    }

    #[test]
    fn zipf_zero_exponent_is_uniform_and_single_rank_works() {
        let z = Zipf::new(4, 0.0);
        for k in 1..=4 {
            assert!((z.probability(k) - 0.25).abs() < 1e-12);
        }
        let one = Zipf::new(1, 1.0);
        let mut rng = Rng::new(3);
        assert!((0..100).all(|_| one.sample(&mut rng) == 1));
    }
}
