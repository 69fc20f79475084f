//! `binpkgfs status`: what a running mount is doing, for people and for scripts.
//!
//! The daemon answers through an extended attribute on the mount's root
//! (`user.binpkgfs.status`, JSON), so no socket or extra file appears in the PKGDIR and the
//! answer always comes from the daemon actually serving that mount point.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::config::MountConfig;
use crate::fetch::Fetcher;
use crate::fs::STATUS_XATTR;
use crate::lifecycle::Lifecycle;
use crate::prefetch::Updates;
use crate::verify::VerifyMode;

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The daemon side: a closure that renders the current status as JSON.
pub fn reporter(
    cfg: &MountConfig,
    lifecycle: Arc<Lifecycle>,
    fetcher: Arc<Fetcher>,
    updates: Option<Arc<Updates>>,
) -> Box<dyn Fn() -> String + Send + Sync> {
    let mountpoint = cfg.mountpoint.display().to_string();
    Box::new(move || {
        let ns = lifecycle.ns.current();
        let last = lifecycle.last.lock().unwrap().clone();
        let usage = fetcher.store().usage();
        let s = &fetcher.stats;
        let now = unix(SystemTime::now());
        json!({
            "url": lifecycle.url,
            "transport": crate::remote::transport_name(&lifecycle.url),
            "mountpoint": mountpoint,
            "pid": std::process::id(),
            "index": {
                "timestamp": ns.index.timestamp,
                "age_seconds": ns.index.timestamp.map(|t| now.saturating_sub(t)),
                "packages": ns.index.packages.len(),
                "refused_entries": ns.index.rejected.len(),
                "last_check": unix(last.at),
                "last_check_result": last.result,
            },
            "cache": {
                "bytes": usage.bytes,
                "limit": usage.limit,
                "entries": usage.entries,
            },
            "hits": s.hits.load(Ordering::Relaxed),
            "misses": s.misses.load(Ordering::Relaxed),
            "bytes_fetched": s.bytes_fetched.load(Ordering::Relaxed),
            "downloads_in_flight": s.in_flight.load(Ordering::Relaxed),
            "failed_downloads": s.failures.load(Ordering::Relaxed),
            "verify": match fetcher.verify_mode() {
                VerifyMode::Strongest => "strongest",
                VerifyMode::All => "all",
            },
            "updates_prefetch": updates
                .as_ref()
                .map_or_else(|| json!({"enabled": false}), |u| u.status()),
        })
        .to_string()
    })
}

/// Reads the status of the mount at `mountpoint`.
pub fn read(mountpoint: &Path) -> Result<Value, String> {
    let not_ours = || format!("{} is not a binpkgfs mount", mountpoint.display());
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| not_ours())?;
    let name = std::ffi::CString::new(STATUS_XATTR).expect("no NUL");
    let mut buf = vec![0u8; 64 * 1024];
    // SAFETY: valid C strings and a buffer of the stated length.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => not_ours(),
            _ => format!("{}: {e}", mountpoint.display()),
        });
    }
    buf.truncate(n as usize);
    serde_json::from_slice(&buf).map_err(|e| format!("unreadable status: {e}"))
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The `updates:` line: `prefetch=updates` off, waiting for its first pass, or its last pass.
fn updates_line(v: &Value, now: u64) -> String {
    let u = |p: &str| v.pointer(&format!("/updates_prefetch{p}"));
    let n = |p: &str| u(p).and_then(Value::as_u64).unwrap_or(0);
    if u("/enabled").and_then(Value::as_bool) != Some(true) {
        return "off (prefetch=updates to fetch updates after each refresh)".into();
    }
    let vdb = Path::new(u("/root").and_then(Value::as_str).unwrap_or("?")).join("var/db/pkg");
    let vdb = vdb.display();
    if u("/last").is_none_or(Value::is_null) {
        return format!("on ({vdb}), no pass yet (one runs after each new index)");
    }
    let queued = n("/queued_total");
    let error = u("/last/error")
        .and_then(Value::as_str)
        .map_or(String::new(), |e| format!(": {e}"));
    format!(
        "on ({vdb}), {} passes; last after {} {}s ago, {}{error}: \
         {} found, {} fetched ({} in {:.1} s), {} already cached, {} over budget, {} failed, \
         {queued} queued",
        n("/passes"),
        u("/last/trigger").and_then(Value::as_str).unwrap_or("?"),
        now.saturating_sub(n("/last/at")),
        u("/last/state").and_then(Value::as_str).unwrap_or("?"),
        n("/last/found"),
        n("/last/fetched"),
        human_bytes(n("/last/bytes")),
        u("/last/seconds").and_then(Value::as_f64).unwrap_or(0.0),
        n("/last/already_cached"),
        n("/last/over_budget"),
        n("/last/failed"),
    )
}

/// Renders the status for a person.
pub fn render(v: &Value) -> String {
    let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    let now = unix(SystemTime::now());
    let transport = s("/transport");
    let index_line = match v.pointer("/index/timestamp").and_then(Value::as_u64) {
        Some(t) => format!("TIMESTAMP {t} ({}s old)", now.saturating_sub(t)),
        None => "no TIMESTAMP".into(),
    };
    let mut binhosts = String::new();
    for b in v
        .get("binhosts")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let g = |k: &str| b.get(k).cloned().unwrap_or(Value::Null);
        binhosts += &format!(
            "  {} (priority {}{}): {}, {} packages ({} served), last check {}s ago: {}\n",
            g("name").as_str().unwrap_or("?"),
            g("priority"),
            if g("frozen").as_bool() == Some(true) {
                ", frozen"
            } else {
                ""
            },
            if g("online").as_bool() == Some(true) {
                "online"
            } else {
                "offline"
            },
            g("packages"),
            g("served_packages"),
            now.saturating_sub(g("last_check").as_u64().unwrap_or(0)),
            g("last_check_result").as_str().unwrap_or("?"),
        );
        for m in b
            .get("mirrors")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            binhosts += &format!(
                "    mirror {}: {}, {} requests, {} failures\n",
                m.get("url").and_then(Value::as_str).unwrap_or("?"),
                m.get("state").and_then(Value::as_str).unwrap_or("?"),
                m.get("requests").and_then(Value::as_u64).unwrap_or(0),
                m.get("failures").and_then(Value::as_u64).unwrap_or(0),
            );
        }
    }
    if !binhosts.is_empty() {
        binhosts = format!("binhosts (highest priority first):\n{binhosts}");
    }
    for m in v
        .get("mirrors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        binhosts += &format!(
            "mirror {}: {}, {} requests, {} failures\n",
            m.get("url").and_then(Value::as_str).unwrap_or("?"),
            m.get("state").and_then(Value::as_str).unwrap_or("?"),
            m.get("requests").and_then(Value::as_u64).unwrap_or(0),
            m.get("failures").and_then(Value::as_u64).unwrap_or(0),
        );
    }
    let text = format!(
        "binhost:    {}\n\
         mounted at: {} (pid {})\n\
         index:      {}, {} packages, {} refused entries\n\
         last check: {}s ago: {}\n\
         cache:      {} of {} in {} entries\n\
         requests:   {} hits, {} misses, {} fetched, {} in flight, {} failed\n\
         verify:     SIZE and {}\n\
         transport:  {}\n\
         updates:    {}\n",
        s("/url"),
        s("/mountpoint"),
        n("/pid"),
        index_line,
        n("/index/packages"),
        n("/index/refused_entries"),
        now.saturating_sub(n("/index/last_check")),
        s("/index/last_check_result"),
        human_bytes(n("/cache/bytes")),
        human_bytes(n("/cache/limit")),
        n("/cache/entries"),
        n("/hits"),
        n("/misses"),
        human_bytes(n("/bytes_fetched")),
        n("/downloads_in_flight"),
        n("/failed_downloads"),
        match s("/verify").as_str() {
            "all" => "every digest in the index",
            _ => "the strongest digest in the index (BLAKE2B > SHA512 > SHA1 > MD5)",
        },
        match transport.as_str() {
            "ssh" => "ssh (SFTP over an OpenSSH ControlMaster connection)",
            "file" => "file (a local or network directory)",
            "http" => "http(s)",
            other => other,
        },
        updates_line(v, now),
    );
    text + &binhosts
}
