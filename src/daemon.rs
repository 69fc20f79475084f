//! The mount process: pre-flight checks, detaching, readiness, signals and a clean unmount.
//!
//! `binpkgfs mount` without `-f` starts `binpkgfs daemon` in a new session, hands it the
//! validated config over a pipe (never on its command line: it may hold a password), reads one
//! line from the child's stdout (`ready` or `error: ...`), and exits with that verdict.
//! So the command returns only once the tree is listable, and a failure is one clear line with
//! a non-zero exit, while the daemon keeps no tie to the terminal (its logs go to a file).
//!
//! The daemon ends when the filesystem is unmounted (`umount`, `fusermount3 -u`) or on
//! SIGTERM/SIGINT, which unmount first. Either way nothing is left mounted or running; an
//! error after the kernel mount (pid file, a tree that does not list) unmounts before exit.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
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
        credentials: cfg.credentials.clone(),
        ca_file: cfg.ca_file.clone(),
    }
}

fn default_log_file(cfg: &MountConfig) -> PathBuf {
    cfg.log_file
        .clone()
        .unwrap_or_else(|| cfg.cache_dir.join("binpkgfs.log"))
}

/// Starts the daemon and waits for its verdict. The daemon's command line is only
/// `binpkgfs daemon`: it reads the validated config from a pipe on its stdin, so neither a
/// setting nor a password shows in `ps`, and nothing is parsed twice.
fn detach(cfg: &MountConfig) -> Result<(), String> {
    let mut child_cfg = cfg.clone();
    child_cfg.foreground = true;
    child_cfg.notify_ready = true;
    child_cfg.log_file = Some(default_log_file(cfg));
    let json = serde_json::to_vec(&child_cfg).map_err(|e| format!("passing settings: {e}"))?;
    let exe = std::env::current_exe().map_err(|e| format!("finding own executable: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("daemon")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from our terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("starting daemon: {e}"))?;
    {
        // Dropped at the end of the block: the daemon reads to end of file.
        let mut stdin = child.stdin.take().expect("piped");
        stdin
            .write_all(&json)
            .map_err(|e| format!("passing settings to the daemon: {e}"))?;
    }
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

/// `binpkgfs daemon`: the detached daemon, started by `detach` with its config on stdin.
pub fn run_detached() -> Result<(), String> {
    let mut json = Vec::new();
    io::stdin()
        .lock()
        .read_to_end(&mut json)
        .map_err(|e| format!("reading settings: {e}"))?;
    if let Ok(null) = File::open("/dev/null") {
        // SAFETY: both fds are valid.
        unsafe { libc::dup2(null.as_raw_fd(), 0) };
    }
    let cfg: MountConfig = serde_json::from_slice(&json)
        .map_err(|e| format!("`binpkgfs daemon` is started by `binpkgfs mount`: {e}"))?;
    serve(cfg)
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
    // Whatever the daemon creates (cache entries, saved index, log) has no world access.
    // SAFETY: umask(2) cannot fail.
    unsafe { libc::umask(0o027) };
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

/// The stages between the kernel and the remote, opened before anything is mounted.
struct Backend {
    lifecycle: Arc<Lifecycle>,
    fetcher: Arc<Fetcher>,
    /// A merged mount's binhosts (their refreshes and status).
    union: Option<Arc<Union>>,
    /// A single binhost's mirrors, for status.
    single_mirrors: Vec<Arc<crate::remote::Mirror>>,
    /// `prefetch=updates`: what its passes did, for status.
    updates: Option<Arc<crate::prefetch::Updates>>,
}

impl Backend {
    /// The status closure: the plain one, plus each binhost and mirror where there are several.
    fn status(&self, cfg: &MountConfig) -> Box<dyn Fn() -> String + Send + Sync> {
        let status = status::reporter(
            cfg,
            self.lifecycle.clone(),
            self.fetcher.clone(),
            self.updates.clone(),
        );
        match &self.union {
            Some(u) => union_status(status, u.clone()),
            None if !self.single_mirrors.is_empty() => {
                mirrors_status(status, self.single_mirrors.clone())
            }
            None => status,
        }
    }
}

fn run(cfg: &MountConfig, notify: &mut Notifier) -> Result<(), String> {
    prepare_process(cfg)?;
    info!(url = %cfg.url, mountpoint = %cfg.mountpoint.display(), "starting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("binpkgfs-io")
        .build()
        .map_err(|e| format!("starting runtime: {e}"))?;
    let result = run_on(cfg, notify, &rt);
    // Not a plain drop: that waits for every blocking task, and one stuck in the kernel on a
    // hung file:// binhost never ends.
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

/// Opens the stages, mounts, serves, and unmounts; every early return unmounts first.
fn run_on(
    cfg: &MountConfig,
    notify: &mut Notifier,
    rt: &tokio::runtime::Runtime,
) -> Result<(), String> {
    // Everything that can fail without a mount is done before mounting: nothing to undo.
    let backend = open_backend(cfg, rt)?;
    let signals = rt
        .block_on(async { Signals::new() })
        .map_err(|e| format!("signal handlers: {e}"))?;
    let pid_file = cfg.pid_file.as_deref().map(PidFile::create).transpose()?;
    let mut mounted = Mounted::mount(cfg, &backend, rt)?;
    // From here on, an early return drops `mounted`, which unmounts: nothing is left behind.
    if let Err(e) = fs::read_dir(&cfg.mountpoint) {
        return Err(format!("mounted, but the tree is not listable: {e}"));
    }
    if let Some(pid_file) = &pid_file {
        pid_file.write()?;
    }
    info!(
        packages = backend.lifecycle.ns.current().index.packages.len(),
        "mounted"
    );
    notify.send("ready");
    let refresher = match &backend.union {
        Some(u) => rt.spawn(u.clone().run(cfg.index_ttl)),
        None => rt.spawn(backend.lifecycle.clone().run(cfg.index_ttl)),
    };
    let prefetcher = cfg.mtimedb.clone().map(|mtimedb| {
        rt.spawn(crate::prefetch::watch(
            mtimedb,
            backend.lifecycle.clone(),
            backend.fetcher.clone(),
            cfg.prefetch_merge_list,
        ))
    });
    let updates = backend
        .updates
        .clone()
        .map(|u| rt.spawn(u.watch(backend.lifecycle.clone(), backend.fetcher.clone())));
    let result = mounted.wait_for_end(rt, signals);
    refresher.abort();
    for task in prefetcher.into_iter().chain(updates) {
        task.abort();
    }
    result
}

/// The cache directory (private), logging, file limits, and no pinned working directory.
fn prepare_process(cfg: &MountConfig) -> Result<(), String> {
    crate::cache::create_private_dir(&cfg.cache_dir)
        .map_err(|e| format!("cache directory {}: {e}", cfg.cache_dir.display()))?;
    crate::logging::init(cfg)?;
    raise_fd_limit();
    // Paths are absolute by now; do not pin whatever directory we were started from.
    let _ = std::env::set_current_dir("/");
    Ok(())
}

fn open_backend(cfg: &MountConfig, rt: &tokio::runtime::Runtime) -> Result<Backend, String> {
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
    Ok(Backend {
        lifecycle,
        fetcher,
        union,
        single_mirrors,
        updates: cfg
            .prefetch_updates
            .clone()
            .map(|root| Arc::new(crate::prefetch::Updates::new(root))),
    })
}

/// SIGTERM and SIGINT, set up before the mount so that failing to set them up leaves nothing.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }
}

/// The pid file: opened before the mount (a bad path fails early), written once the mount
/// answers, removed at exit. Never follows a symlink.
struct PidFile {
    path: PathBuf,
    file: File,
}

impl PidFile {
    fn create(path: &Path) -> Result<PidFile, String> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| format!("pid file {}: {e}", path.display()))?;
        Ok(PidFile {
            path: path.to_path_buf(),
            file,
        })
    }

    fn write(&self) -> Result<(), String> {
        (&self.file)
            .write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(|e| format!("pid file {}: {e}", self.path.display()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only a file we wrote: `--pid-file /dev/null` (or a device named by mistake) stays.
        if fs::symlink_metadata(&self.path).is_ok_and(|m| m.is_file()) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The kernel mount and the thread serving it. Dropping it unmounts (lazily if need be) and
/// waits for the FUSE loop to end, so no error path leaves a mount behind.
struct Mounted {
    mountpoint: PathBuf,
    unmounter: fuser::SessionUnmounter,
    /// The FUSE loop's verdict, sent when it ends.
    done: Option<std::sync::mpsc::Receiver<io::Result<()>>>,
    /// The loop ended by itself (the filesystem was unmounted from outside).
    ended: bool,
}

impl Mounted {
    fn mount(
        cfg: &MountConfig,
        backend: &Backend,
        rt: &tokio::runtime::Runtime,
    ) -> Result<Mounted, String> {
        let fs = BinpkgFs::new(
            backend.lifecycle.ns.clone(),
            backend.fetcher.clone(),
            rt.handle().clone(),
            crate::fs::attr_ttl(cfg.index_ttl),
            backend.status(cfg),
        )
        .with_passthrough(cfg.passthrough);
        let notifier = fs.notifier_slot();
        let mut session = Session::new(fs, &cfg.mountpoint, &fuse_config(cfg))
            .map_err(|e| format!("mounting at {}: {e}", cfg.mountpoint.display()))?;
        let _ = notifier.set(session.notifier());
        let mut mounted = Mounted {
            mountpoint: cfg.mountpoint.clone(),
            unmounter: session.unmount_callable(),
            done: None,
            ended: false,
        };
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("fuse".into())
            .spawn(move || {
                let _ = done_tx.send(session.run());
            })
            // `mounted` unmounts as it is dropped.
            .map_err(|e| format!("starting FUSE loop: {e}"))?;
        mounted.done = Some(done_rx);
        Ok(mounted)
    }

    /// Serves until the filesystem is unmounted or a signal asks us to unmount.
    fn wait_for_end(
        &mut self,
        rt: &tokio::runtime::Runtime,
        mut signals: Signals,
    ) -> Result<(), String> {
        let done = self.done.take().expect("mounted");
        let (tx, mut verdict) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(done.recv().unwrap_or(Ok(())));
        });
        let by_signal = rt.block_on(async {
            tokio::select! {
                r = &mut verdict => Err(r),
                _ = signals.term.recv() => Ok(()),
                _ = signals.int.recv() => Ok(()),
            }
        });
        let result = match by_signal {
            Err(r) => {
                self.ended = true;
                r.unwrap_or(Ok(()))
            }
            Ok(()) => {
                info!("signal received, unmounting");
                self.unmount();
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), verdict).await })
                    .map_or(Ok(()), |r| r.unwrap_or(Ok(())))
            }
        };
        match result {
            Ok(()) => {
                info!("unmounted, exiting");
                Ok(())
            }
            Err(e) => Err(format!("FUSE session ended with an error: {e}")),
        }
    }

    fn unmount(&mut self) {
        if let Err(e) = self.unmounter.unmount() {
            warn!("unmount failed: {e}; detaching lazily");
            lazy_unmount(&self.mountpoint);
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        self.unmount();
        if let Some(done) = self.done.take() {
            let _ = done.recv_timeout(Duration::from_secs(10));
        }
    }
}

fn fuse_config(cfg: &MountConfig) -> Config {
    let mut options = vec![
        // The source in mountinfo: the URL without userinfo, never a password.
        MountOption::FSName(cfg.url.clone()),
        // fuser passes `Subtype` only to fusermount; as root it mounts with type `fuse`, so
        // the subtype goes to the kernel as a mount option: the type reads `fuse.binpkgfs`.
        MountOption::CUSTOM("subtype=binpkgfs".into()),
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
    fuse_cfg
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
