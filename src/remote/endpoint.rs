//! One server and what we know about it: its transport, whether it is reachable (the offline
//! breaker), and whether it does ranges well enough to split a transfer into parts. Kept per
//! server, not per fetcher, so mirrors and several binhosts each have their own.
//!
//! A binhost whose index carries a `URI` header (release assets, a CDN) serves its packages
//! from there: the index keeps coming from the mount URL, packages from the header's base,
//! as Portage downloads `URI` + `/` + PATH. Digests from the index make any package server
//! safe to use.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{RemoteOptions, Transport, TransportError, connect};

/// How long a connect failure makes further new transfers fail at once. After it, one
/// transfer tries again, so reads recover without a remount when the binhost is back.
pub const OFFLINE_HOLD: Duration = Duration::from_secs(10);

pub struct Endpoint {
    transport: Arc<dyn Transport>,
    /// The package server named by the index's `URI` header, when it has one.
    packages: RwLock<Option<(String, Arc<dyn Transport>)>>,
    /// For connecting to a `URI` header's server.
    opts: Option<RemoteOptions>,
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
            transport: transport.into(),
            packages: RwLock::new(None),
            opts: None,
            offline: Mutex::new(None),
            no_split: AtomicBool::new(false),
        }
    }

    /// Options for the servers an index's `URI` header may name.
    pub fn with_options(mut self, opts: RemoteOptions) -> Self {
        self.opts = Some(opts);
        self
    }

    /// Where the index comes from.
    pub fn index_transport(&self) -> &dyn Transport {
        &*self.transport
    }

    /// Where packages come from: the `URI` header's server if the index names one, else the
    /// index's own.
    pub fn transport(&self) -> Arc<dyn Transport> {
        match &*self.packages.read().unwrap() {
            Some((_, t)) => t.clone(),
            None => self.transport.clone(),
        }
    }

    /// Follows an index's `URI` header (`None`: packages are beside the index). A header that
    /// names no usable server is ignored with a warning: packages then come from the index's
    /// server, as before.
    pub fn follow_uri(&self, uri: Option<&str>) {
        let mut packages = self.packages.write().unwrap();
        if packages.as_ref().map(|(u, _)| u.as_str()) == uri {
            return;
        }
        let Some(uri) = uri else {
            *packages = None;
            return;
        };
        let opts = self.opts.clone().unwrap_or(RemoteOptions {
            connect_timeout: std::time::Duration::from_secs(10),
            stall_timeout: std::time::Duration::from_secs(30),
            ..RemoteOptions::default()
        });
        match connect(uri, &opts) {
            Ok(t) => {
                info!(uri, "the index's URI header names the package server");
                *packages = Some((uri.to_string(), t.into()));
            }
            Err(e) => {
                warn!(uri, "ignoring the index's URI header: {e}");
                *packages = None;
            }
        }
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
        self.transport().may_split() && !self.no_split.load(Ordering::Relaxed)
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
