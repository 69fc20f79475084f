//! The runtime's workers never wait for the cache disk (issue 12): a reader whose cache file
//! is slow to read must not stall another reader's cached reads.
//!
//! The slow disk is real: a tiny FUSE filesystem, mounted for the test, whose reads take
//! `SLOW` each. Several readers of a blob backed by it are started on a runtime with two
//! workers (as the daemon has), then a read of an ordinary cached blob must be answered at
//! once. With `read_exact_at` on a worker, both workers sit in the kernel and the cached read
//! waits for them.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner,
    MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEntry, ReplyOpen, Request,
};
use tokio::sync::watch;

use super::{Fetcher, State};
use crate::cache::Store;
use crate::index::Package;
use crate::remote::{self, Endpoint, RemoteOptions};

const SLOW: Duration = Duration::from_secs(3);
const LEN: u64 = 1 << 20;

/// One file, `slow`, of `LEN` zero bytes; every read takes `SLOW`.
struct SlowDisk;

fn attr(ino: u64) -> FileAttr {
    let dir = ino == 1;
    FileAttr {
        ino: INodeNo(ino),
        size: if dir { 0 } else { LEN },
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o644 },
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        flags: 0,
        blksize: 4096,
    }
}

impl Filesystem for SlowDisk {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if u64::from(parent) == 1 && name == "slow" {
            reply.entry(&Duration::from_secs(60), &attr(2), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&Duration::from_secs(60), &attr(u64::from(ino)));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Every read reaches us, none is answered from the page cache.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        std::thread::sleep(SLOW);
        let n = LEN.saturating_sub(offset).min(u64::from(size)) as usize;
        reply.data(&vec![0u8; n]);
    }
}

fn package(path: &str) -> Package {
    Package {
        path: path.into(),
        cpv: "a/b-1".into(),
        build_id: None,
        size: LEN,
        mtime: 0,
        digests: Default::default(),
        build_time: None,
        origin: Default::default(),
        span: (0, 0),
    }
}

#[test]
fn a_slow_cache_file_does_not_stall_other_readers() {
    let mnt = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.mount_options = vec![MountOption::RO, MountOption::FSName("slowdisk".into())];
    config.n_threads = Some(8);
    let _session = fuser::spawn_mount(SlowDisk, mnt.path(), &config).expect("mount the slow disk");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(cache.path(), 1 << 30).unwrap());
    let opts = RemoteOptions {
        connect_timeout: Duration::from_secs(1),
        stall_timeout: Duration::from_secs(1),
        ..RemoteOptions::default()
    };
    let endpoint = Arc::new(Endpoint::new(
        remote::connect("file:///nonexistent", &opts).unwrap(),
    ));
    let fetcher = Arc::new(Fetcher::new(endpoint, store.clone()));

    // An ordinary cached package.
    let fast_pkg = package("a/b/fast.gpkg.tar");
    let key = fast_pkg.cache_key();
    let (partial, mut file) = store.new_partial(&key).unwrap();
    file.write_all(&vec![7u8; LEN as usize]).unwrap();
    store.commit(&key, &partial, &file).unwrap();
    let fast = fetcher.open(&fast_pkg).unwrap();
    assert!(fast.is_complete());

    // A complete blob whose cache file sits on the slow disk.
    let slow_pkg = package("a/b/slow.gpkg.tar");
    let (_tx, state) = watch::channel(State::Complete);
    let slow = fetcher.blob(slow_pkg.cache_key(), &slow_pkg, None, state, None);
    let _ = slow
        .file
        .set(Arc::new(File::open(mnt.path().join("slow")).unwrap()));

    let slow_reads: Vec<_> = (0..4u64)
        .map(|i| {
            let slow = slow.clone();
            rt.spawn(async move { slow.read(i * 4096, 4096).await })
        })
        .collect();
    // Let the slow reads reach the disk.
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let got = rt
        .block_on(rt.spawn(async move { fast.read(0, 4096).await }))
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(got, vec![7u8; 4096]);
    assert!(
        took < SLOW / 3,
        "a cached read waited {took:?} behind slow cache reads"
    );
    for r in slow_reads {
        assert_eq!(rt.block_on(r).unwrap().unwrap(), vec![0u8; 4096]);
    }
}
