//! HTTP(S) binhosts, through reqwest with rustls and the system's CA store (plus `--ca-file`).
//!
//! The base URL never carries userinfo: credentials come separately and are sent as Basic auth
//! on each request, so no URL in an error message holds a password. reqwest drops the
//! `Authorization` header on a redirect to another host, port or scheme, and an https binhost
//! is never followed to plain http: that would hand the index, and so the trust in every
//! digest, to whoever sits on the path.
//!
//! Status codes are classified here, not in the fetcher: 5xx and 429 are retryable, 404 and
//! 410 say the file is not there, 416 says the server's file is shorter than asked for, any
//! other answer is fatal. A connect failure says the binhost is offline.

use bytes::Bytes;
use reqwest::{StatusCode, Url, header};

use super::{
    Body, Chunks, ErrorKind, IndexFetch, RemoteOptions, Transport, TransportError, Validators,
    chain, content_range, packages_gz,
};
use crate::credentials::Credentials;
use crate::index::MAX_INDEX_BYTES;

/// How many redirects one request may follow.
const MAX_REDIRECTS: usize = 8;

pub struct Http {
    base: Url,
    client: reqwest::Client,
    credentials: Option<Credentials>,
}

/// Follows up to `MAX_REDIRECTS` redirects, never from https to http.
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let downgrade = attempt.url().scheme() == "http"
            && attempt.previous().iter().any(|u| u.scheme() == "https");
        if downgrade {
            let to = attempt.url().to_string();
            attempt.error(format!(
                "refusing to follow a redirect from https to plain http ({to})"
            ))
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
        } else {
            attempt.follow()
        }
    })
}

/// The CA certificates of a PEM file, to trust on top of the system's.
fn ca_certificates(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, TransportError> {
    let what = |e: &dyn std::fmt::Display| {
        TransportError::fatal(format!("CA file {}: {e}", path.display()))
    };
    let pem = std::fs::read(path).map_err(|e| what(&e))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| what(&chain(&e)))?;
    if certs.is_empty() {
        return Err(what(&"no PEM certificate in it"));
    }
    Ok(certs)
}

impl Http {
    pub fn new(mut base: Url, opts: &RemoteOptions) -> Result<Http, TransportError> {
        // Userinfo is never part of a URL we keep (config strips it); drop any left, to be sure.
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("binpkgfs/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(opts.connect_timeout)
            .read_timeout(opts.stall_timeout)
            .redirect(redirect_policy());
        if let Some(ca) = &opts.ca_file {
            builder = builder.tls_certs_merge(ca_certificates(ca)?);
        }
        // A proxy given here replaces the environment's (reqwest reads http_proxy,
        // https_proxy and no_proxy only when none is set).
        if let Some(p) = &opts.proxy {
            let proxy = reqwest::Proxy::all(p)
                .map_err(|e| TransportError::fatal(format!("proxy {p}: {}", chain(&e))))?;
            builder = builder.proxy(proxy);
        }
        let client = builder
            .build()
            .map_err(|e| TransportError::fatal(format!("{base}: {}", chain(&e))))?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        // Only for the origin they were given for (not for a `URI` header's server).
        let origin = base.origin().ascii_serialization();
        let credentials = opts
            .credentials
            .iter()
            .find(|c| c.origin == origin)
            .cloned();
        Ok(Http {
            base,
            client,
            credentials,
        })
    }

    /// A GET of `url`, with the binhost's credentials if it has any.
    fn get(&self, url: &Url) -> reqwest::RequestBuilder {
        let req = self.client.get(url.clone());
        match &self.credentials {
            Some(c) => req.basic_auth(&c.user, c.password.as_ref()),
            None => req,
        }
    }

    fn url(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        {
            // path_segments_mut percent-encodes each component (`+`, `#`, `?` are legal in PATH).
            let mut segs = url.path_segments_mut().expect("http URLs have a path");
            segs.pop_if_empty();
            segs.extend(path.split('/'));
        }
        url
    }
}

/// A reqwest failure: offline if the connection could not be made, fatal for a redirect we
/// refused (asking again is refused again), else retryable.
fn request_error(url: &Url, e: &reqwest::Error) -> TransportError {
    let kind = if e.is_connect() {
        ErrorKind::Offline
    } else if e.is_redirect() {
        ErrorKind::Fatal
    } else {
        ErrorKind::Retryable
    };
    TransportError::new(kind, format!("{url}: {}", chain(e)))
}

/// An answer we did not ask for.
fn status_error(url: &Url, status: StatusCode) -> TransportError {
    let kind = match status {
        s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => ErrorKind::Retryable,
        StatusCode::NOT_FOUND | StatusCode::GONE => ErrorKind::NotFound,
        _ => ErrorKind::Fatal,
    };
    let what = if status == StatusCode::RANGE_NOT_SATISFIABLE {
        " (the server's file is shorter than the range asked for)"
    } else {
        ""
    };
    TransportError::new(kind, format!("{url}: server answered {status}{what}"))
}

fn bad_range(url: &Url, range: &str) -> TransportError {
    TransportError::fatal(format!(
        "{url}: asked for a range, got Content-Range {range:?}"
    ))
}

struct Response {
    url: Url,
    resp: reqwest::Response,
}

#[async_trait::async_trait]
impl Chunks for Response {
    async fn next(&mut self) -> Result<Option<Bytes>, TransportError> {
        self.resp
            .chunk()
            .await
            .map_err(|e| request_error(&self.url, &e))
    }
}

fn content_range_of(resp: &reqwest::Response) -> String {
    resp.headers()
        .get(header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

impl Http {
    /// One index file (`Packages` or `Packages.gz`), conditionally.
    async fn fetch_named(
        &self,
        name: &str,
        since: Option<&Validators>,
    ) -> Result<IndexFetch, TransportError> {
        let url = self.url(name);
        let mut req = self.get(&url);
        if let Some(v) = since {
            if let Some(etag) = &v.etag {
                req = req.header(header::IF_NONE_MATCH, etag);
            }
            if let Some(lm) = &v.last_modified {
                req = req.header(header::IF_MODIFIED_SINCE, lm);
            }
        }
        let mut resp = req.send().await.map_err(|e| request_error(&url, &e))?;
        if resp.status() == StatusCode::NOT_MODIFIED && since.is_some() {
            return Ok(IndexFetch::NotModified);
        }
        if resp.status() != StatusCode::OK {
            return Err(status_error(&url, resp.status()));
        }
        let header_str = |name| {
            resp.headers()
                .get(name)
                .and_then(|v: &header::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        let validators = Validators {
            etag: header_str(header::ETAG),
            last_modified: header_str(header::LAST_MODIFIED),
            compressed: false,
        };
        let mut raw = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| request_error(&url, &e))? {
            if raw.len() + chunk.len() > MAX_INDEX_BYTES {
                return Err(TransportError::fatal(format!(
                    "{url}: index larger than {MAX_INDEX_BYTES} bytes"
                )));
            }
            raw.extend_from_slice(&chunk);
        }
        Ok(IndexFetch::Fresh {
            raw: raw.into(),
            validators,
        })
    }
}

#[async_trait::async_trait]
impl Transport for Http {
    async fn fetch_index(&self, since: Option<&Validators>) -> Result<IndexFetch, TransportError> {
        packages_gz::gz_then_plain(since, |name, v| async move {
            self.fetch_named(name, v.as_ref()).await
        })
        .await
    }

    async fn open(&self, path: &str, from: u64, to: Option<u64>) -> Result<Body, TransportError> {
        let url = self.url(path);
        let mut req = self.get(&url);
        let last = to.map(|t| t.saturating_sub(1).to_string());
        if from > 0 || last.is_some() {
            let last = last.as_deref().unwrap_or("");
            req = req.header(header::RANGE, format!("bytes={from}-{last}"));
        }
        let resp = req.send().await.map_err(|e| request_error(&url, &e))?;
        let announced = resp.content_length();
        match resp.status() {
            StatusCode::OK => Ok(Body::whole(
                Box::new(Response { url, resp }),
                from,
                announced,
            )),
            StatusCode::PARTIAL_CONTENT if from > 0 || to.is_some() => {
                let range = content_range_of(&resp);
                // It must start where we asked; it may end elsewhere (a server that caps
                // ranges): the caller decides what to do with that.
                match content_range::parse(&range) {
                    Some((start, end, total)) if start == from => Ok(Body::range(
                        Box::new(Response { url, resp }),
                        end,
                        total,
                        announced,
                    )),
                    _ => Err(bad_range(&url, &range)),
                }
            }
            status => Err(status_error(&url, status)),
        }
    }

    async fn read_range(
        &self,
        path: &str,
        from: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, TransportError> {
        let url = self.url(path);
        let last = from + len - 1;
        let mut resp = self
            .get(&url)
            .header(header::RANGE, format!("bytes={from}-{last}"))
            .send()
            .await
            .map_err(|e| request_error(&url, &e))?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => return Ok(None),
            status => return Err(status_error(&url, status)),
        }
        let range = content_range_of(&resp);
        if !matches!(content_range::parse(&range), Some((a, b, _)) if a == from && b == last + 1) {
            return Err(bad_range(&url, &range));
        }
        let mut out = Vec::with_capacity(len as usize);
        while let Some(chunk) = resp.chunk().await.map_err(|e| request_error(&url, &e))? {
            if out.len() + chunk.len() > len as usize {
                return Err(bad_range(
                    &url,
                    &format!("{range} (body longer than the range)"),
                ));
            }
            out.extend_from_slice(&chunk);
        }
        if out.len() as u64 != len {
            return Err(bad_range(
                &url,
                &format!("{range} (body of {} bytes)", out.len()),
            ));
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn package_urls_are_joined_and_escaped() {
        let opts = RemoteOptions {
            connect_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(1),
            ..RemoteOptions::default()
        };
        let h = Http::new(Url::parse("https://h/amd64").unwrap(), &opts).unwrap();
        assert_eq!(
            h.url("dev-libs/libsigc++/libsigc++-2-1.gpkg.tar").as_str(),
            "https://h/amd64/dev-libs/libsigc++/libsigc++-2-1.gpkg.tar"
        );
        assert_eq!(
            h.url("a/b#c?d.tbz2").as_str(),
            "https://h/amd64/a/b%23c%3Fd.tbz2"
        );
    }

    #[test]
    fn credentials_go_only_to_their_own_origin() {
        let opts = RemoteOptions {
            credentials: vec![Credentials {
                user: "u".into(),
                password: Some("p".into()),
                origin: "https://h".into(),
            }],
            ..RemoteOptions::default()
        };
        let own = Http::new(Url::parse("https://h/amd64").unwrap(), &opts).unwrap();
        assert!(own.credentials.is_some());
        for other in [
            "https://cdn.example/x",
            "http://h/amd64",
            "https://h:444/amd64",
        ] {
            let h = Http::new(Url::parse(other).unwrap(), &opts).unwrap();
            assert!(h.credentials.is_none(), "{other}");
        }
    }

    #[test]
    fn statuses_are_classified() {
        let url = Url::parse("http://h/x").unwrap();
        let kind = |s: u16| status_error(&url, StatusCode::from_u16(s).unwrap()).kind;
        assert_eq!(kind(500), ErrorKind::Retryable);
        assert_eq!(kind(503), ErrorKind::Retryable);
        assert_eq!(kind(429), ErrorKind::Retryable);
        assert_eq!(kind(404), ErrorKind::NotFound);
        assert_eq!(kind(410), ErrorKind::NotFound);
        assert_eq!(kind(403), ErrorKind::Fatal);
        assert_eq!(kind(416), ErrorKind::Fatal);
        assert!(
            status_error(&url, StatusCode::RANGE_NOT_SATISFIABLE)
                .message
                .contains("shorter")
        );
    }
}
