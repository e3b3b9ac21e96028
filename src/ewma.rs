//! Response-time estimate per peer for `least_time`: a lock-free peak-EWMA that
//! forgets when it stops hearing from a peer.
//!
//! Why this shape (linkerd's peak-EWMA, with nginx least_time's anti-starvation):
//!
//! - **Peak up, smooth down.** A sample above the estimate replaces it at once, so a
//!   peer that turns slow loses traffic on its very next response. A sample below
//!   moves the estimate by `alpha = max(1 - e^(-dt/1 s), 0.05)` of the gap (`dt` =
//!   time since the last update): at high rates that is nginx's per-sample 0.05,
//!   at low rates it follows the last second or so.
//! - **Decay while unheard.** A slow peer gets no traffic, hence no samples, hence
//!   would keep its bad estimate forever. So the estimate halves for every second
//!   since its last update (read time, not write time): after a few seconds it looks
//!   fast enough to get a request again; if still slow, that response pushes it
//!   right back up (one probe per few seconds); if recovered, it wins its share back.
//!   (nginx halves its average once per `fail_timeout`; one second recovers sooner.)
//! - **No samples = no opinion.** A new peer reads 0; `least_time` lifts any
//!   estimate to the fastest peer's last-known estimate and a 1 ms floor, so a new
//!   or long-idle peer is treated like the fastest one (tried at once), while the
//!   in-flight factor of the score stops it from being flooded before it answers.
//! - **Lock-free and consistent.** The estimate (µs, `f32`) and the time of the
//!   last update (ms, wrapping `u32`) share one `AtomicU64`, updated by a CAS loop,
//!   so concurrent workers never pair a value with the wrong timestamp.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// An estimate with no new samples halves once per this many milliseconds.
pub const IDLE_HALF_LIFE_MS: f64 = 1000.0;
/// Time constant (ms) of the downward moving average.
pub const TAU_MS: f64 = 1000.0;
/// Smallest weight a lower sample gets (nginx's least_time uses 0.05 per sample).
pub const MIN_ALPHA: f64 = 0.05;

/// Latency estimate of one peer, in microseconds; see the module docs.
#[derive(Debug, Default)]
pub struct Ewma {
    /// High 32 bits: `f32` estimate in µs; low 32 bits: ms timestamp of the last update.
    state: AtomicU64,
}

fn pack(estimate_us: f64, now_ms: u64) -> u64 {
    (u64::from((estimate_us as f32).to_bits()) << 32) | (now_ms & 0xffff_ffff)
}

fn unpack(state: u64) -> (f64, u32) {
    (
        f64::from(f32::from_bits((state >> 32) as u32)),
        state as u32,
    )
}

/// Milliseconds from `stamp` to `now` on the wrapping 32-bit clock; a clock that
/// went backwards reads as no time at all.
fn elapsed_ms(stamp: u32, now_ms: u64) -> f64 {
    let d = (now_ms as u32).wrapping_sub(stamp);
    if d > u32::MAX / 2 { 0.0 } else { f64::from(d) }
}

/// `estimate` after `dt` ms without samples.
fn decayed(estimate: f64, dt: f64) -> f64 {
    estimate * (-dt / IDLE_HALF_LIFE_MS).exp2()
}

/// `2^(-dt / IDLE_HALF_LIFE_MS)` without a call to `exp2`: whole half-lives as
/// an exponent, the rest by a cubic (relative error below 0.1%). For choosing
/// among peers, whose estimates are bucketed far more coarsely than that.
#[inline]
pub fn coarse_decay(dt_ms: f64) -> f64 {
    if dt_ms <= 0.0 {
        return 1.0;
    }
    let x = dt_ms / IDLE_HALF_LIFE_MS;
    if x >= 1000.0 {
        return 0.0;
    }
    let k = x as u64; // whole halvings, < 1000
    let g = 1.0 - (x - k as f64); // in (0, 1]
    // 2^g on [0, 1]; then 2^-x = 2^g / 2^(k + 1).
    let two_g = 1.0 + g * (0.696_065_6 + g * (0.224_494 + g * 0.079_204_3));
    two_g * f64::from_bits((1022 - k) << 52)
}

impl Ewma {
    /// A fresh estimate (no samples: reads as 0).
    pub fn new() -> Ewma {
        Ewma {
            state: AtomicU64::new(0),
        }
    }

    /// Record one response time (the proxy calls this when response headers arrive).
    pub fn record(&self, sample: Duration, now_ms: u64) {
        // At least 1 µs, so a sampled peer never reads as "no samples" right away.
        let s = (sample.as_secs_f64() * 1e6).clamp(1.0, f64::from(f32::MAX));
        // The closure always returns Some, so this cannot fail.
        let _ = self.state.fetch_update(Relaxed, Relaxed, |old| {
            let (est, stamp) = unpack(old);
            let next = if old == 0 {
                s
            } else {
                let dt = elapsed_ms(stamp, now_ms);
                let est = decayed(est, dt);
                if s >= est {
                    s
                } else {
                    let alpha = (1.0 - (-dt / TAU_MS).exp()).max(MIN_ALPHA);
                    est + alpha * (s - est)
                }
            };
            Some(pack(next, now_ms))
        });
    }

    /// The estimate at `now_ms`, in microseconds, with idle decay applied; 0 when
    /// never sampled.
    pub fn estimate(&self, now_ms: u64) -> f64 {
        let (est, stamp) = unpack(self.state.load(Relaxed));
        if est == 0.0 {
            return 0.0;
        }
        decayed(est, elapsed_ms(stamp, now_ms))
    }

    /// The estimate as of the last sample, without idle decay (µs; 0 when never sampled).
    pub fn last(&self) -> f64 {
        unpack(self.state.load(Relaxed)).0
    }

    /// From one read: the estimate as of the last sample and, when `decay`, the
    /// estimate at `now_ms` with the idle decay computed by [`coarse_decay`]
    /// (within 0.1% of [`Ewma::estimate`]; otherwise the two are the same).
    #[inline]
    pub fn read_coarse(&self, now_ms: u64, decay: bool) -> (f64, f64) {
        Ewma::coarse_of(self.state(), now_ms, decay)
    }

    /// The whole state in one read: two reads that return the same value give the
    /// same estimates at the same `now_ms` (see [`Ewma::coarse_of`]).
    #[inline]
    pub fn state(&self) -> u64 {
        self.state.load(Relaxed)
    }

    /// [`Ewma::read_coarse`] of a state returned by [`Ewma::state`].
    #[inline]
    pub fn coarse_of(state: u64, now_ms: u64, decay: bool) -> (f64, f64) {
        let (est, stamp) = unpack(state);
        if !decay || est == 0.0 {
            return (est, est);
        }
        (est, est * coarse_decay(elapsed_ms(stamp, now_ms)))
    }

    /// Forget all samples.
    pub fn reset(&self) {
        self.state.store(0, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 3_600_000;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn fresh_reads_zero() {
        let e = Ewma::new();
        assert_eq!(e.estimate(T0), 0.0);
        assert_eq!(e.last(), 0.0);
    }

    #[test]
    fn first_sample_is_the_estimate() {
        let e = Ewma::new();
        e.record(ms(12), T0);
        assert_eq!(e.estimate(T0), 12_000.0);
        assert_eq!(e.last(), 12_000.0);
    }

    #[test]
    fn higher_sample_is_taken_at_once() {
        let e = Ewma::new();
        e.record(ms(1), T0);
        e.record(ms(50), T0 + 1);
        assert_eq!(e.estimate(T0 + 1), 50_000.0);
    }

    #[test]
    fn lower_samples_pull_down_gradually() {
        let e = Ewma::new();
        e.record(ms(10), T0);
        // Same millisecond: the minimum weight 0.05 applies.
        e.record(ms(0), T0);
        let v = e.estimate(T0);
        assert!(
            (v - (10_000.0 + 0.05 * (1.0 - 10_000.0))).abs() < 0.5,
            "{v}"
        );
        // A stream of 1 ms samples, one per ms: converges within ~100 samples.
        let e = Ewma::new();
        e.record(ms(10), T0);
        for t in 1..=100 {
            e.record(ms(1), T0 + t);
        }
        let v = e.estimate(T0 + 100);
        assert!(v < 1_100.0, "{v}");
    }

    #[test]
    fn a_lower_sample_after_a_long_gap_mostly_replaces() {
        let e = Ewma::new();
        e.record(ms(10), T0);
        e.record(ms(1), T0 + 3_000);
        // Decayed to 1.25 ms, then 95% of the way to 1 ms.
        let v = e.estimate(T0 + 3_000);
        assert!((1_000.0..1_030.0).contains(&v), "{v}");
    }

    #[test]
    fn halves_per_idle_second() {
        let e = Ewma::new();
        e.record(ms(8), T0);
        assert!((e.estimate(T0 + 1_000) - 4_000.0).abs() < 1.0);
        assert!((e.estimate(T0 + 3_000) - 1_000.0).abs() < 1.0);
        assert!(e.estimate(T0 + 60_000) < 1.0);
        // Reading does not change the stored value.
        assert_eq!(e.last(), 8_000.0);
    }

    #[test]
    fn clock_going_backwards_is_no_time() {
        let e = Ewma::new();
        e.record(ms(8), T0);
        assert_eq!(e.estimate(T0 - 5), 8_000.0);
    }

    #[test]
    fn survives_timestamp_wrap() {
        let e = Ewma::new();
        let t = (1u64 << 32) - 500;
        e.record(ms(8), t);
        assert!((e.estimate(t + 1_000) - 4_000.0).abs() < 1.0);
    }

    #[test]
    fn coarse_decay_is_close() {
        for dt in [
            0.0, 1.0, 250.0, 999.0, 1000.0, 1500.0, 2_718.0, 10_000.0, 60_000.0,
        ] {
            let exact = (-dt / IDLE_HALF_LIFE_MS).exp2();
            let coarse = coarse_decay(dt);
            assert!(
                ((coarse - exact) / exact).abs() < 1e-3,
                "dt {dt}: {coarse} vs {exact}"
            );
        }
        assert_eq!(coarse_decay(-5.0), 1.0);
        assert_eq!(coarse_decay(5e6), 0.0);
    }

    #[test]
    fn reset_forgets() {
        let e = Ewma::new();
        e.record(ms(3), T0);
        e.reset();
        assert_eq!(e.estimate(T0), 0.0);
    }

    #[test]
    fn huge_sample_is_clamped() {
        let e = Ewma::new();
        e.record(Duration::from_secs(u64::MAX / 4), T0);
        assert!(e.estimate(T0).is_finite());
    }
}
