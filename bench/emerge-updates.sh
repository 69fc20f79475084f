#!/usr/bin/env bash
# emerge-updates.sh: a binhost release, then `emerge -uD @world` (issue 15.4: updates ready
# before emerge asks), over a slow link far away: 30 Mbit/s (tbf), 50 ms RTT (delay-proxy.py).
#
# Built once with real Portage and cached under $BENCH_DIR/sets: app-misc/upd-blob01..10 at
# version 1.0 and at 2.0 (8 MiB of incompressible data each, other bytes in 2.0) and
# app-misc/upd-all 1.0, a meta package depending on them. Two binhost directories: v1 (the 1.0
# builds) and v2 (v1 plus the 2.0 builds, Packages listing both, as after a release). nginx
# serves a symlink that points at v1; "the release" swaps it to v2.
#
# Each case: a fresh sandbox with v1 installed (`emerge --usepkgonly app-misc/upd-all` from a local
# copy of v1, not timed), then, timed, `emerge -uD @world` with:
#   (a) local     PKGDIR a local copy of v2 (--usepkgonly): the limit
#   (b) portage   Portage's own client: PORTAGE_BINHOST=http://... (v2) --getbinpkgonly
#   (c) prefetch  PKGDIR a binpkgfs mount, empty cache, mounted while v1 is served, with
#                 `-o prefetch=updates,updates_root=<sandbox>`; the release happens after the
#                 mount is up, and emerge starts once `binpkgfs status` shows every update in the
#                 cache and no download in flight. How long that took after the release (and
#                 after the mount saw the new index) is printed beside the table.
#   (d) byhand    the same without the option: once the mount has seen the new index, the
#                 bench runs `binpkgfs prefetch --world-updates --root <sandbox>` (what an admin
#                 or a cron job can do today), waits the same way, then emerges
# If the binary does not know the option (a mount with it fails with "unknown mount option"),
# case (c) is skipped with a message saying so; the others run.
#
# Rounds alternate the cases; median of REPS with the spread (min-max) and every run.
#
# Environment (and those of bench/lib.sh: BINPKGFS, BENCH_DIR, BINPKGFS_PORTAGE_VENV):
#   RATE            link rate for tbf [default: 30mbit]
#   RTT_MS          round trip added by delay-proxy.py [default: 50]
#   REPS            rounds [default: 5]
#   CASES           [default: "local portage prefetch byhand"]
#   UPD_N, UPD_MIB  packages updated and the size of each [10, 8]
#   INDEX_TTL       the mount's --index-ttl, how soon it sees the release [default: 20; at 2 the
#                   1 s attribute TTL that follows costs emerge ~20% through the mount]
#   UPDATES_OPTS    the -o words for the prefetch case
#                   [default: prefetch=updates,updates_root=<sandbox>]
#   PREFETCH_TIMEOUT  seconds to wait for the updates to be cached [default: 600]
#   BENCH_PREFETCH=0  no merge-list prefetch (--no-prefetch) in cases (c) and (d)
set -euo pipefail

BENCH_NAME=emerge-updates
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$HERE/lib.sh"

RATE=${RATE:-30mbit}
RTT_MS=${RTT_MS:-50}
REPS=${REPS:-5}
CASES=${CASES:-local portage prefetch byhand}
UPD_N=${UPD_N:-10}
UPD_MIB=${UPD_MIB:-8}
INDEX_TTL=${INDEX_TTL:-20}
UPDATES_OPTS=${UPDATES_OPTS:-prefetch=updates,updates_root=$PREFIX}
PREFETCH_TIMEOUT=${PREFETCH_TIMEOUT:-600}

bench_setup ip tc nginx curl wget gtar python3 mountpoint
[[ -x $VENV/bin/emerge ]] || die "no emerge in $VENV (set BINPKGFS_PORTAGE_VENV)"
id portage >/dev/null 2>&1 || die "no 'portage' user (Portage wants one)"

# --- the two releases --------------------------------------------------------------------------

for i in $(seq -w 1 "$UPD_N"); do
    echo "blob app-misc/upd-blob$i 1.0 $((UPD_MIB << 20)) $((10#$i))"
    echo "blob app-misc/upd-blob$i 2.0 $((UPD_MIB << 20)) $((1000 + 10#$i))"
done >"$T/list"
echo "meta app-misc/upd-all 1.0$(awk '$3 == "1.0" {printf " %s", $2}' "$T/list")" >>"$T/list"
NPKGS=$((UPD_N + 1))
SETDIR=$BENCH_DIR/sets/updates-$(md5sum <"$T/list" | cut -c1-8)
BENCH_REPO=$SETDIR/repo
V1=$SETDIR/binhost-v1
V2=$SETDIR/binhost-v2
atoms() { awk -v v="$1" '$1 == "blob" && $3 == v {print "=" $2 "-" $3}' "$T/list"; }

build_releases() {
    local stamp
    stamp="list $(md5sum <"$T/list" | cut -d' ' -f1) prefix $PREFIX portage $(portage_version)"
    if cache_valid "$SETDIR" "$stamp" && [[ -s $V1/Packages && -s $V2/Packages ]]; then
        say "reusing packages in $SETDIR"
        return
    fi
    say "building $UPD_N packages at 1.0 and 2.0 with Portage into $SETDIR (once; cached) ..."
    rm -rf "$SETDIR"
    mkdir -p "$SETDIR"
    write_repo "$BENCH_REPO" "$T/list"
    # shellcheck disable=SC2046 # one atom per word
    build_pkgs "$V1" $(atoms 1.0) =app-misc/upd-all-1.0
    cp -a "$V1" "$V2"
    # shellcheck disable=SC2046
    build_pkgs "$V2" $(atoms 2.0)
    echo "$stamp" >"$SETDIR/stamp"
}

serve() { # v1|v2: what nginx serves from now on (an atomic symlink swap)
    ln -sfn "$SETDIR/binhost-$1" "$T/serve.new"
    mv -T "$T/serve.new" "$T/serve"
}

# --- cases -------------------------------------------------------------------------------------

# After an update: every package still installed once, and the last blob has 2.0's bytes.
read -r _ CHECK_CPV _ CHECK_BYTES CHECK_SEED <<<"$(awk '$1 == "blob" && $3 == "2.0"' "$T/list" | tail -1)"
check_case() { check_installed "$1" "$NPKGS" "${CHECK_CPV#*/}" "$CHECK_BYTES" "$CHECK_SEED"; }

install_v1() { # a fresh sandbox with v1 installed (app-misc/upd-all in @world)
    make_sandbox "$T/v1-pkgdir"
    emerge_in_sandbox -- --quiet --usepkgonly app-misc/upd-all >"$T/install-v1.log" 2>&1 ||
        { tail -40 "$T/install-v1.log" >&2; die "installing v1 failed"; }
}

UPDATE=(--update --deep @world)
PREFETCH_SKIP=''
declare -A WAIT=() SEEN=() PNET=() PASS=()

# The mount's status (binpkgfs status --json) as words: cache entries, downloads in flight, index
# TIMESTAMP, and of the last prefetch=updates pass ("-" without one): the index TIMESTAMP it ran
# for, its state, found, fetched, already cached, seconds.
mount_status() {
    "$BINPKGFS" status --json "$T/mnt" | "$PYTHON" -c 'import json, sys
s = json.load(sys.stdin)
last = (s.get("updates_prefetch") or {}).get("last") or {}
w = lambda k: str(last.get(k, "-")).replace(" ", "_")
print(s["cache"]["entries"], s["downloads_in_flight"], s["index"]["timestamp"], w("index_timestamp"),
      w("state"), w("found"), w("fetched"), w("already_cached"), w("seconds"))'
}

# wait_prefetched CASE T_RELEASE TIMESTAMP_V1: waits until the mount has seen the new index
# and every update is in its cache with no download in flight (or, for case prefetch, its
# updates pass for the new index has ended, done or failed); records release -> seen and
# release -> cached. For case byhand, starts `binpkgfs prefetch --world-updates` once seen.
wait_prefetched() {
    local name=$1 t_rel=$2 ts_v1=$3 t_seen='' st entries=0 inflight=0 ts t done=- pid=''
    local p_ts p_state p_found p_fetched p_cached p_secs
    while :; do
        binhost_alive
        st=$(mount_status) || die "$name: binpkgfs status $T/mnt failed"
        read -r entries inflight ts p_ts p_state p_found p_fetched p_cached p_secs <<<"$st"
        t=$(now)
        if [[ -z $t_seen && $ts != "$ts_v1" ]]; then
            t_seen=$t
            if [[ $name == byhand ]]; then
                "$BINPKGFS" prefetch --mount "$T/mnt" --world-updates --root "$PREFIX" \
                    >"$T/byhand.log" 2>&1 &
                pid=$!
            fi
        fi
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" || { tail -5 "$T/byhand.log" >&2; die "byhand: binpkgfs prefetch failed"; }
            pid=''
        fi
        if ((entries >= UPD_N && inflight == 0)) && [[ -n $t_seen ]]; then
            done=$(secs "$t_rel" "$t")
            break
        fi
        if [[ $name == prefetch && -n $t_seen && $p_ts == "$ts" && $p_state =~ ^(done|failed) ]]; then
            say "prefetch: the updates pass ended ($p_state) with $entries of $UPD_N updates cached"
            break
        fi
        if (($(secs "$t_rel" "$t" | cut -d. -f1) >= PREFETCH_TIMEOUT)); then
            say "$name: $entries of $UPD_N updates cached, $inflight downloads in flight" \
                "after $PREFETCH_TIMEOUT s; starting emerge anyway"
            break
        fi
        sleep 0.1
    done
    SEEN[$name]+=" $(if [[ -n $t_seen ]]; then secs "$t_rel" "$t_seen"; else echo -; fi)"
    WAIT[$name]+=" $done"
    PNET[$name]+=" $(net_mib)"
    say "$name: release seen after $(secs "$t_rel" "${t_seen:-$t}") s, updates cached after $done s"
    if [[ $name == prefetch ]]; then
        # The pass may still be finishing its bookkeeping when the cache is complete.
        for _ in $(seq 20); do
            read -r _ _ ts p_ts p_state p_found p_fetched p_cached p_secs <<<"$(mount_status)"
            [[ $p_ts == "$ts" && $p_state =~ ^(done|failed) ]] && break
            sleep 0.1
        done
        PASS[$name]+=" $p_secs"
        say "prefetch: updates pass for index $p_ts: $p_state, $p_found found, $p_fetched fetched," \
            "$p_cached already cached, $p_secs s"
    fi
}

# mount_released CASE -o-WORDS...: mount while v1 is served, release v2, wait for the updates.
# Returns 2 (after saying why) if the binary does not know the words.
mount_released() {
    local name=$1 err ts_v1 t_rel
    shift
    rm -rf "$T/cache"
    set_pkgdir "$T/mnt"
    if ! err=$(mount_binpkgfs "${PREFETCH_ARGS[@]}" --index-ttl "$INDEX_TTL" "$@" 2>&1); then
        if grep -q 'unknown mount option' <<<"$err"; then
            PREFETCH_SKIP="this binary does not know $* ($err)"
            say "SKIPPING case $name: $PREFETCH_SKIP"
            return 2
        fi
        die "mounting $URL failed: $err"
    fi
    MOUNTED=$T/mnt
    ts_v1=$(mount_status | cut -d' ' -f3)
    : >"$ACCESS_LOG"
    serve v2
    t_rel=$(now)
    wait_prefetched "$name" "$t_rel" "$ts_v1"
}

run_case() {
    binhost_alive
    serve v1
    install_v1
    case $1 in
    local)
        serve v2
        rm -rf "$T/local-pkgdir"
        cp -a "$V2" "$T/local-pkgdir"
        set_pkgdir "$T/local-pkgdir"
        timed_emerge local -- --usepkgonly "${UPDATE[@]}"
        ;;
    portage)
        serve v2
        mkdir -p "$PREFIX/pkgdir"
        set_pkgdir "$PREFIX/pkgdir"
        timed_emerge portage PORTAGE_BINHOST="$URL" -- --getbinpkgonly "${UPDATE[@]}"
        ;;
    prefetch | byhand)
        [[ $1 == prefetch && -n $PREFETCH_SKIP ]] && return
        if [[ $1 == prefetch ]]; then
            mount_released prefetch -o "$UPDATES_OPTS" || return 0
        else
            mount_released byhand
        fi
        timed_emerge "$1" -- --usepkgonly "${UPDATE[@]}"
        unmount_binpkgfs
        ;;
    *) die "unknown case $1" ;;
    esac
}

# --- main --------------------------------------------------------------------------------------

prefetch_args
mkdir -p "$BENCH_DIR"
build_releases
rm -rf "$T/v1-pkgdir"
cp -a "$V1" "$T/v1-pkgdir"
UPD_BYTES=$(comm -13 <(cd "$V1" && find . -name '*.gpkg.tar' | sort) \
    <(cd "$V2" && find . -name '*.gpkg.tar' | sort) | (cd "$V2" && xargs stat -c %s) |
    awk '{s += $1} END {print s}')
serve v1
start_binhost "$T/serve"
set_rtt "$RTT_MS"
say "binhost $URL in netns $NS; link $(link_name); cases: $CASES; $REPS rounds"
for ((r = 1; r <= REPS; r++)); do
    say "round $r/$REPS"
    for c in $CASES; do
        run_case "$c"
    done
done

declare -A LABEL=([local]="(a) local" [portage]="(b) portage" [prefetch]="(c) binpkgfs prefetch"
    [byhand]="(d) binpkgfs by hand")
declare -A WHAT=([local]="PKGDIR a local copy of v2"
    [portage]="PORTAGE_BINHOST=http://..., --getbinpkgonly"
    [prefetch]="mount, -o prefetch=updates, cached before emerge"
    [byhand]="mount, binpkgfs prefetch --world-updates first")
echo
echo "emerge -uD @world after a release: $UPD_N of $NPKGS packages updated," \
    "$(awk -v b="$UPD_BYTES" 'BEGIN {printf "%.1f", b / 1048576}') MiB of new gpkg; link $(link_name);" \
    "$(nproc) CPUs; Portage $(portage_version)"
echo "binary: $BINPKGFS; $PREFETCH_NOTE; (c) and (d) mounted with --index-ttl $INDEX_TTL, (c) with -o $UPDATES_OPTS"
echo "median of $REPS rounds (cases alternating within each round), spread = min-max"
fmt='%-22s %8s %13s %9s %7s %9s %12s  %-46s %s\n'
# shellcheck disable=SC2059
printf "$fmt" case seconds spread "vs local" "CPU s" "daemon s" "MiB on link" what "all runs (s)"
# shellcheck disable=SC2059
printf "$fmt" ---- ------- ------ -------- ----- -------- ----------- ---- ------------
m_local=-
[[ -n ${SECS[local]:-} ]] && m_local=$(median "${SECS[local]}")
for c in $CASES; do
    if [[ -z ${SECS[$c]:-} ]]; then
        # shellcheck disable=SC2059
        printf "$fmt" "${LABEL[$c]}" skipped - - - - - "${WHAT[$c]}" ""
        continue
    fi
    m=$(median "${SECS[$c]}")
    # shellcheck disable=SC2059
    printf "$fmt" "${LABEL[$c]}" "$m" "$(spread "${SECS[$c]}")" "$(ratio "$m" "$m_local")" \
        "$(median "${CPU[$c]}")" "$(median "${DCPU[$c]}")" "$(median "${NET[$c]}")" "${WHAT[$c]}" "${SECS[$c]# }"
done
for c in prefetch byhand; do
    [[ -n ${SECS[$c]:-} ]] || continue
    echo "${LABEL[$c]}: release -> mount saw the new index: median $(median "${SEEN[$c]}") s" \
        "($(spread "${SEEN[$c]}")); release -> all updates cached: median" \
        "$(median "${WAIT[$c]}") s ($(spread "${WAIT[$c]}")), $(median "${PNET[$c]}") MiB sent"
    [[ -n ${PASS[$c]:-} ]] && echo "${LABEL[$c]}: the daemon's own updates pass took median" \
        "$(median "${PASS[$c]}") s ($(spread "${PASS[$c]}")) (binpkgfs status: updates_prefetch.last.seconds)"
    echo "${LABEL[$c]} vs local: $(ratio "$(median "${SECS[$c]}")" "$m_local")" \
        "(issue 15.4 target for (c): <= 1.03x)"
done
echo "transfer floor of the updates at $RATE:" \
    "$(awk -v b="$UPD_BYTES" -v r="$(rate_bits "$RATE")" 'BEGIN { printf "%.1f", b * 8 / r }') s"
[[ -n $PREFETCH_SKIP ]] && echo "case (c) SKIPPED: $PREFETCH_SKIP"
echo "CPU s: user+sys of emerge and its children; daemon s: CPU the binpkgfs daemon used during"
echo "the emerge. Load average now: $(cut -d' ' -f1-3 /proc/loadavg)."
