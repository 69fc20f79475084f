//! The binhosts of a mount, from the command line (as `PORTAGE_BINHOST`) and Portage's
//! `binrepos.conf`, in Portage's order; and the refusal of `verify-signature` that binpkgfs
//! cannot honour by itself; and where their credentials leave their URLs.

use std::path::{Path, PathBuf};

use super::absolute;
use crate::credentials::{BinhostUrl, Credentials};

/// The binhosts of a mount: command-line URLs (as PORTAGE_BINHOST) and binrepos.conf
/// sections, in Portage's order. Returns the source to show, the binhosts, and whether their
/// indexes are merged.
pub(super) fn binhosts(
    urls: &[String],
    extra: Vec<String>,
    mut binrepos: Option<&Path>,
    request_signature: bool,
) -> Result<(String, Vec<crate::binrepos::BinRepo>, bool), String> {
    let mut cli = Vec::new();
    for u in urls.iter().chain(&extra) {
        if u == "binrepos" {
            binrepos = binrepos.or(Some(Path::new(crate::binrepos::DEFAULT_BINREPOS)));
        } else {
            cli.push(u.clone());
        }
    }
    let mut paths = Vec::new();
    if let Some(file) = binrepos {
        if !file.exists() {
            return Err(format!(
                "binrepos.conf {}: no such file or directory",
                file.display()
            ));
        }
        // Portage reads its shipped file first ([DEFAULT] verify-signature = true).
        paths.push(PathBuf::from(crate::binrepos::GLOBAL_BINREPOS));
        paths.push(absolute(file)?);
    }
    let loaded = crate::binrepos::load(&paths, &cli)?;
    for w in &loaded.warnings {
        eprintln!("binpkgfs: warning: {w}");
    }
    let repos = loaded.repos;
    if repos.is_empty() {
        return Err(match binrepos {
            Some(f) => format!(
                "no binhost: {} has no section with a sync-uri, and no URL was given",
                f.display()
            ),
            None => "no binhost: give a URL (or --binrepos)".into(),
        });
    }
    if let Some(r) = repos.iter().find(|r| r.verify_signature) {
        if !request_signature {
            return Err(format!(
                "binrepos.conf asks for verify-signature on [{}], which binpkgfs cannot check: \
                 Portage checks signatures of a local PKGDIR only with \
                 FEATURES=\"binpkg-request-signature\" (and the binhost's key in \
                 /etc/portage/gnupg). Set that in make.conf and mount with --request-signature \
                 (or -o request_signature), or set verify-signature = false for that binhost",
                r.name
            ));
        }
    }
    let merge = binrepos.is_some() || repos.len() > 1;
    let url = if binrepos.is_some() {
        "binrepos".to_string()
    } else {
        repos[0].mirrors[0].clone()
    };
    Ok((url, repos, merge))
}

/// Takes the credentials out of every binhost's name and mirror URLs (userinfo, or the
/// `netrc` entry of an http(s) host), leaving only their shown form. The first binhost must
/// find its netrc entry; the others may have none.
pub(super) fn take_credentials(
    binhosts: &mut [crate::binrepos::BinRepo],
    netrc: Option<PathBuf>,
) -> Result<Vec<Credentials>, String> {
    let mut credentials = Vec::new();
    for (i, b) in binhosts.iter_mut().enumerate() {
        // A command-line binhost is named by its URL: shown, so never with userinfo.
        b.name = BinhostUrl::parse(&b.name).as_str().to_string();
        for (j, m) in b.mirrors.iter_mut().enumerate() {
            let mut parsed = BinhostUrl::parse(m);
            let http = m.starts_with("http://") || m.starts_with("https://");
            if let (Some(n), true) = (&netrc, http) {
                match parsed.clone().with_netrc(n) {
                    Ok(p) => parsed = p,
                    Err(e) if i == 0 && j == 0 => return Err(e),
                    Err(_) => {}
                }
            }
            credentials.extend(parsed.credentials().cloned());
            *m = parsed.as_str().to_string();
        }
    }
    Ok(credentials)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::super::tests::cfg;

    #[test]
    fn several_binhosts_mirrors_and_binrepos() {
        let c = cfg(&["http://h/x", "/mnt"]).unwrap();
        assert_eq!(
            (c.url.as_str(), c.binhosts.len(), c.merge),
            ("http://h/x", 1, false)
        );
        let c = cfg(&["http://a|http://a2/", "http://b", "/mnt"]).unwrap();
        assert!(c.merge);
        assert_eq!(c.binhosts[0].mirrors, ["http://a", "http://a2"]);
        assert_eq!(c.binhosts[1].mirrors, ["http://b"]);
        let c = cfg(&["-o", "binhost=http://c", "http://a", "/mnt"]).unwrap();
        assert_eq!(c.binhosts.len(), 2);
        assert!(cfg(&["/mnt"]).unwrap_err().contains("no binhost"));

        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("binrepos.conf");
        std::fs::write(
            &conf,
            "[mine]\npriority = 9\nsync-uri = http://mine\n[main]\nsync-uri = http://main\n",
        )
        .unwrap();
        let eq = format!("--binrepos={}", conf.display());
        let c = cfg(&[&eq, "/mnt"]).unwrap();
        assert!(c.merge);
        assert_eq!(c.url, "binrepos");
        assert_eq!(c.mountpoint, PathBuf::from("/mnt"));
        let names: Vec<_> = c.binhosts.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["mine", "main"]);
        // fstab form: the source is the word `binrepos`.
        let o = format!("binrepos={}", conf.display());
        assert_eq!(
            cfg(&["-o", &o, "binrepos", "/mnt"]).unwrap().binhosts.len(),
            2
        );
        // A command-line URL comes before sections without a priority.
        let c = cfg(&[&eq, "http://cli", "/mnt"]).unwrap();
        let names: Vec<_> = c.binhosts.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["mine", "http://cli", "main"]);
        // Bare --binrepos takes the mount point as a positional, not as its file.
        let e = cfg(&["--binrepos", "/mnt"]).err();
        if !Path::new(crate::binrepos::DEFAULT_BINREPOS).exists() {
            assert!(e.unwrap().contains("/etc/portage/binrepos.conf"));
        }

        std::fs::write(
            &conf,
            "[DEFAULT]\nverify-signature = true\n[s]\nsync-uri = http://s\n",
        )
        .unwrap();
        let e = cfg(&[&eq, "/mnt"]).unwrap_err();
        assert!(
            e.contains("binpkg-request-signature") && e.contains("[s]"),
            "{e}"
        );
        let c = cfg(&[&eq, "--request-signature", "/mnt"]).unwrap();
        assert!(c.binhosts[0].verify_signature);

        assert!(cfg(&["--proxy", "not a url", "http://a", "/mnt"]).is_err());
        let c = cfg(&["-o", "proxy=http://squid:3128", "http://a", "/mnt"]).unwrap();
        assert_eq!(c.proxy.as_deref(), Some("http://squid:3128"));
    }
}
