//! The ssh:// URL, parsed here and not by the crate (its parser takes `:22/path` for a port
//! and breaks on IPv6), and the extra options a mount passes to ssh. A host or user starting
//! with `-` is refused: the crate passes the host as the last argument of `ssh` without `--`.

use reqwest::Url;

/// Checks one extra option (`Key=value` or `Key value`) and returns it as a config line.
pub fn option_line(opt: &str) -> Result<String, String> {
    let opt = opt.trim();
    let (key, value) = opt
        .split_once('=')
        .or_else(|| opt.split_once(char::is_whitespace))
        .ok_or_else(|| format!("ssh option {opt:?}: expected Key=value"))?;
    let (key, value) = (key.trim(), value.trim());
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(format!("ssh option {opt:?}: bad option name"));
    }
    if value.is_empty() || value.chars().any(|c| c.is_control()) {
        return Err(format!("ssh option {opt:?}: bad value"));
    }
    Ok(format!("{key} {value}"))
}

/// Where an ssh:// URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub user: Option<String>,
    /// Bare host (an IPv6 address without brackets).
    pub host: String,
    pub port: Option<u16>,
    /// The absolute, decoded directory that holds `Packages`, without a trailing `/`.
    pub root: String,
}

pub(super) fn parse_target(url: &Url) -> Result<Target, String> {
    if url.password().is_some() {
        return Err("passwords in ssh:// URLs are not supported (use a key)".into());
    }
    let host = match url.host_str() {
        Some(h) if h.starts_with('[') => h.trim_start_matches('[').trim_end_matches(']'),
        Some(h) => h,
        None => return Err("no host".into()),
    }
    .to_string();
    let name_ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c))
    };
    if !name_ok(&host) {
        return Err(format!("host {host:?} is not a host name or address"));
    }
    let user = match url.username() {
        "" => None,
        u => {
            let u = percent_decode(u)?;
            if !name_ok(&u) || u.contains(':') {
                return Err(format!("user {u:?} is not a user name"));
            }
            Some(u)
        }
    };
    let root = percent_decode(url.path())?;
    if !root.starts_with('/') || root.trim_end_matches('/').is_empty() {
        return Err("needs an absolute path: ssh://[user@]host[:port]/path/to/binhost".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("no query or fragment allowed".into());
    }
    Ok(Target {
        user,
        host,
        port: url.port(),
        root: root.trim_end_matches('/').to_string(),
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let out = String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8"))?;
    if out.contains('\0') || out.chars().any(|c| c.is_control()) {
        return Err(format!("control characters in {s:?}"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Result<Target, String> {
        parse_target(&Url::parse(url).unwrap())
    }

    #[test]
    fn urls_with_user_port_and_ipv6_parse() {
        let t = target("ssh://binhost@build.example.org:2222/var/cache/binpkgs/").unwrap();
        assert_eq!(t.user.as_deref(), Some("binhost"));
        assert_eq!(t.host, "build.example.org");
        assert_eq!(t.port, Some(2222));
        assert_eq!(t.root, "/var/cache/binpkgs");
        let t = target("ssh://[::1]:22/srv/b%20x").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", Some(22)));
        assert_eq!(t.root, "/srv/b x");
        let t = target("ssh://h/p").unwrap();
        assert_eq!((t.user, t.port), (None, None));
    }

    #[test]
    fn hostile_or_incomplete_urls_are_refused() {
        for bad in [
            "ssh://-oProxyCommand=touch%20x/p",
            "ssh://-h/p",
            "ssh://u:pw@h/p",
            "ssh://-l@h/p",
            "ssh://h",
            "ssh://h/",
            "ssh://h/p?x",
            "ssh://h/p%0a",
        ] {
            assert!(target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn extra_options_become_config_lines() {
        assert_eq!(
            option_line("Ciphers=aes128-gcm@openssh.com").unwrap(),
            "Ciphers aes128-gcm@openssh.com"
        );
        assert_eq!(
            option_line(" ProxyJump  bastion ").unwrap(),
            "ProxyJump bastion"
        );
        for bad in ["", "NoValue", "=x", "Bad-Key=1", "Key=a\nHost *"] {
            assert!(option_line(bad).is_err(), "{bad:?}");
        }
    }
}
