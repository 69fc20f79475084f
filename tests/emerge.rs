//! The end-to-end test: unmodified `emerge --usepkgonly` installs from a binhost
//! that real nginx serves and binpkgfs mounts as PKGDIR.
//!
//! Dependency calculation must read nothing but the index; the install must
//! fetch every package of the chain exactly once, whole, and produce exactly
//! the files the packages carry; unmounting must leave nothing behind.

mod support;

use std::fs;

use support::{
    LogLine, Mount, Nginx, PortageSandbox, copy_fixture_binhost, extract_gpkg_image,
    fixture_binhost, fixture_packages, is_mounted, list_files, require_real_parts,
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

#[test]
fn emerge_usepkgonly_installs_a_dependency_chain_from_an_http_binhost() {
    require_real_parts();
    let binhost = TempDir::new().unwrap();
    copy_fixture_binhost(binhost.path());
    let nginx = Nginx::start(binhost.path());
    let cache = TempDir::new().unwrap();
    let mut mount = Mount::new(&nginx.url(), cache.path(), &[])
        .unwrap_or_else(|err| panic!("binpkgfs mount {} failed: {err}", nginx.url()));
    let mountpoint = mount.path().to_owned();
    let daemon = mount.pid();
    let sandbox = PortageSandbox::new(&mountpoint);

    // (a) Dependency calculation trusts the index and opens no package file.
    let pretend = sandbox.emerge_ok(&["--pretend", "--usepkgonly", "app-misc/binpkgfs-demo"]);
    let stdout = String::from_utf8_lossy(&pretend.stdout);
    for cpf in CHAIN {
        assert!(
            stdout.contains(cpf),
            "emerge --pretend does not plan {cpf}:\n{stdout}"
        );
    }
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

    let requests = nginx.requests();
    for entry in fixture_packages() {
        let uri = format!("/{}", entry["PATH"]);
        let cpv = &entry["CPV"];
        let fetches: Vec<&LogLine> = requests.iter().filter(|line| line.uri == uri).collect();
        if CHAIN.iter().any(|cpf| cpf == cpv) {
            let size: u64 = entry["SIZE"].parse().unwrap();
            assert!(
                matches!(fetches.as_slice(), [only]
                    if only.method == "GET" && only.status == 200 && only.bytes_sent == size),
                "{uri} ({size} bytes) should be fetched exactly once, whole (GET 200), \
                 during the install; nginx logged: {fetches:#?}"
            );
        } else {
            assert!(
                fetches.is_empty(),
                "{uri} is not part of the install but was fetched: {fetches:#?}"
            );
        }
    }

    for entry in fixture_packages() {
        let cpv = &entry["CPV"];
        if !CHAIN.iter().any(|cpf| cpf == cpv) {
            continue;
        }
        let unpacked = TempDir::new().unwrap();
        let image = extract_gpkg_image(&fixture_binhost().join(&entry["PATH"]), unpacked.path());
        let files = list_files(&image);
        assert!(!files.is_empty(), "{cpv}: the fixture's image has no files");
        for file in files {
            let installed = sandbox.root().join(&file);
            let got = fs::read(&installed).unwrap_or_else(|err| {
                panic!("{cpv}: {} not installed: {err}", installed.display())
            });
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

    // (c) Unmounting leaves no mount and no daemon.
    mount
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
