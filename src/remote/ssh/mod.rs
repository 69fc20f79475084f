//! `ssh://[user@]host[:port]/absolute/path` binhosts: SFTP over one multiplexed OpenSSH
//! ControlMaster connection per binhost (crates `openssh`, native mux, and
//! `openssh-sftp-client`).
//!
//! The system `ssh` client makes the connection, so `~/.ssh/config`, `known_hosts`,
//! `ProxyJump`, the agent and identity files behave as they do for Portage. Always
//! `BatchMode=yes` (nobody answers a prompt at boot) and strict host-key checking unless the
//! mount asks for `accept-new`. The master lives in a per-mount control directory under
//! `/run/binpkgfs`, with `ControlPersist` of 10 s: while we are connected it stays, and if the
//! daemon is killed it exits 10 s after our channel closes. The directory is cleaned (stale
//! masters told to exit) at the first connect and when the transport is dropped.
//!
//! Invariants:
//! * every SFTP operation is bounded by the stall timeout (the crate has none), so a reader
//!   never hangs on a dead or stopped server (sshfs's lesson);
//! * one connect at a time (single flight, under a mutex), with backoff; a connection that
//!   failed or stalled is dropped and the next operation reconnects and reopens its file;
//! * host-key and authentication failures are fatal with one clear line; a refused or
//!   timed-out connect is "offline"; a missing file is "not found"; a dead link is retryable.
//!
//! Reads are pipelined: the crate sends one request at a time per `File`, so a stream keeps
//! `INFLIGHT` reads of the server's maximum length in flight on clones of one handle (clones
//! share the remote handle, each has its own offset) and yields them in order.
//!
//! `target` parses the URL (not the crate: its parser breaks on `:22/path` and IPv6) and
//! refuses a host starting with `-`; `master` owns the control directory and reads ssh's
//! errors.

use std::io::SeekFrom;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt, TryStreamExt, stream};
use openssh::{ControlPersist, KnownHosts, Session, SessionBuilder};
use openssh_sftp_client::error::SftpErrorKind;
use openssh_sftp_client::file::File as SftpFile;
use openssh_sftp_client::{Error as SftpError, Sftp, SftpOptions};
use reqwest::Url;
use tokio::io::AsyncSeekExt;
use tracing::{debug, info, warn};

use super::{Body, Chunks, ErrorKind, IndexFetch, RemoteOptions, Transport, TransportError};
use master::{connect_error, home_dir, prepare_control_dir, stop_masters};
pub use target::option_line;
use target::{Target, parse_target};

mod master;
mod target;
use crate::index::{MAX_INDEX_BYTES, Validators};

/// Reads in flight per stream: at 255 KiB each, 4 MiB, enough for ~400 MiB/s at 10 ms RTT.
const INFLIGHT: usize = 16;
/// One read request: OpenSSH's limit (`limits@openssh.com`). A server with a lower limit
/// answers short, and the rest of the chunk is asked for in turn.
const CHUNK: u64 = 261_120;
/// How long the master outlives its last client (our SFTP channel): the bound on an orphan
/// master after the daemon is SIGKILLed.
const CONTROL_PERSIST_SECS: usize = 10;
/// Where per-mount control directories live.
pub const CONTROL_ROOT: &str = "/run/binpkgfs";
/// OpenSSH's ServerAliveInterval for the master: a dead server is noticed by the master too.
const SERVER_ALIVE: Duration = Duration::from_secs(15);
/// The longest wait between two connect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(4);

/// SSH settings of a mount, from the validated config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SshOptions {
    /// `-i FILE` (and `IdentitiesOnly=yes`).
    pub identity: Option<PathBuf>,
    /// `UserKnownHostsFile`.
    pub known_hosts: Option<PathBuf>,
    /// An ssh config file used instead of `~/.ssh/config` and `/etc/ssh/ssh_config`.
    pub config: Option<PathBuf>,
    /// Extra `Key value` options (the role of `PORTAGE_SSH_OPTS`).
    pub options: Vec<String>,
    /// `StrictHostKeyChecking=accept-new` instead of `yes`.
    pub accept_new: bool,
    /// This mount's control directory (created 0700, cleaned at start and exit).
    pub control_dir: PathBuf,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            identity: None,
            known_hosts: None,
            config: None,
            options: Vec::new(),
            accept_new: false,
            control_dir: Path::new(CONTROL_ROOT).join("ssh-default"),
        }
    }
}

/// One live connection: the master session and the SFTP channel on it.
struct Conn {
    sftp: Sftp,
    /// Kept so the master is told to exit when the last user of this connection drops it.
    _session: Arc<Session>,
    generation: u64,
}

#[derive(Default)]
struct Link {
    conn: Option<Arc<Conn>>,
    generation: u64,
    /// Connect failures in a row, and the last one (shared with callers that waited for it).
    failures: u32,
    last_failure: Option<(Instant, TransportError)>,
}

struct Shared {
    target: Target,
    /// `ssh://...` as the user wrote it, for messages.
    name: String,
    ssh: SshOptions,
    connect_timeout: Duration,
    stall: Duration,
    link: tokio::sync::Mutex<Link>,
    /// Connect attempts made so far (for single flight: did one finish while we waited?).
    attempts: AtomicU64,
    /// Whether this process used the control directory (a pre-flight check never does).
    used_dir: AtomicBool,
}

pub struct Ssh {
    shared: Arc<Shared>,
}

impl Ssh {
    pub fn new(url: &Url, opts: &RemoteOptions) -> Result<Ssh, TransportError> {
        let target = parse_target(url).map_err(|e| TransportError::fatal(format!("{url}: {e}")))?;
        Ok(Ssh {
            shared: Arc::new(Shared {
                target,
                name: url.to_string(),
                ssh: opts.ssh.clone(),
                connect_timeout: opts.connect_timeout,
                stall: opts.stall_timeout,
                link: tokio::sync::Mutex::new(Link::default()),
                attempts: AtomicU64::new(0),
                used_dir: AtomicBool::new(false),
            }),
        })
    }
}

impl Shared {
    fn path(&self, rel: &str) -> String {
        format!("{}/{rel}", self.target.root)
    }

    /// The live connection, connecting (one caller at a time, with backoff) if there is none.
    async fn conn(&self) -> Result<Arc<Conn>, TransportError> {
        let seen = self.attempts.load(Ordering::Acquire);
        let mut link = self.link.lock().await;
        if let Some(c) = &link.conn {
            return Ok(c.clone());
        }
        // Someone else tried while we waited for the lock, and failed: that is our answer too.
        if self.attempts.load(Ordering::Acquire) != seen
            && let Some((_, e)) = &link.last_failure
        {
            return Err(e.clone());
        }
        if let Some((at, _)) = &link.last_failure {
            let backoff =
                (Duration::from_millis(250) * 2u32.pow(link.failures.min(5) - 1)).min(MAX_BACKOFF);
            let wait = backoff.saturating_sub(at.elapsed());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        self.attempts.fetch_add(1, Ordering::AcqRel);
        let started = Instant::now();
        match self.dial(link.generation + 1).await {
            Ok(conn) => {
                let conn = Arc::new(conn);
                link.generation += 1;
                link.failures = 0;
                link.last_failure = None;
                link.conn = Some(conn.clone());
                info!(binhost = %self.name, secs = format!("{:.2}", started.elapsed().as_secs_f64()), "ssh connected");
                Ok(conn)
            }
            Err(e) => {
                link.failures += 1;
                link.last_failure = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Drops `conn` if it is still the current connection: the next operation reconnects.
    async fn invalidate(&self, generation: u64) {
        let mut link = self.link.lock().await;
        if link
            .conn
            .as_ref()
            .is_some_and(|c| c.generation == generation)
        {
            warn!(binhost = %self.name, "ssh connection lost; reconnecting on next use");
            link.conn = None;
        }
    }

    async fn dial(&self, generation: u64) -> Result<Conn, TransportError> {
        let dir = self.ssh.control_dir.clone();
        if !self.used_dir.swap(true, Ordering::AcqRel) {
            tokio::task::spawn_blocking(move || prepare_control_dir(&dir))
                .await
                .map_err(|e| TransportError::fatal(e.to_string()))?
                .map_err(|e| {
                    TransportError::fatal(format!(
                        "ssh control directory {}: {e}",
                        self.ssh.control_dir.display()
                    ))
                })?;
        }
        let mut b = SessionBuilder::default();
        b.known_hosts_check(if self.ssh.accept_new {
            KnownHosts::Add
        } else {
            KnownHosts::Strict
        })
        .control_directory(&self.ssh.control_dir)
        .control_persist(ControlPersist::IdleFor(
            NonZeroUsize::new(CONTROL_PERSIST_SECS).expect("non-zero"),
        ))
        .connect_timeout(self.connect_timeout.max(Duration::from_secs(1)))
        .server_alive_interval(SERVER_ALIVE);
        if let Some(u) = &self.target.user {
            b.user(u.clone());
        }
        if let Some(p) = self.target.port {
            b.port(p);
        }
        if let Some(k) = &self.ssh.identity {
            b.keyfile(k);
        }
        if let Some(k) = &self.ssh.known_hosts {
            b.user_known_hosts_file(k);
        }
        let generated = self.config_file()?;
        if let Some(f) = generated.as_ref().or(self.ssh.config.as_ref()) {
            b.config_file(f);
        }
        // ssh bounds the TCP connect and banner by ConnectTimeout; this bounds the rest.
        let bound = self.connect_timeout + self.stall;
        let session = match tokio::time::timeout(bound, b.connect_mux(&self.target.host)).await {
            Ok(Ok(s)) => Arc::new(s),
            Ok(Err(e)) => return Err(connect_error(&self.name, &e)),
            Err(_) => {
                return Err(TransportError::new(
                    ErrorKind::Offline,
                    format!(
                        "{}: ssh connect timed out after {}s",
                        self.name,
                        bound.as_secs()
                    ),
                ));
            }
        };
        let sftp = match tokio::time::timeout(
            self.stall,
            Sftp::from_clonable_session(session.clone(), SftpOptions::new()),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(TransportError::fatal(format!(
                    "{}: starting SFTP failed (does the server allow the sftp subsystem?): {}",
                    self.name,
                    super::chain(&e)
                )));
            }
            Err(_) => {
                return Err(TransportError::new(
                    ErrorKind::Retryable,
                    format!(
                        "{}: SFTP did not start within {}s",
                        self.name,
                        self.stall.as_secs()
                    ),
                ));
            }
        };
        Ok(Conn {
            sftp,
            _session: session,
            generation,
        })
    }

    /// The generated `-F` file, when there are extra options: they come first (ssh takes the
    /// first value it sees), then the config ssh would have read itself, by `Include`.
    fn config_file(&self) -> Result<Option<PathBuf>, TransportError> {
        if self.ssh.options.is_empty() {
            return Ok(None);
        }
        let mut text =
            String::from("# generated by binpkgfs: extra options, then the usual config\n");
        for o in &self.ssh.options {
            let line = option_line(o).map_err(TransportError::fatal)?;
            text.push_str(&line);
            text.push('\n');
        }
        let includes = match &self.ssh.config {
            Some(c) => vec![c.clone()],
            None => {
                let mut v = Vec::new();
                if let Some(home) = home_dir() {
                    v.push(home.join(".ssh/config"));
                }
                v.push(PathBuf::from("/etc/ssh/ssh_config"));
                v
            }
        };
        for inc in includes {
            text.push_str(&format!("Include \"{}\"\n", inc.display()));
        }
        let path = self.ssh.control_dir.join("ssh_config");
        std::fs::write(&path, text)
            .map_err(|e| TransportError::fatal(format!("writing {}: {e}", path.display())))?;
        Ok(Some(path))
    }

    /// What a failed SFTP operation means; a dead connection is dropped (the caller retries).
    async fn failed(&self, conn: &Conn, what: &str, e: SftpError) -> TransportError {
        let (kind, dead) = classify_sftp(&e);
        if dead {
            self.invalidate(conn.generation).await;
        }
        let why = match &e {
            SftpError::SftpError(SftpErrorKind::NoSuchFile, _) => "no such file".to_string(),
            SftpError::SftpError(SftpErrorKind::PermDenied, _) => "permission denied".to_string(),
            SftpError::SftpError(k, _) => format!("the SFTP server answered {k:?}"),
            _ => format!("connection lost ({})", super::chain(&e)),
        };
        TransportError::new(kind, format!("{}: {what}: {why}", self.name))
    }

    /// Runs one SFTP operation under the stall timeout.
    async fn op<T>(
        &self,
        conn: &Conn,
        what: &str,
        fut: impl Future<Output = Result<T, SftpError>>,
    ) -> Result<T, TransportError> {
        match tokio::time::timeout(self.stall, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.failed(conn, what, e).await),
            Err(_) => Err(self.stalled(conn, what).await),
        }
    }

    async fn stalled(&self, conn: &Conn, what: &str) -> TransportError {
        // A stopped server may come back, but a new connection is cheap and cannot be worse.
        self.invalidate(conn.generation).await;
        TransportError::new(
            ErrorKind::Retryable,
            format!(
                "{}: {what}: no answer within {}s",
                self.name,
                self.stall.as_secs()
            ),
        )
    }

    async fn open_file(
        &self,
        conn: &Conn,
        path: &str,
    ) -> Result<(SftpFile, u64, u32), TransportError> {
        let what = format!("open {path}");
        let mut file = self
            .op(conn, &what, conn.sftp.options().read(true).open(path))
            .await?;
        let md = self.op(conn, &what, file.metadata()).await?;
        if md.file_type().is_some_and(|t| !t.is_file()) {
            return Err(TransportError::fatal(format!(
                "{}: {path}: not a regular file",
                self.name
            )));
        }
        let size = md.len().ok_or_else(|| {
            TransportError::fatal(format!("{}: {path}: the server gave no size", self.name))
        })?;
        let mtime = md.modified().map_or(0, |t| t.into_raw());
        Ok((file, size, mtime))
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if !self.used_dir.load(Ordering::Acquire) {
            return;
        }
        // Dropping the connection tells its master to exit (the crate's Session drop).
        self.link.get_mut().conn = None;
        let dir = &self.ssh.control_dir;
        stop_masters(dir);
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// `(kind, the connection is dead)` for an SFTP error.
fn classify_sftp(e: &SftpError) -> (ErrorKind, bool) {
    match e {
        SftpError::SftpError(kind, _) => (server_says(*kind), false),
        // The background tasks, the channel or the master are gone.
        _ => (ErrorKind::Retryable, true),
    }
}

/// An error status the SFTP server answered with: the connection is fine.
fn server_says(kind: SftpErrorKind) -> ErrorKind {
    match kind {
        SftpErrorKind::NoSuchFile => ErrorKind::NotFound,
        SftpErrorKind::PermDenied | SftpErrorKind::OpUnsupported => ErrorKind::Fatal,
        _ => ErrorKind::Retryable,
    }
}

/// Reads `[start, end)` of `file` with `INFLIGHT` requests in flight, in order; ends early
/// at the server's EOF.
fn pipelined(
    file: SftpFile,
    start: u64,
    end: u64,
) -> impl Stream<Item = Result<Bytes, SftpError>> + Send + 'static {
    stream::iter((start..end).step_by(CHUNK as usize))
        .map(move |off| {
            let mut f = file.clone();
            let want = (end - off).min(CHUNK) as usize;
            async move {
                f.seek(SeekFrom::Start(off)).await?;
                let mut buf = BytesMut::with_capacity(want);
                while buf.len() < want {
                    let n = (want - buf.len()) as u32;
                    match f.read(n, buf.split_off(buf.len())).await? {
                        Some(b) if !b.is_empty() => buf.unsplit(b),
                        _ => break,
                    }
                }
                Ok(buf.freeze())
            }
        })
        .buffered(INFLIGHT)
        .try_take_while(|b| std::future::ready(Ok(!b.is_empty())))
}

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, SftpError>> + Send>>;

/// A body being read: each chunk must come within the stall timeout.
struct Reader {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    what: String,
    stream: ByteStream,
}

#[async_trait::async_trait]
impl Chunks for Reader {
    async fn next(&mut self) -> Result<Option<Bytes>, TransportError> {
        match tokio::time::timeout(self.shared.stall, self.stream.next()).await {
            Ok(None) => Ok(None),
            Ok(Some(Ok(b))) => Ok(Some(b)),
            Ok(Some(Err(e))) => Err(self.shared.failed(&self.conn, &self.what, e).await),
            Err(_) => Err(self.shared.stalled(&self.conn, &self.what).await),
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[async_trait::async_trait]
impl Transport for Ssh {
    /// SFTP has no ETag: the validator is `(size, mtime)` from a stat, in whole seconds. An
    /// index changed less than 2 s ago gets no validator (a same-size rewrite in the same
    /// second would look unchanged), and one that changes while it is read is read again.
    async fn fetch_index(&self, since: Option<&Validators>) -> Result<IndexFetch, TransportError> {
        let s = &self.shared;
        let conn = s.conn().await?;
        let path = s.path("Packages");
        let what = format!("read {path}");
        for _ in 0..3 {
            let (file, size, mtime) = s.open_file(&conn, &path).await?;
            if size > MAX_INDEX_BYTES as u64 {
                return Err(TransportError::fatal(format!(
                    "{}: index larger than {MAX_INDEX_BYTES} bytes",
                    s.name
                )));
            }
            let tag = format!("sftp:{size}:{mtime}");
            let settled = now_secs().saturating_sub(mtime as u64) >= 2;
            if settled && since.and_then(|v| v.etag.as_deref()) == Some(tag.as_str()) {
                return Ok(IndexFetch::NotModified);
            }
            let chunks: Vec<Bytes> = s
                .op(&conn, &what, pipelined(file, 0, size).try_collect())
                .await?;
            let raw: Vec<u8> = chunks.concat();
            let md = s.op(&conn, &what, conn.sftp.fs().metadata(&path)).await?;
            let after = (md.len(), md.modified().map_or(0, |t| t.into_raw()));
            if after != (Some(size), mtime) || raw.len() as u64 != size {
                debug!(path, "index changed while it was read; reading again");
                continue;
            }
            return Ok(IndexFetch::Fresh {
                raw: raw.into(),
                validators: Validators {
                    etag: settled.then_some(tag),
                    last_modified: None,
                    compressed: false,
                },
            });
        }
        Err(TransportError::new(
            ErrorKind::Retryable,
            format!("{}: {path} kept changing while it was read", s.name),
        ))
    }

    async fn open(&self, path: &str, from: u64, to: Option<u64>) -> Result<Body, TransportError> {
        let s = &self.shared;
        let conn = s.conn().await?;
        let full = s.path(path);
        let (file, size, _) = s.open_file(&conn, &full).await?;
        if from > size {
            return Err(TransportError::fatal(format!(
                "{}: {full}: the server's file is shorter than the range asked for",
                s.name
            )));
        }
        let end = to.map_or(size, |t| t.min(size));
        let reader = Reader {
            shared: s.clone(),
            conn: conn.clone(),
            what: format!("read {full}"),
            stream: Box::pin(pipelined(file, from, end)),
        };
        // What a server says in Content-Length (and Content-Range for a resumed or bounded
        // read): the fetcher checks it against SIZE before any byte is kept.
        if from > 0 || to.is_some() {
            Ok(Body::range(
                Box::new(reader),
                end,
                Some(size),
                Some(end - from),
            ))
        } else {
            Ok(Body::whole(Box::new(reader), 0, Some(size)))
        }
    }

    async fn read_range(
        &self,
        path: &str,
        from: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, TransportError> {
        let s = &self.shared;
        let conn = s.conn().await?;
        let full = s.path(path);
        let (file, size, _) = s.open_file(&conn, &full).await?;
        if from + len > size {
            return Err(TransportError::fatal(format!(
                "{}: {full}: the server's file is shorter than the range asked for",
                s.name
            )));
        }
        let what = format!("read {full} at {from}");
        let chunks: Vec<Bytes> = s
            .op(
                &conn,
                &what,
                pipelined(file, from, from + len).try_collect(),
            )
            .await?;
        let out = chunks.concat();
        if out.len() as u64 != len {
            return Err(TransportError::new(
                ErrorKind::Retryable,
                format!("{}: {what}: got {} of {len} bytes", s.name, out.len()),
            ));
        }
        Ok(Some(out))
    }

    /// One multiplexed connection carries every request, and one stream already keeps 4 MiB
    /// in flight: parts over the same connection add read-back CPU and no bandwidth
    /// (measured, see README "ssh:// binhosts").
    fn may_split(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sftp_errors_are_classified() {
        assert_eq!(server_says(SftpErrorKind::NoSuchFile), ErrorKind::NotFound);
        assert_eq!(server_says(SftpErrorKind::PermDenied), ErrorKind::Fatal);
        assert_eq!(server_says(SftpErrorKind::Failure), ErrorKind::Retryable);
        let e = SftpError::BackgroundTaskFailure(&"read/flush task failed");
        assert_eq!(classify_sftp(&e), (ErrorKind::Retryable, true));
    }
}
