#!/usr/bin/env bash
# index-scale.sh: how binpkgfs copes with a big binhost index (50,000 entries, ~27 MB `Packages`).
#
# Generates a realistic index (bench/gen-packages.py, fixed seed) into a temporary binhost, serves
# it with a real nginx on 127.0.0.1, and measures, each repeated $REPS times (median printed):
#   ready      wall time of `binpkgfs mount` returning (fresh, empty cache dir each time)
#              floor: `curl -o /dev/null` of the same `Packages` from the same nginx
#   remount    the same with the saved index left in the cache dir (conditional request, 304)
#   walk cold  `find MNT -type f | wc -l` right after mounting
#   walk warm  the same again immediately afterwards (kernel dentry/attr caches, 1 s TTL)
#   stat walk  `find MNT -type f -printf '%s %T@'`: lstat of every file, which is what Portage
#              does with FEATURES=-pkgdir-index-trusted
#              floor for the walks: the same tree as a local directory of sparse files with the
#              right sizes and mtimes (page cache warm unless BENCH_DROP_CACHES=1)
#   RSS        VmRSS and VmHWM of the daemon after the walks
#   gz         mount ready with Packages.gz beside Packages (asked for first) against a
#              plain-only binhost in the same rounds; bytes of both files over the wire
# and prints PASS/FAIL against the issue's bounds (and the stretch targets).
#
# Needs root (FUSE mount), nginx, curl, python3. Everything lives in one temp dir and is removed
# on exit, including on failure: the mount is unmounted and nginx is stopped.
#
# Environment:
#   BINPKGFS            binary to test [default: <repo>/target/release/binpkgfs]
#   ENTRIES             index entries [default: 50000]
#   REPS                repetitions per figure [default: 3]
#   BENCH_DROP_CACHES=1 drop the kernel's page/dentry caches before each cold baseline walk
#   BENCH_KEEP=1        keep the temp dir (for profiling by hand)

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
BINPKGFS=${BINPKGFS:-$REPO/target/release/binpkgfs}
ENTRIES=${ENTRIES:-50000}
REPS=${REPS:-3}

die() { echo "index-scale: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "must run as root (FUSE mounts)"
[[ -x $BINPKGFS ]] || die "no binary at $BINPKGFS (cargo build --release, or set BINPKGFS)"
for t in nginx curl python3 find umount; do
    command -v "$t" >/dev/null || die "$t not found"
done

T=$(mktemp -d /tmp/binpkgfs-index-scale.XXXXXX)
MNT=$T/mnt
NGINX_PID=

cleanup() {
    local rc=$?
    set +e
    if mountpoint -q "$MNT" 2>/dev/null; then
        umount "$MNT" 2>/dev/null || umount -l "$MNT"
    fi
    # The daemon exits on unmount; make sure, by its own pid.
    if [[ -s $T/binpkgfs.pid ]]; then
        kill "$(cat "$T/binpkgfs.pid")" 2>/dev/null
    fi
    if [[ -n $NGINX_PID ]]; then
        kill "$NGINX_PID" 2>/dev/null
        wait "$NGINX_PID" 2>/dev/null
    fi
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        echo "index-scale: kept $T" >&2
    else
        rm -rf "$T"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- helpers -----------------------------------------------------------------------------------

now() { echo "$EPOCHREALTIME"; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# Times a command (stdout kept in $T/last.out); prints seconds.
timed() {
    local t0 t1
    t0=$(now)
    if ! "$@" >"$T/last.out"; then
        echo "index-scale: failed: $*" >&2
        if [[ -s $T/binpkgfs.log ]]; then tail -5 "$T/binpkgfs.log" >&2; fi
        return 1
    fi
    t1=$(now)
    elapsed "$t0" "$t1"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

drop_caches() {
    if [[ ${BENCH_DROP_CACHES:-0} == 1 ]]; then
        sync
        echo 3 >/proc/sys/vm/drop_caches
    fi
}

# --- the binhost -------------------------------------------------------------------------------

echo "index-scale: generating $ENTRIES entries (and the sparse baseline tree) in $T/binhost ..." >&2
python3 "$HERE/gen-packages.py" --entries "$ENTRIES" --sparse-tree "$T/binhost"
INDEX_BYTES=$(stat -c %s "$T/binhost/Packages")

PORT=$(free_port)
mkdir -p "$T/nginx/tmp" "$MNT"
cat >"$T/nginx/nginx.conf" <<EOF
user root;
daemon off;
worker_processes 1;
pid $T/nginx/nginx.pid;
error_log $T/nginx/error.log;
events { worker_connections 256; }
http {
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path $T/nginx/tmp/body;
    proxy_temp_path $T/nginx/tmp/proxy;
    fastcgi_temp_path $T/nginx/tmp/fastcgi;
    uwsgi_temp_path $T/nginx/tmp/uwsgi;
    scgi_temp_path $T/nginx/tmp/scgi;
    server {
        listen 127.0.0.1:$PORT;
        root $T/binhost;
    }
}
EOF
nginx -e "$T/nginx/error.log" -p "$T/nginx" -c "$T/nginx/nginx.conf" &
NGINX_PID=$!
URL=http://127.0.0.1:$PORT
for _ in $(seq 100); do
    curl -sf -o /dev/null "$URL/Packages" && break
    kill -0 "$NGINX_PID" 2>/dev/null || die "nginx failed: $(cat "$T/nginx/error.log")"
    sleep 0.1
done
curl -sf -o /dev/null "$URL/Packages" || die "nginx does not serve $URL/Packages"

# --- measurements ------------------------------------------------------------------------------

declare -a CURL READY REMOUNT WALK_COLD WALK_WARM STAT_WALK BASE_COLD BASE_WARM BASE_STAT RSS HWM
COUNT_MNT='' COUNT_BASE=''

for ((r = 1; r <= REPS; r++)); do
    echo "index-scale: round $r/$REPS" >&2
    CURL+=("$(timed curl -sf -o /dev/null "$URL/Packages")")

    # Baseline: the same tree as local sparse files.
    drop_caches
    BASE_COLD+=("$(timed sh -c "find '$T/binhost' -type f | wc -l")")
    COUNT_BASE=$(cat "$T/last.out")
    BASE_WARM+=("$(timed sh -c "find '$T/binhost' -type f | wc -l")")
    BASE_STAT+=("$(timed sh -c "find '$T/binhost' -type f -printf '%s %T@\n' | wc -l")")

    # binpkgfs, first mount: empty cache dir.
    rm -rf "$T/cache"
    READY+=("$(timed "$BINPKGFS" mount --cache-dir "$T/cache" --log-file "$T/binpkgfs.log" \
        --pid-file "$T/binpkgfs.pid" "$URL" "$MNT")")
    PID=$(cat "$T/binpkgfs.pid")
    WALK_COLD+=("$(timed sh -c "find '$MNT' -type f | wc -l")")
    COUNT_MNT=$(cat "$T/last.out")
    WALK_WARM+=("$(timed sh -c "find '$MNT' -type f | wc -l")")
    STAT_WALK+=("$(timed sh -c "find '$MNT' -type f -printf '%s %T@\n' | wc -l")")
    RSS+=("$(awk '/^VmRSS:/ {print $2}' "/proc/$PID/status")")
    HWM+=("$(awk '/^VmHWM:/ {print $2}' "/proc/$PID/status")")
    umount "$MNT"
    for _ in $(seq 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.05; done

    # Remount: the saved index is in the cache dir, nginx answers 304.
    REMOUNT+=("$(timed "$BINPKGFS" mount --cache-dir "$T/cache" --log-file "$T/binpkgfs.log" \
        --pid-file "$T/binpkgfs.pid" "$URL" "$MNT")")
    PID=$(cat "$T/binpkgfs.pid")
    umount "$MNT"
    for _ in $(seq 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.05; done
done

# Packages.gz beside Packages (what Portage publishes): the mount asks for it first. Measured
# after the plain rounds, alternating with a plain-only mount in each round.
gzip -6 -k -c "$T/binhost/Packages" >"$T/binhost/Packages.gz"
GZ_BYTES=$(stat -c %s "$T/binhost/Packages.gz")
declare -a READY_GZ READY_PLAIN CURL_GZ
for ((r = 1; r <= REPS; r++)); do
    echo "index-scale: Packages.gz round $r/$REPS" >&2
    CURL_GZ+=("$(timed sh -c "curl -sf '$URL/Packages.gz' | gzip -dc >/dev/null")")
    rm -rf "$T/cache"
    READY_GZ+=("$(timed "$BINPKGFS" mount --cache-dir "$T/cache" --log-file "$T/binpkgfs.log" \
        --pid-file "$T/binpkgfs.pid" "$URL" "$MNT")")
    PID=$(cat "$T/binpkgfs.pid")
    cmp -s "$MNT/Packages" "$T/binhost/Packages" || die "the mount does not serve Packages.gz's bytes"
    umount "$MNT"
    for _ in $(seq 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.05; done
    mv "$T/binhost/Packages.gz" "$T/Packages.gz.aside"
    rm -rf "$T/cache"
    READY_PLAIN+=("$(timed "$BINPKGFS" mount --cache-dir "$T/cache" --log-file "$T/binpkgfs.log" \
        --pid-file "$T/binpkgfs.pid" "$URL" "$MNT")")
    PID=$(cat "$T/binpkgfs.pid")
    umount "$MNT"
    for _ in $(seq 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.05; done
    mv "$T/Packages.gz.aside" "$T/binhost/Packages.gz"
done

[[ $COUNT_MNT == "$COUNT_BASE" ]] ||
    die "the mount shows $COUNT_MNT files, the local tree $COUNT_BASE"

# --- report ------------------------------------------------------------------------------------

verdict() { # value bound stretch -> PASS/FAIL (+ stretch)
    awk -v v="$1" -v b="$2" -v s="$3" 'BEGIN {
        printf "%s", (v < b) ? "PASS" : "FAIL";
        printf " (stretch %s)", (v < s) ? "met" : "missed" }'
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

m_curl=$(median "${CURL[@]}")
m_ready=$(median "${READY[@]}")
m_remount=$(median "${REMOUNT[@]}")
m_cold=$(median "${WALK_COLD[@]}")
m_warm=$(median "${WALK_WARM[@]}")
m_stat=$(median "${STAT_WALK[@]}")
m_bcold=$(median "${BASE_COLD[@]}")
m_bwarm=$(median "${BASE_WARM[@]}")
m_bstat=$(median "${BASE_STAT[@]}")
m_rss=$(mib "$(median "${RSS[@]}")")
m_hwm=$(mib "$(median "${HWM[@]}")")
base_note="local sparse tree"
[[ ${BENCH_DROP_CACHES:-0} == 1 ]] || base_note="local sparse tree (page cache warm)"

echo
echo "binpkgfs index scale: $ENTRIES entries, Packages $INDEX_BYTES bytes, $COUNT_MNT files;" \
    "median of $REPS; $(nproc) CPUs"
echo "binary: $BINPKGFS"
printf '%-22s %12s  %-38s %12s  %s\n' "measure" "binpkgfs" "baseline" "baseline" "bound (stretch)"
printf '%-22s %12s  %-38s %12s  %s\n' "-------" "--------" "--------" "--------" "---------------"
printf '%-22s %11ss  %-38s %11ss  %s\n' "mount ready (cold)" "$m_ready" "curl -o /dev/null Packages" \
    "$m_curl" "< 3 s (< 1 s): $(verdict "$m_ready" 3 1)"
printf '%-22s %11ss  %-38s %11ss  %s\n' "mount ready (saved)" "$m_remount" "curl -o /dev/null Packages" \
    "$m_curl" "(not bounded)"
printf '%-22s %11ss  %-38s %11ss  %s\n' "walk, cold" "$m_cold" "$base_note" "$m_bcold" \
    "< 3 s (< 1 s): $(verdict "$m_cold" 3 1)"
printf '%-22s %11ss  %-38s %11ss  %s\n' "walk, warm" "$m_warm" "$base_note" "$m_bwarm" \
    "< 3 s (< 1 s): $(verdict "$m_warm" 3 1)"
printf '%-22s %11ss  %-38s %11ss  %s\n' "stat walk (lstat all)" "$m_stat" "$base_note" "$m_bstat" \
    "(not bounded)"
printf '%-22s %10sMi  %-38s %12s  %s\n' "daemon VmRSS" "$m_rss" "-" "-" \
    "< 200 MiB (< 100 MiB): $(verdict "$m_rss" 200 100)"
printf '%-22s %10sMi  %-38s %12s  %s\n' "daemon VmHWM (peak)" "$m_hwm" "-" "-" \
    "< 200 MiB (< 100 MiB): $(verdict "$m_hwm" 200 100)"
printf '%-22s %11ss  %-38s %11ss  %s\n' "ready, Packages.gz" "$(median "${READY_GZ[@]}")" \
    "curl Packages.gz | gzip -d" "$(median "${CURL_GZ[@]}")" \
    "plain-only mount, same rounds: $(median "${READY_PLAIN[@]}") s"
echo "index bytes over the wire: Packages.gz $GZ_BYTES, Packages $INDEX_BYTES" \
    "($(awk -v g="$GZ_BYTES" -v p="$INDEX_BYTES" 'BEGIN { printf "%.1f%%", 100 * g / p }'))"
echo
echo "all runs (s): curl ${CURL[*]} | ready ${READY[*]} | remount ${REMOUNT[*]}"
echo "  walk cold ${WALK_COLD[*]} | warm ${WALK_WARM[*]} | stat ${STAT_WALK[*]}"
echo "  local cold ${BASE_COLD[*]} | warm ${BASE_WARM[*]} | stat ${BASE_STAT[*]}"
echo "  VmRSS KiB ${RSS[*]} | VmHWM KiB ${HWM[*]}"
echo "  ready gz ${READY_GZ[*]} | ready plain-only ${READY_PLAIN[*]} | curl gz ${CURL_GZ[*]}"
