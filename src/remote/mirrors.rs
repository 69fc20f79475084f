//! Several mirrors of one binhost behind one `Transport`.
//!
//! * The index comes from the mirror with the newest `TIMESTAMP` among those that answer
//!   (each mirror is asked with its own validators, kept in memory); the caller's validators
//!   are that TIMESTAMP, so "not modified" means no mirror has anything newer.
//! * A package comes from the first mirror (in the order given) that answers. A mirror that
//!   cannot be reached, answers 5xx/429 or whose body breaks off or stalls is passed over for
//!   `OFFLINE_HOLD`; one that says 404 is passed over for that request only. The fetcher's
//!   own retry (resuming at the bytes it has) then lands on the next mirror, so a reader sees
//!   no error while another mirror can serve. Digests make every mirror safe to use.
//! * Only when every mirror is unreachable does this transport say `Offline`, so the outer
//!   breaker trips only when the whole binhost is down.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tracing::{info, warn};

use super::endpoint::OFFLINE_HOLD;
use super::{Body, Chunks, ErrorKind, IndexFetch, Transport, TransportError, Validators};

pub struct Mirror {
    pub url: String,
    transport: Box<dyn Transport>,
    /// Passed over until then (and why), after a failure that says the mirror is unwell.
    held: Mutex<Option<(Instant, String)>>,
    /// This mirror's own validators and TIMESTAMP, from its last full answer.
    last: Mutex<Option<(Validators, u64)>>,
    pub served: AtomicU64,
    pub failures: AtomicU64,
}

impl Mirror {
    fn is_held(&self) -> bool {
        matches!(&*self.held.lock().unwrap(), Some((until, _)) if Instant::now() < *until)
    }

    fn hold(&self, why: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut held = self.held.lock().unwrap();
        if !matches!(&*held, Some((until, _)) if Instant::now() < *until) {
            warn!(mirror = %self.url, "mirror failed ({why}); using the others for a while");
        }
        *held = Some((Instant::now() + OFFLINE_HOLD, why.to_string()));
    }

    /// For `status`: `None` when in use, else why it is passed over.
    pub fn state(&self) -> Option<String> {
        match &*self.held.lock().unwrap() {
            Some((until, why)) if Instant::now() < *until => Some(why.clone()),
            _ => None,
        }
    }
}

pub struct Mirrors {
    pub mirrors: Vec<std::sync::Arc<Mirror>>,
}

const VALIDATOR_PREFIX: &str = "binpkgfs-mirrors-timestamp:";

/// The `TIMESTAMP` of an index, read from its header alone.
fn header_timestamp(raw: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(&raw[..raw.len().min(64 << 10)]);
    text.lines()
        .take_while(|l| !l.trim().is_empty())
        .find_map(|l| l.strip_prefix("TIMESTAMP:"))
        .and_then(|t| t.trim().parse().ok())
}

impl Mirrors {
    pub fn new(mirrors: Vec<(String, Box<dyn Transport>)>) -> Mirrors {
        Mirrors {
            mirrors: mirrors
                .into_iter()
                .map(|(url, transport)| {
                    std::sync::Arc::new(Mirror {
                        url,
                        transport,
                        held: Mutex::new(None),
                        last: Mutex::new(None),
                        served: AtomicU64::new(0),
                        failures: AtomicU64::new(0),
                    })
                })
                .collect(),
        }
    }

    /// Mirrors in the order to try: those not held first (in the order given), then the held.
    fn order(&self) -> Vec<&std::sync::Arc<Mirror>> {
        let (ok, held): (Vec<_>, Vec<_>) = self.mirrors.iter().partition(|m| !m.is_held());
        ok.into_iter().chain(held).collect()
    }

    /// A failure seen from `m`: it is held unless it only lacks the file.
    fn failed(m: &Mirror, e: TransportError, errors: &mut Vec<TransportError>) {
        if e.kind != ErrorKind::NotFound {
            m.hold(&e.message);
        }
        errors.push(e);
    }
}

/// Every mirror failed: `Offline` only when all were unreachable; else the most telling
/// kind (not found over retryable over fatal).
fn all_failed(errors: Vec<TransportError>) -> TransportError {
    let kind = if errors.iter().all(|e| e.is_offline()) {
        ErrorKind::Offline
    } else if errors.iter().any(|e| e.kind == ErrorKind::NotFound) {
        ErrorKind::NotFound
    } else if errors.iter().any(|e| e.kind == ErrorKind::Retryable) {
        ErrorKind::Retryable
    } else {
        ErrorKind::Fatal
    };
    let message = errors
        .iter()
        .map(|e| e.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    TransportError::new(kind, format!("every mirror failed: {message}"))
}

/// A body that holds its mirror when it breaks off, so the resumed request goes elsewhere.
struct Watched {
    inner: Box<dyn Chunks>,
    mirror: std::sync::Arc<Mirror>,
}

#[async_trait::async_trait]
impl Chunks for Watched {
    async fn next(&mut self) -> Result<Option<Bytes>, TransportError> {
        let r = self.inner.next().await;
        if let Err(e) = &r {
            self.mirror.hold(&e.message);
        }
        r
    }
}

#[async_trait::async_trait]
impl Transport for Mirrors {
    async fn fetch_index(&self, since: Option<&Validators>) -> Result<IndexFetch, TransportError> {
        let have = since
            .and_then(|v| v.etag.as_deref())
            .and_then(|e| e.strip_prefix(VALIDATOR_PREFIX))
            .and_then(|t| t.parse::<u64>().ok());
        let mut best: Option<(u64, Bytes)> = None;
        let mut newest_known = have;
        let mut errors = Vec::new();
        for m in &self.mirrors {
            let last = m.last.lock().unwrap().clone();
            match m.transport.fetch_index(last.as_ref().map(|(v, _)| v)).await {
                Ok(IndexFetch::NotModified) => {
                    let ts = last.map(|(_, t)| t);
                    newest_known = newest_known.max(ts);
                }
                Ok(IndexFetch::Fresh { raw, validators }) => {
                    let ts = header_timestamp(&raw).unwrap_or(0);
                    *m.last.lock().unwrap() = Some((validators, ts));
                    if best.as_ref().is_none_or(|(b, _)| ts > *b) {
                        best = Some((ts, raw));
                    }
                }
                Err(e) => {
                    warn!(mirror = %m.url, "index check failed: {e}");
                    errors.push(e);
                }
            }
        }
        if best.is_none() && errors.len() == self.mirrors.len() {
            let kind = if errors.iter().all(|e| e.is_offline()) {
                ErrorKind::Offline
            } else {
                errors[0].kind
            };
            let msg: Vec<_> = errors.iter().map(|e| e.message.as_str()).collect();
            return Err(TransportError::new(kind, msg.join("; ")));
        }
        match best {
            Some((ts, raw)) if since.is_none() || have.is_none_or(|h| ts > h) => {
                info!(timestamp = ts, "index taken from the newest mirror");
                Ok(IndexFetch::Fresh {
                    raw,
                    validators: Validators {
                        etag: Some(format!("{VALIDATOR_PREFIX}{ts}")),
                        ..Validators::default()
                    },
                })
            }
            // Nothing newer than what the caller has. With no validators of its own, the
            // caller needs the bytes: send the newest a mirror still has.
            _ if since.is_some() => Ok(IndexFetch::NotModified),
            _ => Err(TransportError::new(
                ErrorKind::Retryable,
                format!("no mirror sent an index (newest known {newest_known:?})"),
            )),
        }
    }

    async fn open(&self, path: &str, from: u64, to: Option<u64>) -> Result<Body, TransportError> {
        let mut errors = Vec::new();
        for m in self.order() {
            match m.transport.open(path, from, to).await {
                Ok(body) => {
                    m.served.fetch_add(1, Ordering::Relaxed);
                    let mirror = m.clone();
                    return Ok(body.map_chunks(|inner| Box::new(Watched { inner, mirror })));
                }
                Err(e) => Self::failed(m, e, &mut errors),
            }
        }
        Err(all_failed(errors))
    }

    async fn read_range(
        &self,
        path: &str,
        from: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, TransportError> {
        let mut errors = Vec::new();
        for m in self.order() {
            match m.transport.read_range(path, from, len).await {
                Ok(data) => {
                    m.served.fetch_add(1, Ordering::Relaxed);
                    return Ok(data);
                }
                Err(e) => Self::failed(m, e, &mut errors),
            }
        }
        Err(all_failed(errors))
    }

    fn may_split(&self) -> bool {
        self.mirrors.iter().any(|m| m.transport.may_split())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A scripted mirror: its index, which files it has, and whether it is reachable.
    struct Fake {
        index: Option<&'static str>,
        files: &'static [&'static str],
        up: bool,
        log: Arc<Mutex<Vec<String>>>,
        name: &'static str,
    }

    struct Once(Option<Bytes>);
    #[async_trait::async_trait]
    impl Chunks for Once {
        async fn next(&mut self) -> Result<Option<Bytes>, TransportError> {
            Ok(self.0.take())
        }
    }

    #[async_trait::async_trait]
    impl Transport for Fake {
        async fn fetch_index(
            &self,
            since: Option<&Validators>,
        ) -> Result<IndexFetch, TransportError> {
            if !self.up {
                return Err(TransportError::new(ErrorKind::Offline, "refused"));
            }
            if since.is_some() {
                return Ok(IndexFetch::NotModified);
            }
            Ok(IndexFetch::Fresh {
                raw: Bytes::from(self.index.unwrap()),
                validators: Validators {
                    etag: Some(self.name.into()),
                    ..Validators::default()
                },
            })
        }
        async fn open(&self, path: &str, _: u64, _: Option<u64>) -> Result<Body, TransportError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("{} {path}", self.name));
            if !self.up {
                return Err(TransportError::new(ErrorKind::Offline, "refused"));
            }
            if !self.files.contains(&path) {
                return Err(TransportError::new(ErrorKind::NotFound, "404"));
            }
            Ok(Body::whole(
                Box::new(Once(Some(Bytes::from(self.name)))),
                0,
                None,
            ))
        }
        async fn read_range(
            &self,
            _: &str,
            _: u64,
            _: u64,
        ) -> Result<Option<Vec<u8>>, TransportError> {
            Ok(None)
        }
    }

    fn mirrors(specs: Vec<Fake>) -> Mirrors {
        Mirrors::new(
            specs
                .into_iter()
                .map(|f| (f.name.to_string(), Box::new(f) as Box<dyn Transport>))
                .collect(),
        )
    }

    fn fake(
        name: &'static str,
        index: Option<&'static str>,
        files: &'static [&'static str],
        up: bool,
        log: &Arc<Mutex<Vec<String>>>,
    ) -> Fake {
        Fake {
            index,
            files,
            up,
            log: log.clone(),
            name,
        }
    }

    #[tokio::test]
    async fn index_from_the_newest_mirror() {
        let log = Arc::default();
        let m = mirrors(vec![
            fake("a", Some("TIMESTAMP: 5\n\n"), &[], true, &log),
            fake("b", Some("TIMESTAMP: 9\n\n"), &[], true, &log),
            fake("c", None, &[], false, &log),
        ]);
        let IndexFetch::Fresh { raw, validators } = m.fetch_index(None).await.unwrap() else {
            panic!()
        };
        assert_eq!(&raw[..], b"TIMESTAMP: 9\n\n");
        // Asked again with those validators: every mirror says not modified.
        assert!(matches!(
            m.fetch_index(Some(&validators)).await.unwrap(),
            IndexFetch::NotModified
        ));
    }

    #[tokio::test]
    async fn packages_fail_over_and_offline_only_when_all_are() {
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let m = mirrors(vec![
            fake("a", None, &["x"], false, &log),
            fake("b", None, &["x"], true, &log),
            fake("c", None, &["x", "y"], true, &log),
        ]);
        let mut body = m.open("x", 0, None).await.unwrap();
        assert_eq!(&body.chunk().await.unwrap().unwrap()[..], b"b");
        // a is now held: the next request goes straight to b; y is only on c.
        log.lock().unwrap().clear();
        let mut body = m.open("y", 0, None).await.unwrap();
        assert_eq!(&body.chunk().await.unwrap().unwrap()[..], b"c");
        assert_eq!(*log.lock().unwrap(), ["b y", "c y"]);
        let e = m.open("z", 0, None).await.err().unwrap();
        assert_eq!(e.kind, ErrorKind::NotFound);
        let down = mirrors(vec![
            fake("a", None, &[], false, &log),
            fake("b", None, &[], false, &log),
        ]);
        assert!(down.open("x", 0, None).await.err().unwrap().is_offline());
        assert!(down.fetch_index(None).await.err().unwrap().is_offline());
    }
}
