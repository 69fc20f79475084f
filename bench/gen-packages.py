#!/usr/bin/env python3
"""Writes a large, realistic-looking Gentoo binhost `Packages` index (and optionally the tree).

Usage: gen-packages.py [--entries N] [--seed S] [--sparse-tree] OUTDIR

OUTDIR/Packages gets a header block and N entries shaped like those `emerge --buildpkg` writes on a
real amd64 binhost (keys in Portage's order: BUILD_ID, BUILD_TIME, CPV, DEFINED_PHASES, DEPEND, EAPI,
IUSE, KEYWORDS, LICENSE, MD5, PATH, RDEPEND, SHA1, SIZE, SLOT, USE, MTIME, REPO), spread over about
150 categories, multi-instance PATHs `cat/pn/pn-ver-N.gpkg.tar`. With the default 50,000 entries the
file is about 26 MB, the size of a big real binhost's index.

With --sparse-tree every PATH is also created under OUTDIR as a sparse file of the entry's SIZE with
its MTIME, so OUTDIR doubles as a "local PKGDIR" baseline for tree walks (the bytes are holes, not
valid packages).

Deterministic: the same --seed gives byte-identical output.
"""

import argparse
import hashlib
import os
import random
import sys

CAT_PREFIXES = [
    "app-admin", "app-arch", "app-backup", "app-benchmarks", "app-cdr", "app-containers",
    "app-crypt", "app-dicts", "app-doc", "app-editors", "app-emacs", "app-emulation", "app-eselect",
    "app-forensics", "app-i18n", "app-laptop", "app-misc", "app-mobilephone", "app-office",
    "app-portage", "app-shells", "app-text", "app-vim", "dev-ada", "dev-build", "dev-cpp", "dev-db",
    "dev-debug", "dev-dotnet", "dev-embedded", "dev-erlang", "dev-go", "dev-haskell", "dev-java",
    "dev-lang", "dev-libs", "dev-lisp", "dev-lua", "dev-ml", "dev-perl", "dev-php", "dev-python",
    "dev-qt", "dev-ruby", "dev-rust", "dev-scheme", "dev-tcltk", "dev-tex", "dev-texlive",
    "dev-util", "dev-vcs", "games-action", "games-arcade", "games-board", "games-emulation",
    "games-engines", "games-fps", "games-misc", "games-puzzle", "games-rpg", "games-simulation",
    "games-strategy", "gnome-base", "gnome-extra", "gui-apps", "gui-libs", "gui-wm", "kde-apps",
    "kde-frameworks", "kde-misc", "kde-plasma", "lxqt-base", "mail-client", "mail-filter",
    "mail-mta", "media-fonts", "media-gfx", "media-libs", "media-plugins", "media-radio",
    "media-sound", "media-tv", "media-video", "net-analyzer", "net-dialup", "net-dns", "net-firewall",
    "net-fs", "net-ftp", "net-im", "net-irc", "net-libs", "net-mail", "net-misc", "net-nds",
    "net-news", "net-nntp", "net-p2p", "net-print", "net-proxy", "net-vpn", "net-voip",
    "net-wireless", "perl-core", "sci-astronomy", "sci-biology", "sci-calculators", "sci-chemistry",
    "sci-electronics", "sci-geosciences", "sci-libs", "sci-mathematics", "sci-physics",
    "sci-visualization", "sec-keys", "sec-policy", "sys-apps", "sys-auth", "sys-block", "sys-boot",
    "sys-cluster", "sys-devel", "sys-firmware", "sys-fs", "sys-kernel", "sys-libs", "sys-power",
    "sys-process", "virtual", "www-apache", "www-apps", "www-client", "www-plugins", "www-servers",
    "x11-apps", "x11-base", "x11-drivers", "x11-libs", "x11-misc", "x11-plugins", "x11-terms",
    "x11-themes", "x11-wm", "xfce-base", "xfce-extra", "acct-group", "acct-user",
    "app-accessibility", "app-alternatives", "app-antivirus", "app-metrics",
]
SYLLABLES = ["lib", "py", "gtk", "qt", "x", "net", "gnu", "kde", "fs", "ssl", "ml", "tool", "kit",
             "io", "core", "data", "sig", "zip", "img", "snd", "vid", "db", "http", "xml", "json",
             "yaml", "rs", "go", "c", "tls", "crypt", "auth", "font", "term", "wm", "cal", "map",
             "geo", "sci", "num", "stat", "plot", "mail", "chat", "irc", "dns", "vpn", "usb"]
PHASES = ["compile", "configure", "install", "postinst", "postrm", "preinst", "prepare", "setup",
          "test", "unpack", "pretend", "config", "info", "nofetch", "prerm"]
LICENSES = ["GPL-2", "GPL-2+", "GPL-3", "GPL-3+", "LGPL-2.1", "LGPL-2.1+", "LGPL-3", "MIT",
            "BSD", "BSD-2", "Apache-2.0", "MPL-2.0", "ISC", "ZLIB", "public-domain", "Boost-1.0",
            "Artistic", "|| ( Artistic GPL-1+ )", "( MIT Apache-2.0 )", "Unicode-DFS-2016"]
USE_FLAGS = ["X", "acl", "alsa", "bluetooth", "bzip2", "caps", "cups", "dbus", "debug", "doc",
             "examples", "gtk", "gui", "icu", "introspection", "ipv6", "jpeg", "kerberos", "lto",
             "lz4", "lzma", "man", "ncurses", "nls", "opengl", "openmp", "pam", "png", "policykit",
             "pulseaudio", "python", "qt5", "qt6", "readline", "seccomp", "selinux", "sqlite",
             "ssl", "static-libs", "systemd", "test", "threads", "tiff", "udev", "unicode",
             "vaapi", "vulkan", "wayland", "webp", "xattr", "xml", "zlib", "zstd"]
ALWAYS_USE = ["abi_x86_64", "amd64", "elibc_glibc", "kernel_linux"]
PY_TARGETS = ["python_targets_python3_11", "python_targets_python3_12",
              "python_targets_python3_13"]
SLOT_OPS = ["", ":=", ":0", ":0=", ":2", ":3", ":*"]
VER_OPS = ["", ">=", ">=", "~", "<"]


def make_names(rng, n):
    seen = set()
    names = []
    while len(names) < n:
        parts = rng.randint(1, 3)
        name = "".join(rng.choice(SYLLABLES) for _ in range(parts))
        if rng.random() < 0.3:
            name += "-" + rng.choice(SYLLABLES)
        if rng.random() < 0.1:
            name += str(rng.randint(1, 9))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def version(rng):
    v = ".".join(str(rng.randint(0, 30)) for _ in range(rng.choice([1, 2, 2, 3, 3, 3, 4])))
    r = rng.random()
    if r < 0.05:
        v += "_p" + str(rng.randint(1, 20240101))
    elif r < 0.08:
        v += "_rc" + str(rng.randint(1, 5))
    if rng.random() < 0.3:
        v += "-r" + str(rng.randint(1, 5))
    return v


def dep_atom(rng, pool):
    cat, pn = rng.choice(pool)
    op = rng.choice(VER_OPS)
    atom = f"{op}{cat}/{pn}"
    if op:
        atom += "-" + version(rng).split("-r")[0]
    atom += rng.choice(SLOT_OPS)
    if rng.random() < 0.2:
        atom += "[" + ",".join(rng.sample(USE_FLAGS, rng.randint(1, 3))) + "]"
    return atom


def dep_string(rng, pool, n):
    atoms = [dep_atom(rng, pool) for _ in range(n)]
    if n >= 4 and rng.random() < 0.4:
        flag = rng.choice(USE_FLAGS)
        k = rng.randint(1, 2)
        atoms = atoms[:-k] + [f"{flag}? ( " + " ".join(atoms[-k:]) + " )"]
    return " ".join(atoms)


def pkg_size(rng):
    # Log-normal, median ~250 KiB, long tail to a few hundred MiB; gpkg is tar, so 10 KiB blocks.
    s = int(rng.lognormvariate(12.4, 1.6))
    s = max(20480, min(s, 900 << 20))
    return (s + 10239) // 10240 * 10240


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--sparse-tree", action="store_true")
    ap.add_argument("outdir")
    a = ap.parse_args()
    rng = random.Random(a.seed)

    cats = CAT_PREFIXES[:150]
    # ~2.5 entries per package name (versions x build ids), as on a long-lived binhost.
    n_pkgs = max(1, a.entries * 2 // 5)
    names = make_names(rng, n_pkgs)
    pool = [(rng.choice(cats), pn) for pn in names]
    base_time = 1_700_000_000

    # Round-robin over the names: every pass gives each package one more version.
    entries = [(*pool[i % len(pool)], version(rng)) for i in range(a.entries)]
    # Distinct PATHs: number builds of the same cpv.
    build_ids = {}
    out = []
    for cat, pn, ver in entries:
        cpv = f"{cat}/{pn}-{ver}"
        build_ids[cpv] = build_ids.get(cpv, 0) + 1
        bid = build_ids[cpv]
        build_time = base_time + rng.randint(0, 60_000_000)
        mtime = build_time + rng.randint(1, 30)
        size = pkg_size(rng)
        iuse_flags = rng.sample(USE_FLAGS, rng.randint(0, 10))
        iuse = " ".join(("+" if rng.random() < 0.3 else "") + f for f in sorted(iuse_flags))
        use_on = sorted(ALWAYS_USE + [f for f in iuse_flags if rng.random() < 0.5]
                        + (rng.sample(PY_TARGETS, 2) if cat == "dev-python" else []))
        rdep = dep_string(rng, pool, rng.randint(0, 4))
        dep = dep_string(rng, pool, rng.randint(0, 3)) if rng.random() < 0.6 else ""
        seed = f"{cpv}:{bid}".encode()
        fields = [
            ("BUILD_ID", str(bid)),
            ("BUILD_TIME", str(build_time)),
            ("CPV", cpv),
            ("DEFINED_PHASES", " ".join(sorted(rng.sample(PHASES, rng.randint(1, 5))))),
            ("DEPEND", dep),
            ("EAPI", rng.choice(["7", "8", "8", "8"])),
            ("IUSE", iuse),
            ("KEYWORDS", rng.choice(["amd64", "~amd64", "amd64 ~arm64", "~amd64 ~arm64 ~x86"])),
            ("LICENSE", rng.choice(LICENSES)),
            ("MD5", hashlib.md5(seed).hexdigest()),
            ("PATH", f"{cat}/{pn}/{pn}-{ver}-{bid}.gpkg.tar"),
            ("RDEPEND", rdep),
            ("SHA1", hashlib.sha1(seed).hexdigest()),
            ("SIZE", str(size)),
            ("SLOT", rng.choice(["0", "0", "0", "0/1", "2", "3", "0/" + ver.split("-r")[0]])),
            ("USE", " ".join(use_on)),
            ("MTIME", str(mtime)),
            ("REPO", "gentoo"),
        ]
        out.append((cat, pn, ver, bid, size, mtime, fields))

    os.makedirs(a.outdir, exist_ok=True)
    out.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
    with open(os.path.join(a.outdir, "Packages"), "w", encoding="utf-8") as f:
        f.write("ACCEPT_KEYWORDS: amd64\nACCEPT_LICENSE: @FREE\nARCH: amd64\n"
                "CHOST: x86_64-pc-linux-gnu\nELIBC: glibc\nKERNEL: linux\n"
                f"PACKAGES: {len(out)}\nPROFILE: default/linux/amd64/23.0\n"
                f"TIMESTAMP: {base_time + 60_000_100}\nVERSION: 0\n\n")
        for e in out:
            f.write("".join(f"{k}: {v}\n" for k, v in e[6] if v))
            f.write("\n")
    if a.sparse_tree:
        for cat, pn, ver, bid, size, mtime, _ in out:
            d = os.path.join(a.outdir, cat, pn)
            os.makedirs(d, exist_ok=True)
            p = os.path.join(d, f"{pn}-{ver}-{bid}.gpkg.tar")
            with open(p, "wb") as fh:
                fh.truncate(size)
            os.utime(p, (mtime, mtime))
    print(f"{len(out)} entries, {len(set((e[0], e[1]) for e in out))} package dirs, "
          f"{len(set(e[0] for e in out))} categories", file=sys.stderr)


if __name__ == "__main__":
    main()
