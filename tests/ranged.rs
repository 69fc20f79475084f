//! Ranged reads of a large package through real mounts: an 8 MiB package built by real Portage
//! at test time (`app-misc/demo-big`, kept out of the committed fixture), served by real nginx.
//!
//! Metadata-only reads (Portage's reindex scan) must cost a few percent of the file, a whole
//! read must still fetch the file about once and verify it, and every byte must match. A
//! synthetic 20 MiB package checks that a whole read comes from nginx as parallel parts.

mod support;

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use support::{Mount, Nginx, PortageSandbox, both_modes};
use tempfile::TempDir;

const BIG: &str = "app-misc/demo-big/demo-big-1.0-1.gpkg.tar";

/// Body bytes nginx sent for `uri`, once every answer the daemon received is in the log.
fn bytes_sent_for(nginx: &Nginx, uri: &str) -> u64 {
    nginx.sync_log();
    nginx
        .requests()
        .iter()
        .filter(|l| l.uri == uri)
        .map(|l| l.bytes_sent)
        .sum()
}

/// The bounded range `line` asked for (`bytes=A-B`, both inclusive), if any.
fn range_of(line: &support::LogLine) -> Option<(u64, u64)> {
    let (a, b) = line
        .range
        .as_deref()?
        .strip_prefix("bytes=")?
        .split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The bounded range of 1 MiB or more `line` asked for (a part of a split transfer), if any.
fn part(line: &support::LogLine) -> Option<(u64, u64)> {
    range_of(line).filter(|(a, b)| b - a >= 1 << 20)
}

/// The bounded range under 1 MiB `line` asked for (a ranged read of a sparse file), if any.
fn small_range(line: &support::LogLine) -> Option<(u64, u64)> {
    range_of(line).filter(|(a, b)| b - a < 1 << 20)
}

both_modes! {
    fn scattered_reads_fetch_ranges_and_return_the_files_bytes(mode) {
        let binhost = support::big_binhost();
        let nginx = Nginx::start(&binhost);
        let cache = TempDir::new().unwrap();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        let want = fs::read(binhost.join(BIG)).unwrap();
        let mut f = fs::File::open(mount.path().join(BIG)).unwrap();
        let n = want.len() as u64;
        for offset in [n - 512, 0, 512, n / 2, n / 3 + 7, n - 1] {
            let mut buf = vec![0u8; 512];
            f.seek(SeekFrom::Start(offset)).unwrap();
            let got = f.read(&mut buf).unwrap();
            assert!(
                buf[..got] == want[offset as usize..offset as usize + got],
                "offset {offset}"
            );
        }
        // The reader may have its bytes before nginx logs the answer: wait for the line.
        let uri = format!("/{BIG}");
        nginx.wait_for_requests(1, Duration::from_secs(10), |l| {
            l.uri == uri && l.range.is_some() && l.status == 206
        });
        let sent = bytes_sent_for(&nginx, &uri);
        assert!(
            sent > 0 && sent < n / 4,
            "scattered reads fetched {sent} of {n} bytes"
        );
        // A whole read after the scattered ones: exact bytes, the file crossed about once.
        drop(f);
        assert!(
            fs::read(mount.path().join(BIG)).unwrap() == want,
            "whole read after ranges"
        );
        let sent = bytes_sent_for(&nginx, &format!("/{BIG}"));
        assert!(sent <= n + n / 4, "{sent} bytes sent for a {n}-byte file");
    }
}

both_modes! {
    fn a_reader_from_offset_0_starts_the_whole_transfer_after_a_few_ranged_requests(mode) {
        // `cat`'s pattern (and Portage's digest pass): 128 KiB reads in order from offset 0 of
        // an uncached large file. The head comes in one ranged request (384 KiB, what a metadata
        // scan reads there), perhaps the next block in a second, and a read past 512 KiB starts
        // the whole transfer: not one round trip per kernel read until 1 MiB is there (9
        // requests before).
        let binhost = support::big_binhost();
        let nginx = Nginx::start(&binhost);
        let cache = TempDir::new().unwrap();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        let want = fs::read(binhost.join(BIG)).unwrap();
        let mut f = fs::File::open(mount.path().join(BIG)).unwrap();
        let mut got = Vec::with_capacity(want.len());
        let mut buf = vec![0u8; 128 << 10];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got == want, "bytes differ from the binhost's file");
        let uri = format!("/{BIG}");
        nginx.wait_for_requests(1, Duration::from_secs(10), |l| {
            l.uri == uri && l.status == 206 && small_range(l).is_none()
        });
        nginx.sync_log();
        let requests: Vec<_> = nginx.requests().into_iter().filter(|l| l.uri == uri).collect();
        // The kernel's readahead reads run concurrently, so the order they take the file's
        // lock in varies: the head always comes in one request from 0 (at least 384 KiB), and
        // at most one block more before a read past 512 KiB starts the whole transfer.
        let mut small: Vec<_> = requests.iter().filter_map(small_range).collect();
        small.sort();
        assert!(
            small.first().is_some_and(|&(a, b)| a == 0 && b + 1 >= 384 << 10),
            "ranged reads: {requests:?}"
        );
        assert!(small.len() <= 2, "ranged reads: {requests:?}");
        let n = want.len() as u64;
        let sent = bytes_sent_for(&nginx, &uri);
        assert!(sent <= n + n / 16, "{sent} bytes sent for a {n}-byte file");
    }
}

both_modes! {
    fn reindex_scan_fetches_a_few_percent_and_install_fetches_about_once(mode) {
        let binhost = support::big_binhost();
        let nginx = Nginx::start(&binhost);
        let cache = TempDir::new().unwrap();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();
        let n = fs::metadata(binhost.join(BIG)).unwrap().len();
        let uri = format!("/{BIG}");

        let mut sandbox = PortageSandbox::new(mount.path());
        sandbox.add_feature("-pkgdir-index-trusted");
        sandbox.emerge_ok(&["-p", "--usepkgonly", "app-misc/demo-big"]);
        let scan = bytes_sent_for(&nginx, &uri);
        eprintln!(
            "reindex scan: {scan} of {n} bytes ({:.2}%)",
            scan as f64 * 100.0 / n as f64
        );
        assert!(
            scan * 20 <= n,
            "reindex scan fetched {scan} of {n} bytes (more than 5%)"
        );

        sandbox.emerge_ok(&["--oneshot", "--usepkgonly", "app-misc/demo-big"]);
        let total = bytes_sent_for(&nginx, &uri);
        eprintln!("scan + install: {total} bytes for a {n}-byte package");
        assert!(
            total <= n + n / 10,
            "install fetched {total} bytes of a {n}-byte package"
        );
        let image = TempDir::new().unwrap();
        let root = support::extract_gpkg_image(&binhost.join(BIG), image.path());
        for rel in support::list_files(&root) {
            let installed = fs::read(sandbox.root().join(&rel)).unwrap();
            assert!(
                installed == fs::read(root.join(&rel)).unwrap(),
                "{}",
                rel.display()
            );
        }
    }
}

both_modes! {
    fn a_large_package_read_whole_comes_from_nginx_in_parallel_parts(mode) {
        // 20 MiB of data under an index entry with its SIZE and digests (the fetch path checks
        // nothing else), served by real nginx capping each request at 2 MB/s after a first
        // second at full speed (`limit_rate`), so the head turns slow and the transfer is split:
        // nginx's 206 answers, Content-Range and keep-alive connections are what the parts must
        // get right.
        support::require_real_parts();
        let dir = TempDir::new().unwrap();
        let data: Vec<u8> = (0..20u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        let path = "app-misc/huge/huge-1-1.gpkg.tar";
        fs::create_dir_all(dir.path().join("app-misc/huge")).unwrap();
        fs::write(dir.path().join(path), &data).unwrap();
        fs::write(
            dir.path().join("Packages"),
            format!(
                "TIMESTAMP: 1\nVERSION: 0\n\nCPV: app-misc/huge-1\nPATH: {path}\nSIZE: {}\n\
                 MTIME: 1\nSHA1: {}\nMD5: {}\n\n",
                data.len(),
                support::digest_hex("sha1sum", &data),
                support::digest_hex("md5sum", &data)
            ),
        )
        .unwrap();
        let nginx = Nginx::start_limited(dir.path(), "2m");
        let cache = TempDir::new().unwrap();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).unwrap();

        assert!(fs::read(mount.path().join(path)).unwrap() == data);
        let uri = format!("/{path}");
        let is_part = |l: &support::LogLine| l.uri == uri && l.status == 206 && part(l).is_some();
        nginx.wait_for_requests(3, Duration::from_secs(10), is_part);
        nginx.sync_log();
        let mut parts: Vec<(u64, u64)> = nginx
            .requests()
            .iter()
            .filter(|l| l.uri == uri && l.status == 206)
            .filter_map(part)
            .collect();
        parts.sort();
        assert!(parts.len() >= 3, "parallel parts: {parts:?}");
        for w in parts.windows(2) {
            assert_eq!(w[0].1 + 1, w[1].0, "parts join: {parts:?}");
        }
        assert_eq!(parts.last().unwrap().1, data.len() as u64 - 1);
        let n = data.len() as u64;
        let sent = bytes_sent_for(&nginx, &uri);
        assert!(sent >= n && sent <= n + n / 16, "{sent} bytes sent for {n}");
    }
}
