//! Response-time estimate per peer for `least_time`.

/// Latency estimate of one peer (placeholder until the balancing module lands).
#[derive(Debug, Default)]
pub struct Ewma {}

impl Ewma {
    /// A fresh estimate.
    pub fn new() -> Ewma {
        Ewma {}
    }
}
