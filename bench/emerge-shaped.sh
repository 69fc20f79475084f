#!/usr/bin/env bash
# emerge-shaped.sh: a real `emerge` install over a shaped (and optionally long) link, several ways.
#
# Package sets (SET=), built once with real Portage and cached under $BENCH_DIR/sets:
#   blobs  app-misc/bench-blob01..12 (16 MiB of incompressible data each) and app-misc/bench-all,
#          a meta package depending on all twelve: 13 packages, 192 MiB [default]
#   many   app-misc/many-small001..100 (50 KiB to 2 MiB each, deterministic log-uniform sizes),
#          app-misc/many-big1..3 (30 MiB each) and app-misc/many-all: 104 packages
#          (bench/emerge-many.sh runs this set at RTT 0 and 150 ms)
# Each case installs the meta package with `emerge --oneshot` into a fresh sandbox:
#   (a) local    PKGDIR is a local copy of the binhost (--usepkgonly): the limit
#   (b) portage  Portage's own client: PORTAGE_BINHOST=http://... --getbinpkgonly
#   (c) cold     PKGDIR is a binpkgfs mount of the same URL, empty cache (--usepkgonly)
#   (d) warm     binpkgfs again, remounted with the cache dir of (c) kept, fresh sandbox
#   (e) warm-mounted  a third sandbox on the still-mounted filesystem of (d) (kernel page cache hot)
# Rounds alternate the cases (a b c ... a b c ...); each prints the median of REPS rounds with
# the spread (min-max) and every run. The binhost is a real nginx inside a network namespace this
# script creates, behind a veth pair (10.x addresses it picks) whose namespace side is shaped with
# tbf at RATE; with RTT_MS (a list: one table per value) delay-proxy.py inside the namespace adds
# that round trip in front of nginx (its replies still cross the tbf). Each round also times one
# `curl` of the set's largest package over the same path; from its rate and the local time the
# script prints the physical limit of a cold install:
#   limit = package bytes / curl rate + local time / packages   (or the local time, if larger)
#
# Builder and installs use the same EPREFIX path ($BENCH_DIR/prefix), so Portage never has to
# "adjust prefix" inside the packages (slow for big packages, and it would dominate the figures).
#
# Needs root, iproute2 (ip netns, tc with tbf), nginx, curl, wget (Portage's FETCHCOMMAND), a
# `gtar` on PATH, a `portage` user, and Portage in a venv (BINPKGFS_PORTAGE_VENV, default
# /opt/portage-venv).
#
# Environment:
#   BINPKGFS        binary to test [default: <repo>/target/release/binpkgfs]
#   BENCH_DIR       build cache, reused between runs [default: /var/tmp/binpkgfs-bench]
#   BENCH_REBUILD=1 rebuild the packages even if the cache is valid
#   SET             blobs or many [default: blobs]
#   RATE            link rate for tbf [default: 200mbit]
#   RTT_MS          round-trip times to add, space-separated, 0 = none [default: 0]
#   CASES           which cases to run, in order [blobs: "local portage cold warm warm-mounted";
#                   many: "local portage cold"]
#   REPS            rounds of all cases; the median is printed [default: 5]
#   NBLOBS, BLOB_MIB                 size of the blobs set [12, 16]
#   MANY_SMALL, MANY_BIG, BIG_MIB    size of the many set [100, 3, 30]
#   BENCH_PREFETCH=0  do not point binpkgfs at the sandbox's mtimedb (merge-list prefetch off);
#                   binaries without --mtimedb are run without it either way

set -euo pipefail

BENCH_NAME=${BENCH_NAME:-emerge-shaped}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$HERE/lib.sh"

SET=${SET:-blobs}
RATE=${RATE:-200mbit}
RTT_MS=${RTT_MS:-0}
REPS=${REPS:-5}
case $SET in
blobs) CASES=${CASES:-local portage cold warm warm-mounted} ;;
many) CASES=${CASES:-local portage cold} ;;
*) die "unknown SET=$SET (blobs or many)" ;;
esac

bench_setup ip tc nginx curl wget gtar python3 mountpoint
[[ -x $VENV/bin/emerge ]] || die "no emerge in $VENV (set BINPKGFS_PORTAGE_VENV)"
id portage >/dev/null 2>&1 || die "no 'portage' user (Portage wants one)"

# --- the package set ---------------------------------------------------------------------------

# The package list (see write_repo in lib.sh) in $T/list: the blobs, then the meta package
# (ATOM, what the cases install) depending on all of them.
write_list() {
    local i meta
    case $SET in
    blobs)
        meta=app-misc/bench-all
        for i in $(seq -w 1 "${NBLOBS:-12}"); do
            echo "blob app-misc/bench-blob$i 1.0 $((${BLOB_MIB:-16} << 20)) $((10#$i))"
        done
        ;;
    many)
        meta=app-misc/many-all
        # 50 KiB to 2 MiB, log-uniform, fixed seed: the same sizes every run.
        python3 - "${MANY_SMALL:-100}" <<'EOF'
import math, random, sys
r = random.Random(15)
for i in range(1, int(sys.argv[1]) + 1):
    size = int(math.exp(r.uniform(math.log(50 << 10), math.log(2 << 20))))
    print(f"blob app-misc/many-small{i:03d} 1.0 {size} {i}")
EOF
        for i in $(seq 1 "${MANY_BIG:-3}"); do
            echo "blob app-misc/many-big$i 1.0 $((${BIG_MIB:-30} << 20)) $((1000 + i))"
        done
        ;;
    esac >"$T/list"
    echo "meta $meta 1.0$(awk '{printf " %s", $2}' "$T/list")" >>"$T/list"
}
write_list
ATOM=$(awk '$1 == "meta" {print $2}' "$T/list")
NPKGS=$(wc -l <"$T/list")
# The blob check_installed compares: the last one in the list.
read -r _ CHECK_CPV _ CHECK_BYTES CHECK_SEED <<<"$(grep '^blob ' "$T/list" | tail -1)"
BIGGEST=$(sort -k4,4n "$T/list" | awk '$1 == "blob" {p = $2} END {print p}')

SETDIR=$BENCH_DIR/sets/$SET-$(md5sum <"$T/list" | cut -c1-8)
BENCH_REPO=$SETDIR/repo
BINHOST=$SETDIR/binhost

build_set() {
    local stamp
    stamp="list $(md5sum <"$T/list" | cut -d' ' -f1) prefix $PREFIX portage $(portage_version)"
    if cache_valid "$SETDIR" "$stamp" && [[ -s $BINHOST/Packages ]]; then
        say "reusing packages in $BINHOST"
        return
    fi
    say "building $NPKGS packages with Portage into $BINHOST (once; cached) ..."
    rm -rf "$SETDIR"
    mkdir -p "$SETDIR"
    write_repo "$BENCH_REPO" "$T/list"
    build_pkgs "$BINHOST" "$ATOM"
    echo "$stamp" >"$SETDIR/stamp"
}

# --- cases -------------------------------------------------------------------------------------

check_case() { check_installed "$1" "$NPKGS" "${CHECK_CPV#*/}" "$CHECK_BYTES" "$CHECK_SEED"; }

mount_case() { # note-key
    mount_binpkgfs "${PREFETCH_ARGS[@]}" || die "mounting $URL failed"
    NOTE[$1]+=" $MOUNT_SECS"
}

run_case() {
    binhost_alive
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
        mount_case cold
        timed_emerge cold -- --oneshot --usepkgonly "$ATOM"
        unmount_binpkgfs
        ;;
    warm)
        [[ -d $T/cache ]] || die "case warm needs case cold first"
        make_sandbox "$T/mnt"
        mount_case warm
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

# --- the table ---------------------------------------------------------------------------------

declare -A LABEL=([local]="(a) local" [portage]="(b) portage" [cold]="(c) binpkgfs cold"
    [warm]="(d) binpkgfs warm" [warm-mounted]="(e) warm, mounted")
declare -A WHAT=([local]="PKGDIR on local disk (page cache warm)"
    [portage]="PORTAGE_BINHOST=http://..., --getbinpkgonly"
    [cold]="binpkgfs, empty cache dir"
    [warm]="binpkgfs remounted, cache dir of (c) kept"
    [warm-mounted]="same mount as (d), fresh sandbox")

print_table() {
    local fmt c m ratio m_local=- m_portage=- m_cold=- rate limit
    echo
    echo "emerge --oneshot $ATOM: $NPKGS packages, $TOTAL_MIB MiB of gpkg; link $(link_name);" \
        "$(nproc) CPUs; Portage $(portage_version)"
    echo "binary: $BINPKGFS; $PREFETCH_NOTE"
    echo "median of $REPS rounds (cases alternating within each round), spread = min-max"
    fmt='%-18s %8s %13s %9s %7s %9s %12s  %-44s %s\n'
    # shellcheck disable=SC2059
    printf "$fmt" case seconds spread "vs local" "CPU s" "daemon s" "MiB on link" what "all runs (s)"
    # shellcheck disable=SC2059
    printf "$fmt" ---- ------- ------ -------- ----- -------- ----------- ---- ------------
    [[ -n ${SECS[local]:-} ]] && m_local=$(median "${SECS[local]}")
    [[ -n ${SECS[portage]:-} ]] && m_portage=$(median "${SECS[portage]}")
    [[ -n ${SECS[cold]:-} ]] && m_cold=$(median "${SECS[cold]}")
    for c in $CASES; do
        m=$(median "${SECS[$c]}")
        ratio=$(ratio "$m" "$m_local")
        # shellcheck disable=SC2059
        printf "$fmt" "${LABEL[$c]}" "$m" "$(spread "${SECS[$c]}")" "$ratio" "$(median "${CPU[$c]}")" \
            "$(median "${DCPU[$c]}")" "$(median "${NET[$c]}")" "${WHAT[$c]}" "${SECS[$c]# }"
    done
    if [[ -n ${NOTE[cold]:-} ]]; then
        echo "binpkgfs mount-ready times (s): cold${NOTE[cold]}${NOTE[warm]:+; warm${NOTE[warm]}}"
    fi
    rate=$(awk -v b="$PROBE_BYTES" -v t="$(median "$PROBE_S")" 'BEGIN { printf "%.2f", b / t / 1e6 }')
    echo "curl of ${BIGGEST#*/} ($(awk -v b="$PROBE_BYTES" 'BEGIN {printf "%.1f", b / 1048576}') MiB," \
        "fresh connection) over the same path: median $(median "$PROBE_S") s" \
        "($(spread "$PROBE_S")) = $(awk -v r="$rate" 'BEGIN {printf "%.0f", r * 8}') Mbit/s;" \
        "first byte after $(median "$PROBE_FB") s (2 RTT + server)"
    if [[ $m_local != - ]]; then
        limit=$(awk -v b="$TOTAL_BYTES" -v r="$rate" -v l="$m_local" -v n="$NPKGS" \
            'BEGIN { x = b / (r * 1e6) + l / n; if (l > x) x = l; printf "%.2f", x }')
        echo "physical limit: $TOTAL_MIB MiB / that rate + local $m_local s / $NPKGS packages" \
            "(or local, if larger) = $limit s"
        if [[ $m_cold != - && $SET == blobs ]]; then
            echo "cold: $(ratio "$m_cold" "$limit") the limit (issue 15.2 target at 50 and 150 ms:" \
                "<= 1.03x), $(ratio "$m_cold" "$m_portage") portage (target <= 0.95x)," \
                "$(ratio "$m_cold" "$m_local") local"
        elif [[ $m_cold != - ]]; then
            echo "cold: $(ratio "$m_cold" "$m_local") local (issue 15.3 target at 150 ms: <= 1.03x)," \
                "$(ratio "$m_cold" "$limit") the limit, $(ratio "$m_cold" "$m_portage") portage"
        fi
    fi
    echo "CPU s: user+sys of emerge and its children; daemon s: CPU the binpkgfs daemon used during"
    echo "the case. Wall times on a busy machine vary a lot; compare the CPU columns too (load"
    echo "average now: $(cut -d' ' -f1-3 /proc/loadavg))."
}

# --- main --------------------------------------------------------------------------------------

prefetch_args
mkdir -p "$BENCH_DIR"
build_set
TOTAL_BYTES=$(find "$BINHOST" -name '*.gpkg.tar' -printf '%s\n' | awk '{s += $1} END {print s}')
TOTAL_MIB=$(awk -v b="$TOTAL_BYTES" 'BEGIN {printf "%.1f", b / 1048576}')
PROBE_PATH=$(cd "$BINHOST" && find . -path "./$BIGGEST/*.gpkg.tar" | head -1)
PROBE_PATH=${PROBE_PATH#./}
PROBE_BYTES=$(stat -c %s "$BINHOST/$PROBE_PATH")
start_binhost "$BINHOST"
for rtt in $RTT_MS; do
    set_rtt "$rtt"
    say "binhost $URL in netns $NS; link $(link_name); cases: $CASES; $REPS rounds"
    read -r s _ fb <<<"$(probe_url "$PROBE_PATH")"
    say "link check: curl of ${BIGGEST#*/}: $s s, first byte $fb s"
    SECS=() NOTE=() NET=() CPU=() DCPU=() PROBE_S='' PROBE_FB=''
    for ((r = 1; r <= REPS; r++)); do
        say "RTT $rtt ms: round $r/$REPS"
        read -r s _ fb <<<"$(probe_url "$PROBE_PATH")"
        PROBE_S+=" $s" PROBE_FB+=" $fb"
        for c in $CASES; do
            run_case "$c"
        done
        if [[ -n $MOUNTED ]]; then unmount_binpkgfs; fi
    done
    print_table
done
