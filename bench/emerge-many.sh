#!/usr/bin/env bash
# emerge-many.sh: one merge of many small packages and a few big ones (issue 15.3), near and far.
#
# emerge-shaped.sh with SET=many: 100 packages of 50 KiB to 2 MiB (deterministic log-uniform sizes,
# incompressible), 3 of 30 MiB and one meta package, installed over a 200 Mbit/s link (tbf) at
# RTT 0 and 150 ms (delay-proxy.py), cases local / portage / cold alternating per round, median
# of 5 with the spread; the table gives each case against local (target: cold <= 1.03x local at
# 150 ms). Every variable of emerge-shaped.sh applies (RATE, RTT_MS, REPS, CASES, BENCH_DIR, ...),
# plus MANY_SMALL, MANY_BIG and BIG_MIB for a smaller set.
set -euo pipefail
export BENCH_NAME=emerge-many SET=many RATE=${RATE:-200mbit} RTT_MS=${RTT_MS:-0 150}
export CASES=${CASES:-local portage cold}
exec "$(dirname "${BASH_SOURCE[0]}")/emerge-shaped.sh" "$@"
