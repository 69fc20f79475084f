//! The FUSE adapter: translates kernel requests into namespace lookups and fetcher reads.
//!
//! It is thin on purpose. Each handler opens a span, asks the current `Namespace` snapshot or a
//! `Blob`, and turns the `Result` into a reply. Reads that may wait for the network run as tokio
//! tasks and reply when their bytes are there, so one slow package never blocks the FUSE loop.
//!
//! Everything is read-only: the mount is `ro`, and every write-like request that still reaches
//! us answers `EROFS`, so Portage's `os.access(PKGDIR, W_OK)` says no and it never tries to write.
//! An open handle keeps the snapshot entry (and `Blob`) it was opened with until release, so an
//! index refresh never changes the bytes under a reader.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::{Instrument, debug, debug_span, event, info, warn};

use crate::error::FsError;
use crate::fetch::{Blob, Fetcher};
use crate::namespace::{Attr, Namespace, NodeKind};
use crate::snapshot::Snapshot;

/// How long the kernel may cache names and attributes: a quarter of the index TTL, at most a
/// minute, so a withdrawn file disappears within 1.25 refresh intervals. A stale entry can
/// never mean wrong bytes: inode numbers carry content identity.
pub fn attr_ttl(index_ttl: Duration) -> Duration {
    (index_ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60))
}
/// The extended attribute on the mount's root that `binpkgfs status` reads.
pub const STATUS_XATTR: &str = "user.binpkgfs.status";

enum Open {
    Package {
        blob: Arc<Blob>,
        attr: Attr,
        /// Set when the kernel reads this handle straight from the cache file.
        backing: Option<Arc<BackingId>>,
    },
    Index(Bytes),
}

/// Passthrough bookkeeping per inode. The kernel wants one backing file per inode while any
/// passthrough handle is open, and refuses to mix passthrough and cached opens of one inode,
/// so an inode with a cached (userspace) open stays cached until that handle is released.
#[derive(Default)]
struct Passthrough {
    /// Allowed by the configuration.
    wanted: bool,
    /// Allowed, and the kernel agreed.
    enabled: bool,
    backing: HashMap<u64, Weak<BackingId>>,
    cached_opens: HashMap<u64, usize>,
}

pub struct BinpkgFs {
    ns: Arc<Snapshot>,
    fetcher: Arc<Fetcher>,
    rt: tokio::runtime::Handle,
    handles: Mutex<HashMap<u64, Arc<Open>>>,
    next_fh: AtomicU64,
    ttl: Duration,
    passthrough: Mutex<Passthrough>,
    /// Set by the daemon once the session exists; used to drop the kernel's cached pages.
    notifier: Arc<OnceLock<Notifier>>,
    status: Box<dyn Fn() -> String + Send + Sync>,
}

impl BinpkgFs {
    pub fn new(
        ns: Arc<Snapshot>,
        fetcher: Arc<Fetcher>,
        rt: tokio::runtime::Handle,
        ttl: Duration,
        status: Box<dyn Fn() -> String + Send + Sync>,
    ) -> Self {
        BinpkgFs {
            ns,
            fetcher,
            rt,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            ttl,
            passthrough: Mutex::default(),
            notifier: Arc::default(),
            status,
        }
    }

    /// Whether complete packages may be handed to the kernel (FUSE passthrough).
    pub fn with_passthrough(self, wanted: bool) -> Self {
        self.passthrough.lock().unwrap().wanted = wanted;
        self
    }

    /// Where the daemon puts the session's notifier (the session is created after `self`).
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    fn snapshot(&self) -> Arc<Namespace> {
        self.ns.current()
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Open>, FsError> {
        self.handles
            .lock()
            .unwrap()
            .get(&fh.0)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    /// Opens a file: the index from memory, a package through the fetcher. Complete packages
    /// are handed to the kernel (passthrough) where it allows, so warm reads never reach us.
    fn open_file(
        &self,
        ino: u64,
        flags: OpenFlags,
        reply: &ReplyOpen,
    ) -> Result<(u64, FopenFlags, Option<Arc<BackingId>>), FsError> {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return Err(FsError::ReadOnly);
        }
        let ns = self.snapshot();
        let node = ns.node(ino).ok_or(FsError::NotFound)?;
        let open = match &node.kind {
            NodeKind::Dir(_) => return Err(FsError::IsDir),
            NodeKind::IndexFile => Open::Index(ns.index.raw.clone()),
            NodeKind::Package(_) => {
                let pkg = ns.package(node).expect("package node has a package");
                // Fetcher::open may start a transfer; it must run on our runtime.
                let _rt = self.rt.enter();
                let blob = self.fetcher.open(pkg)?;
                let backing = self.backing_for(ino, &blob, reply);
                Open::Package {
                    blob,
                    attr: ns.attr(node),
                    backing,
                }
            }
        };
        let backing = match &open {
            Open::Package { backing, .. } => backing.clone(),
            Open::Index(_) => None,
        };
        // An inode's content never changes (inodes carry content identity), so the kernel may
        // keep its page cache across opens, but only of checked bytes: an open of a file not
        // yet verified drops the cache, so pages from a transfer that failed its check (or
        // from unchecked ranged reads) are never served again.
        let flags = match &open {
            Open::Package { blob, .. } if !blob.is_complete() => FopenFlags::empty(),
            _ => FopenFlags::FOPEN_KEEP_CACHE,
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, Arc::new(open));
        Ok((fh, flags, backing))
    }

    /// A backing id for a complete package, or `None` to serve it through `read`.
    fn backing_for(&self, ino: u64, blob: &Blob, reply: &ReplyOpen) -> Option<Arc<BackingId>> {
        let mut pt = self.passthrough.lock().unwrap();
        let cached = pt.cached_opens.get(&ino).copied().unwrap_or(0) > 0;
        if let Some(file) = blob
            .file()
            .filter(|_| pt.enabled && blob.is_complete() && !cached)
        {
            if let Some(id) = pt.backing.get(&ino).and_then(Weak::upgrade) {
                return Some(id);
            }
            match reply.open_backing(file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    pt.backing.retain(|_, w| w.strong_count() > 0);
                    pt.backing.insert(ino, Arc::downgrade(&id));
                    return Some(id);
                }
                Err(e) => {
                    warn!("passthrough unavailable, serving reads through the daemon: {e}");
                    pt.enabled = false;
                }
            }
        }
        *pt.cached_opens.entry(ino).or_default() += 1;
        None
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let mtime = if a.mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(a.mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(a.mtime.unsigned_abs())
    };
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind: if a.is_dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if a.is_dir { 0o555 } else { 0o444 },
        nlink: if a.is_dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 128 * 1024,
        flags: 0,
    }
}

/// Feeds a directory's entries from `offset` on to `add` (which returns true when the reply is
/// full). Offsets are "index of the next entry": 1 after ".", 2 after "..", 3.. after children.
fn entries(
    ns: &Namespace,
    ino: u64,
    offset: u64,
    mut add: impl FnMut(u64, &Attr, &str) -> bool,
) -> Result<(), FsError> {
    let (parent, children) = ns.dir(ino).ok_or(FsError::NotFound)?;
    let attr_of = |ino| ns.node(ino).map(|n| ns.attr(n));
    let dots = [(attr_of(ino), "."), (attr_of(parent), "..")];
    let dots = dots.into_iter().filter_map(|(a, name)| Some((a?, name)));
    let all = dots.chain(children.map(|n| (ns.attr(n), &*n.name)));
    for (i, (attr, name)) in all.enumerate().skip(offset as usize) {
        if add(i as u64, &attr, name) {
            break;
        }
    }
    Ok(())
}

/// Logs a failed request at the error's own level and returns its errno.
fn fail(err: FsError) -> Errno {
    match err.level() {
        tracing::Level::WARN => event!(tracing::Level::WARN, error = %err, "request failed"),
        _ => event!(tracing::Level::DEBUG, error = %err, "request failed"),
    }
    err.errno()
}

impl Filesystem for BinpkgFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large reads cut per-request overhead for Portage's whole-file digest pass.
        let _ = config.set_max_readahead(1 << 20);
        // A tree walk is request-bound: READDIRPLUS returns attributes with the names (no
        // LOOKUP per entry), and with no-opendir support the kernel skips OPENDIR/RELEASEDIR.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS);
        let _ = config.add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        // Passthrough (Linux >= 6.9): complete packages are read by the kernel straight from
        // the cache file. Depth 2 lets the cache live on overlayfs.
        let pt = self.passthrough.get_mut().unwrap();
        if !pt.wanted {
            info!("passthrough off (--no-passthrough): serving every read through the daemon");
        } else if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok()
        {
            pt.enabled = true;
        } else {
            info!("kernel without FUSE passthrough: serving every read through the daemon");
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _s = debug_span!("lookup", req = req.unique().0, ino = parent.0, ?name).entered();
        let ns = self.snapshot();
        let found = name
            .to_str()
            .and_then(|n| ns.lookup(parent.0, n))
            .map(|node| ns.attr(node));
        match found {
            Some(a) => reply.entry(&self.ttl, &file_attr(&a), Generation(0)),
            None => reply.error(fail(FsError::NotFound)),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _s = debug_span!("getattr", req = req.unique().0, ino = ino.0).entered();
        // An open handle answers for the version it was opened with, even after a refresh.
        if let Some(fh) = fh
            && let Ok(open) = self.handle(fh)
            && let Open::Package { attr, .. } = &*open
        {
            return reply.attr(&self.ttl, &file_attr(attr));
        }
        let ns = self.snapshot();
        match ns.node(ino.0) {
            Some(node) => reply.attr(&self.ttl, &file_attr(&ns.attr(node))),
            None => reply.error(fail(FsError::NotFound)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _s = debug_span!("open", req = req.unique().0, ino = ino.0).entered();
        match self.open_file(ino.0, flags, &reply) {
            // The kernel refuses page-cache flags on a passthrough open (FOPEN_PASSTHROUGH_MASK).
            Ok((fh, _, Some(id))) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id)
            }
            Ok((fh, flags, None)) => reply.opened(FileHandle(fh), flags),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let span = debug_span!(
            "read",
            req = req.unique().0,
            ino = ino.0,
            fh = fh.0,
            offset,
            size
        );
        let open = match self.handle(fh) {
            Ok(open) => open,
            Err(e) => return reply.error(fail(e)),
        };
        match &*open {
            Open::Index(raw) => {
                let start = (offset as usize).min(raw.len());
                let end = start.saturating_add(size as usize).min(raw.len());
                reply.data(&raw[start..end]);
            }
            Open::Package { .. } => {
                let notifier = self.notifier.clone();
                self.rt.spawn(
                    async move {
                        let Open::Package { blob, .. } = &*open else {
                            unreachable!()
                        };
                        match blob.read(offset, size).await {
                            Ok(data) => reply.data(&data),
                            Err(e) => reply.error(fail(e)),
                        }
                        // After a promotion, drop the pages this file got from ranged reads,
                        // so every byte a whole reader gets passes the check. Off the runtime
                        // (the kernel may wait for pages other reads still hold) and after
                        // the reply (this read's own pages are among them).
                        if blob.take_needs_inval()
                            && let Some(n) = notifier.get().cloned()
                        {
                            tokio::task::spawn_blocking(move || {
                                if let Err(e) = n.inval_inode(ino, 0, -1) {
                                    debug!("page cache invalidation: {e}");
                                }
                            });
                        }
                    }
                    .instrument(span),
                );
            }
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let open = self.handles.lock().unwrap().remove(&fh.0);
        if let Some(open) = open
            && let Open::Package {
                backing: None,
                attr,
                ..
            } = &*open
        {
            let mut pt = self.passthrough.lock().unwrap();
            if let Some(n) = pt.cached_opens.get_mut(&attr.ino) {
                *n -= 1;
                if *n == 0 {
                    pt.cached_opens.remove(&attr.ino);
                }
            }
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// `ENOSYS` tells the kernel we keep no directory state, so it stops sending OPENDIR and
    /// RELEASEDIR (two requests per directory in a walk). Directories are stateless here.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _s = debug_span!("readdir", req = req.unique().0, ino = ino.0, offset).entered();
        let ns = self.snapshot();
        let full = entries(&ns, ino.0, offset, |i, a, name| {
            let kind = if a.is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            reply.add(INodeNo(a.ino), i + 1, kind, name)
        });
        match full {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _s = debug_span!("readdirplus", req = req.unique().0, ino = ino.0, offset).entered();
        let ns = self.snapshot();
        let ttl = self.ttl;
        let full = entries(&ns, ino.0, offset, |i, a, name| {
            reply.add(
                INodeNo(a.ino),
                i + 1,
                name,
                &ttl,
                &file_attr(a),
                Generation(0),
            )
        });
        match full {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let ns = self.snapshot();
        let bytes: u64 = ns.index.packages.iter().map(|p| p.size).sum();
        let bsize = 4096u32;
        reply.statfs(
            bytes.div_ceil(u64::from(bsize)),
            0,
            0,
            ns.len() as u64,
            0,
            bsize,
            255,
            bsize,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if mask.contains(AccessFlags::W_OK) {
            return reply.error(fail(FsError::ReadOnly));
        }
        match self.snapshot().node(ino.0) {
            Some(_) => reply.ok(),
            None => reply.error(fail(FsError::NotFound)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if ino.0 != crate::namespace::ROOT_INO || name != STATUS_XATTR {
            return reply.error(fail(FsError::NoAttr));
        }
        let value = (self.status)();
        if size == 0 {
            reply.size(value.len() as u32);
        } else if (size as usize) < value.len() {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(value.as_bytes());
        }
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    // Write-like requests: the `ro` mount stops them in the VFS; these answer for the rest.

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(fail(FsError::ReadOnly));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(fail(FsError::ReadOnly));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(fail(FsError::ReadOnly));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(fail(FsError::ReadOnly));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(fail(FsError::ReadOnly));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(fail(FsError::ReadOnly));
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(fail(FsError::ReadOnly));
    }
}
