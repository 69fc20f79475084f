//! The end-to-end test: unmodified `emerge --usepkgonly` installs from a binhost
//! that real nginx serves and binpkgfs mounts as PKGDIR.
//!
//! Dependency calculation must read nothing but the index; the install must
//! fetch every package of the chain exactly once, whole, and produce exactly
//! the files the packages carry; unmounting must leave nothing behind.

mod support;

use std::fs;

use support::{
    IndexEntry, LogLine, PortageSandbox, Served, both_modes, entry_for, extract_gpkg_image,
    fixture_binhost, fixture_packages, is_mounted, list_files,
};
use tempfile::TempDir;

/// The dependency chain below `app-misc/binpkgfs-demo`, as `cat/pf`.
const CHAIN: [&str; 3] = [
    "app-misc/binpkgfs-demo-0.3",
    "dev-libs/libdemo-2.1",
    "sys-apps/demo-base-1.0",
];

fn is_index(line: &LogLine) -> bool {
    matches!(line.uri.as_str(), "/Packages" | "/Packages.gz")
}

both_modes! {
    fn emerge_usepkgonly_installs_a_dependency_chain_from_an_http_binhost(mode) {
        let mut served = Served::new(mode, &[]);
        let nginx = &served.nginx;
        let mountpoint = served.mount.path().to_owned();
        let daemon = served.mount.pid();
        let sandbox = PortageSandbox::new(&mountpoint);

        // (a) Dependency calculation trusts the index and opens no package file.
        assert_pretend_plans_the_chain(&sandbox);
        nginx.sync_log();
        let requests = nginx.requests();
        assert!(
            requests.iter().all(is_index),
            "mount + emerge --pretend requested more than the index: {requests:#?}"
        );
        assert!(
            requests.iter().any(is_index),
            "binpkgfs never fetched the index from nginx"
        );
        assert!(
            sandbox.installed().is_empty(),
            "--pretend installed something"
        );

        // (b) The install fetches each package of the chain once and installs
        // exactly its files.
        nginx.clear_log();
        sandbox.emerge_ok(&["--oneshot", "--usepkgonly", "app-misc/binpkgfs-demo"]);
        assert_eq!(sandbox.installed(), CHAIN.map(String::from).to_vec());

        let (chain, others): (Vec<IndexEntry>, Vec<IndexEntry>) = fixture_packages()
            .into_iter()
            .partition(|entry| CHAIN.contains(&entry["CPV"].as_str()));
        assert_eq!(
            chain.len(),
            CHAIN.len(),
            "the fixture lacks part of the chain"
        );
        nginx.sync_log();
        let requests = nginx.requests();
        let fetches_of = |entry: &IndexEntry| -> Vec<LogLine> {
            let uri = format!("/{}", entry["PATH"]);
            requests
                .iter()
                .filter(|line| line.uri == uri)
                .cloned()
                .collect()
        };
        for entry in &chain {
            let size: u64 = entry["SIZE"].parse().unwrap();
            let fetches = fetches_of(entry);
            assert!(
                matches!(fetches.as_slice(), [only]
                    if only.method == "GET" && only.status == 200 && only.bytes_sent == size),
                "{} ({size} bytes) should be fetched exactly once, whole (GET 200), \
                 during the install; nginx logged: {fetches:#?}",
                entry["PATH"]
            );
            assert_installed_as_packaged(&sandbox, entry);
        }
        for entry in &others {
            let fetches = fetches_of(entry);
            assert!(
                fetches.is_empty(),
                "{} is not part of the install but was fetched: {fetches:#?}",
                entry["PATH"]
            );
        }

        // (c) Unmounting leaves no mount and no daemon.
        served
            .mount
            .unmount()
            .unwrap_or_else(|err| panic!("unmount failed: {err}"));
        assert!(
            !is_mounted(&mountpoint),
            "{} is still mounted",
            mountpoint.display()
        );
        assert!(
            !support::process_alive(daemon),
            "binpkgfs daemon {daemon} survived the unmount"
        );
    }
}

both_modes! {
    /// With `FEATURES=-pkgdir-index-trusted` Portage stats every package file and
    /// reads its metadata: the mount must report the index's size and mtime and
    /// serve exact bytes, or emerge renames files aside (EROFS) and dies. The
    /// incompressible 1 MiB package then installs byte for byte, and no package
    /// crosses the network twice.
    fn untrusted_index_scan_and_an_incompressible_package_install_byte_for_byte(mode) {
        let served = Served::new(mode, &[]);
        let mut sandbox = PortageSandbox::new(served.mount.path());
        sandbox.add_feature("-pkgdir-index-trusted");

        assert_pretend_plans_the_chain(&sandbox);

        sandbox.emerge_ok(&["--oneshot", "--usepkgonly", "app-misc/demo-data"]);
        assert_eq!(sandbox.installed(), ["app-misc/demo-data-1.0"]);
        assert_installed_as_packaged(&sandbox, &entry_for("app-misc/demo-data-1.0"));
        served.nginx.sync_log();

        for entry in fixture_packages() {
            let uri = format!("/{}", entry["PATH"]);
            let whole: u64 = entry["SIZE"].parse().unwrap();
            let sent: u64 = served
                .nginx
                .requests()
                .iter()
                .filter(|line| line.uri == uri)
                .map(|line| line.bytes_sent)
                .sum();
            assert!(
                sent <= whole,
                "{uri}: nginx sent {sent} bytes of a {whole}-byte file; it crossed the network twice"
            );
        }
    }
}

/// Every file in the package's image (extracted from the committed fixture
/// with `tar` and `zstd`) was installed under the sandbox with identical bytes.
/// `emerge --pretend --usepkgonly` of the demo package plans the whole chain.
fn assert_pretend_plans_the_chain(sandbox: &PortageSandbox) {
    let pretend = sandbox.emerge_ok(&["--pretend", "--usepkgonly", "app-misc/binpkgfs-demo"]);
    let stdout = String::from_utf8_lossy(&pretend.stdout);
    for cpf in CHAIN {
        assert!(
            stdout.contains(cpf),
            "emerge --pretend does not plan {cpf}:\n{stdout}"
        );
    }
}

fn assert_installed_as_packaged(sandbox: &PortageSandbox, entry: &IndexEntry) {
    let cpv = &entry["CPV"];
    let unpacked = TempDir::new().unwrap();
    let image = extract_gpkg_image(&fixture_binhost().join(&entry["PATH"]), unpacked.path());
    let files = list_files(&image);
    assert!(!files.is_empty(), "{cpv}: the fixture's image has no files");
    for file in files {
        let installed = sandbox.root().join(&file);
        let got = fs::read(&installed)
            .unwrap_or_else(|err| panic!("{cpv}: {} not installed: {err}", installed.display()));
        let want = fs::read(image.join(&file)).unwrap();
        assert!(
            got == want,
            "{cpv}: {} differs from the package's image ({} vs {} bytes)",
            file.display(),
            got.len(),
            want.len()
        );
    }
}
