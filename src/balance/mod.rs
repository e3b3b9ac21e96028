//! Balancing strategies. A strategy only chooses among peers; health lives on the peer.

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::UpstreamConfig;
use crate::peer::{Peer, Tried};

/// What a strategy may look at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestKey<'a> {
    /// The client's address (ip_hash).
    pub client_ip: IpAddr,
    /// The rendered `hash_key` template (hash); empty for other strategies.
    pub hash_key: &'a [u8],
}

/// Picks one peer for one request. Never blocks; no allocation on the hot path.
/// Returns only a peer that is usable at `now` (see [`Peer::is_usable`]) and not in `tried`.
pub trait Strategy: Send + Sync {
    /// The index into `peers` of the chosen peer, or `None` when no peer is usable.
    fn pick(&self, peers: &[Arc<Peer>], key: &RequestKey<'_>, tried: &Tried, now: u64)
    -> Option<usize>;
}

/// Build the strategy an upstream's configuration asks for, over `peers` (one list:
/// primaries or backups). Each worker thread builds its own instance.
pub fn from_config(_up: &UpstreamConfig, _peers: &[Arc<Peer>]) -> Box<dyn Strategy> {
    todo!()
}
