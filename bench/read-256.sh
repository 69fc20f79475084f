#!/usr/bin/env bash
# Sequential reads of one large package, binpkgfs beside its baselines (issue 5):
#   cold: `cat` through a fresh mount with an empty cache   vs  `curl -o /dev/null` of the URL
#   warm: `cat` through a fresh mount, package cached         vs  `cat` of a local copy
# over loopback, from a real nginx. Prints the median of REPS runs and the ratios.
#
#   bench/read-256.sh            # SIZE_MIB=256 REPS=3
#   LIMIT_RATE=25m SIZE_MIB=64 bench/read-256.sh   # nginx caps each connection at 25 MB/s
#
# The cold read is timed twice: with the default parallel ranged parts, and with
# `-o streams=1` (one connection per package). With LIMIT_RATE, curl (one connection) is
# capped and the parts are not: that is the case they are for.
#
# Needs root (FUSE), nginx, curl, and a release build (BINPKGFS= to point at another binary).
# The local copy's page cache is warm for the `cat` baseline, as the cached file's is after the
# first warm read; both are read once before timing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${BINPKGFS:-$here/../target/release/binpkgfs}
size_mib=${SIZE_MIB:-256}
reps=${REPS:-3}
work=$(mktemp -d /tmp/binpkgfs-read256.XXXXXX)
nginx_pid=

cleanup() {
	set +e
	if mountpoint -q "$work/mnt" 2>/dev/null; then umount "$work/mnt" || umount -l "$work/mnt"; fi
	[[ -n $nginx_pid ]] && kill "$nginx_pid" 2>/dev/null && wait "$nginx_pid" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT

[[ -x $bin ]] || { echo "no binpkgfs at $bin (cargo build --release)" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }

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

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/nginx/nginx.conf" <<EOF
daemon off; master_process off; user root; worker_processes 1;
error_log $work/nginx/error.log; pid $work/nginx/nginx.pid;
events { worker_connections 64; }
http {
  access_log off; sendfile on; tcp_nopush on; ${LIMIT_RATE:+limit_rate $LIMIT_RATE;}
  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx;
  fastcgi_temp_path $work/nginx; uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
  server { listen 127.0.0.1:$port; root $work/binhost; }
}
EOF
/usr/sbin/nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" &
nginx_pid=$!
for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$port/Packages" && break; sleep 0.1; done
url=http://127.0.0.1:$port

secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc -l; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mount_it() { "$bin" mount --no-prefetch --cache-dir "$work/cache" --pid-file "$work/pid" "$@" "$url" "$work/mnt"; }
# The daemon's argv names no mount point (its config comes on stdin): wait for its pid.
umount_it() {
	local pid
	pid=$(cat "$work/pid")
	umount "$work/mnt"
	while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
}

# What Portage's own client does per package: download to a file, then check MD5 and SHA1.
portage_client() { curl -s -o "$work/dl" "$url/$pkg" && md5sum "$work/dl" && sha1sum "$work/dl"; }

curl_t=() cold_t=() one_t=() warm_t=() local_t=() client_t=() all_t=()
cat "$file" >/dev/null
for r in $(seq "$reps"); do
	echo "read-256: round $r/$reps" >&2
	curl_t+=("$(secs curl -s -o /dev/null "$url/$pkg")")
	client_t+=("$(secs portage_client)")
	rm -f "$work/dl"
	rm -rf "$work/cache"
	mount_it
	cold_t+=("$(secs cat "$work/mnt/$pkg")")
	umount_it
	rm -rf "$work/cache"
	mount_it -o verify=all
	all_t+=("$(secs cat "$work/mnt/$pkg")")
	umount_it
	rm -rf "$work/cache"
	mount_it -o streams=1
	one_t+=("$(secs cat "$work/mnt/$pkg")")
	umount_it
	mount_it # fresh mount: no page cache for the FUSE inode; the cache has the file
	cat "$work/cache/objects/"* >/dev/null
	warm_t+=("$(secs cat "$work/mnt/$pkg")")
	umount_it
	local_t+=("$(secs cat "$file")")
done

p=$(median "${client_t[@]}") a=$(median "${all_t[@]}")
c=$(median "${curl_t[@]}") k=$(median "${cold_t[@]}") o=$(median "${one_t[@]}") w=$(median "${warm_t[@]}") l=$(median "${local_t[@]}")
mib=$size_mib
printf '\nbinpkgfs sequential read of a %s MiB package, loopback nginx%s, median of %s, %s CPUs\n' \
	"$mib" "${LIMIT_RATE:+ (limit_rate $LIMIT_RATE per connection)}" "$reps" "$(nproc)"
printf '%-34s %9s %10s   %-28s %9s %10s   %s\n' case s MiB/s baseline s MiB/s ratio
printf '%-34s %9.3f %10.0f   %-28s %9.3f %10.0f   %.2fx (target >= 0.9x)\n' \
	"cold: cat through the mount" "$k" "$(echo "$mib / $k" | bc -l)" \
	"curl -o /dev/null" "$c" "$(echo "$mib / $c" | bc -l)" "$(echo "$c / $k" | bc -l)"
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
printf 'portage client %s | verify=all %s\n' "${client_t[*]}" "${all_t[*]}"
printf 'all runs (s): curl %s | cold %s | cold, one stream %s | warm %s | local %s\n' \
	"${curl_t[*]}" "${cold_t[*]}" "${one_t[*]}" "${warm_t[*]}" "${local_t[*]}"
