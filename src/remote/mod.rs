//! Transports: how bytes come from a binhost.
//!
//! `Transport` is the one seam between the filesystem and a server: fetch the index (with
//! conditional-request validators), open a package as a stream of chunks from an offset
//! (a resumed transfer, or a bounded part of a split one), and read one byte range (a
//! metadata scan). `connect` is the one place URLs are dispatched to a transport; a new
//! transport is one new file here plus one arm there.
//!
//! A transport never decides whether bytes are *right*; it reports what the server said and
//! classifies what went wrong (`TransportError`: retryable, fatal, not found, offline). The
//! fetcher checks sizes and digests. A transport does bound what it can: connect and stall
//! timeouts, a redirect limit, and an index size limit.
//!
//! `Endpoint` wraps one server's transport with the state that belongs to that server and not
//! to the fetcher: the offline breaker and whether it does ranges well enough to split.

mod content_range;
mod endpoint;
mod file;
mod http;
mod mirrors;
mod packages_gz;
mod ssh;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

use crate::credentials::Credentials;

pub use crate::index::Validators;
pub use endpoint::Endpoint;
pub use mirrors::{Mirror, Mirrors};
pub use ssh::{CONTROL_ROOT as SSH_CONTROL_ROOT, SshOptions, option_line as ssh_option_line};

/// What went wrong, as far as deciding what to do next is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The server may do better next time: a dropped connection, a stall, a 5xx, a 429.
    Retryable,
    /// The server is wrong about this request, and asking again cannot help.
    Fatal,
    /// The server says the file is not there (404/410, ENOENT).
    NotFound,
    /// The server could not be reached at all (refused, unroutable, connect timeout, DNS).
    Offline,
}

/// A transport failure: its kind and a one-line message (with the whole source chain) that
/// names the server and file, never a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TransportError {
    pub kind: ErrorKind,
    pub message: String,
}

impl TransportError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        TransportError {
            kind,
            message: message.into(),
        }
    }

    pub fn fatal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Fatal, message)
    }

    pub fn is_offline(&self) -> bool {
        self.kind == ErrorKind::Offline
    }
}

#[derive(Debug)]
pub enum IndexFetch {
    NotModified,
    Fresh { raw: Bytes, validators: Validators },
}

/// Settings for transports, from the validated config.
#[derive(Debug, Clone, Default)]
pub struct RemoteOptions {
    pub connect_timeout: Duration,
    /// A transfer that delivers nothing for this long is cut.
    pub stall_timeout: Duration,
    /// For ssh:// binhosts.
    pub ssh: SshOptions,
    /// An HTTP(S) proxy for every request; `None`: the environment's (`http_proxy`,
    /// `https_proxy`, `no_proxy`), as reqwest reads them.
    pub proxy: Option<String>,
    /// HTTP Basic auth, kept apart from the URL so that no URL shown anywhere carries it.
    /// Each for the one origin it was given for.
    pub credentials: Vec<Credentials>,
    /// Extra CA certificates (PEM) for https, on top of the system's.
    pub ca_file: Option<PathBuf>,
}

/// A binhost as the fetcher and the refresher see it.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    /// Fetches `Packages`, or reports that it has not changed since `since`.
    async fn fetch_index(&self, since: Option<&Validators>) -> Result<IndexFetch, TransportError>;

    /// Starts reading one package file at byte `from`, asking for bytes up to `to` (exclusive)
    /// if given, else to the end. The body always starts at `from` (a server that ignored the
    /// range is skipped forward); it says what the server promised (see `Body`).
    async fn open(&self, path: &str, from: u64, to: Option<u64>) -> Result<Body, TransportError>;

    /// Reads exactly `len` bytes at `from` with one request. `Ok(None)` when the server does
    /// not do ranges: the caller then fetches the file whole.
    async fn read_range(
        &self,
        path: &str,
        from: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, TransportError>;

    /// Whether several connections can fill what one cannot (false for local storage).
    fn may_split(&self) -> bool {
        true
    }
}

/// The chunks of one answer, as a transport produces them.
#[async_trait::async_trait]
pub trait Chunks: Send {
    async fn next(&mut self) -> Result<Option<Bytes>, TransportError>;
}

/// A package body being received, and what the server promised about it.
pub struct Body {
    /// Bytes still to drop from the front (a whole-file answer to a ranged request).
    skip: u64,
    /// For an answer with a range of the file: where it ends (exclusive), and the file's total
    /// length if the server said.
    range: Option<(u64, Option<u64>)>,
    /// How many bytes the server said it would send, before any skip.
    announced: Option<u64>,
    chunks: Box<dyn Chunks>,
}

impl Body {
    /// A body that sends the file from the requested offset to its end.
    pub fn whole(chunks: Box<dyn Chunks>, skip: u64, announced: Option<u64>) -> Body {
        Body {
            skip,
            range: None,
            announced,
            chunks,
        }
    }

    /// A body that sends a range of the file ending at `end` (exclusive).
    pub fn range(
        chunks: Box<dyn Chunks>,
        end: u64,
        total: Option<u64>,
        announced: Option<u64>,
    ) -> Body {
        Body {
            skip: 0,
            range: Some((end, total)),
            announced,
            chunks,
        }
    }

    /// The same body, its chunks passed through `f` (a mirror watching for a broken body).
    pub fn map_chunks(self, f: impl FnOnce(Box<dyn Chunks>) -> Box<dyn Chunks>) -> Body {
        Body {
            chunks: f(self.chunks),
            ..self
        }
    }

    /// How many bytes the server announced it will send from the caller's start offset, if it
    /// said (checked before any byte is kept): the rest of the file, or for an honoured
    /// bounded range (`is_partial`), the range.
    pub fn announced_len(&self) -> Option<u64> {
        self.announced.map(|n| n.saturating_sub(self.skip))
    }

    /// The server answered with a range, not the whole file.
    pub fn is_partial(&self) -> bool {
        self.range.is_some()
    }

    /// Where the body ends (exclusive) if the server sent a range.
    pub fn range_end(&self) -> Option<u64> {
        self.range.map(|(end, _)| end)
    }

    /// The whole file's length as a ranged answer states it.
    pub fn total_len(&self) -> Option<u64> {
        self.range.and_then(|(_, total)| total)
    }

    /// The next chunk, or `None` at the end of the body.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, TransportError> {
        loop {
            let Some(mut chunk) = self.chunks.next().await? else {
                return Ok(None);
            };
            if self.skip >= chunk.len() as u64 {
                self.skip -= chunk.len() as u64;
                continue;
            }
            let rest = chunk.split_off(self.skip as usize);
            self.skip = 0;
            return Ok(Some(rest));
        }
    }
}

/// The transport for a binhost URL: the one place URLs are dispatched.
pub fn connect(url: &str, opts: &RemoteOptions) -> Result<Box<dyn Transport>, TransportError> {
    let bad = || {
        TransportError::fatal(format!(
            "unsupported URL {url:?}: use http://, https://, ssh://[user@]host[:port]/path or file:///path"
        ))
    };
    let parsed = reqwest::Url::parse(url).map_err(|_| bad())?;
    match parsed.scheme() {
        "http" | "https" if parsed.host_str().is_some() => {
            Ok(Box::new(http::Http::new(parsed, opts)?))
        }
        "ssh" => Ok(Box::new(ssh::Ssh::new(&parsed, opts)?)),
        "file" if parsed.host_str().unwrap_or("").is_empty() => {
            let base = parsed.to_file_path().map_err(|_| bad())?;
            Ok(Box::new(file::LocalDir::new(base, opts)))
        }
        _ => Err(bad()),
    }
}

/// The transport a URL is served by, for `status`: `http`, `ssh`, `file` (or `?`).
pub fn transport_name(url: &str) -> &'static str {
    match url.split_once("://").map(|(scheme, _)| scheme) {
        Some("http" | "https") => "http",
        Some("ssh") => "ssh",
        Some("file") => "file",
        _ => "?",
    }
}

/// How often and how patiently a failed request is tried again: one policy for whole
/// transfers, parts and ranged reads. At most 0.5 + 1 + 2 s of waiting.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub retries: u32,
    pub first_backoff: Duration,
}

pub const RETRY: RetryPolicy = RetryPolicy {
    retries: 3,
    first_backoff: Duration::from_millis(500),
};

impl RetryPolicy {
    /// The wait before retry number `attempt` (1-based), or `None` once retries are used up.
    pub fn backoff(&self, attempt: u32) -> Option<Duration> {
        (1..=self.retries)
            .contains(&attempt)
            .then(|| self.first_backoff * 2u32.pow(attempt - 1))
    }
}

/// Formats an error with its whole `source()` chain on one line, for warnings.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> RemoteOptions {
        RemoteOptions {
            connect_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(1),
            ..RemoteOptions::default()
        }
    }

    #[test]
    fn urls_are_validated() {
        for bad in [
            "ftp://x/y",
            "not a url",
            "http://",
            "file://host/x",
            "/plain/path",
        ] {
            let err = connect(bad, &opts()).err().expect(bad);
            assert_eq!(err.kind, ErrorKind::Fatal, "{bad}");
            assert!(err.message.contains("unsupported URL"), "{bad}");
        }
        assert!(connect("file:///srv/binpkgs", &opts()).is_ok());
        assert!(connect("https://h/amd64", &opts()).is_ok());
        assert!(connect("ssh://binhost@h:2222/var/cache/binpkgs", &opts()).is_ok());
        let err = connect("ssh://-oProxyCommand=x/p", &opts()).err().unwrap();
        assert_eq!(err.kind, ErrorKind::Fatal);
    }

    #[test]
    fn retries_back_off_and_end() {
        assert_eq!(RETRY.backoff(1), Some(Duration::from_millis(500)));
        assert_eq!(RETRY.backoff(3), Some(Duration::from_secs(2)));
        assert_eq!(RETRY.backoff(4), None);
        assert_eq!(RETRY.backoff(0), None);
    }
}
