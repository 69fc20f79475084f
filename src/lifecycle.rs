//! The index's life: first load, periodic refresh, atomic swap, and the saved copy.
//!
//! At mount, the binhost's `Packages` is fetched (conditionally, against the saved copy's
//! validators); if the binhost is down or serves a broken index, the last good saved index is
//! used with a warning; with neither, the mount fails with one clear line.
//!
//! While mounted, the index is re-checked every `--index-ttl` seconds, or sooner when the index's
//! own `TTL` header asks for less. A 304 costs nothing. A new index replaces the old one only if
//! it parses and its `TIMESTAMP` is not older; the new tree is built aside and swapped in whole,
//! so a lookup sees one tree or the other, and `Packages` always matches the tree it describes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tracing::{info, warn};

use crate::cache::Store;
use crate::index::Validators;
use crate::index::{Index, Rejected};
use crate::namespace::Namespace;
use crate::remote::{Endpoint, IndexFetch};
use crate::snapshot::Snapshot;

/// What the last index check did, for `status`.
#[derive(Debug, Clone)]
pub struct RefreshState {
    pub at: SystemTime,
    pub result: String,
    pub validators: Validators,
}

pub struct Lifecycle {
    pub remote: Arc<Endpoint>,
    pub store: Arc<Store>,
    pub url: String,
    pub ns: Arc<Snapshot>,
    pub last: Mutex<RefreshState>,
}

impl Lifecycle {
    /// Loads the first index: from the binhost, else from the saved copy. `Err` is the one-line
    /// reason the mount cannot start.
    pub async fn start(
        remote: Arc<Endpoint>,
        store: Arc<Store>,
        url: String,
    ) -> Result<Lifecycle, String> {
        let saved = store
            .load_index(&url)
            .map_err(|e| format!("reading saved index: {e}"))?;
        let saved_index = saved.as_ref().and_then(|(raw, _)| {
            Index::parse(Bytes::copy_from_slice(raw))
                .map_err(|e| warn!("saved index is unusable, ignoring it: {e}"))
                .ok()
        });
        let since = saved_index
            .as_ref()
            .and_then(|_| saved.as_ref().map(|(_, v)| v));
        let (index, validators, result) = match remote.index_transport().fetch_index(since).await {
            Ok(IndexFetch::NotModified) => {
                let v = since.cloned().unwrap_or_default();
                (
                    saved_index.expect("304 only when we sent validators"),
                    v,
                    "not modified".to_string(),
                )
            }
            Ok(IndexFetch::Fresh { raw, validators }) => match Index::parse(raw.clone()) {
                Ok(index) => {
                    if let Err(e) = store.save_index(&url, &raw, &validators) {
                        warn!("could not save the index for offline use: {e}");
                    }
                    (index, validators, "fetched".to_string())
                }
                Err(e) => match saved_index {
                    Some(index) => {
                        warn!("binhost index is malformed ({e}); using the saved index");
                        (index, Validators::default(), format!("malformed: {e}"))
                    }
                    None => return Err(format!("binhost index is malformed: {e}")),
                },
            },
            Err(e) => match saved_index {
                Some(index) => {
                    let e = e.message;
                    warn!("binhost unreachable ({e}); mounting from the saved index");
                    (
                        index,
                        since.cloned().unwrap_or_default(),
                        format!("offline: {e}"),
                    )
                }
                None => {
                    return Err(format!(
                        "binhost unreachable and no saved index: {}",
                        e.message
                    ));
                }
            },
        };
        remote.follow_uri(index.uri.as_deref());
        let ns = build(index);
        info!(
            url,
            packages = ns.index.packages.len(),
            "index loaded ({result})"
        );
        Ok(Lifecycle {
            remote,
            store,
            url,
            ns: Arc::new(Snapshot::new(ns)),
            last: Mutex::new(RefreshState {
                at: SystemTime::now(),
                result,
                validators,
            }),
        })
    }

    /// Re-checks the index forever; run as a task.
    pub async fn run(self: Arc<Self>, ttl: Duration) {
        loop {
            let header_ttl = self.ns.current().index.ttl.map(Duration::from_secs);
            let wait = header_ttl
                .map_or(ttl, |h| h.min(ttl))
                .max(Duration::from_secs(1));
            tokio::time::sleep(wait).await;
            self.refresh().await;
        }
    }

    /// One conditional check; swaps in a newer index.
    pub async fn refresh(&self) {
        let since = self.last.lock().unwrap().validators.clone();
        let since = (since != Validators::default()).then_some(since);
        let (result, validators) = match self
            .remote
            .index_transport()
            .fetch_index(since.as_ref())
            .await
        {
            Ok(IndexFetch::NotModified) => ("not modified".to_string(), since.unwrap_or_default()),
            Ok(IndexFetch::Fresh { raw, validators }) => match Index::parse(raw.clone()) {
                Ok(index) => {
                    let current = self.ns.current().index.timestamp;
                    if let (Some(new), Some(cur)) = (index.timestamp, current)
                        && new < cur
                    {
                        warn!(
                            new,
                            current = cur,
                            "binhost served an older index; keeping ours"
                        );
                        ("older index ignored".to_string(), since.unwrap_or_default())
                    } else {
                        if let Err(e) = self.store.save_index(&self.url, &raw, &validators) {
                            warn!("could not save the index for offline use: {e}");
                        }
                        self.remote.follow_uri(index.uri.as_deref());
                        let ns = build(index);
                        let packages = ns.index.packages.len();
                        self.ns.swap(ns);
                        info!(packages, "index refreshed");
                        ("updated".to_string(), validators)
                    }
                }
                Err(e) => {
                    warn!("binhost index is malformed, keeping the current one: {e}");
                    (format!("malformed: {e}"), since.unwrap_or_default())
                }
            },
            Err(e) => {
                let e = e.message;
                warn!("index check failed, keeping the current one: {e}");
                (format!("failed: {e}"), since.unwrap_or_default())
            }
        };
        *self.last.lock().unwrap() = RefreshState {
            at: SystemTime::now(),
            result,
            validators,
        };
    }
}

/// Builds the namespace and reports every refused entry (at most 20 lines, then a count).
fn build(index: Index) -> Namespace {
    let index = Arc::new(index);
    let (ns, collisions) = Namespace::build(index.clone());
    let refused: Vec<&Rejected> = index.rejected.iter().chain(&collisions).collect();
    for r in refused.iter().take(20) {
        warn!(entry = %r.what, "refusing index entry: {}", r.reason);
    }
    if refused.len() > 20 {
        warn!("{} more index entries refused", refused.len() - 20);
    }
    ns
}
