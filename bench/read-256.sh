#!/usr/bin/env bash
# Sequential reads of one large package, binpkgfs beside its baselines (issue 5, issue 15.1):
#   cold: `cat` through a fresh mount with an empty cache   vs  `curl -o /dev/null` of the URL
#   warm: `cat` through a fresh mount, package cached         vs  `cat` of a local copy
# from a real nginx, over loopback or (RATE=) a shaped link. Prints the median of REPS runs
# with the spread, and the ratios.
#
#   bench/read-256.sh            # SIZE_MIB=256 REPS=3, loopback
#   RATE=1gbit bench/read-256.sh # nginx in a network namespace, veth shaped with tbf (issue 15.1)
#   LIMIT_RATE=25m SIZE_MIB=64 bench/read-256.sh   # nginx caps each connection at 25 MB/s
#
# The cold read is timed twice: with the default parallel ranged parts, and with
# `-o streams=1` (one connection per package). With LIMIT_RATE, curl (one connection) is
# capped and the parts are not: that is the case they are for. RATE= shapes the link with the
# same netns + tbf set-up as emerge-shaped.sh (bench/lib.sh); RTT_MS= adds delay-proxy.py.
#
# Needs root (FUSE), nginx, curl, bc, and a release build (BINPKGFS= to point at another
# binary); with RATE, iproute2. The local copy's page cache is warm for the `cat` baseline, as
# the cached file's is after the first warm read; both are read once before timing.
set -euo pipefail

BENCH_NAME=read-256
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/lib.sh
. "$HERE/lib.sh"
size_mib=${SIZE_MIB:-256}
reps=${REPS:-3}
RATE=${RATE:-}
bench_setup nginx curl bc python3 mountpoint ${RATE:+ip tc}
work=$T

# The binhost: one incompressible package and its index.
mkdir -p "$work/binhost/app-misc/big" "$work/mnt" "$work/nginx"
pkg=app-misc/big/big-1-1.gpkg.tar
head -c $((size_mib << 20)) /dev/urandom >"$work/binhost/$pkg"
file=$work/binhost/$pkg
{
	printf 'TIMESTAMP: %s\nVERSION: 0\n\n' "$(date +%s)"
	printf 'CPV: app-misc/big-1\nPATH: %s\nSIZE: %s\nMTIME: %s\n' \
		"$pkg" "$(stat -c %s "$file")" "$(stat -c %Y "$file")"
	printf 'SHA1: %s\nMD5: %s\n\n' "$(sha1sum "$file" | cut -d' ' -f1)" \
		"$(md5sum "$file" | cut -d' ' -f1)"
} >"$work/binhost/Packages"

start_binhost "$work/binhost"
set_rtt "${RTT_MS:-0}"
url=$URL

timed() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); printf '%.3f' "$(echo "$t1 - $t0" | bc -l)"; }
mount_it() { mount_binpkgfs --no-prefetch "$@"; }
umount_it() { unmount_binpkgfs; }

# What Portage's own client does per package: download to a file, then check MD5 and SHA1.
portage_client() { curl -s -o "$work/dl" "$url/$pkg" && md5sum "$work/dl" && sha1sum "$work/dl"; }

curl_t=() cold_t=() one_t=() warm_t=() local_t=() client_t=() all_t=()
cat "$file" >/dev/null
for r in $(seq "$reps"); do
	echo "read-256: round $r/$reps" >&2
	curl_t+=("$(timed curl -s -o /dev/null "$url/$pkg")")
	client_t+=("$(timed portage_client)")
	rm -f "$work/dl"
	rm -rf "$work/cache"
	mount_it
	cold_t+=("$(timed cat "$work/mnt/$pkg")")
	umount_it
	rm -rf "$work/cache"
	mount_it -o verify=all
	all_t+=("$(timed cat "$work/mnt/$pkg")")
	umount_it
	rm -rf "$work/cache"
	mount_it -o streams=1
	one_t+=("$(timed cat "$work/mnt/$pkg")")
	umount_it
	mount_it # fresh mount: no page cache for the FUSE inode; the cache has the file
	cat "$work/cache/objects/"* >/dev/null
	warm_t+=("$(timed cat "$work/mnt/$pkg")")
	umount_it
	local_t+=("$(timed cat "$file")")
done

p=$(median "${client_t[@]}") a=$(median "${all_t[@]}")
c=$(median "${curl_t[@]}") k=$(median "${cold_t[@]}") o=$(median "${one_t[@]}") w=$(median "${warm_t[@]}") l=$(median "${local_t[@]}")
mib=$size_mib
target=0.9
[[ -n $RATE ]] && target=0.95 # issue 15.1: on a shaped 1 Gbit/s link
printf '\nbinpkgfs sequential read of a %s MiB package, nginx over %s%s, median of %s, %s CPUs\n' \
	"$mib" "$(link_name)" "${LIMIT_RATE:+ (limit_rate $LIMIT_RATE per connection)}" "$reps" "$(nproc)"
printf '%-34s %9s %10s   %-28s %9s %10s   %s\n' case s MiB/s baseline s MiB/s ratio
printf '%-34s %9.3f %10.0f   %-28s %9.3f %10.0f   %.2fx (target >= %sx)\n' \
	"cold: cat through the mount" "$k" "$(echo "$mib / $k" | bc -l)" \
	"curl -o /dev/null" "$c" "$(echo "$mib / $c" | bc -l)" "$(echo "$c / $k" | bc -l)" "$target"
printf '%-34s %9.3f %10.0f   %-28s %9.3f %10.0f   %.2fx (target >= 1.0x)\n' \
	"cold (SIZE + strongest digest)" "$k" "$(echo "$mib / $k" | bc -l)" \
	"curl -o F; md5sum F; sha1sum F" "$p" "$(echo "$mib / $p" | bc -l)" "$(echo "$p / $k" | bc -l)"
printf '%-34s %9.3f %10.0f   %-28s %9.3f %10.0f   %.2fx\n' \
	"cold, -o verify=all" "$a" "$(echo "$mib / $a" | bc -l)" \
	"curl -o F; md5sum F; sha1sum F" "$p" "$(echo "$mib / $p" | bc -l)" "$(echo "$p / $a" | bc -l)"
printf '%-34s %9.3f %10.0f   %-28s %9.3f %10.0f   %.2fx\n' \
	"cold, -o streams=1" "$o" "$(echo "$mib / $o" | bc -l)" \
	"curl -o /dev/null" "$c" "$(echo "$mib / $c" | bc -l)" "$(echo "$c / $o" | bc -l)"
printf '%-34s %9.3f %10.0f   %-28s %9.3f %10.0f   %.2fx (target >= 0.9x)\n' \
	"warm: cat after remount" "$w" "$(echo "$mib / $w" | bc -l)" \
	"cat of a local copy" "$l" "$(echo "$mib / $l" | bc -l)" "$(echo "$l / $w" | bc -l)"
printf 'spread (min-max, s): curl %s | cold %s | verify=all %s | portage client %s | one stream %s | warm %s | local %s\n' \
	"$(spread "${curl_t[@]}")" "$(spread "${cold_t[@]}")" "$(spread "${all_t[@]}")" "$(spread "${client_t[@]}")" \
	"$(spread "${one_t[@]}")" "$(spread "${warm_t[@]}")" "$(spread "${local_t[@]}")"
printf 'portage client %s | verify=all %s\n' "${client_t[*]}" "${all_t[*]}"
printf 'all runs (s): curl %s | cold %s | cold, one stream %s | warm %s | local %s\n' \
	"${curl_t[*]}" "${cold_t[*]}" "${one_t[*]}" "${warm_t[*]}" "${local_t[*]}"
