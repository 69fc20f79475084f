//! Where the index and the packages come from: `Packages.gz` before `Packages`, and an index
//! whose `URI` header sends the packages to another server (binhosts published as release
//! assets or behind a CDN), as Portage's own client does it.

mod support;

use std::fs;
use std::io::Write;
use std::path::Path;

use support::{
    Mount, Nginx, both_modes, copy_fixture_binhost, fixture_binhost, fixture_packages, wait_until,
};
use tempfile::TempDir;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn read_all_packages(mnt: &Path) {
    for entry in fixture_packages() {
        let got = fs::read(mnt.join(&entry["PATH"])).expect("read through the mount");
        let want = fs::read(fixture_binhost().join(&entry["PATH"])).unwrap();
        assert!(got == want, "{}: bytes differ", entry["PATH"]);
    }
}

/// Waits until nginx's log has settled and returns the package requests it saw.
fn package_requests(nginx: &Nginx) -> Vec<String> {
    nginx.sync_log();
    nginx
        .requests()
        .into_iter()
        .filter(|l| l.is_package())
        .map(|l| l.uri)
        .collect()
}

both_modes! {
    /// The index names another server in its `URI` header: every package comes from there,
    /// none from the index's server, and the bytes are the index's.
    fn packages_come_from_the_uri_header_base(mode) {
        let index_root = TempDir::new().unwrap();
        let packages_root = TempDir::new().unwrap();
        copy_fixture_binhost(packages_root.path());
        let packages = Nginx::start(packages_root.path());
        // The index's server has the index only (with the header), not one package.
        let text = fs::read_to_string(fixture_binhost().join("Packages")).unwrap();
        let text = text.replacen("\n\n", &format!("\nURI: {}/\n\n", packages.url()), 1);
        fs::write(index_root.path().join("Packages"), &text).unwrap();
        let index = Nginx::start(index_root.path());

        let cache = TempDir::new().unwrap();
        let mount = Mount::new(mode, &index.url(), cache.path(), &[]).expect("mount");
        read_all_packages(mount.path());
        assert_eq!(
            package_requests(&index),
            Vec::<String>::new(),
            "the index's server was asked for packages"
        );
        let from_base = package_requests(&packages);
        assert_eq!(from_base.len(), fixture_packages().len(), "{from_base:#?}");
        // The served index is the binhost's, header and all.
        assert_eq!(fs::read_to_string(mount.path().join("Packages")).unwrap(), text);
    }

    /// `Packages.gz` is asked for first and served uncompressed as `Packages`; `Packages` is
    /// never fetched while the compressed one answers.
    fn the_compressed_index_is_used_first(mode) {
        let root = TempDir::new().unwrap();
        copy_fixture_binhost(root.path());
        let plain = fs::read(root.path().join("Packages")).unwrap();
        // A plain index that differs tells which one was served.
        fs::write(root.path().join("Packages"), b"garbage that is not an index\0").unwrap();
        fs::write(root.path().join("Packages.gz"), gzip(&plain)).unwrap();
        let nginx = Nginx::start(root.path());
        let cache = TempDir::new().unwrap();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &[]).expect("mount");
        assert_eq!(fs::read(mount.path().join("Packages")).unwrap(), plain);
        read_all_packages(mount.path());
        nginx.sync_log();
        let index_requests: Vec<String> = nginx
            .requests()
            .into_iter()
            .filter(|l| l.uri.starts_with("/Packages"))
            .map(|l| l.uri)
            .collect();
        assert!(
            index_requests.iter().all(|u| u == "/Packages.gz"),
            "{index_requests:?}"
        );
    }

    /// Without `Packages.gz` the plain index is used, and a later refresh that publishes a new
    /// plain index is seen (conditional requests go to the file that answered).
    fn without_a_compressed_index_the_plain_one_is_used_and_refreshed(mode) {
        let root = TempDir::new().unwrap();
        copy_fixture_binhost(root.path());
        fs::remove_file(root.path().join("Packages.gz")).ok();
        let nginx = Nginx::start(root.path());
        let cache = TempDir::new().unwrap();
        let mount = Mount::new(mode, &nginx.url(), cache.path(), &["--index-ttl", "1"])
            .expect("mount");
        read_all_packages(mount.path());
        let text = fs::read_to_string(root.path().join("Packages")).unwrap();
        let stamp = text
            .lines()
            .find_map(|l| l.strip_prefix("TIMESTAMP: "))
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap();
        let newer = text.replacen(
            &format!("TIMESTAMP: {stamp}"),
            // A different size too: nginx's ETag is mtime-size, and this may land in the
            // same second as the copy (a limitation the README names).
            &format!("TIMESTAMP: {}\nRELEASE: 2", stamp + 10),
            1,
        );
        fs::write(root.path().join("Packages.tmp"), &newer).unwrap();
        fs::rename(root.path().join("Packages.tmp"), root.path().join("Packages")).unwrap();
        // Every read must succeed across the refresh (issue 11.2), so no error is a "not yet".
        let served = || fs::read_to_string(mount.path().join("Packages")).unwrap();
        assert!(
            wait_until(std::time::Duration::from_secs(15), || served() == newer),
            "the refreshed plain index was never served; log:\n{}",
            fs::read_to_string(cache.path().join("binpkgfs.log")).unwrap_or_default()
        );
    }
}
