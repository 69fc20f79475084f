//! One server and what we know about it: its transport, whether it is reachable (the offline
//! breaker), which files it says it does not have, and whether it does ranges well enough to
//! split a transfer into parts. Kept per server, not per fetcher, so mirrors and several
//! binhosts each have their own.
//!
//! A binhost whose index carries a `URI` header (release assets, a CDN) serves its packages
//! from there: the index keeps coming from the mount URL, packages from the header's base,
//! as Portage downloads `URI` + `/` + PATH. Digests from the index make any package server
//! safe to use.
//!
//! The breaker (issue 11.4): after a connect failure the server is *offline*. A new request
//! then does not each wait out a connect timeout: one request at a time is the probe, and the
//! others wait for its answer (at most `PROBE_WAIT`) and share it: the server is back (they
//! go ahead) or it is not (they fail at once). So once the server answers, the next read
//! succeeds. Only a probe that failed slowly (a host that drops packets: a connect timeout)
//! makes new requests fail at once for `OFFLINE_HOLD` without probing, since each would
//! otherwise wait that long again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{RemoteOptions, Transport, TransportError, connect};

/// After a probe that failed slowly, how long new requests fail at once without probing.
pub const OFFLINE_HOLD: Duration = Duration::from_secs(10);
/// A probe that failed in less than this failed fast (refused, unreachable): the next request
/// probes again at once.
const SLOW_FAILURE: Duration = Duration::from_secs(1);
/// How long a request waits for another's probe before giving up.
pub const PROBE_WAIT: Duration = Duration::from_secs(15);
/// How long a file the server said it does not have stays hidden (unless the index changes).
pub const MISSING_RECHECK: Duration = Duration::from_secs(15 * 60);

pub struct Endpoint {
    transport: Arc<dyn Transport>,
    /// The package server named by the index's `URI` header, when it has one.
    packages: RwLock<Option<(String, Arc<dyn Transport>)>>,
    /// For connecting to a `URI` header's server.
    opts: Option<RemoteOptions>,
    breaker: Mutex<Breaker>,
    /// One probe at a time while offline; the others wait on this.
    probe: tokio::sync::Mutex<()>,
    /// Files the server answered "not found" for, and when.
    missing: Mutex<HashMap<String, Instant>>,
    /// Bumped whenever `missing` changes, for the refresher.
    missing_changes: watch::Sender<u64>,
    /// The server answered a part's range request with the whole file, or a range request
    /// with another range: later transfers stay one stream (such answers are still used).
    no_split: AtomicBool,
}

#[derive(Default)]
struct Breaker {
    /// `None` while the server answers.
    offline: Option<Offline>,
    /// Bumped by every probe result, so a waiter can tell its probe has answered.
    generation: u64,
}

struct Offline {
    reason: String,
    /// Requests fail at once without probing until then (after a slow failure).
    hold_until: Option<Instant>,
}

/// Leave to send a request; held until its answer (or failure) is known, since while the
/// server is offline it is the probe the others wait for.
pub struct Admission<'a> {
    _probe: Option<tokio::sync::MutexGuard<'a, ()>>,
    started: Instant,
}

impl Endpoint {
    pub fn new(transport: Box<dyn Transport>) -> Endpoint {
        Endpoint {
            transport: transport.into(),
            packages: RwLock::new(None),
            opts: None,
            breaker: Mutex::default(),
            probe: tokio::sync::Mutex::new(()),
            missing: Mutex::default(),
            missing_changes: watch::channel(0).0,
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

    /// Leave to start a new request, or `Err` with the reason when the server is offline.
    /// Online: at once. Offline: this request is the probe, or it waits for the one running
    /// and takes its answer.
    pub async fn admit(&self) -> Result<Admission<'_>, String> {
        let seen = {
            let b = self.breaker.lock().unwrap();
            match &b.offline {
                None => return Ok(self.admission(None)),
                Some(o) if o.hold_until.is_some_and(|t| Instant::now() < t) => {
                    return Err(format!("binhost offline: {}", o.reason));
                }
                Some(_) => b.generation,
            }
        };
        let guard = tokio::time::timeout(PROBE_WAIT, self.probe.lock())
            .await
            .map_err(|_| "binhost offline: no answer to the probe in time".to_string())?;
        let b = self.breaker.lock().unwrap();
        match &b.offline {
            None => Ok(self.admission(None)),
            // The probe we waited for failed: share its answer.
            Some(o) if b.generation != seen => Err(format!("binhost offline: {}", o.reason)),
            Some(_) => Ok(self.admission(Some(guard))),
        }
    }

    fn admission<'a>(&self, probe: Option<tokio::sync::MutexGuard<'a, ()>>) -> Admission<'a> {
        Admission {
            _probe: probe,
            started: Instant::now(),
        }
    }

    /// An admission for a request that is already under way (a retry), for `went_offline`.
    pub fn admitted(&self) -> Admission<'_> {
        self.admission(None)
    }

    /// A request admitted by `admission` could not connect: the server is offline. Returns
    /// the reason.
    pub fn went_offline(&self, admission: &Admission<'_>, e: &TransportError) -> String {
        let reason = e.message.clone();
        let slow = admission.started.elapsed() >= SLOW_FAILURE;
        let mut b = self.breaker.lock().unwrap();
        b.generation += 1;
        b.offline = Some(Offline {
            reason: reason.clone(),
            hold_until: slow.then(|| Instant::now() + OFFLINE_HOLD),
        });
        format!("binhost offline: {reason}")
    }

    /// The server answered: it is online.
    /// Whether the server answered last time (for `status`).
    pub fn is_online(&self) -> bool {
        self.breaker.lock().unwrap().offline.is_none()
    }

    pub fn answered(&self) {
        let mut b = self.breaker.lock().unwrap();
        if b.offline.take().is_some() {
            b.generation += 1;
        }
    }

    /// The server says it does not have `path`.
    pub fn not_found(&self, path: &str) {
        self.missing
            .lock()
            .unwrap()
            .insert(path.to_string(), Instant::now());
        self.missing_changes.send_modify(|n| *n += 1);
    }

    /// Files the server said it does not have within `MISSING_RECHECK`.
    pub fn missing(&self) -> Vec<String> {
        let mut m = self.missing.lock().unwrap();
        m.retain(|_, at| at.elapsed() < MISSING_RECHECK);
        m.keys().cloned().collect()
    }

    /// When the oldest missing file is due for a re-check, if any.
    pub fn next_recheck(&self) -> Option<Instant> {
        let m = self.missing.lock().unwrap();
        m.values().min().map(|at| *at + MISSING_RECHECK)
    }

    /// A new index: every file it names gets a fresh chance.
    pub fn forget_missing(&self) {
        let mut m = self.missing.lock().unwrap();
        if !m.is_empty() {
            m.clear();
            self.missing_changes.send_modify(|n| *n += 1);
        }
    }

    /// Changes whenever the set of missing files does.
    pub fn missing_changes(&self) -> watch::Receiver<u64> {
        self.missing_changes.subscribe()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::{Body, ErrorKind, IndexFetch, Validators};
    use std::sync::Arc;

    struct Nothing;

    #[async_trait::async_trait]
    impl Transport for Nothing {
        async fn fetch_index(&self, _: Option<&Validators>) -> Result<IndexFetch, TransportError> {
            unreachable!()
        }
        async fn open(&self, _: &str, _: u64, _: Option<u64>) -> Result<Body, TransportError> {
            unreachable!()
        }
        async fn read_range(
            &self,
            _: &str,
            _: u64,
            _: u64,
        ) -> Result<Option<Vec<u8>>, TransportError> {
            unreachable!()
        }
    }

    fn refused() -> TransportError {
        TransportError::new(ErrorKind::Offline, "connection refused")
    }

    #[tokio::test]
    async fn the_next_request_after_a_fast_failure_probes_and_recovers_at_once() {
        let ep = Endpoint::new(Box::new(Nothing));
        let a = ep.admit().await.unwrap();
        ep.went_offline(&a, &refused());
        drop(a);
        // Back at once: the next request is the probe, and it gets through.
        let probe = ep
            .admit()
            .await
            .expect("a fast failure must not hold requests back");
        ep.answered();
        drop(probe);
        assert!(ep.admit().await.is_ok());
    }

    #[tokio::test]
    async fn others_wait_for_the_probe_and_share_its_answer() {
        let ep = Arc::new(Endpoint::new(Box::new(Nothing)));
        let a = ep.admit().await.unwrap();
        ep.went_offline(&a, &refused());
        drop(a);
        let probe = ep.admit().await.unwrap();
        let waiter = {
            let ep = ep.clone();
            tokio::spawn(async move { ep.admit().await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "a second request did not wait for the probe"
        );
        ep.went_offline(&probe, &refused());
        drop(probe);
        let shared = waiter.await.unwrap();
        assert!(shared.is_err(), "the waiter did not share the failed probe");
        // Succeeding probe: a waiter goes ahead.
        let probe = ep.admit().await.unwrap();
        let waiter = {
            let ep = ep.clone();
            tokio::spawn(async move { ep.admit().await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        ep.answered();
        drop(probe);
        assert!(waiter.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_slow_failure_holds_new_requests_back_for_a_while() {
        let ep = Endpoint::new(Box::new(Nothing));
        // A request that took 5 s to fail to connect (a host that drops packets).
        let slow = Admission {
            _probe: None,
            started: Instant::now() - Duration::from_secs(5),
        };
        ep.went_offline(&slow, &TransportError::new(ErrorKind::Offline, "timed out"));
        assert!(
            ep.admit().await.is_err(),
            "fails at once after a slow failure"
        );
    }

    #[test]
    fn missing_files_are_remembered_until_the_index_changes() {
        let ep = Endpoint::new(Box::new(Nothing));
        let changes = ep.missing_changes();
        ep.not_found("a/b.tbz2");
        assert!(changes.has_changed().unwrap());
        assert_eq!(ep.missing(), ["a/b.tbz2"]);
        assert!(ep.next_recheck().is_some());
        ep.forget_missing();
        assert!(ep.missing().is_empty());
    }
}
