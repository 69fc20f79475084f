//! The mount process: pre-flight checks, detaching, readiness, signals and a clean unmount.
//!
//! `binpkgfs mount` without `-f` re-executes itself with `-f --notify-ready` in a new session,
//! reads one line from the child's stdout (`ready` or `error: ...`), and exits with that verdict.
//! So the command returns only once the tree is listable, and a failure is one clear line with
//! a non-zero exit, while the daemon keeps no tie to the terminal (its logs go to a file).
//!
//! The daemon ends when the filesystem is unmounted (`umount`, `fusermount3 -u`) or on
//! SIGTERM/SIGINT, which unmount first. Either way nothing is left mounted or running.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL};
use tracing::{error, info, warn};

use crate::cache::Store;
use crate::config::MountConfig;
use crate::fetch::Fetcher;
use crate::fs::BinpkgFs;
use crate::lifecycle::Lifecycle;
use crate::remote::{self, Endpoint, RemoteOptions};
use crate::status;
use crate::union::Union;

/// Runs `binpkgfs mount`. `Err` is the one line to print before exiting non-zero.
pub fn mount(cfg: MountConfig) -> Result<(), String> {
    preflight(&cfg)?;
    if cfg.foreground {
        serve(cfg)
    } else {
        detach(&cfg)
    }
}

fn preflight(cfg: &MountConfig) -> Result<(), String> {
    // The URLs first: a typo should not wait for anything else.
    for url in cfg.binhosts.iter().flat_map(|b| &b.mirrors) {
        remote::connect(url, &remote_options(cfg)).map_err(|e| e.to_string())?;
    }
    let mnt = &cfg.mountpoint;
    match fs::metadata(mnt) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("mount point {} is not a directory", mnt.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("mount point {} does not exist", mnt.display()));
        }
        Err(e) => return Err(format!("mount point {}: {e}", mnt.display())),
    }
    if is_mounted(mnt) {
        return Err(format!("{} is already a mount point", mnt.display()));
    }
    match OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err("no /dev/fuse: load the fuse module (modprobe fuse)".into())
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            Err("no permission to open /dev/fuse (run as root)".into())
        }
        Err(e) => Err(format!("/dev/fuse: {e}")),
    }
}

/// True if `path` is the mount point of a mounted filesystem (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(target) = fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(&unescape_mountinfo(m)) == target)
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn remote_options(cfg: &MountConfig) -> RemoteOptions {
    RemoteOptions {
        connect_timeout: cfg.connect_timeout,
        stall_timeout: cfg.stall_timeout,
        ssh: cfg.ssh.clone(),
        proxy: cfg.proxy.clone(),
    }
}

fn default_log_file(cfg: &MountConfig) -> PathBuf {
    cfg.log_file
        .clone()
        .unwrap_or_else(|| cfg.cache_dir.join("binpkgfs.log"))
}

/// Starts the daemon and waits for its verdict.
fn detach(cfg: &MountConfig) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding own executable: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .args(["--foreground", "--notify-ready"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if cfg.log_file.is_none() {
        cmd.arg("--log-file").arg(default_log_file(cfg));
    }
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("starting daemon: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    let line = line.trim();
    if line == "ready" {
        return Ok(());
    }
    let _ = child.wait();
    match line.strip_prefix("error: ") {
        Some(msg) => Err(msg.to_string()),
        None => Err(format!(
            "daemon exited before the mount was ready (see {})",
            default_log_file(cfg).display()
        )),
    }
}

/// Tells the detaching parent (if any) how the start went.
struct Notifier(Option<File>);

impl Notifier {
    fn new(enabled: bool) -> Notifier {
        // The parent reads our stdout; take it over and point fd 1 at /dev/null afterwards.
        Notifier(enabled.then(|| {
            // SAFETY: dup of a valid fd.
            let fd = unsafe { libc::dup(1) };
            unsafe { std::os::unix::io::FromRawFd::from_raw_fd(fd) }
        }))
    }

    fn send(&mut self, line: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = writeln!(f, "{line}");
            if let Ok(null) = File::open("/dev/null") {
                // SAFETY: both fds are valid.
                unsafe { libc::dup2(null.as_raw_fd(), 1) };
            }
        }
    }
}

fn serve(cfg: MountConfig) -> Result<(), String> {
    let mut notify = Notifier::new(cfg.notify_ready);
    match run(&cfg, &mut notify) {
        Ok(()) => Ok(()),
        Err(msg) => {
            error!("{msg}");
            notify.send(&format!("error: {msg}"));
            Err(msg)
        }
    }
}

fn run(cfg: &MountConfig, notify: &mut Notifier) -> Result<(), String> {
    fs::create_dir_all(&cfg.cache_dir)
        .map_err(|e| format!("cache directory {}: {e}", cfg.cache_dir.display()))?;
    crate::logging::init(cfg)?;
    raise_fd_limit();
    // Paths are absolute by now; do not pin whatever directory we were started from.
    let _ = std::env::set_current_dir("/");
    info!(url = %cfg.url, mountpoint = %cfg.mountpoint.display(), "starting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("binpkgfs-io")
        .build()
        .map_err(|e| format!("starting runtime: {e}"))?;
    let store = Arc::new(Store::open(&cfg.cache_dir, cfg.cache_size).map_err(|e| e.to_string())?);
    let mut single_mirrors = Vec::new();
    let (lifecycle, fetcher, union) = if cfg.merge {
        let union = Arc::new(rt.block_on(Union::start(
            cfg.binhosts.clone(),
            &remote_options(cfg),
            store.clone(),
            cfg.url.clone(),
        ))?);
        let fetcher = Fetcher::with_binhosts(union.endpoints(), store);
        (union.merged.clone(), fetcher, Some(union))
    } else {
        let (transport, mirrors) = crate::union::connect(&cfg.binhosts[0], &remote_options(cfg))?;
        single_mirrors = mirrors;
        let endpoint = Arc::new(Endpoint::new(transport).with_options(remote_options(cfg)));
        let lifecycle = Arc::new(rt.block_on(Lifecycle::start(
            endpoint.clone(),
            store.clone(),
            cfg.url.clone(),
        ))?);
        (lifecycle, Fetcher::new(endpoint, store), None)
    };
    let fetcher = Arc::new(fetcher.with_streams(cfg.streams).with_verify(cfg.verify));
    let status = status::reporter(cfg, lifecycle.clone(), fetcher.clone());
    let status = match &union {
        Some(u) => union_status(status, u.clone()),
        None if !single_mirrors.is_empty() => mirrors_status(status, single_mirrors),
        None => status,
    };
    let ttl = crate::fs::attr_ttl(cfg.index_ttl);
    let fs = BinpkgFs::new(
        lifecycle.ns.clone(),
        fetcher.clone(),
        rt.handle().clone(),
        ttl,
        status,
    )
    .with_passthrough(cfg.passthrough);

    let mut options = vec![
        MountOption::FSName(cfg.url.clone()),
        MountOption::Subtype("binpkgfs".into()),
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
    ];
    if cfg.allow_other {
        options.push(MountOption::CUSTOM("allow_other".into()));
    }
    let mut fuse_cfg = Config::default();
    fuse_cfg.mount_options = options;
    fuse_cfg.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    fuse_cfg.n_threads = Some(2);
    let notifier = fs.notifier_slot();
    let mut session = Session::new(fs, &cfg.mountpoint, &fuse_cfg)
        .map_err(|e| format!("mounting at {}: {e}", cfg.mountpoint.display()))?;
    let _ = notifier.set(session.notifier());
    let mut unmounter = session.unmount_callable();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fuse".into())
        .spawn(move || {
            let _ = done_tx.send(session.run());
        })
        .map_err(|e| format!("starting FUSE loop: {e}"))?;

    // Ready means listable, checked through the kernel like any user would.
    if let Err(e) = fs::read_dir(&cfg.mountpoint) {
        let _ = unmounter.unmount();
        return Err(format!("mounted, but the tree is not listable: {e}"));
    }
    if let Some(pid_file) = &cfg.pid_file {
        fs::write(pid_file, format!("{}\n", std::process::id()))
            .map_err(|e| format!("pid file {}: {e}", pid_file.display()))?;
    }
    info!(
        packages = lifecycle.ns.current().index.packages.len(),
        "mounted"
    );
    notify.send("ready");

    let refresher = match union {
        Some(u) => rt.spawn(u.run(cfg.index_ttl)),
        None => rt.spawn(lifecycle.clone().run(cfg.index_ttl)),
    };
    let prefetcher = cfg.prefetch_mtimedb.clone().map(|mtimedb| {
        rt.spawn(crate::prefetch::watch(
            mtimedb,
            lifecycle.clone(),
            fetcher.clone(),
        ))
    });
    let ended = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            r = &mut done_rx => Some(r),
            _ = term.recv() => None,
            _ = int.recv() => None,
        }
    });
    let result = match ended {
        Some(r) => r,
        None => {
            info!("signal received, unmounting");
            if let Err(e) = unmounter.unmount() {
                warn!("unmount failed: {e}; detaching lazily");
                lazy_unmount(&cfg.mountpoint);
            }
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), done_rx).await })
                .unwrap_or(Ok(Ok(())))
        }
    };
    refresher.abort();
    if let Some(p) = prefetcher {
        p.abort();
    }
    if let Some(pid_file) = &cfg.pid_file {
        let _ = fs::remove_file(pid_file);
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(Ok(())) | Err(_) => {
            info!("unmounted, exiting");
            Ok(())
        }
        Ok(Err(e)) => Err(format!("FUSE session ended with an error: {e}")),
    }
}

/// The status of a merged mount: the plain one, plus each binhost and its mirrors.
fn union_status(
    base: Box<dyn Fn() -> String + Send + Sync>,
    union: Arc<Union>,
) -> Box<dyn Fn() -> String + Send + Sync> {
    Box::new(move || {
        let mut v: serde_json::Value = serde_json::from_str(&base()).unwrap_or_default();
        v["binhosts"] = union.status();
        v.to_string()
    })
}

/// The status of a mount of one binhost with several mirrors: the plain one, plus each mirror.
fn mirrors_status(
    base: Box<dyn Fn() -> String + Send + Sync>,
    mirrors: Vec<Arc<crate::remote::Mirror>>,
) -> Box<dyn Fn() -> String + Send + Sync> {
    Box::new(move || {
        let mut v: serde_json::Value = serde_json::from_str(&base()).unwrap_or_default();
        v["mirrors"] = crate::union::mirrors_status(&mirrors);
        v.to_string()
    })
}

/// Every open package holds a file descriptor (two while a large one downloads); a busy
/// install must not run out at a default soft limit of 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn lazy_unmount(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}
