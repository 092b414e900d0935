#!/usr/bin/env bash
# Load benchmark: cascade vs nginx as reverse proxies in front of the same two static origins,
# on 127.0.0.1 only, for a bounded time. See benches/README.md.
#
#   benches/load.sh                          # defaults: THREADS=1 CONNS=32 DURATION=10s
#   THREADS=2 DURATION=30s ROUNDS=3 CPU=1 benches/load.sh
#
# Knobs (environment):
#   THREADS=1        worker threads of cascade = worker processes of nginx
#   CONNS=32         wrk connections;  WRK_THREADS=2  wrk threads
#   DURATION=10s     measured wrk run (wrk syntax: 10s, 1m);  WARMUP=2s  before each run (0 = none)
#   ROUNDS=1         cascade/nginx alternations per scenario; the table shows medians
#   SCENARIOS="pass fallback"
#   CPU=0            1: also report proxy CPU time per request (from /proc/PID/stat)
#   PIN=0            1: pin the proxy to CPUs 0..THREADS-1 and wrk + origins to the others
#   BUILD=1          0: skip `cargo build --release` (use CASCADE_BIN as it is)
#   CASCADE_BIN      default $CARGO_TARGET_DIR/release/cascade
#   NGINX, WRK, CURL paths of the tools;  KEEP=1 keeps the work directory (path printed)
#
# Needs nginx, wrk and curl (scripts/deps.sh --bench installs them on Debian).
set -euo pipefail

THREADS=${THREADS:-1}
CONNS=${CONNS:-32}
WRK_THREADS=${WRK_THREADS:-2}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
ROUNDS=${ROUNDS:-1}
SCENARIOS=${SCENARIOS:-pass fallback}
CPU=${CPU:-0}
PIN=${PIN:-0}
BUILD=${BUILD:-1}
KEEP=${KEEP:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/benches"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/cascade-target}"
CASCADE_BIN=${CASCADE_BIN:-$CARGO_TARGET_DIR/release/cascade}
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
WRK=${WRK:-$(command -v wrk || echo wrk)}
CURL=${CURL:-$(command -v curl || echo curl)}

OBJ_SIZE=4096
STARTUP_TRIES=100 # × 0.1 s: the longest wait for a server to accept

log() { printf '%s\n' "load.sh: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# ---------------------------------------------------------------------------- arguments
# need_uint NAME MIN: the variable NAME holds an integer >= MIN.
need_uint() {
  local v=${!1}
  if ! [[ $v =~ ^[0-9]+$ ]] || [ "$v" -lt "$2" ]; then die "$1 must be an integer >= $2 (got '$v')"; fi
}
need_uint THREADS 1
need_uint CONNS 1
need_uint WRK_THREADS 1
need_uint ROUNDS 1
[ "$CONNS" -ge "$WRK_THREADS" ] || die "CONNS ($CONNS) must be >= WRK_THREADS ($WRK_THREADS)"

# wrk duration ("10", "10s", "2m", "1h") in seconds, for the outer timeouts.
to_secs() {
  [[ $1 =~ ^([0-9]+)([smh]?)$ ]] || return 1
  local n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]}
  case $u in
  m) echo $((n * 60)) ;;
  h) echo $((n * 3600)) ;;
  *) echo "$n" ;;
  esac
}
DURATION_S=$(to_secs "$DURATION") || DURATION_S=0
[ "$DURATION_S" -ge 1 ] || die "DURATION must look like 10s, 2m (got '$DURATION')"
WARMUP_S=$(to_secs "$WARMUP") || die "WARMUP must look like 2s, 0 (got '$WARMUP')"
for s in $SCENARIOS; do
  case $s in pass | fallback) ;; *) die "unknown scenario '$s' (known: pass fallback)" ;; esac
done

for tool in "$NGINX" "$WRK" "$CURL"; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (scripts/deps.sh --bench installs nginx and wrk)"
done
"$NGINX" -h 2>&1 | grep -q -- ' -e ' || die "$NGINX lacks -e (nginx >= 1.19.5 is needed)"

NCPU=$(getconf _NPROCESSORS_ONLN)
PROXY_CPUS="" LOAD_CPUS=""
if [ "$PIN" = 1 ]; then
  command -v taskset >/dev/null 2>&1 || die "PIN=1 needs taskset (util-linux)"
  [ "$THREADS" -lt "$NCPU" ] || die "PIN=1 needs THREADS < CPUs ($NCPU) to leave a CPU for wrk and origins"
  PROXY_CPUS="0-$((THREADS - 1))"
  LOAD_CPUS="$THREADS-$((NCPU - 1))"
fi
# Run "$@" pinned to CPU list $1 (when PIN=1); exec keeps the PID the one of the program.
pinned() {
  local cpus=$1
  shift
  if [ -n "$cpus" ]; then exec taskset -c "$cpus" "$@"; else exec "$@"; fi
}

# ---------------------------------------------------------------------------- cleanup
WORK=""
PIDS=()
WRK_PID=""
cleanup() {
  local rc=$? pid kids i
  trap - EXIT INT TERM
  if [ -n "$WRK_PID" ]; then kill -TERM "$WRK_PID" 2>/dev/null || true; fi
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    # nginx masters stop their workers on TERM; cascade exits after its 1 s grace period.
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      kids=$(pgrep -P "$pid" || true)
      log "pid $pid did not stop within 5 s: killing it${kids:+ and its children $kids}"
      # shellcheck disable=SC2086 # word splitting of the child list is intended
      kill -KILL "$pid" $kids 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
  if [ -n "$WORK" ] && [ -d "$WORK" ]; then
    if [ "$KEEP" = 1 ]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---------------------------------------------------------------------------- build
if [ "$BUILD" = 1 ]; then
  log "building cascade (release, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
fi
[ -x "$CASCADE_BIN" ] || die "no cascade binary at $CASCADE_BIN"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cascade-bench.XXXXXX")

# ---------------------------------------------------------------------------- helpers
# Is something accepting on 127.0.0.1:$1? (bounded: 1 s)
# shellcheck disable=SC2016 # $0 is expanded by the inner bash
accepting() { timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null; }

# pick_port VAR: a free port below the usual ephemeral range (so no client socket holds it).
USED_PORTS=" "
pick_port() {
  local p i
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 12000))
    case $USED_PORTS in *" $p "*) continue ;; esac
    if ! accepting "$p"; then
      USED_PORTS+="$p "
      printf -v "$1" '%s' "$p"
      return 0
    fi
  done
  die "no free port found on 127.0.0.1"
}

# render TEMPLATE OUT KEY=VALUE...: replace every @KEY@ in TEMPLATE.
render() {
  local tpl=$1 out=$2 script="" kv k v
  shift 2
  for kv in "$@"; do
    k=${kv%%=*} v=${kv#*=}
    v=${v//\\/\\\\} v=${v//|/\\|} v=${v//&/\\&}
    script+="s|@${k}@|${v}|g;"
  done
  sed "$script" "$tpl" >"$out"
  if grep -q '@[A-Z_]*@' "$out"; then die "unsubstituted placeholder in $out: $(grep -o '@[A-Z_]*@' "$out" | head -1)"; fi
}

# wait_accept NAME PORT PID LOGFILE: bounded wait until PORT accepts; fails fast if PID exits.
wait_accept() {
  local name=$1 port=$2 pid=$3 logf=$4 i
  for ((i = 0; i < STARTUP_TRIES; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$name exited during startup; last lines of $logf:"
      tail -n 20 "$logf" >&2 || true
      die "$name did not start"
    fi
    accepting "$port" && return 0
    sleep 0.1
  done
  tail -n 20 "$logf" >&2 || true
  die "$name did not accept on 127.0.0.1:$port within $((STARTUP_TRIES / 10)) s"
}

if [ "$(id -u)" = 0 ]; then
  # As root, nginx would switch its workers to `nobody`, who cannot read the work directory.
  NGINX_USER="user $(id -un) $(id -gn);"
else
  NGINX_USER="# not root: the workers run as the current user"
fi

# start_nginx NAME CONF_TEMPLATE CPUS KEY=VALUE...: render, test and start one nginx in
# the foreground (daemon off) under $WORK/NAME; sets LAST_PID.
start_nginx() {
  local name=$1 tpl=$2 cpus=$3 dir="$WORK/$1"
  shift 3
  mkdir -p "$dir"
  render "$tpl" "$dir/nginx.conf" DIR="$dir" USER="$NGINX_USER" "$@"
  "$NGINX" -t -q -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" >"$dir/test.log" 2>&1 ||
    {
      cat "$dir/test.log" >&2
      die "nginx config $dir/nginx.conf is invalid"
    }
  (pinned "$cpus" "$NGINX" -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g 'daemon off;') \
    >"$dir/stdout.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# ---------------------------------------------------------------------------- origins
pick_port MAIN_PORT
pick_port FB_PORT
pick_port NGINX_PORT
pick_port CASCADE_PORT
pick_port METRICS_PORT

mkdir -p "$WORK/fixtures/main" "$WORK/fixtures/fallback"
head -c "$OBJ_SIZE" /dev/urandom >"$WORK/fixtures/main/main-4k.bin"
head -c "$OBJ_SIZE" /dev/urandom >"$WORK/fixtures/fallback/fb-4k.bin" # only in fallback

start_nginx origin-main "$BENCH/nginx/origin.conf.template" "$LOAD_CPUS" \
  NAME=main ROOT="$WORK/fixtures/main" PORT="$MAIN_PORT"
MAIN_PID=$LAST_PID
start_nginx origin-fallback "$BENCH/nginx/origin.conf.template" "$LOAD_CPUS" \
  NAME=fallback ROOT="$WORK/fixtures/fallback" PORT="$FB_PORT"
FB_PID=$LAST_PID
wait_accept "origin main" "$MAIN_PORT" "$MAIN_PID" "$WORK/origin-main/error.log"
wait_accept "origin fallback" "$FB_PORT" "$FB_PID" "$WORK/origin-fallback/error.log"

# ---------------------------------------------------------------------------- proxies
start_nginx nginx "$BENCH/nginx/proxy.conf.template" "$PROXY_CPUS" \
  THREADS="$THREADS" PORT="$NGINX_PORT" MAIN_PORT="$MAIN_PORT" FB_PORT="$FB_PORT"
NGINX_PID=$LAST_PID

mkdir -p "$WORK/cascade/run"
render "$BENCH/cascade.yaml.template" "$WORK/cascade/gen.yaml" DIR="$WORK/cascade" \
  THREADS="$THREADS" PORT="$CASCADE_PORT" METRICS_PORT="$METRICS_PORT" \
  MAIN_PORT="$MAIN_PORT" FB_PORT="$FB_PORT"
"$CASCADE_BIN" check -c "$WORK/cascade/gen.yaml" >"$WORK/cascade/check.log" 2>&1 ||
  {
    cat "$WORK/cascade/check.log" >&2
    die "cascade rejected the generated config"
  }
(pinned "$PROXY_CPUS" "$CASCADE_BIN" run -c "$WORK/cascade/gen.yaml") >"$WORK/cascade/cascade.log" 2>&1 &
CASCADE_PID=$!
PIDS+=("$CASCADE_PID")

wait_accept nginx "$NGINX_PORT" "$NGINX_PID" "$WORK/nginx/error.log"
wait_accept cascade "$CASCADE_PORT" "$CASCADE_PID" "$WORK/cascade/cascade.log"

declare -A PORT_OF=([cascade]=$CASCADE_PORT [nginx]=$NGINX_PORT)
declare -A PID_OF=([cascade]=$CASCADE_PID [nginx]=$NGINX_PID)
declare -A PATH_OF=([pass]=/main-4k.bin [fallback]=/fb-4k.bin)
declare -A FROM_OF=([pass]=main [fallback]=fallback)
declare -A FIXTURE_OF=([pass]="$WORK/fixtures/main/main-4k.bin" [fallback]="$WORK/fixtures/fallback/fb-4k.bin")

# ---------------------------------------------------------------------------- checks
# header NAME FILE: the value of the (last) response header NAME in a curl -D dump.
header() { awk -v n="$(tr '[:upper:]' '[:lower:]' <<<"$1")" -F': *' \
  'tolower($1) == n { v = $2 } END { sub(/\r$/, "", v); print v }' "$2"; }

# verify PROXY SCENARIO: one GET must be 200 with the fixture's exact bytes and the right
# X-Served-From; anything else aborts, so a run never measures error pages.
verify() {
  local proxy=$1 sc=$2 code from role
  local url="http://127.0.0.1:${PORT_OF[$proxy]}${PATH_OF[$sc]}" hdr="$WORK/verify.hdr" body="$WORK/verify.body"
  code=$("$CURL" -sS -m 5 -o "$body" -D "$hdr" -w '%{http_code}' "$url") || die "$proxy: GET $url failed"
  from=$(header X-Served-From "$hdr")
  if [ "$code" != 200 ] || ! cmp -s "$body" "${FIXTURE_OF[$sc]}" || [ "$from" != "${FROM_OF[$sc]}" ]; then
    log "$proxy: GET $url gave status $code, $(wc -c <"$body") bytes, X-Served-From '$from'; headers:"
    cat "$hdr" >&2
    die "$proxy fails the $sc check (want 200, the $OBJ_SIZE-byte fixture, X-Served-From ${FROM_OF[$sc]})"
  fi
  if [ "$proxy" = cascade ]; then
    role=$(header X-Served-From-Role "$hdr")
    [ "$role" = "${FROM_OF[$sc]}" ] || log "warning: cascade X-Served-From-Role is '$role' for $sc (README says '${FROM_OF[$sc]}')"
  fi
}

# origin_counts PORT: "accepts requests" of an origin (stub_status; its own request included).
origin_counts() {
  "$CURL" -sS -m 5 "http://127.0.0.1:$1/__origin_status" | awk 'NR == 3 { print $1, $3 }'
}

# cpu_ticks PID: utime+stime of PID and its children (nginx workers), in clock ticks.
cpu_ticks() {
  local p s total=0 f
  for p in "$1" $(pgrep -P "$1" || true); do
    { s=$(<"/proc/$p/stat"); } 2>/dev/null || continue
    s=${s##*) } # drop "pid (comm) ": field 3 (state) comes first
    read -r -a f <<<"$s"
    total=$((total + f[11] + f[12])) # fields 14 (utime) and 15 (stime)
  done
  echo "$total"
}
CLK_TCK=$(getconf CLK_TCK)

# to_ms LATENCY: wrk's "850.00us" / "1.23ms" / "1.02s" / "1.50m" in milliseconds.
to_ms() {
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); m = v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); m = v }
    else if (v ~ /s$/) { sub(/s$/, "", v); m = v * 1000 }
    else if (v ~ /m$/) { sub(/m$/, "", v); m = v * 60000 }
    else if (v ~ /h$/) { sub(/h$/, "", v); m = v * 3600000 }
    else { print "nan"; exit }
    printf "%.3f", m }'
}

run_wrk() { # PROXY SCENARIO DURATION OUTFILE
  local url="http://127.0.0.1:${PORT_OF[$1]}${PATH_OF[$2]}" secs
  secs=$(to_secs "$3")
  # In the background and waited for, so that a signal to this script is handled at once.
  (pinned "$LOAD_CPUS" timeout $((secs + 30)) "$WRK" -t"$WRK_THREADS" -c"$CONNS" -d"$3" \
    --timeout 5s --latency "$url") >"$4" 2>&1 &
  WRK_PID=$!
  if ! wait "$WRK_PID"; then
    WRK_PID=""
    cat "$4" >&2
    die "wrk against $1 failed"
  fi
  WRK_PID=""
}

# ---------------------------------------------------------------------------- measure
declare -A R # R[scenario,proxy,metric] = space-separated values, one per round
add() { R[$1]="${R[$1]:-}${R[$1]:+ }$2"; }

measure() { # PROXY SCENARIO ROUND
  local proxy=$1 sc=$2 round=$3 out="$WORK/wrk-$2-$1-$3.txt"
  local t0 t1 m0 m1 f0 f1 rps p99 reqs non2xx sockerr errs
  verify "$proxy" "$sc"
  if [ "$WARMUP_S" -gt 0 ]; then run_wrk "$proxy" "$sc" "$WARMUP" "$WORK/warmup.txt"; fi
  m0=$(origin_counts "$MAIN_PORT") f0=$(origin_counts "$FB_PORT")
  t0=$(cpu_ticks "${PID_OF[$proxy]}")
  run_wrk "$proxy" "$sc" "$DURATION" "$out"
  t1=$(cpu_ticks "${PID_OF[$proxy]}")
  m1=$(origin_counts "$MAIN_PORT") f1=$(origin_counts "$FB_PORT")
  verify "$proxy" "$sc" # still serving correctly after the load

  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
  p99=$(awk '$1 == "99%" { print $2 }' "$out")
  reqs=$(awk '/ requests in / { print $1 }' "$out")
  non2xx=$(awk -F': *' '/Non-2xx or 3xx responses/ { print $2 }' "$out")
  sockerr=$(awk '/Socket errors/ { gsub(/,/, ""); print $4 + $6 + $8 + $10 }' "$out")
  if [ -z "$rps" ] || [ -z "$p99" ] || ! [[ $reqs =~ ^[0-9]+$ ]] || [ "$reqs" -eq 0 ]; then
    cat "$out" >&2
    die "cannot parse wrk output for $proxy/$sc"
  fi
  errs=$((${non2xx:-0} + ${sockerr:-0}))
  if [ "$errs" -gt 0 ]; then
    log "WARNING: $proxy/$sc round $round: ${non2xx:-0} non-2xx responses, ${sockerr:-0} socket errors:"
    grep -E 'Non-2xx|Socket errors' "$out" >&2 || true
  fi
  add "$sc,$proxy,rps" "$rps"
  add "$sc,$proxy,p99" "$(to_ms "$p99")"
  add "$sc,$proxy,errs" "$errs"
  add "$sc,$proxy,reqs" "$reqs"
  add "$sc,$proxy,cpu" "$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", d * 1e6 / hz / n }')"
  # Upstream connections opened and requests made per 1000 client requests (minus the
  # status request itself).
  add "$sc,$proxy,mconn" "$(awk -v a="$m0" -v b="$m1" -v n="$reqs" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.1f", (y[1] - x[1] - 1) * 1000 / n }')"
  add "$sc,$proxy,fconn" "$(awk -v a="$f0" -v b="$f1" -v n="$reqs" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.1f", (y[1] - x[1] - 1) * 1000 / n }')"
  add "$sc,$proxy,mreq" "$(awk -v a="$m0" -v b="$m1" -v n="$reqs" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.2f", (y[2] - x[2] - 1) / n }')"
  add "$sc,$proxy,freq" "$(awk -v a="$f0" -v b="$f1" -v n="$reqs" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.2f", (y[2] - x[2] - 1) / n }')"
  log "  $sc round $round $proxy: $rps req/s, p99 $p99, $reqs requests, $errs errors"
}

log "cascade $("$CASCADE_BIN" --version 2>/dev/null | awk '{ print $NF }'), $("$NGINX" -v 2>&1 | sed 's/.*: //'), $("$WRK" -v 2>&1 | head -1 | awk '{ print $1, $2 }')"
log "THREADS=$THREADS CONNS=$CONNS WRK_THREADS=$WRK_THREADS DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS PIN=$PIN CPUs=$NCPU"
for sc in $SCENARIOS; do
  for ((round = 1; round <= ROUNDS; round++)); do
    # Alternate who goes first, so neither always runs on a warmer (or hotter) machine.
    if ((round % 2)); then order="cascade nginx"; else order="nginx cascade"; fi
    for proxy in $order; do measure "$proxy" "$sc" "$round"; done
  done
done

# ---------------------------------------------------------------------------- report
median() { tr ' ' '\n' <<<"$1" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
sum() { tr ' ' '\n' <<<"$1" | awk '{ s += $1 } END { print s + 0 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }

echo
echo "cascade vs nginx: THREADS=$THREADS CONNS=$CONNS DURATION=$DURATION (wrk -t$WRK_THREADS), 4 KiB objects, loopback$([ "$ROUNDS" -gt 1 ] && echo ", median of $ROUNDS rounds")"
echo "ratio = cascade / nginx: req/s above 1 is better for cascade; p99 and CPU below 1 are better for cascade"
hdr=$(printf '%-9s %12s %12s %6s %11s %11s %6s' scenario "cascade r/s" "nginx r/s" ratio "cascade p99" "nginx p99" ratio)
[ "$CPU" = 1 ] && hdr+=$(printf ' %11s %11s %6s' "cascade CPU" "nginx CPU" ratio)
echo "$hdr"
lines=()
for sc in $SCENARIOS; do
  crps=$(median "${R[$sc,cascade,rps]}") nrps=$(median "${R[$sc,nginx,rps]}")
  cp99=$(median "${R[$sc,cascade,p99]}") np99=$(median "${R[$sc,nginx,p99]}")
  ccpu=$(median "${R[$sc,cascade,cpu]}") ncpu=$(median "${R[$sc,nginx,cpu]}")
  cerr=$(sum "${R[$sc,cascade,errs]}") nerr=$(sum "${R[$sc,nginx,errs]}")
  row=$(printf '%-9s %12.0f %12.0f %6s %9.3fms %9.3fms %6s' "$sc" "$crps" "$nrps" "$(ratio "$crps" "$nrps")" \
    "$cp99" "$np99" "$(ratio "$cp99" "$np99")")
  [ "$CPU" = 1 ] && row+=$(printf ' %7.1fus/r %7.1fus/r %6s' "$ccpu" "$ncpu" "$(ratio "$ccpu" "$ncpu")")
  if [ "$cerr" -gt 0 ] || [ "$nerr" -gt 0 ]; then row+="  ! errors: cascade $cerr, nginx $nerr"; fi
  echo "$row"
  line="BENCH scenario=$sc threads=$THREADS conns=$CONNS duration=$DURATION rounds=$ROUNDS"
  line+=" cascade_rps=$crps nginx_rps=$nrps rps_ratio=$(ratio "$crps" "$nrps")"
  line+=" cascade_p99_ms=$cp99 nginx_p99_ms=$np99 p99_ratio=$(ratio "$cp99" "$np99")"
  [ "$CPU" = 1 ] && line+=" cascade_cpu_us_per_req=$ccpu nginx_cpu_us_per_req=$ncpu cpu_ratio=$(ratio "$ccpu" "$ncpu")"
  for p in cascade nginx; do
    line+=" ${p}_errors=$(sum "${R[$sc,$p,errs]}")"
    line+=" ${p}_main_conns_per_1k=$(median "${R[$sc,$p,mconn]}") ${p}_fb_conns_per_1k=$(median "${R[$sc,$p,fconn]}")"
    line+=" ${p}_main_reqs_per_req=$(median "${R[$sc,$p,mreq]}") ${p}_fb_reqs_per_req=$(median "${R[$sc,$p,freq]}")"
  done
  lines+=("$line")
done
echo
echo "upstream connections opened per 1000 client requests (main origin / fallback origin):"
for sc in $SCENARIOS; do
  printf '  %-9s cascade %s / %s   nginx %s / %s\n' "$sc" \
    "$(median "${R[$sc,cascade,mconn]}")" "$(median "${R[$sc,cascade,fconn]}")" \
    "$(median "${R[$sc,nginx,mconn]}")" "$(median "${R[$sc,nginx,fconn]}")"
done
echo
printf '%s\n' "${lines[@]}"

# Anything cascade or nginx complained about during the run (the work directory goes away).
metrics=$("$CURL" -sS -m 5 "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null || true)
bad=$(grep -E '^cascade_upstream_errors_total' <<<"$metrics" | awk '$NF > 0' || true)
[ -z "$bad" ] || {
  echo
  echo "cascade upstream errors (metrics):"
  echo "$bad"
}
# Clients cut off when wrk stops mid-request show up as "Fail to proxy: Downstream ..." in
# cascade's log: expected, a few per run. Anything else is worth a look.
down=$(grep -c 'Fail to proxy: Downstream' "$WORK/cascade/cascade.log" || true)
if [ "${down:-0}" -gt 0 ]; then
  echo
  echo "cascade.log: $down 'Fail to proxy: Downstream ...' errors (clients cut off when each wrk run stops: expected)"
fi
for f in "$WORK/cascade/cascade.log" "$WORK/nginx/error.log" "$WORK/origin-main/error.log" "$WORK/origin-fallback/error.log"; do
  pat='WARN|ERROR|\[(warn|error|crit|alert|emerg)\]'
  n=$(grep -E "$pat" "$f" 2>/dev/null | grep -vc 'Fail to proxy: Downstream' || true)
  if [ "${n:-0}" -gt 0 ]; then
    echo
    echo "${f#"$WORK"/}: $n other warning/error lines, first 5:"
    grep -E "$pat" "$f" | grep -v 'Fail to proxy: Downstream' | head -5
  fi
done
