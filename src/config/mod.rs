//! Command line: parsed once, here, into a validated `MountConfig`.
//!
//! Nothing past this module sees raw flags. Settings come either as long options or in mount form
//! (`-o cache_dir=...,cache_size=...`, as `mount(8)` and fstab pass them); the usual mount words
//! (`ro`, `_netdev`, `noauto`, ...) are accepted and ignored where they do not concern us, and
//! `rw` is refused: this filesystem is read-only by design.

use crate::verify::VerifyMode;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::credentials::{BinhostUrl, Credentials};

use crate::remote::SshOptions;

mod binhosts;
mod prefetch;
mod ssh;
use binhosts::{binhosts, take_credentials};

pub const DEFAULT_CACHE_DIR: &str = "/var/cache/binpkgfs";
pub const DEFAULT_MOUNTPOINT: &str = "/var/cache/binpkgs";
/// Where emerge publishes its merge list (`EROOT/var/cache/edb/mtimedb`) on a plain system.
pub const DEFAULT_MTIMEDB: &str = "/var/cache/edb/mtimedb";
/// 10 GiB: room for a typical world update without filling a small root filesystem.
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;
/// Four ranged streams per large package: enough to fill a link whose server or path caps
/// each connection, few enough not to look like abuse to a shared binhost.
pub const DEFAULT_STREAMS: usize = 4;
pub const MAX_STREAMS: usize = 16;

#[derive(Debug, Parser)]
#[command(
    name = "binpkgfs",
    version,
    about = "A Gentoo binhost as a lazy, verified, read-only PKGDIR"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount a binhost (http://, https://, file:///) as a read-only PKGDIR.
    #[command(args_override_self = true)]
    Mount(Box<MountArgs>),
    /// Mount the built-in binhost (shipped in the source tree) at a temporary directory,
    /// read every package through it, and unmount: the main job, no server needed.
    Demo,
    /// Show what a mounted binpkgfs is doing.
    Status {
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
        #[arg(default_value = DEFAULT_MOUNTPOINT)]
        mountpoint: PathBuf,
    },
    /// Fetch packages into a mounted binpkgfs's cache now, by reading them through the mount.
    Prefetch(PrefetchArgs),
    /// Internal: the detached daemon. It reads its validated `MountConfig` (JSON) from stdin,
    /// so no setting, and no password, is on its command line.
    #[command(hide = true)]
    Daemon,
}

#[derive(Debug, Args)]
pub struct PrefetchArgs {
    /// The binpkgfs mount point.
    #[arg(long, default_value = DEFAULT_MOUNTPOINT)]
    pub mount: PathBuf,
    /// Also every package in the index that is a newer version (same slot) or a newer build of
    /// one installed in ROOT/var/db/pkg.
    #[arg(long)]
    pub world_updates: bool,
    /// The EROOT whose installed packages --world-updates compares against.
    #[arg(long, default_value = "/")]
    pub root: PathBuf,
    /// `cat/pkg` (every version in the index, newest build of each: a binhost that keeps many versions means many downloads), `cat/pkg-1.2` (newest build), or a file
    /// path relative to the mount.
    #[arg(value_name = "ATOM-OR-PATH")]
    pub targets: Vec<String>,
}

/// What `binpkgfs prefetch` does, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefetchConfig {
    pub mountpoint: PathBuf,
    pub targets: Vec<String>,
    /// The EROOT to compare against, with `--world-updates`.
    pub world_updates: Option<PathBuf>,
}

impl PrefetchConfig {
    pub fn from_args(a: PrefetchArgs) -> Result<PrefetchConfig, String> {
        if a.targets.is_empty() && !a.world_updates {
            return Err("nothing to prefetch: name packages or use --world-updates".into());
        }
        Ok(PrefetchConfig {
            mountpoint: absolute(&a.mount)?,
            targets: a.targets,
            world_updates: a.world_updates.then(|| absolute(&a.root)).transpose()?,
        })
    }
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Binhost URLs (the directory holding `Packages`), highest priority first, as in
    /// PORTAGE_BINHOST; `URL|URL` names mirrors of one binhost. The word `binrepos` means
    /// `--binrepos`.
    /// ... and last, the mount point.
    #[arg(value_name = "URL... MOUNTPOINT", num_args = 1.., required = true)]
    pub args: Vec<String>,
    /// Also every binhost in Portage's binrepos.conf (a file or directory)
    /// [default: /etc/portage/binrepos.conf].
    #[arg(long, value_name = "FILE", num_args = 0..=1, require_equals = true,
          default_missing_value = crate::binrepos::DEFAULT_BINREPOS)]
    pub binrepos: Option<PathBuf>,
    /// Confirm that Portage requires signatures (FEATURES=binpkg-request-signature), so
    /// binhosts with `verify-signature = true` may be served.
    #[arg(long)]
    pub request_signature: bool,
    /// HTTP(S) proxy for every binhost (else http_proxy/https_proxy/no_proxy apply).
    #[arg(long, value_name = "URL")]
    pub proxy: Option<String>,
    /// Stay attached instead of detaching once the mount answers.
    #[arg(short, long)]
    pub foreground: bool,
    /// Where verified packages and the last good index are kept [default: /var/cache/binpkgfs].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Cache bound, e.g. 500M, 20G [default: 10G].
    #[arg(long)]
    pub cache_size: Option<String>,
    /// Seconds between index checks [default: 300].
    #[arg(long)]
    pub index_ttl: Option<String>,
    /// error, warn, info, debug, trace, or a tracing filter [default: info].
    #[arg(long)]
    pub log_level: Option<String>,
    /// Log file [default: stderr with -f, else <cache-dir>/binpkgfs.log].
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Write the daemon's pid here once the mount answers.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Seconds a transfer may deliver nothing before it is cut [default: 30].
    #[arg(long)]
    pub stall_timeout: Option<String>,
    /// emerge's merge list to watch: packages it is about to install are prefetched
    /// [default: /var/cache/edb/mtimedb].
    #[arg(long)]
    pub mtimedb: Option<PathBuf>,
    /// Do not prefetch emerge's merge list (nor watch it, unless --prefetch-updates is on).
    #[arg(long)]
    pub no_prefetch: bool,
    /// After each index refresh that brings newer builds of installed packages, fetch them
    /// into the cache in the background (the updates take at most a quarter of the cache).
    #[arg(long)]
    pub prefetch_updates: bool,
    /// The EROOT whose var/db/pkg --prefetch-updates compares with the index [default: /].
    #[arg(long, value_name = "DIR")]
    pub updates_root: Option<PathBuf>,
    /// Serve every read through the daemon, even for complete packages (no FUSE passthrough).
    #[arg(long)]
    pub no_passthrough: bool,
    /// Connections one large package may be fetched over, as parallel ranges when the server
    /// does ranges; 1 fetches each package as one stream [default: 4].
    #[arg(long)]
    pub streams: Option<String>,
    /// Which digests a download is checked against: `strongest` (the strongest the index
    /// carries: BLAKE2B, SHA512, SHA1, then MD5) or `all` [default: strongest].
    #[arg(long)]
    pub verify: Option<String>,
    /// ssh://: private key to use (`ssh -i`, with IdentitiesOnly).
    #[arg(long)]
    pub ssh_identity: Option<PathBuf>,
    /// ssh://: known_hosts file to check the server's host key against.
    #[arg(long)]
    pub ssh_known_hosts: Option<PathBuf>,
    /// ssh://: ssh config file to read instead of ~/.ssh/config and /etc/ssh/ssh_config.
    #[arg(long)]
    pub ssh_config: Option<PathBuf>,
    /// ssh://: an extra ssh option, `Key=value` (repeatable; the role of PORTAGE_SSH_OPTS).
    #[arg(long = "ssh-option", value_name = "KEY=VALUE")]
    pub ssh_options: Vec<String>,
    /// ssh://: accept an unknown host key and remember it (StrictHostKeyChecking=accept-new);
    /// a changed key is still refused.
    #[arg(long)]
    pub ssh_accept_new: bool,
    /// Credentials for the binhost from FILE, as curl and wget read `.netrc`
    /// (`machine HOST login USER password PASS`); the file must be private (mode 600).
    #[arg(long)]
    pub netrc_file: Option<PathBuf>,
    /// PEM file of CA certificates trusted for an https binhost, on top of the system's.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Mount options: cache_dir=, cache_size=, index_ttl=, log_level=, log_file=, pid_file=,
    /// stall_timeout=, mtimedb=, prefetch=updates|none, updates_root=, streams=, verify=,
    /// netrc_file=, ca_file=, ssh_identity=, ssh_known_hosts=, ssh_config=,
    /// ssh_option=KEY=VALUE, ssh_accept_new, binhost=, binrepos[=FILE], proxy=,
    /// request_signature, noprefetch, nopassthrough, allow_other, and the usual mount words.
    #[arg(short = 'o', value_delimiter = ',')]
    pub options: Vec<String>,
}

/// Everything a mount needs, checked. The detaching parent hands it to the daemon as JSON over
/// a pipe (see `daemon`), so it holds only settled values. `Debug` never shows a password.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MountConfig {
    /// What the mount shows as its source: the binhost's URL (never with its credentials),
    /// or `binrepos`.
    pub url: String,
    /// The binhosts, highest priority first (`binrepos`); one for a plain mount.
    pub binhosts: Vec<crate::binrepos::BinRepo>,
    /// Merge the binhosts' indexes (`index::merge`): several binhosts, or a binrepos.conf.
    pub merge: bool,
    /// `--proxy`: used for every HTTP(S) binhost instead of the environment's.
    pub proxy: Option<String>,
    /// HTTP Basic credentials, each for the one origin it was given for (from a URL's userinfo
    /// or `--netrc-file`); the URLs above no longer carry them.
    pub credentials: Vec<Credentials>,
    /// Extra CA certificates (PEM) for an https binhost.
    pub ca_file: Option<PathBuf>,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    pub notify_ready: bool,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub index_ttl: Duration,
    pub log_level: String,
    pub log_file: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub stall_timeout: Duration,
    pub connect_timeout: Duration,
    /// Let other users (the `portage` user) read the mount.
    pub allow_other: bool,
    /// emerge's `mtimedb` to watch for merge lists (to prefetch them, to hold their entries,
    /// and for `prefetch=updates` to yield to); `None`: not watched.
    pub mtimedb: Option<PathBuf>,
    /// Whether the packages of a new merge list are prefetched (`noprefetch` turns it off).
    pub prefetch_merge_list: bool,
    /// `prefetch=updates`: the EROOT whose installed packages' updates are prefetched after
    /// each index refresh; `None`: off.
    pub prefetch_updates: Option<PathBuf>,
    /// Hand complete packages to the kernel (FUSE passthrough) where it supports it.
    pub passthrough: bool,
    /// Parallel ranged streams per large package (1: one stream).
    pub streams: usize,
    /// For ssh:// binhosts.
    pub ssh: SshOptions,
    /// Which digests a download is checked against.
    pub verify: VerifyMode,
}

/// Mount words that are someone else's business (mount(8), netmount, systemd) or already true.
const IGNORED_OPTIONS: &[&str] = &[
    "ro",
    "defaults",
    "auto",
    "noauto",
    "_netdev",
    "nofail",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "nosuid",
    "nodev",
    "noexec",
    "exec",
    "suid",
    "dev",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "nodiratime",
    "async",
    "sync",
    "loud",
    "silent",
    "default_permissions",
];

impl MountConfig {
    pub fn from_args(a: MountArgs) -> Result<MountConfig, String> {
        let mut cache_dir = None;
        let mut cache_size = None;
        let mut index_ttl = None;
        let mut log_level = None;
        let mut log_file = None;
        let mut pid_file = None;
        let mut stall = None;
        let mut streams = None;
        let mut verify = None;
        let mut allow_other = None;
        let mut netrc_file = None;
        let mut ca_file = None;
        let mut prefetch = prefetch::PrefetchWords::default();
        let mut passthrough = !a.no_passthrough;
        let mut ssh = ssh::SshWords::default();
        let mut binrepos = a.binrepos.clone();
        let mut extra_binhosts = Vec::new();
        let mut request_signature = a.request_signature;
        let mut proxy = None;
        for opt in a.options.iter().map(|o| o.trim()).filter(|o| !o.is_empty()) {
            if prefetch.take(opt)? || ssh.take(opt) {
                continue;
            }
            match opt.split_once('=') {
                Some(("cache_dir", v)) => cache_dir = Some(PathBuf::from(v)),
                Some(("cache_size", v)) => cache_size = Some(v.to_string()),
                Some(("index_ttl", v)) => index_ttl = Some(v.to_string()),
                Some(("log_level", v)) => log_level = Some(v.to_string()),
                Some(("log_file", v)) => log_file = Some(PathBuf::from(v)),
                Some(("pid_file", v)) => pid_file = Some(PathBuf::from(v)),
                Some(("stall_timeout", v)) => stall = Some(v.to_string()),
                Some(("streams", v)) => streams = Some(v.to_string()),
                Some(("binrepos", v)) => binrepos = Some(PathBuf::from(v)),
                Some(("binhost", v)) => extra_binhosts.push(v.to_string()),
                Some(("proxy", v)) => proxy = Some(v.to_string()),
                None if opt == "binrepos" => {
                    binrepos = Some(PathBuf::from(crate::binrepos::DEFAULT_BINREPOS))
                }
                None if opt == "request_signature" => request_signature = true,
                Some(("verify", v)) => verify = Some(v.to_string()),
                Some(("netrc_file", v)) => netrc_file = Some(PathBuf::from(v)),
                Some(("ca_file", v)) => ca_file = Some(PathBuf::from(v)),
                // fstab comments and systemd's x-* words.
                Some((k, _)) if k == "comment" || k.starts_with("x-") => {}
                None if opt.starts_with("x-") => {}
                None if opt == "allow_other" || opt == "allow_root" => allow_other = Some(true),
                None if opt == "nopassthrough" => passthrough = false,
                None if opt == "rw" => {
                    return Err("option `rw`: binpkgfs is read-only; use `ro`".into());
                }
                None if IGNORED_OPTIONS.contains(&opt) => {}
                _ => return Err(format!("unknown mount option `{opt}`")),
            }
        }
        let prefetch = prefetch.settle(&a)?;
        let (mountpoint, urls) = a.args.split_last().expect("clap requires one");
        let mountpoint = absolute(Path::new(mountpoint))?;
        let ssh = ssh.settle(&a, &mountpoint)?;
        let cache_size = a.cache_size.or(cache_size);
        let cache_size = match cache_size {
            Some(s) => parse_size(&s).map_err(|e| format!("cache size {s:?}: {e}"))?,
            None => DEFAULT_CACHE_SIZE,
        };
        let secs = |what: &str, v: Option<String>, default: u64| -> Result<Duration, String> {
            match v {
                None => Ok(Duration::from_secs(default)),
                Some(s) => match s.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
                    _ => Err(format!(
                        "{what} {s:?}: expected a positive number of seconds"
                    )),
                },
            }
        };
        let index_ttl = secs("index TTL", a.index_ttl.or(index_ttl), 300)?;
        let stall_timeout = secs("stall timeout", a.stall_timeout.or(stall), 30)?;
        let streams = match a.streams.or(streams) {
            None => DEFAULT_STREAMS,
            Some(s) => match s.trim().parse::<usize>() {
                Ok(n @ 1..=MAX_STREAMS) => n,
                _ => return Err(format!("streams {s:?}: expected 1 to {MAX_STREAMS}")),
            },
        };
        let verify = match a.verify.or(verify).as_deref().map(str::trim) {
            None | Some("strongest") => VerifyMode::Strongest,
            Some("all") => VerifyMode::All,
            Some(v) => return Err(format!("verify {v:?}: expected `strongest` or `all`")),
        };
        let log_level = a.log_level.or(log_level).unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| format!("log level {log_level:?}: {e}"))?;
        let cache_dir = a
            .cache_dir
            .or(cache_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR));
        let is_root = unsafe { libc::geteuid() } == 0;
        let (url, mut binhosts, merge) =
            binhosts(urls, extra_binhosts, binrepos.as_deref(), request_signature)?;
        // Credentials leave the URLs here: from now on only the shown form exists.
        let credentials = take_credentials(&mut binhosts, a.netrc_file.or(netrc_file))?;
        let url = match url.as_str() {
            "binrepos" => url,
            u => BinhostUrl::parse(u).as_str().to_string(),
        };
        let ca_file = a.ca_file.or(ca_file).map(|p| absolute(&p)).transpose()?;
        if let Some(ca) = &ca_file {
            // Read now, so a wrong path is an error before anything starts.
            std::fs::metadata(ca).map_err(|e| format!("CA file {}: {e}", ca.display()))?;
        }
        let proxy = a.proxy.or(proxy);
        if let Some(p) = &proxy {
            reqwest::Url::parse(p).map_err(|e| format!("proxy {p:?}: {e}"))?;
        }
        Ok(MountConfig {
            url,
            binhosts,
            merge,
            proxy,
            credentials,
            ca_file,
            mountpoint,
            foreground: a.foreground,
            notify_ready: false,
            cache_dir: absolute(&cache_dir)?,
            cache_size,
            index_ttl,
            log_level,
            log_file: a.log_file.or(log_file).map(|p| absolute(&p)).transpose()?,
            pid_file: a.pid_file.or(pid_file).map(|p| absolute(&p)).transpose()?,
            stall_timeout,
            connect_timeout: Duration::from_secs(10).min(stall_timeout),
            allow_other: allow_other.unwrap_or(is_root),
            mtimedb: prefetch.mtimedb,
            prefetch_merge_list: prefetch.merge_list,
            prefetch_updates: prefetch.updates,
            passthrough,
            streams,
            ssh,
            verify,
        })
    }
}

/// The daemon detaches and changes directory, so every path is made absolute first.
fn absolute(p: &Path) -> Result<PathBuf, String> {
    std::path::absolute(p).map_err(|e| format!("{}: {e}", p.display()))
}

/// `500M`, `20G`, `1.5T`, `4096` (bytes); binary units, optional `B`/`iB` suffix.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown unit `{c}` (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| "expected a number with an optional K/M/G/T unit".to_string())?;
    if !n.is_finite() || n < 0.0 {
        return Err("must be a non-negative number".into());
    }
    let bytes = n * (1u64 << shift) as f64;
    if bytes > u64::MAX as f64 {
        return Err("too large".into());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn cfg(args: &[&str]) -> Result<MountConfig, String> {
        let mut argv = vec!["binpkgfs", "mount"];
        argv.extend_from_slice(args);
        let Command::Mount(m) = Cli::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        else {
            panic!("not mount")
        };
        MountConfig::from_args(*m)
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("1.5K"), Ok(1536));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "G", "12Q", "-1G", "lots"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_form_options_and_flags() {
        let c = cfg(&[
            "-o",
            "ro,_netdev,noauto,cache_dir=/tmp/c,cache_size=1G,index_ttl=60,allow_other",
            "http://h/x",
            "/mnt",
        ])
        .unwrap();
        assert_eq!(c.cache_dir, PathBuf::from("/tmp/c"));
        assert_eq!(c.cache_size, 1 << 30);
        assert_eq!(c.index_ttl, Duration::from_secs(60));
        assert!(c.allow_other);
        // Long options win over -o.
        let c = cfg(&[
            "--cache-size",
            "2G",
            "-o",
            "cache_size=1G",
            "http://h/x",
            "/mnt",
        ])
        .unwrap();
        assert_eq!(c.cache_size, 2 << 30);
        let c = cfg(&["http://h/x", "/mnt"]).unwrap();
        assert_eq!(c.cache_dir, PathBuf::from(DEFAULT_CACHE_DIR));
        assert_eq!(c.cache_size, DEFAULT_CACHE_SIZE);
    }

    #[test]
    fn verify_mode_defaults_to_the_strongest_digest() {
        use crate::verify::VerifyMode;
        assert_eq!(
            cfg(&["http://h/x", "/mnt"]).unwrap().verify,
            VerifyMode::Strongest
        );
        assert_eq!(
            cfg(&["-o", "verify=all", "http://h/x", "/mnt"])
                .unwrap()
                .verify,
            VerifyMode::All
        );
        assert_eq!(
            cfg(&["--verify", "all", "http://h/x", "/mnt"])
                .unwrap()
                .verify,
            VerifyMode::All
        );
        let e = cfg(&["-o", "verify=md5", "http://h/x", "/mnt"]).unwrap_err();
        assert!(e.contains("verify"), "{e}");
    }

    #[test]
    fn bad_options_are_clear_errors() {
        let e = cfg(&["-o", "rw", "http://h/x", "/mnt"]).unwrap_err();
        assert!(e.contains("read-only"), "{e}");
        let e = cfg(&["-o", "frobnicate", "http://h/x", "/mnt"]).unwrap_err();
        assert!(e.contains("unknown mount option `frobnicate`"), "{e}");
        let e = cfg(&["--index-ttl", "0", "http://h/x", "/mnt"]).unwrap_err();
        assert!(e.contains("index TTL"), "{e}");
        assert!(cfg(&["--cache-size", "big", "http://h/x", "/mnt"]).is_err());
        for bad in ["0", "17", "many"] {
            let e = cfg(&["-o", &format!("streams={bad}"), "http://h/x", "/mnt"]).unwrap_err();
            assert!(e.contains("streams"), "{e}");
        }
        assert_eq!(
            cfg(&["http://h/x", "/mnt"]).unwrap().streams,
            DEFAULT_STREAMS
        );
        assert_eq!(
            cfg(&["--streams", "1", "http://h/x", "/mnt"])
                .unwrap()
                .streams,
            1
        );
        assert!(cfg(&["--log-level", "no[such", "http://h/x", "/mnt"]).is_err());
    }

    #[test]
    fn prefetch_needs_something_to_do() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["binpkgfs", "prefetch"];
            argv.extend_from_slice(args);
            let Command::Prefetch(p) = Cli::try_parse_from(argv).unwrap().command else {
                panic!("not prefetch")
            };
            PrefetchConfig::from_args(p)
        };
        assert!(parse(&[]).unwrap_err().contains("nothing to prefetch"));
        let c = parse(&["--world-updates", "--root", "/r"]).unwrap();
        assert_eq!(c.world_updates, Some(PathBuf::from("/r")));
        assert_eq!(c.mountpoint, PathBuf::from(DEFAULT_MOUNTPOINT));
        let c = parse(&["--mount", "/m", "a/b", "a/b/b-1-1.gpkg.tar"]).unwrap();
        assert_eq!((c.targets.len(), c.world_updates), (2, None));
    }

    #[test]
    fn ssh_options_in_both_forms() {
        let url = "ssh://binhost@h/var/cache/binpkgs";
        let c = cfg(&[
            "-o",
            "ro,_netdev,ssh_identity=/etc/binpkgfs/id,ssh_known_hosts=/etc/binpkgfs/kh",
            "-o",
            "ssh_option=ProxyJump=bastion,ssh_accept_new",
            "--ssh-option",
            "Ciphers aes128-gcm@openssh.com",
            url,
            "/mnt",
        ])
        .unwrap();
        assert_eq!(c.ssh.identity, Some(PathBuf::from("/etc/binpkgfs/id")));
        assert_eq!(c.ssh.known_hosts, Some(PathBuf::from("/etc/binpkgfs/kh")));
        assert_eq!(c.ssh.options.len(), 2);
        assert!(c.ssh.accept_new);
        assert_eq!(c.ssh.config, None);
        // One control directory per mount point, under /run/binpkgfs.
        let d = cfg(&[url, "/mnt2"]).unwrap().ssh.control_dir;
        assert!(
            d.to_string_lossy().starts_with("/run/binpkgfs/ssh-"),
            "{}",
            d.display()
        );
        assert_ne!(d, c.ssh.control_dir);
        assert!(!cfg(&[url, "/mnt2"]).unwrap().ssh.accept_new);
        let e = cfg(&["-o", "ssh_option=Key=a\nHost *", url, "/mnt"]).unwrap_err();
        assert!(e.contains("ssh option"), "{e}");
    }

    #[test]
    fn the_config_crosses_to_the_daemon_whole_but_never_shows_the_password() {
        let c = cfg(&["--streams", "2", "https://al:s3cret@h/x", "/mnt"]).unwrap();
        assert_eq!(c.url.as_str(), "https://h/x");
        assert!(!format!("{c:?}").contains("s3cret"));
        let json = serde_json::to_vec(&c).unwrap();
        let back: MountConfig = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, c);
        let creds = &back.credentials[0];
        assert_eq!(creds.password.as_deref(), Some("s3cret"));
    }

    #[test]
    fn netrc_and_ca_file_options() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let netrc = dir.path().join("netrc");
        std::fs::write(&netrc, "machine h login al password pw\n").unwrap();
        std::fs::set_permissions(&netrc, std::fs::Permissions::from_mode(0o600)).unwrap();
        let opt = format!("netrc_file={}", netrc.display());
        let c = cfg(&["-o", &opt, "https://h/x", "/mnt"]).unwrap();
        assert_eq!(c.credentials[0].user, "al");
        let e = cfg(&["--ca-file", "/nonexistent.pem", "https://h/x", "/mnt"]).unwrap_err();
        assert!(e.contains("CA file /nonexistent.pem"), "{e}");
        let e = cfg(&["--netrc-file", "/nonexistent", "https://h/x", "/mnt"]).unwrap_err();
        assert!(e.contains("netrc file /nonexistent"), "{e}");
    }

    #[test]
    fn relative_paths_become_absolute() {
        let c = cfg(&["--cache-dir", "rel", "http://h/x", "mnt"]).unwrap();
        assert!(c.cache_dir.is_absolute() && c.mountpoint.is_absolute());
    }
}
