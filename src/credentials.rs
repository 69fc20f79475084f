//! Binhost URLs and their secrets: what may be shown, and what must never be.
//!
//! Portage users write private binhosts as `https://user:password@host/path`. `BinhostUrl`
//! splits such a URL once, at the config boundary, into the URL without its userinfo (the only
//! form ever shown: the mount source in `/proc/self/mountinfo`, log lines, `status`, error
//! messages, the saved index's key) and `Credentials`, which go to the HTTP transport as Basic
//! auth and nowhere else. `Debug` of either never prints the password.
//!
//! `--netrc-file` reads credentials the way curl and wget do (`machine HOST login USER password
//! PASS`, or a `default` entry), so they can stay out of fstab and conf.d. The file must not be
//! readable or writable by group or others: like ssh with a private key, a secret file that
//! leaks already is refused rather than used (curl only warns; a daemon's warning is easy to
//! miss in a log, a refused mount is not). No crate is used: `netrc` (0.4, unmaintained since
//! 2016) and `rust-netrc` (0.1, opens files itself and reads `$NETRC`) fit less well than the
//! 80-line parser below, which is tested beside it.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};

/// A user name and password for HTTP Basic auth, and the one origin (scheme, host, port) they
/// are for: a transport for any other server (an index's `URI` header may name one) does not
/// send them, as reqwest does not on a redirect to another origin.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub user: String,
    pub password: Option<String>,
    pub origin: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let password = self.password.as_ref().map(|_| "<redacted>");
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &password)
            .field("origin", &self.origin)
            .finish()
    }
}

/// A binhost URL: the form that may be shown, and the credentials it carried, kept apart.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BinhostUrl {
    /// The URL without userinfo. For a URL that had none it is the text as given, so the mount
    /// source and the saved index's key are what they always were.
    shown: String,
    credentials: Option<Credentials>,
}

impl BinhostUrl {
    /// Splits `raw` into the shown URL and its credentials. A string that is no URL is kept as
    /// given (`remote::connect` refuses it later with a clear error) unless it holds an `@`,
    /// which might be a password: then only the scheme-less rest is kept.
    pub fn parse(raw: &str) -> BinhostUrl {
        let hidden = || BinhostUrl {
            shown: match raw.rsplit_once('@') {
                Some((_, rest)) => format!("(userinfo hidden)@{rest}"),
                None => raw.to_string(),
            },
            credentials: None,
        };
        let Ok(mut url) = reqwest::Url::parse(raw) else {
            return hidden();
        };
        if url.host_str().is_none() && url.scheme() != "file" {
            // `bob:pw@host/x` parses, as scheme `bob` and path `pw@host/x`.
            return hidden();
        }
        if url.username().is_empty() && url.password().is_none() {
            return BinhostUrl {
                shown: raw.to_string(),
                credentials: None,
            };
        }
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let credentials = Credentials {
            user: decode(url.username()),
            password: url.password().map(decode),
            origin: url.origin().ascii_serialization(),
        };
        let _ = url.set_username("");
        let _ = url.set_password(None);
        BinhostUrl {
            shown: url.to_string(),
            credentials: Some(credentials),
        }
    }

    /// The URL without userinfo: the only form to show, log or store.
    pub fn as_str(&self) -> &str {
        &self.shown
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// Fills in credentials from a netrc file: the URL's own password wins (as in curl); a URL
    /// with a user name only takes the password of that login.
    pub fn with_netrc(mut self, path: &Path) -> Result<BinhostUrl, String> {
        if self
            .credentials
            .as_ref()
            .is_some_and(|c| c.password.is_some())
        {
            return Ok(self);
        }
        let text = read_private(path)?;
        let url = reqwest::Url::parse(&self.shown).ok();
        let host = url
            .as_ref()
            .and_then(|u| u.host_str().map(str::to_string))
            .ok_or_else(|| format!("netrc file {}: the URL has no host", path.display()))?;
        let origin = url.map(|u| u.origin().ascii_serialization());
        let user = self.credentials.as_ref().map(|c| c.user.as_str());
        let found = lookup(&text, &host, user).ok_or_else(|| {
            format!(
                "netrc file {}: no entry for machine {host}{}",
                path.display(),
                user.map(|u| format!(" and login {u}")).unwrap_or_default()
            )
        })?;
        self.credentials = Some(Credentials {
            origin: origin.unwrap_or_default(),
            ..found
        });
        Ok(self)
    }
}

impl fmt::Display for BinhostUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for BinhostUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.credentials {
            Some(c) => write!(f, "{:?} ({c:?})", self.shown),
            None => write!(f, "{:?}", self.shown),
        }
    }
}

/// Reads a secret file, refusing one that group or others may read or write, and a symlink.
fn read_private(path: &Path) -> Result<String, String> {
    let what = || format!("netrc file {}", path.display());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("{}: {e}", what()))?;
    let meta = file.metadata().map_err(|e| format!("{}: {e}", what()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", what()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{}: readable or writable by group or others (mode {:o}); it holds passwords: \
             chmod 600 it",
            what(),
            meta.mode() & 0o7777
        ));
    }
    let mut text = String::new();
    file.take(1 << 20)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", what()))?;
    Ok(text)
}

/// netrc tokens: whitespace-separated words, or double-quoted strings with `\` escapes (as
/// curl reads them). `macdef` bodies (up to a blank line) are skipped.
fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    let mut in_macdef = false;
    while let Some(&c) = chars.peek() {
        if in_macdef {
            // A macro ends at the first empty line.
            let mut prev_newline = false;
            for c in chars.by_ref() {
                if c == '\n' && prev_newline {
                    break;
                }
                prev_newline = c == '\n';
            }
            in_macdef = false;
            continue;
        }
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if c == '#' {
            // A comment to the end of the line.
            for c in chars.by_ref() {
                if c == '\n' {
                    break;
                }
            }
            continue;
        }
        let mut word = String::new();
        if c == '"' {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => word.extend(chars.next()),
                    c => word.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                word.push(c);
                chars.next();
            }
        }
        if word == "macdef" {
            // The macro's name is on the same line; skip past it, then the body.
            for c in chars.by_ref() {
                if c == '\n' {
                    break;
                }
            }
            in_macdef = true;
            continue;
        }
        out.push(word);
    }
    out
}

/// The credentials for `host` (and `user`, if the URL named one): the first matching `machine`
/// entry, else the `default` entry.
fn lookup(text: &str, host: &str, user: Option<&str>) -> Option<Credentials> {
    let mut entries: Vec<(Option<String>, Credentials)> = Vec::new();
    let mut it = tokens(text).into_iter();
    while let Some(t) = it.next() {
        match t.as_str() {
            "machine" => entries.push((
                Some(it.next()?),
                Credentials {
                    user: String::new(),
                    password: None,
                    origin: String::new(),
                },
            )),
            "default" => entries.push((
                None,
                Credentials {
                    user: String::new(),
                    password: None,
                    origin: String::new(),
                },
            )),
            "login" | "password" | "account" => {
                let value = it.next()?;
                let Some((_, c)) = entries.last_mut() else {
                    continue;
                };
                match t.as_str() {
                    "login" => c.user = value,
                    "password" => c.password = Some(value),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let fits = |c: &Credentials| user.is_none_or(|u| c.user == u);
    let machine = entries
        .iter()
        .find(|(m, c)| m.as_deref() == Some(host) && fits(c));
    let default = || entries.iter().find(|(m, c)| m.is_none() && fits(c));
    machine
        .or_else(default)
        .map(|(_, c)| c.clone())
        .filter(|c| c.password.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_split_off_and_never_shown() {
        let u = BinhostUrl::parse("https://alice:s%40cret@bin.example.org:8443/amd64");
        assert_eq!(u.as_str(), "https://bin.example.org:8443/amd64");
        assert_eq!(u.to_string(), u.as_str());
        let c = u.credentials().unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.as_deref()),
            ("alice", Some("s@cret"))
        );
        let debug = format!("{u:?}");
        assert!(
            !debug.contains("cret") && debug.contains("alice"),
            "{debug}"
        );
        // Without userinfo the URL is kept exactly as given (mount source, saved-index key).
        let u = BinhostUrl::parse("http://127.0.0.1:8080");
        assert_eq!(u.as_str(), "http://127.0.0.1:8080");
        assert!(u.credentials().is_none());
        // Not a URL: kept for the error message, but never what precedes an `@`.
        assert_eq!(BinhostUrl::parse("not a url").as_str(), "not a url");
        assert!(!BinhostUrl::parse("bob:pw@host/x").as_str().contains("pw"));
    }

    #[test]
    fn netrc_entries_are_found_like_curl_finds_them() {
        let text = "# comment\nmachine other login x password y\n\
                    machine bin.example.org\n  login alice\n  password \"s3 cret\\\"\"\n\
                    macdef init\ncd /\nmachine bin.example.org login evil password no\n\n\
                    machine bin.example.org login bob password hunter2\n\
                    default login anon password guest\n";
        let c = lookup(text, "bin.example.org", None).unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.as_deref()),
            ("alice", Some("s3 cret\""))
        );
        let c = lookup(text, "bin.example.org", Some("bob")).unwrap();
        assert_eq!(c.password.as_deref(), Some("hunter2"));
        let c = lookup(text, "elsewhere", None).unwrap();
        assert_eq!(c.user, "anon");
        assert!(lookup("machine a login b", "a", None).is_none());
        assert!(lookup("", "a", None).is_none());
    }

    #[test]
    fn a_netrc_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("netrc");
        std::fs::write(&path, "machine h login u password p\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let url = BinhostUrl::parse("https://h/x");
        let e = url.clone().with_netrc(&path).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let got = url.clone().with_netrc(&path).unwrap();
        assert_eq!(got.credentials().unwrap().password.as_deref(), Some("p"));
        assert_eq!(got.as_str(), "https://h/x");
        assert_eq!(got.credentials().unwrap().origin, "https://h");
        // The URL's own password wins; a missing entry is a clear error.
        let own = BinhostUrl::parse("https://u:mine@h/x")
            .with_netrc(&path)
            .unwrap();
        assert_eq!(own.credentials().unwrap().password.as_deref(), Some("mine"));
        let e = BinhostUrl::parse("https://other/x")
            .with_netrc(&path)
            .unwrap_err();
        assert!(e.contains("no entry for machine other"), "{e}");
    }
}
