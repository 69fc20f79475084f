//! One server and what we know about it: its transport, whether it is reachable (the offline
//! breaker), and whether it does ranges well enough to split a transfer into parts. Kept per
//! server, not per fetcher, so mirrors and several binhosts each have their own.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::warn;

use super::{Transport, TransportError};

/// How long a connect failure makes further new transfers fail at once. After it, one
/// transfer tries again, so reads recover without a remount when the binhost is back.
pub const OFFLINE_HOLD: Duration = Duration::from_secs(10);

pub struct Endpoint {
    transport: Box<dyn Transport>,
    /// Set when the server could not be connected to: until then, new transfers fail at
    /// once instead of each waiting out connect timeouts (offline reads fail fast).
    offline: Mutex<Option<(Instant, String)>>,
    /// The server answered a part's range request with the whole file, or a range request
    /// with another range: later transfers stay one stream (such answers are still used).
    no_split: AtomicBool,
}

impl Endpoint {
    pub fn new(transport: Box<dyn Transport>) -> Endpoint {
        Endpoint {
            transport,
            offline: Mutex::new(None),
            no_split: AtomicBool::new(false),
        }
    }

    pub fn transport(&self) -> &dyn Transport {
        &*self.transport
    }

    /// `Err` with the reason while the offline breaker holds.
    pub fn check_online(&self) -> Result<(), String> {
        match &*self.offline.lock().unwrap() {
            Some((until, reason)) if Instant::now() < *until => {
                Err(format!("binhost offline: {reason}"))
            }
            _ => Ok(()),
        }
    }

    /// Trips the breaker after a connect failure; returns the reason.
    pub fn went_offline(&self, e: &TransportError) -> String {
        let reason = e.message.clone();
        *self.offline.lock().unwrap() = Some((Instant::now() + OFFLINE_HOLD, reason.clone()));
        format!("binhost offline: {reason}")
    }

    /// The server answered: the breaker is reset.
    pub fn answered(&self) {
        *self.offline.lock().unwrap() = None;
    }

    /// Whether a transfer may be split into parallel ranged parts.
    pub fn may_split(&self) -> bool {
        self.transport.may_split() && !self.no_split.load(Ordering::Relaxed)
    }

    /// The server does ranges in a way splitting cannot use: later transfers stay one stream.
    pub fn stop_splitting(&self, path: &str, why: &str) {
        if !self.no_split.swap(true, Ordering::Relaxed) {
            warn!(
                path,
                "the binhost {why}; large packages will be fetched as one stream"
            );
        }
    }
}
