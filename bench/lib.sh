# shellcheck shell=bash disable=SC2034 # variables set here are read by the sourcing script
# lib.sh: what the bench scripts share. Sourced, never run; the sourcing script sets
# BENCH_NAME (for messages) first and calls bench_setup.
#
#   statistics       median, spread (min-max), ratio
#   the binhost      start_binhost DIR: a real nginx serving DIR, either on loopback or (RATE
#                    set) inside a network namespace behind a veth pair shaped with tbf;
#                    set_rtt MS puts delay-proxy.py in front of it (MS=0: direct); $URL is
#                    where to reach it; probe_url PATH times a curl of one file on that path
#   Portage          write_repo (ebuilds from a package list), make_sandbox, emerge_in_sandbox,
#                    build_pkgs, check_installed: real emerge in a prefix sandbox
#   binpkgfs         mount_binpkgfs, unmount_binpkgfs
#   clean-up         bench_cleanup runs on exit: mounts, daemons, nginx, proxy, namespace, $T
#
# Environment read here: BINPKGFS, BINPKGFS_PORTAGE_VENV, BENCH_DIR, RATE, BURST, LIMIT_RATE,
# BENCH_KEEP=1 (keep $T and the last sandbox, to look at the logs), PROXY_OPTS (more
# delay-proxy.py options, e.g. --no-slow-start).

HERE=${HERE:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
REPO=$(dirname "$HERE")
BINPKGFS=${BINPKGFS:-$REPO/target/release/binpkgfs}
VENV=${BINPKGFS_PORTAGE_VENV:-/opt/portage-venv}
BENCH_DIR=${BENCH_DIR:-/var/tmp/binpkgfs-bench}
PREFIX=$BENCH_DIR/prefix # the one EPREFIX for builders and every install sandbox

# The interpreter itself, not a shim (pyenv's are bash scripts: slower, and they swallow SIGINT).
PYTHON=${PYTHON:-$(python3 -c 'import sys; print(sys.executable)')}

die() { echo "$BENCH_NAME: $*" >&2; exit 1; }
say() { echo "$BENCH_NAME: $*" >&2; }
now() { echo "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# shellcheck disable=SC2048,SC2086 # the arguments are lists of numbers, split on purpose
median() { printf '%s\n' $* | grep -v '^-$' | sort -g | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)]; else print "-"}'; }
# shellcheck disable=SC2048,SC2086
spread() { printf '%s\n' $* | grep -v '^-$' | sort -g | awk 'NR==1 {lo=$1} {hi=$1} END {if (NR) printf "%s-%s", lo, hi; else print "-"}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2fx", a / b }'; }

# --- set-up and clean-up -----------------------------------------------------------------------

NS='' VETH_HOST='' NGINX_PID='' PROXY_PID='' MOUNTED='' T=''
CLEANUP_HOOKS=()

bench_setup() { # needs...: root and these tools
    [[ $(id -u) == 0 ]] || die "must run as root"
    [[ -x $BINPKGFS ]] || die "no binary at $BINPKGFS (cargo build --release, or set BINPKGFS)"
    local t
    for t in "$@"; do command -v "$t" >/dev/null || die "$t not found on PATH"; done
    T=$(mktemp -d "/tmp/binpkgfs-$BENCH_NAME.XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

bench_cleanup() {
    local rc=$? h
    set +e
    for h in "${CLEANUP_HOOKS[@]}"; do "$h"; done
    if [[ -n $MOUNTED ]] && mountpoint -q "$MOUNTED"; then
        umount "$MOUNTED" 2>/dev/null || umount -l "$MOUNTED"
    fi
    if [[ -s $T/binpkgfs.pid ]]; then kill "$(cat "$T/binpkgfs.pid")" 2>/dev/null; fi
    stop_proxy
    if [[ -n $NGINX_PID ]]; then
        kill "$NGINX_PID" 2>/dev/null
        wait "$NGINX_PID" 2>/dev/null
    fi
    [[ -n $NS ]] && ip netns del "$NS" 2>/dev/null
    [[ -n $VETH_HOST ]] && ip link del "$VETH_HOST" 2>/dev/null
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        say "kept $T and $PREFIX (BENCH_KEEP=1)"
    else
        # The sandbox prefix holds only what a bench made (checked by its marker).
        [[ -e $PREFIX/.binpkgfs-bench ]] && rm -rf "$PREFIX"
        [[ -n $T ]] && rm -rf "$T"
    fi
    exit "$rc"
}

# --- the binhost: nginx, optionally shaped (netns + tbf), optionally far away (delay-proxy) ------

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

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The command prefix that runs a command where the binhost lives (its namespace, or here). An
# array, not a function, so that `"${AT_BINHOST[@]}" cmd &` leaves $! the pid of cmd itself.
AT_BINHOST=()

# rate_bits RATE: a tc rate ("200mbit", "1gbit", "500kbit") in bits per second.
rate_bits() {
    awk -v r="$1" 'BEGIN {
        n = r + 0; u = tolower(r); sub(/^[0-9.]+/, "", u)
        printf "%d", n * ((u ~ /^g/) ? 1e9 : (u ~ /^m/) ? 1e6 : (u ~ /^k/) ? 1e3 : 1) }'
}

# tbf's burst must hold at least a timer tick of traffic (rate / HZ) or the rate is not reached;
# 256kb (what the reference figures used) is enough up to about 200mbit.
tbf_burst() {
    awk -v b="$(rate_bits "$1")" 'BEGIN { b = b / 8 / 250; if (b < 262144) b = 262144; printf "%dkb", b / 1024 }'
}

# start_binhost DIR: nginx serving DIR. With RATE, inside a fresh network namespace behind a
# veth pair whose namespace side is shaped with tbf (what the binhost sends: its uplink).
# nginx listens directly at $BIND_IP:$DIRECT_PORT and, for the delay proxy, at
# 127.0.0.1:$BACKEND_PORT (inside the namespace). $ACCESS_LOG gets one line per request: bytes
# sent, connection number, time, method, path, Range header.
start_binhost() {
    local root=$1 net
    BIND_IP=127.0.0.1 DIRECT_PORT=$(free_port) BACKEND_PORT=$(free_port) PROXY_PORT=$(free_port)
    if [[ -n ${RATE:-} ]]; then
        net=$(pick_subnet)
        NS=bpfsbench$$ VETH_HOST=bpfb$$h
        AT_BINHOST=(ip netns exec "$NS")
        local veth_ns=bpfb$$n
        HOST_IP=$net.1 BIND_IP=$net.2 DIRECT_PORT=80 BACKEND_PORT=8080 PROXY_PORT=8000
        ip netns add "$NS"
        ip link add "$VETH_HOST" type veth peer name "$veth_ns"
        ip link set "$veth_ns" netns "$NS"
        ip addr add "$HOST_IP/30" dev "$VETH_HOST"
        ip link set "$VETH_HOST" up
        ip -n "$NS" addr add "$BIND_IP/30" dev "$veth_ns"
        ip -n "$NS" link set "$veth_ns" up
        ip -n "$NS" link set lo up
        ip netns exec "$NS" tc qdisc add dev "$veth_ns" root tbf rate "$RATE" \
            burst "${BURST:-$(tbf_burst "$RATE")}" latency 50ms
    fi
    mkdir -p "$T/nginx/tmp"
    ACCESS_LOG=$T/nginx/access.log
    cat >"$T/nginx/nginx.conf" <<EOF
user root;
daemon off;
worker_processes 1;
pid $T/nginx/nginx.pid;
error_log $T/nginx/error.log;
events { worker_connections 1024; }
http {
    log_format bytes '\$body_bytes_sent \$connection \$msec \$request_method \$uri \$http_range';
    access_log $ACCESS_LOG bytes;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000;
    ${LIMIT_RATE:+limit_rate $LIMIT_RATE;}
    client_body_temp_path $T/nginx/tmp/body;
    proxy_temp_path $T/nginx/tmp/proxy;
    fastcgi_temp_path $T/nginx/tmp/fastcgi;
    uwsgi_temp_path $T/nginx/tmp/uwsgi;
    scgi_temp_path $T/nginx/tmp/scgi;
    server {
        listen $BIND_IP:$DIRECT_PORT;
        listen 127.0.0.1:$BACKEND_PORT;
        root $root;
    }
}
EOF
    "${AT_BINHOST[@]}" nginx -e "$T/nginx/error.log" -p "$T/nginx" -c "$T/nginx/nginx.conf" &
    NGINX_PID=$!
    URL=http://$BIND_IP:$DIRECT_PORT
    wait_for_url "$URL" || die "nginx does not answer at $URL: $(cat "$T/nginx/error.log")"
}

wait_for_url() {
    for _ in $(seq 100); do
        curl -s -o /dev/null "$1/" && return 0
        sleep 0.1
    done
    return 1
}

# Dies if nginx or the delay proxy has gone (a Ctrl-C reaches them too: then the bench must end
# rather than wait for a binhost that is not there).
binhost_alive() {
    kill -0 "$NGINX_PID" 2>/dev/null || die "nginx has exited (interrupted?)"
    [[ -z $PROXY_PID ]] || kill -0 "$PROXY_PID" 2>/dev/null || die "delay-proxy.py has exited (interrupted?)"
}

stop_proxy() {
    if [[ -n $PROXY_PID ]]; then
        kill "$PROXY_PID" 2>/dev/null || true
        wait "$PROXY_PID" 2>/dev/null || true
        PROXY_PID=
    fi
}

# set_rtt MS: from now on $URL is MS milliseconds of round trip away (delay-proxy.py beside
# nginx, where the binhost lives: in the namespace its replies still cross the tbf). 0: direct.
set_rtt() {
    stop_proxy
    RTT=$1
    if [[ $RTT == 0 ]]; then
        URL=http://$BIND_IP:$DIRECT_PORT
        return
    fi
    # shellcheck disable=SC2086 # PROXY_OPTS: words, split on purpose
    "${AT_BINHOST[@]}" "$PYTHON" "$HERE/delay-proxy.py" --listen "$BIND_IP:$PROXY_PORT" \
        --upstream "127.0.0.1:$BACKEND_PORT" --rtt-ms "$RTT" ${PROXY_OPTS:-} 2>"$T/proxy.log" &
    PROXY_PID=$!
    URL=http://$BIND_IP:$PROXY_PORT
    wait_for_url "$URL" || die "delay proxy does not answer at $URL: $(cat "$T/proxy.log")"
}

# A description of the path to $URL, for the tables.
link_name() {
    local s=${RATE:+$RATE (tbf)}
    s=${s:-loopback}
    if [[ ${RTT:-0} == 0 ]]; then echo "$s, no added RTT"; else echo "$s, RTT $RTT ms (delay-proxy.py)"; fi
}

# probe_url PATH: one fresh curl of $URL/PATH; prints "seconds bytes first-byte-seconds".
probe_url() {
    curl -s -o /dev/null -w '%{time_total} %{size_download} %{time_starttransfer}\n' "$URL/$1" |
        awk '{printf "%.3f %d %.3f\n", $1, $2, $3}'
}

# --- Portage -----------------------------------------------------------------------------------

# write_repo DIR LIST: an ebuild repository from a package list, one package per line:
#   blob CAT/PN VERSION BYTES SEED     installs BYTES of incompressible data (Random(SEED))
#                                      as /usr/share/PN/blob.bin
#   meta CAT/PN VERSION ATOM...        installs nothing, RDEPENDs on the atoms
# shellcheck disable=SC2016 # the ebuild's own variables, written as they are
write_repo() {
    local r=$1 list=$2 kind cpv ver a b cats
    rm -rf "$r"
    mkdir -p "$r"/{profiles/default,metadata,licenses}
    echo bench >"$r/profiles/repo_name"
    cats=$(awk '{split($2, c, "/"); print c[1]}' "$list" | sort -u)
    echo "$cats" >"$r/profiles/categories"
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
    while read -r kind cpv ver a b; do
        mkdir -p "$r/$cpv"
        {
            echo 'EAPI=8'
            echo 'HOMEPAGE="https://example.invalid/binpkgfs"'
            echo 'S="${WORKDIR}"'
            echo 'LICENSE="public-domain"'
            echo 'SLOT="0"'
            echo 'KEYWORDS="amd64"'
            case $kind in
            blob)
                echo "DESCRIPTION=\"binpkgfs benchmark: $a bytes of incompressible data\""
                echo 'src_install() {'
                echo "	\"\${PORTAGE_PYTHON:-python3}\" -c 'import random, sys; sys.stdout.buffer.write(random.Random($b).randbytes($a))' \\"
                echo '		> "${T}"/blob.bin || die'
                echo "	insinto /usr/share/${cpv#*/}"
                echo '	doins "${T}"/blob.bin'
                echo '}'
                ;;
            meta)
                echo 'DESCRIPTION="binpkgfs benchmark: a meta package"'
                echo "RDEPEND=\"$a${b:+ $b}\""
                ;;
            *) die "write_repo: unknown kind $kind" ;;
            esac
        } >"$r/$cpv/${cpv#*/}-$ver.ebuild"
    done < <(grep -v '^#' "$list")
}

# make_sandbox PKGDIR: a fresh Portage sandbox at $PREFIX (repository $BENCH_REPO).
make_sandbox() {
    local pkgdir=$1
    [[ -e $PREFIX && ! -e $PREFIX/.binpkgfs-bench ]] &&
        die "$PREFIX exists and is not ours; refusing to touch it"
    rm -rf "$PREFIX"
    mkdir -p "$PREFIX"/{etc/portage,share/portage,var/db/pkg,var/cache/edb,var/lib/portage,var/tmp,distfiles}
    touch "$PREFIX/.binpkgfs-bench"
    ln -s "$VENV/share/portage/config" "$PREFIX/share/portage/config"
    ln -s "$BENCH_REPO/profiles/default" "$PREFIX/etc/portage/make.profile"
    echo 0 >"$PREFIX/var/cache/edb/counter"
    set_pkgdir "$pkgdir"
}

# set_pkgdir PKGDIR: point the sandbox's make.conf at another PKGDIR (what is installed stays).
set_pkgdir() {
    cat >"$PREFIX/etc/portage/make.conf" <<EOF
PKGDIR="$1"
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
location = $BENCH_REPO" \
        PATH="$VENV/bin:$PATH" \
        "${envs[@]}" \
        "$VENV/bin/emerge" --color=n "$@"
}

portage_version() { "$VENV/bin/python" -c 'import portage; print(portage.VERSION)'; }

# build_pkgs PKGDIR ATOM...: emerge --buildpkg the atoms in a builder sandbox, packages into
# PKGDIR (kept: a second call adds to it, as a binhost's next release does).
build_pkgs() {
    local pkgdir=$1
    shift
    mkdir -p "$pkgdir"
    make_sandbox "$pkgdir"
    emerge_in_sandbox -- --quiet --oneshot --buildpkg "$@" >"$T/build.log" 2>&1 ||
        { tail -40 "$T/build.log" >&2; die "building the packages failed"; }
    find "$pkgdir" -name '.*lockfile' -delete
    rm -rf "$PREFIX"
}

# cache_valid DIR STAMP: whether DIR was built from STAMP (and BENCH_REBUILD is not 1).
cache_valid() {
    [[ ${BENCH_REBUILD:-0} != 1 && -e $1/stamp && $(cat "$1/stamp") == "$2" ]]
}

# check_installed CASE COUNT PN BYTES SEED: COUNT packages are installed in the sandbox, and
# PN's blob has the bytes Random(SEED) makes.
check_installed() {
    local n
    n=$(find "$PREFIX/var/db/pkg" -mindepth 2 -maxdepth 2 | wc -l)
    [[ $n == "$2" ]] || die "$1: $n of $2 packages installed"
    cmp -s <(python3 -c "import random, sys; sys.stdout.buffer.write(random.Random($5).randbytes($4))" 2>/dev/null) \
        "$PREFIX/usr/share/$3/blob.bin" || die "$1: installed $3 has wrong content"
}

# utime+stime of a process, in seconds.
proc_cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }

# Per-case results, appended to by timed_emerge: one space-separated entry per run.
declare -A SECS=() CPU=() DCPU=() NET=() NOTE=()

# timed_emerge CASE [NAME=value...] -- EMERGE-ARGS: emerge in the sandbox, timed; appends to
# the associative arrays SECS (wall s), CPU (emerge user+sys), DCPU (daemon CPU, if
# mounted), NET (MiB nginx sent), then calls the caller's check_case CASE.
timed_emerge() {
    local name=$1 t0 t1 d0='' d1 dpid=''
    shift
    sync
    : >"$ACCESS_LOG"
    if [[ -n $MOUNTED ]]; then
        dpid=$(cat "$T/binpkgfs.pid")
        d0=$(proc_cpu "$dpid")
    fi
    EMERGE_WRAPPER=(/usr/bin/time -f '%U %S' -o "$T/time.out")
    t0=$(now)
    if ! emerge_in_sandbox "$@" >"$T/$name.log" 2>&1; then
        EMERGE_WRAPPER=()
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
    NET[$name]+=" $(net_mib)"
    check_case "$name"
    say "$name: $(secs "$t0" "$t1") s"
}

# MiB nginx sent since $ACCESS_LOG was last emptied.
net_mib() { awk '{s += $1} END {printf "%.1f", s / 1048576}' "$ACCESS_LOG"; }

# --- binpkgfs ----------------------------------------------------------------------------------

# mount_binpkgfs [ARGS...]: mount $URL at $T/mnt with cache $T/cache; sets MOUNT_SECS.
# BINPKGFS_OPTS (words) are added to every mount, e.g. BINPKGFS_OPTS="-o streams=1".
mount_binpkgfs() {
    local t0 t1 extra=()
    read -r -a extra <<<"${BINPKGFS_OPTS:-}"
    mkdir -p "$T/mnt"
    t0=$(now)
    "$BINPKGFS" mount --cache-dir "$T/cache" --log-file "$T/binpkgfs.log" \
        --pid-file "$T/binpkgfs.pid" "${extra[@]}" "$@" "$URL" "$T/mnt" || return 1
    t1=$(now)
    MOUNTED=$T/mnt
    MOUNT_SECS=$(secs "$t0" "$t1")
}

unmount_binpkgfs() {
    local pid
    pid=$(cat "$T/binpkgfs.pid")
    umount "$T/mnt"
    MOUNTED=
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    rm -f "$T/binpkgfs.pid"
}

# Merge-list prefetch: binpkgfs watches emerge's mtimedb, which lives in the sandbox here.
# Sets PREFETCH_ARGS and PREFETCH_NOTE (BENCH_PREFETCH=0: --no-prefetch).
prefetch_args() {
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
}
