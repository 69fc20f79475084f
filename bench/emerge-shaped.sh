#!/usr/bin/env bash
# emerge-shaped.sh: a real `emerge` install over a 200 Mbit/s link, four ways.
#
# 13 packages: app-misc/bench-blob01..12 (16 MiB of incompressible data each) and app-misc/bench-all
# (a meta package depending on all twelve), built once with real Portage and cached in $BENCH_DIR.
# Each case installs `app-misc/bench-all` with `emerge --oneshot` into a fresh sandbox:
#   (a) local    PKGDIR is a local copy of the binhost (--usepkgonly): the limit
#   (b) portage  Portage's own client: PORTAGE_BINHOST=http://... --getbinpkgonly
#   (c) cold     PKGDIR is a binpkgfs mount of the same URL, empty cache (--usepkgonly)
#   (d) warm     binpkgfs again, remounted with the cache dir of (c) kept, fresh sandbox
#   (e) warm-mounted  a third sandbox on the still-mounted filesystem of (d) (kernel page cache hot)
# The binhost is a real nginx inside a network namespace this script creates, behind a veth pair
# (10.x addresses it picks) whose namespace side is shaped with
# `tc qdisc ... tbf rate 200mbit burst 256kb latency 50ms`. Times are the wall time of the whole
# `emerge` command (dependency calculation included); binpkgfs mount time is printed separately.
#
# Builder and installs use the same EPREFIX path ($BENCH_DIR/prefix), so Portage never has to
# "adjust prefix" inside the packages (slow for big packages, and it would dominate the figures).
#
# Needs root, iproute2 (ip netns, tc with tbf), nginx, wget (Portage's FETCHCOMMAND), a `gtar` on
# PATH, a `portage` user, and Portage in a venv (BINPKGFS_PORTAGE_VENV, default /opt/portage-venv).
#
# Environment:
#   BINPKGFS        binary to test [default: <repo>/target/release/binpkgfs]
#   BENCH_DIR       build cache, reused between runs [default: /var/tmp/binpkgfs-bench]
#   BENCH_REBUILD=1 rebuild the packages even if the cache is valid
#   RATE            link rate for tbf [default: 200mbit]
#   CASES           which cases to run, in order [default: "local portage cold warm warm-mounted"]
#   REPS            rounds of all cases; the median is printed [default: 3]
#   BENCH_PREFETCH=0  do not point binpkgfs at the sandbox's mtimedb (merge-list prefetch off);
#                   binaries without --mtimedb are run without it either way

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
BINPKGFS=${BINPKGFS:-$REPO/target/release/binpkgfs}
VENV=${BINPKGFS_PORTAGE_VENV:-/opt/portage-venv}
BENCH_DIR=${BENCH_DIR:-/var/tmp/binpkgfs-bench}
RATE=${RATE:-200mbit}
CASES=${CASES:-local portage cold warm warm-mounted}
REPS=${REPS:-3}
NBLOBS=12
BLOB_MIB=16
# Bump when the packages below change, to invalidate $BENCH_DIR.
RECIPE_VERSION=1

die() { echo "emerge-shaped: $*" >&2; exit 1; }
say() { echo "emerge-shaped: $*" >&2; }
[[ $(id -u) == 0 ]] || die "must run as root"
[[ -x $BINPKGFS ]] || die "no binary at $BINPKGFS (cargo build --release, or set BINPKGFS)"
[[ -x $VENV/bin/emerge ]] || die "no emerge in $VENV (set BINPKGFS_PORTAGE_VENV)"
for t in ip tc nginx wget gtar python3 mountpoint; do
    command -v "$t" >/dev/null || die "$t not found on PATH"
done
id portage >/dev/null 2>&1 || die "no 'portage' user (Portage wants one)"

PREFIX=$BENCH_DIR/prefix # the one EPREFIX for builder and every install sandbox
BINHOST=$BENCH_DIR/binhost
T=$(mktemp -d /tmp/binpkgfs-emerge-shaped.XXXXXX)
NS=bpfsbench$$
VETH_HOST=bpfb$$h
VETH_NS=bpfb$$n
NGINX_PID=
MOUNTED=

cleanup() {
    local rc=$?
    set +e
    if [[ -n $MOUNTED ]] && mountpoint -q "$MOUNTED"; then
        umount "$MOUNTED" 2>/dev/null || umount -l "$MOUNTED"
    fi
    if [[ -s $T/binpkgfs.pid ]]; then
        kill "$(cat "$T/binpkgfs.pid")" 2>/dev/null
    fi
    if [[ -n $NGINX_PID ]]; then
        kill "$NGINX_PID" 2>/dev/null
        wait "$NGINX_PID" 2>/dev/null
    fi
    ip netns del "$NS" 2>/dev/null
    ip link del "$VETH_HOST" 2>/dev/null
    # The sandbox prefix holds only what this script made (checked by its marker).
    [[ -e $PREFIX/.binpkgfs-bench ]] && rm -rf "$PREFIX"
    rm -rf "$T"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { echo "$EPOCHREALTIME"; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"; }

# --- the package recipes -----------------------------------------------------------------------

write_repo() {
    local r=$1
    mkdir -p "$r"/{profiles/default,metadata,licenses,app-misc}
    echo bench >"$r/profiles/repo_name"
    echo app-misc >"$r/profiles/categories"
    echo amd64 >"$r/profiles/arch.list"
    echo 8 >"$r/profiles/default/eapi"
    cat >"$r/profiles/default/make.defaults" <<'EOF'
ARCH="amd64"
ACCEPT_KEYWORDS="amd64"
ELIBC="glibc"
KERNEL="linux"
USERLAND="GNU"
CHOST="x86_64-pc-linux-gnu"
EOF
    printf 'masters =\nthin-manifests = true\nsign-manifests = false\ncache-formats =\n' \
        >"$r/metadata/layout.conf"
    echo "Public domain." >"$r/licenses/public-domain"
    local i deps=
    for i in $(seq -w 1 $NBLOBS); do
        mkdir -p "$r/app-misc/bench-blob$i"
        cat >"$r/app-misc/bench-blob$i/bench-blob$i-1.0.ebuild" <<EOF
EAPI=8
DESCRIPTION="binpkgfs benchmark: $BLOB_MIB MiB of incompressible data"
HOMEPAGE="https://example.invalid/binpkgfs"
S="\${WORKDIR}"
LICENSE="public-domain"
SLOT="0"
KEYWORDS="amd64"
src_install() {
	"\${PORTAGE_PYTHON:-python3}" -c 'import random, sys; sys.stdout.buffer.write(random.Random($((10#$i))).randbytes($BLOB_MIB << 20))' \\
		> "\${T}"/blob.bin || die
	insinto /usr/share/bench-blob$i
	doins "\${T}"/blob.bin
}
EOF
        deps+=" app-misc/bench-blob$i"
    done
    mkdir -p "$r/app-misc/bench-all"
    cat >"$r/app-misc/bench-all/bench-all-1.0.ebuild" <<EOF
EAPI=8
DESCRIPTION="binpkgfs benchmark: meta package pulling in every blob"
HOMEPAGE="https://example.invalid/binpkgfs"
S="\${WORKDIR}"
LICENSE="public-domain"
SLOT="0"
KEYWORDS="amd64"
RDEPEND="$deps"
EOF
}

# A fresh Portage sandbox at $PREFIX with the given PKGDIR.
make_sandbox() {
    local pkgdir=$1
    [[ -e $PREFIX && ! -e $PREFIX/.binpkgfs-bench ]] &&
        die "$PREFIX exists and is not ours; refusing to touch it"
    rm -rf "$PREFIX"
    mkdir -p "$PREFIX"/{etc/portage,share/portage,var/db/pkg,var/cache/edb,var/tmp,distfiles}
    touch "$PREFIX/.binpkgfs-bench"
    ln -s "$VENV/share/portage/config" "$PREFIX/share/portage/config"
    ln -s "$BENCH_DIR/repo/profiles/default" "$PREFIX/etc/portage/make.profile"
    echo 0 >"$PREFIX/var/cache/edb/counter"
    cat >"$PREFIX/etc/portage/make.conf" <<EOF
PKGDIR="$pkgdir"
DISTDIR="$PREFIX/distfiles"
PORTAGE_TMPDIR="$PREFIX/var/tmp"
ACCEPT_LICENSE="*"
BINPKG_FORMAT="gpkg"
BINPKG_COMPRESS="zstd"
PORTAGE_USERNAME="root"
PORTAGE_GRPNAME="root"
NOCOLOR="true"
FEATURES="-sandbox -usersandbox -userpriv -userfetch -ipc-sandbox -network-sandbox -pid-sandbox -mount-sandbox -news -binpkg-request-signature -binpkg-signing"
EOF
}

# emerge in the sandbox; extra environment as NAME=value words before "--". The command is
# prefixed with "${EMERGE_WRAPPER[@]}" (a timer) when set.
EMERGE_WRAPPER=()
emerge_in_sandbox() {
    local envs=()
    while [[ $1 != -- ]]; do envs+=("$1"); shift; done
    shift
    "${EMERGE_WRAPPER[@]}" env -u ROOT -u PORTAGE_CONFIGROOT -u PKGDIR -u PORTAGE_BINHOST -u FEATURES \
        -u EMERGE_DEFAULT_OPTS \
        PORTAGE_OVERRIDE_EPREFIX="$PREFIX" \
        PORTAGE_REPOSITORIES="[DEFAULT]
main-repo = bench
[bench]
location = $BENCH_DIR/repo" \
        PATH="$VENV/bin:$PATH" \
        "${envs[@]}" \
        "$VENV/bin/emerge" --color=n "$@"
}

build_packages() {
    local stamp version
    version=$("$VENV/bin/python" -c 'import portage; print(portage.VERSION)')
    stamp="recipe $RECIPE_VERSION blobs $NBLOBS x $BLOB_MIB MiB prefix $PREFIX portage $version"
    if [[ ${BENCH_REBUILD:-0} != 1 && -s $BINHOST/Packages && -e $BENCH_DIR/stamp &&
        $(cat "$BENCH_DIR/stamp") == "$stamp" ]]; then
        say "reusing packages in $BINHOST"
        return
    fi
    say "building $((NBLOBS + 1)) packages with Portage into $BINHOST (once; cached) ..."
    rm -rf "$BENCH_DIR/repo" "$BINHOST" "$BENCH_DIR/stamp"
    mkdir -p "$BINHOST"
    write_repo "$BENCH_DIR/repo"
    make_sandbox "$BINHOST"
    emerge_in_sandbox -- --quiet --oneshot --buildpkg app-misc/bench-all >"$T/build.log" 2>&1 ||
        { tail -40 "$T/build.log" >&2; die "building the packages failed"; }
    find "$BINHOST" -name '.*lockfile' -delete
    rm -rf "$PREFIX"
    echo "$stamp" >"$BENCH_DIR/stamp"
}

# --- the shaped binhost ------------------------------------------------------------------------

pick_subnet() { # a 10.x.y.0/30 no local address or route uses
    local b c
    for _ in $(seq 50); do
        b=$((RANDOM % 200 + 20)) c=$((RANDOM % 250 + 1))
        if ! ip -4 addr | grep -q "inet 10\.$b\.$c\." && ! ip -4 route | grep -q "^10\.$b\."; then
            echo "10.$b.$c"
            return
        fi
    done
    die "no free 10.x subnet found"
}

start_shaped_binhost() {
    local net
    net=$(pick_subnet)
    HOST_IP=$net.1 NS_IP=$net.2
    ip netns add "$NS"
    ip link add "$VETH_HOST" type veth peer name "$VETH_NS"
    ip link set "$VETH_NS" netns "$NS"
    ip addr add "$HOST_IP/30" dev "$VETH_HOST"
    ip link set "$VETH_HOST" up
    ip -n "$NS" addr add "$NS_IP/30" dev "$VETH_NS"
    ip -n "$NS" link set "$VETH_NS" up
    ip -n "$NS" link set lo up
    # Shape what the binhost sends (its egress), as a 200 Mbit/s uplink would.
    ip netns exec "$NS" tc qdisc add dev "$VETH_NS" root tbf rate "$RATE" burst 256kb latency 50ms
    mkdir -p "$T/nginx/tmp"
    cat >"$T/nginx/nginx.conf" <<EOF
user root;
daemon off;
worker_processes 1;
pid $T/nginx/nginx.pid;
error_log $T/nginx/error.log;
events { worker_connections 256; }
http {
    log_format bytes '\$body_bytes_sent';
    access_log $T/nginx/access.log bytes;
    default_type application/octet-stream;
    sendfile on;
    client_body_temp_path $T/nginx/tmp/body;
    proxy_temp_path $T/nginx/tmp/proxy;
    fastcgi_temp_path $T/nginx/tmp/fastcgi;
    uwsgi_temp_path $T/nginx/tmp/uwsgi;
    scgi_temp_path $T/nginx/tmp/scgi;
    server {
        listen $NS_IP:80;
        root $BINHOST;
    }
}
EOF
    ip netns exec "$NS" nginx -e "$T/nginx/error.log" -p "$T/nginx" -c "$T/nginx/nginx.conf" &
    NGINX_PID=$!
    URL=http://$NS_IP
    for _ in $(seq 100); do
        wget -q -O /dev/null "$URL/Packages" && return
        kill -0 "$NGINX_PID" 2>/dev/null || die "nginx failed: $(cat "$T/nginx/error.log")"
        sleep 0.1
    done
    die "nginx in $NS does not answer at $URL"
}

# --- cases -------------------------------------------------------------------------------------

declare -A SECS NOTE NET CPU DCPU
ATOM=app-misc/bench-all

check_installed() {
    local n
    n=$(find "$PREFIX/var/db/pkg/app-misc" -mindepth 1 -maxdepth 1 -name 'bench-*' | wc -l)
    [[ $n == $((NBLOBS + 1)) ]] || die "$1: $n of $((NBLOBS + 1)) packages installed"
    cmp -s <(python3 -c "import random, sys; sys.stdout.buffer.write(random.Random(1).randbytes($BLOB_MIB << 20))") \
        "$PREFIX/usr/share/bench-blob01/blob.bin" || die "$1: installed blob01 has wrong content"
}

# utime+stime of a process, in seconds.
proc_cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }

timed_emerge() { # case-name [env...] -- emerge args
    local name=$1 t0 t1 d0='' d1 dpid=
    shift
    sync
    : >"$T/nginx/access.log"
    if [[ -n $MOUNTED ]]; then
        dpid=$(cat "$T/binpkgfs.pid")
        d0=$(proc_cpu "$dpid")
    fi
    EMERGE_WRAPPER=(/usr/bin/time -f '%U %S' -o "$T/time.out")
    t0=$(now)
    if ! emerge_in_sandbox "$@" >"$T/$name.log" 2>&1; then
        tail -40 "$T/$name.log" >&2
        die "case $name: emerge failed"
    fi
    t1=$(now)
    EMERGE_WRAPPER=()
    CPU[$name]+=" $(awk '{printf "%.1f", $1 + $2}' "$T/time.out")"
    if [[ -n $dpid ]]; then
        d1=$(proc_cpu "$dpid")
        DCPU[$name]+=" $(awk -v a="$d0" -v b="$d1" 'BEGIN {printf "%.1f", b - a}')"
    else
        DCPU[$name]+=" -"
    fi
    SECS[$name]+=" $(secs "$t0" "$t1")"
    NET[$name]+=" $(awk '{s += $1} END {printf "%.1f", s / 1048576}' "$T/nginx/access.log")"
    check_installed "$name"
    say "$name: $(secs "$t0" "$t1") s"
}

mount_binpkgfs() { # note-key
    local t0 t1
    mkdir -p "$T/mnt"
    t0=$(now)
    "$BINPKGFS" mount --cache-dir "$T/cache" --log-file "$T/binpkgfs.log" \
        --pid-file "$T/binpkgfs.pid" "${PREFETCH_ARGS[@]}" "$URL" "$T/mnt"
    t1=$(now)
    MOUNTED=$T/mnt
    NOTE[$1]+=" $(secs "$t0" "$t1")"
}

unmount_binpkgfs() {
    local pid
    pid=$(cat "$T/binpkgfs.pid")
    umount "$T/mnt"
    MOUNTED=
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
}

run_case() {
    case $1 in
    local)
        rm -rf "$T/local-pkgdir"
        cp -a "$BINHOST" "$T/local-pkgdir"
        make_sandbox "$T/local-pkgdir"
        timed_emerge local -- --oneshot --usepkgonly "$ATOM"
        ;;
    portage)
        make_sandbox "$PREFIX/pkgdir"
        mkdir -p "$PREFIX/pkgdir"
        timed_emerge portage PORTAGE_BINHOST="$URL" -- --oneshot --getbinpkgonly "$ATOM"
        ;;
    cold)
        rm -rf "$T/cache"
        make_sandbox "$T/mnt"
        mount_binpkgfs cold
        timed_emerge cold -- --oneshot --usepkgonly "$ATOM"
        unmount_binpkgfs
        ;;
    warm)
        [[ -d $T/cache ]] || die "case warm needs case cold first"
        make_sandbox "$T/mnt"
        mount_binpkgfs warm
        timed_emerge warm -- --oneshot --usepkgonly "$ATOM"
        ;;
    warm-mounted)
        [[ -n $MOUNTED ]] || die "case warm-mounted needs case warm first"
        make_sandbox "$T/mnt"
        timed_emerge warm-mounted -- --oneshot --usepkgonly "$ATOM"
        unmount_binpkgfs
        ;;
    *) die "unknown case $1" ;;
    esac
}

# --- main --------------------------------------------------------------------------------------

# Merge-list prefetch: binpkgfs watches emerge's mtimedb, which lives in the sandbox here.
PREFETCH_ARGS=()
PREFETCH_NOTE="merge-list prefetch: not supported by this binary"
if "$BINPKGFS" mount --help 2>/dev/null | grep -q -- '--mtimedb'; then
    if [[ ${BENCH_PREFETCH:-1} == 1 ]]; then
        PREFETCH_ARGS=(--mtimedb "$PREFIX/var/cache/edb/mtimedb")
        PREFETCH_NOTE="merge-list prefetch: on (--mtimedb of the sandbox)"
    else
        PREFETCH_ARGS=(--no-prefetch)
        PREFETCH_NOTE="merge-list prefetch: off (--no-prefetch)"
    fi
fi

mkdir -p "$BENCH_DIR"
build_packages
start_shaped_binhost
say "binhost $URL in netns $NS, shaped to $RATE; cases: $CASES; $REPS rounds"
# Sanity check of the shaping: one 16 MiB package over the link.
blob=$(cd "$BINHOST" && find . -name 'bench-blob01-*.gpkg.tar' | head -1)
t0=$(now)
wget -q -O /dev/null "$URL/${blob#./}"
t1=$(now)
LINK=$(awk -v b="$(stat -c %s "$BINHOST/$blob")" -v t="$(secs "$t0" "$t1")" \
    'BEGIN { printf "%.0f Mbit/s", b * 8 / t / 1e6 }')
say "link check: wget of one package: $LINK"
for ((r = 1; r <= REPS; r++)); do
    say "round $r/$REPS"
    for c in $CASES; do
        run_case "$c"
    done
    if [[ -n $MOUNTED ]]; then unmount_binpkgfs; fi
done

total=$(find "$BINHOST" -name '*.gpkg.tar' -printf '%s\n' | awk '{s += $1} END {printf "%.1f", s / 1048576}')
echo
echo "emerge --oneshot $ATOM: $((NBLOBS + 1)) packages, $total MiB of gpkg, link $RATE (tbf)," \
    "$(nproc) CPUs; Portage $("$VENV/bin/python" -c 'import portage; print(portage.VERSION)')"
echo "binary: $BINPKGFS; $PREFETCH_NOTE"
echo "link check (one wget): $LINK; median of $REPS rounds"
# shellcheck disable=SC2086 # $1 is a list of numbers, split on purpose
median() { printf '%s\n' $1 | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -A LABEL=([local]="(a) local" [portage]="(b) portage" [cold]="(c) binpkgfs cold"
    [warm]="(d) binpkgfs warm" [warm-mounted]="(e) warm, mounted")
declare -A WHAT=([local]="PKGDIR on local disk (page cache warm)"
    [portage]="PORTAGE_BINHOST=http://..., --getbinpkgonly"
    [cold]="binpkgfs, empty cache dir"
    [warm]="binpkgfs remounted, cache dir of (c) kept"
    [warm-mounted]="same mount as (d), fresh sandbox")
fmt='%-18s %8s %9s %8s %9s %12s  %-44s %s\n'
# shellcheck disable=SC2059
printf "$fmt" case seconds "vs local" "CPU s" "daemon s" "MiB on link" what "all runs (s)"
# shellcheck disable=SC2059
printf "$fmt" ---- ------- -------- ----- -------- ----------- ---- ------------
m_local=
[[ -n ${SECS[local]:-} ]] && m_local=$(median "${SECS[local]}")
for c in $CASES; do
    m=$(median "${SECS[$c]}")
    ratio=-
    [[ -n $m_local ]] && ratio=$(awk -v a="$m" -v b="$m_local" 'BEGIN { printf "%.2fx", a / b }')
    dcpu=$(median "${DCPU[$c]}")
    # shellcheck disable=SC2059
    printf "$fmt" "${LABEL[$c]}" "$m" "$ratio" "$(median "${CPU[$c]}")" "$dcpu" \
        "$(median "${NET[$c]}")" "${WHAT[$c]}" "${SECS[$c]# }"
done
if [[ -n ${NOTE[cold]:-} ]]; then
    echo "binpkgfs mount-ready times (s): cold${NOTE[cold]}${NOTE[warm]:+; warm${NOTE[warm]}}"
fi
floor=$(awk -v m="$total" -v r="$RATE" 'BEGIN { sub(/mbit/, "", r); printf "%.1f", m * 8 * 1.048576 / r }')
echo "transfer floor at $RATE: ${floor} s for $total MiB. CPU s: user+sys of emerge and its children;"
echo "daemon s: CPU the binpkgfs daemon used during the case. Wall times on a busy machine vary a lot;"
echo "compare the CPU columns too (load average now: $(cut -d' ' -f1-3 /proc/loadavg))."
