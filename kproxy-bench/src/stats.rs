//! Paired statistics (issue 19): the median of per-round ratios with a percentile-bootstrap 95 %
//! interval, computed with a seeded generator so that a report renders the same from the same
//! samples, and the verdict of a target against such an interval.

use serde::{Deserialize, Serialize};

/// Bootstrap resamples per interval.
pub const RESAMPLES: usize = 4000;
/// The generator's seed: every interval of a report is reproducible.
pub const SEED: u64 = 0x6b70_726f_7879_1900;

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast and good enough to draw resample indices.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0); the modulo bias is below 2^-40 for the sample sizes here.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A point estimate with its 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub median: f64,
    pub lo: f64,
    pub hi: f64,
    /// Samples the estimate is taken over.
    pub n: usize,
}

impl Interval {
    pub const NONE: Interval = Interval { median: f64::NAN, lo: f64::NAN, hi: f64::NAN, n: 0 };

    pub fn is_finite(&self) -> bool {
        self.n > 0 && self.median.is_finite() && self.lo.is_finite() && self.hi.is_finite()
    }

    /// "0.974 (0.968–0.982)", with `digits` decimals.
    pub fn show(&self, digits: usize) -> String {
        if !self.is_finite() {
            return "–".into();
        }
        format!("{:.d$} ({:.d$}–{:.d$})", self.median, self.lo, self.hi, d = digits)
    }
}

pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    median_sorted(&v)
}

fn median_sorted(v: &[f64]) -> f64 {
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// The `q`-quantile (0..=1) of sorted values, linearly interpolated.
fn quantile_sorted(v: &[f64], q: f64) -> f64 {
    let pos = q * (v.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos.fract());
    if i + 1 < v.len() {
        v[i] + (v[i + 1] - v[i]) * frac
    } else {
        v[i]
    }
}

/// The median of `sample` of one resample with replacement.
fn resampled_median(sample: &[f64], rng: &mut Rng, buf: &mut Vec<f64>) -> f64 {
    buf.clear();
    buf.extend((0..sample.len()).map(|_| sample[rng.below(sample.len())]));
    buf.sort_by(f64::total_cmp);
    median_sorted(buf)
}

/// The 2.5 % and 97.5 % quantiles of `stats`.
fn percentile_interval(mut stats: Vec<f64>) -> (f64, f64) {
    stats.sort_by(f64::total_cmp);
    (quantile_sorted(&stats, 0.025), quantile_sorted(&stats, 0.975))
}

/// The median of `sample` and its percentile-bootstrap 95 % interval ([`RESAMPLES`] resamples,
/// seeded with `seed`). NaN values are dropped; an empty sample gives [`Interval::NONE`].
pub fn median_interval(sample: &[f64], seed: u64) -> Interval {
    let sample: Vec<f64> = sample.iter().copied().filter(|v| v.is_finite()).collect();
    if sample.is_empty() {
        return Interval::NONE;
    }
    let mut rng = Rng::new(seed);
    let mut buf = Vec::with_capacity(sample.len());
    let stats = (0..RESAMPLES).map(|_| resampled_median(&sample, &mut rng, &mut buf)).collect();
    let (lo, hi) = percentile_interval(stats);
    Interval { median: median(&sample), lo, hi, n: sample.len() }
}

/// median(a) / median(b) with a 95 % interval from resampling `a` and `b` independently (for
/// samples that are not paired, such as per-round ratios at two N or from two builds).
pub fn ratio_of_medians_interval(a: &[f64], b: &[f64], seed: u64) -> Interval {
    let a: Vec<f64> = a.iter().copied().filter(|v| v.is_finite()).collect();
    let b: Vec<f64> = b.iter().copied().filter(|v| v.is_finite()).collect();
    if a.is_empty() || b.is_empty() {
        return Interval::NONE;
    }
    let mut rng = Rng::new(seed);
    let (mut ba, mut bb) = (Vec::with_capacity(a.len()), Vec::with_capacity(b.len()));
    let stats = (0..RESAMPLES)
        .map(|_| resampled_median(&a, &mut rng, &mut ba) / resampled_median(&b, &mut rng, &mut bb))
        .collect();
    let (lo, hi) = percentile_interval(stats);
    Interval { median: median(&a) / median(&b), lo, hi, n: a.len().min(b.len()) }
}

/// A target's verdict from an interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The whole interval is on the right side of the target.
    Met,
    /// The whole interval is on the wrong side.
    Missed,
    /// The interval straddles the target (or nothing was measured).
    NotResolved,
}

impl Verdict {
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Met => "**met**",
            Verdict::Missed => "**missed**",
            Verdict::NotResolved => "**not resolved**",
        }
    }

    /// The verdict of several parts that must all be met (e.g. "at every N"): missed if any is
    /// missed, met if all are met, else not resolved.
    pub fn all(parts: impl IntoIterator<Item = Verdict>) -> Verdict {
        let mut out = Verdict::Met;
        for v in parts {
            match v {
                Verdict::Missed => return Verdict::Missed,
                Verdict::NotResolved => out = Verdict::NotResolved,
                Verdict::Met => {}
            }
        }
        out
    }
}

/// `value ≥ target` judged on an interval.
pub fn at_least(i: &Interval, target: f64) -> Verdict {
    if !i.is_finite() {
        Verdict::NotResolved
    } else if i.lo >= target {
        Verdict::Met
    } else if i.hi < target {
        Verdict::Missed
    } else {
        Verdict::NotResolved
    }
}

/// `value ≤ target` judged on an interval.
pub fn at_most(i: &Interval, target: f64) -> Verdict {
    if !i.is_finite() {
        Verdict::NotResolved
    } else if i.hi <= target {
        Verdict::Met
    } else if i.lo > target {
        Verdict::Missed
    } else {
        Verdict::NotResolved
    }
}

/// `lo ≤ value ≤ hi` judged on an interval: met if the interval lies inside, missed if it lies
/// entirely outside.
pub fn within(i: &Interval, lo: f64, hi: f64) -> Verdict {
    if !i.is_finite() {
        Verdict::NotResolved
    } else if i.lo >= lo && i.hi <= hi {
        Verdict::Met
    } else if i.hi < lo || i.lo > hi {
        Verdict::Missed
    } else {
        Verdict::NotResolved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed, irregular sample around 1.0 (from the generator, so the test needs no data file).
    fn sample(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| 0.9 + (rng.next_u64() % 2001) as f64 / 10_000.0).collect()
    }

    #[test]
    fn generator_is_deterministic_and_spread() {
        let a: Vec<u64> = { let mut r = Rng::new(7); (0..5).map(|_| r.next_u64()).collect() };
        let b: Vec<u64> = { let mut r = Rng::new(7); (0..5).map(|_| r.next_u64()).collect() };
        assert_eq!(a, b);
        let mut r = Rng::new(1);
        let mut counts = [0usize; 10];
        for _ in 0..10_000 {
            counts[r.below(10)] += 1;
        }
        assert!(counts.iter().all(|&c| (900..1100).contains(&c)), "{counts:?}");
    }

    #[test]
    fn interval_covers_the_median_and_is_reproducible() {
        let s = sample(20, 3);
        let i = median_interval(&s, SEED);
        assert_eq!(i.median, median(&s));
        assert!(i.lo <= i.median && i.median <= i.hi, "{i:?}");
        assert!(i.lo < i.hi, "{i:?}");
        assert!(i.lo >= 0.9 && i.hi <= 1.1, "{i:?}");
        assert_eq!(i, median_interval(&s, SEED));
        assert_eq!(i.n, 20);
    }

    #[test]
    fn interval_narrows_with_n() {
        let width = |n| {
            let i = median_interval(&sample(n, 11), SEED);
            i.hi - i.lo
        };
        let (w10, w100, w1000) = (width(10), width(100), width(1000));
        assert!(w100 < w10 && w1000 < w100, "{w10} {w100} {w1000}");
        // About 1/sqrt(n): 1000 values are several times narrower than 10.
        assert!(w1000 < w10 / 4.0, "{w10} {w1000}");
    }

    #[test]
    fn constant_sample_is_a_point() {
        let i = median_interval(&[0.97; 12], SEED);
        assert_eq!((i.median, i.lo, i.hi), (0.97, 0.97, 0.97));
        let one = median_interval(&[1.5], SEED);
        assert_eq!((one.lo, one.hi), (1.5, 1.5));
    }

    #[test]
    fn empty_or_nan_sample_has_no_interval() {
        assert!(!median_interval(&[], SEED).is_finite());
        let i = median_interval(&[f64::NAN, 2.0, 4.0, 3.0], SEED);
        assert_eq!((i.median, i.n), (3.0, 3));
    }

    #[test]
    fn ratio_of_medians() {
        let a = sample(30, 5);
        let b: Vec<f64> = sample(30, 6).iter().map(|v| v * 2.0).collect();
        let i = ratio_of_medians_interval(&a, &b, SEED);
        assert!((i.median - median(&a) / median(&b)).abs() < 1e-12);
        assert!(i.lo <= i.median && i.median <= i.hi && i.lo > 0.4 && i.hi < 0.6, "{i:?}");
        let same = ratio_of_medians_interval(&[2.0; 5], &[4.0; 7], SEED);
        assert_eq!((same.lo, same.hi), (0.5, 0.5));
    }

    #[test]
    fn verdicts() {
        let i = |lo, hi| Interval { median: (lo + hi) / 2.0, lo, hi, n: 10 };
        assert_eq!(at_least(&i(0.96, 0.99), 0.95), Verdict::Met);
        assert_eq!(at_least(&i(0.90, 0.94), 0.95), Verdict::Missed);
        assert_eq!(at_least(&i(0.94, 0.96), 0.95), Verdict::NotResolved);
        assert_eq!(at_most(&i(2.0, 9.0), 10.0), Verdict::Met);
        assert_eq!(at_most(&i(11.0, 12.0), 10.0), Verdict::Missed);
        assert_eq!(within(&i(0.97, 1.03), 0.95, 1.05), Verdict::Met);
        assert_eq!(within(&i(1.06, 1.10), 0.95, 1.05), Verdict::Missed);
        assert_eq!(within(&i(1.00, 1.10), 0.95, 1.05), Verdict::NotResolved);
        assert_eq!(at_least(&Interval::NONE, 1.0), Verdict::NotResolved);
        assert_eq!(Verdict::all([Verdict::Met, Verdict::NotResolved]), Verdict::NotResolved);
        assert_eq!(Verdict::all([Verdict::NotResolved, Verdict::Missed]), Verdict::Missed);
        assert_eq!(Verdict::all([Verdict::Met, Verdict::Met]), Verdict::Met);
    }
}
