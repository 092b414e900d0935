#!/usr/bin/env bash
# Load benchmark: cascade vs nginx as reverse proxies (and caches) in front of the same two
# static origins, on 127.0.0.1 only, for a bounded time. See benches/README.md.
#
#   benches/load.sh                          # defaults: THREADS=1 CONNS=32 DURATION=10s
#   THREADS=2 DURATION=30s ROUNDS=3 CPU=1 benches/load.sh
#   SCENARIOS="hit4k hit1m" PROXIES=nginx DURATION=2s benches/load.sh
#
# Knobs (environment):
#   THREADS=1        worker threads of cascade = worker processes of nginx
#   CONNS=32         wrk connections;  WRK_THREADS=2  wrk threads
#   DURATION=10s     measured wrk run (wrk syntax: 10s, 1m);  WARMUP=2s  before each run (0 = none)
#   ROUNDS=1         cascade/nginx alternations per scenario; the table shows medians
#   SCENARIOS="pass fallback hit4k hit1m fallhit plughit"   (see the scenario table below;
#                    plugnoop, not in the default set, is hit4k with three no-op plugins;
#                    plugcall, not in the default set, is hit4k with ext-auth (an HTTP call
#                    per request); plughit64k and plughit1m, not in the default set, are
#                    plughit on a 64 KiB and a 1 MiB object (compared with hit64k / hit1m);
#                    plughit runs the Wasm plugins from plugins/dist, built if missing)
#   PROXIES="cascade nginx"   which proxies to run (one alone: no ratios); add `floor` for the
#                    Pingora floor (benches/floor.rs: a bare ProxyHttp on cascade's Pingora
#                    settings; plain profile only), reported as cascade's own cost above it
#   CPU=0            1: also report proxy CPU time per request (from /proc/PID/stat)
#   STRACE=0         1: after each scenario's first measured run, a separate 3 s run under
#                    `strace -c -f` counts each proxy's system calls per request (not timed)
#   PERF=0           1: likewise a 3 s run under `perf record -g` per proxy; the reports are
#                    kept as perf-SCENARIO-PROXY.txt in the work directory (use with KEEP=1)
#   PIN=0            1: pin the proxy to CPUs 0..THREADS-1 and wrk + origins to the others
#   BUILD=1          0: skip `cargo build --release` (use CASCADE_BIN as it is)
#   CASCADE_BIN      default $CARGO_TARGET_DIR/release/cascade
#   CASCADE_SERVER   extra settings under cascade's `server:`, e.g. 'write_buffer: 0'
#   CACHE_DISK=0     1: give cascade's cache a disk tier too (under the work directory)
#   CACHE_MEMORY=256MiB   cascade's memory tier; objects above a quarter of it are served from
#                    disk (CACHE_DISK=1 CACHE_MEMORY=1MiB: hit1m is a disk hit, hit4k a memory one)
#   NGINX_MAIN404=locked   nginx cache profile, main's 404 in `location /`: locked (not cached,
#                    proxy_cache_lock on), unlocked (not cached, lock off), cached (1m)
#   PLUGIN_BODIES=0  1: the plughit plugins take body callbacks too (bodies: true)
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
SCENARIOS=${SCENARIOS:-pass fallback hit4k hit1m fallhit plughit}
PROXIES=${PROXIES:-cascade nginx}
CPU=${CPU:-0}
PIN=${PIN:-0}
BUILD=${BUILD:-1}
KEEP=${KEEP:-0}
CACHE_DISK=${CACHE_DISK:-0}
CACHE_MEMORY=${CACHE_MEMORY:-256MiB}
NGINX_MAIN404=${NGINX_MAIN404:-locked}
PLUGIN_BODIES=${PLUGIN_BODIES:-0}
STRACE=${STRACE:-0}
PERF=${PERF:-0}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/benches"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/cascade-target}"
CASCADE_BIN=${CASCADE_BIN:-$CARGO_TARGET_DIR/release/cascade}
CASCADE_SERVER=${CASCADE_SERVER:-}
FLOOR_BIN=${FLOOR_BIN:-$CARGO_TARGET_DIR/release/examples/floor}
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
WRK=${WRK:-$(command -v wrk || echo wrk)}
CURL=${CURL:-$(command -v curl || echo curl)}

STARTUP_TRIES=100 # × 0.1 s: the longest wait for a server to accept

# ---------------------------------------------------------------------------- scenarios
# One line per scenario; adding one is adding a line (and, for a new profile, its templates).
#   name      the SCENARIOS word
#   profile   which configs the proxies run: cascade gets benches/cascade.yaml.template for
#             "plain", else benches/cascade-PROFILE.yaml.template; nginx gets
#             benches/nginx/proxy.conf.template for "plain", else nginx/proxy-PROFILE.conf.template.
#             A proxy without a template for the profile sits the scenario out.
#   path      the URL path requested; the fixture is fixtures/ORIGIN/PATH, in that origin only
#   origin    the origin that holds the object = the X-Served-From both proxies must send
#   bytes     fixture size
#   xcache    the X-Cache both proxies must send before and after the measured run (- = none)
#   what      description, for the report
SCENARIO_TABLE='
pass      plain  /main-4k.bin    main      4096     -    no cache; main answers 200
fallback  plain  /fb-4k.bin      fallback  4096     -    no cache; main answers 404, replayed to the fallback
hit4k     cache  /hit-4k.bin     main      4096     HIT  cache hit, 4 KiB object
hit64k    cache  /hit-64k.bin    main      65536    HIT  cache hit, 64 KiB object (an image)
hit1m     cache  /hit-1m.bin     main      1048576  HIT  cache hit, 1 MiB object
fallhit   cache  /fb-hit-4k.bin  fallback  4096     HIT  repeated hit of an object only the fallback has (4 KiB)
plughit   plugins /hit-4k.bin    main      4096     HIT  hit4k with the auth, tenant-router and headers plugins (cascade only)
plughit64k plugins /hit-64k.bin main     65536    HIT  hit64k with the plughit plugins (cascade only)
plughit1m plugins /hit-1m.bin    main      1048576  HIT  hit1m with the plughit plugins (cascade only)
plugnoop  plugnoop /hit-4k.bin   main      4096     HIT  hit4k with three no-op SDK plugins: the ABI floor (cascade only)
plugcall  plugcall /hit-4k.bin   main      4096     HIT  hit4k with ext-auth: one HTTP call per request to a local auth service (cascade only)
pass1m    plain  /hit-1m.bin     main      1048576  -    no cache; a 1 MiB pass-through (main answers 200)
pass2     peers  /main-4k.bin    main      4096     -    pass with main as two round-robin peers (nginx: an upstream of two servers)
passtls   tls    /main-4k.bin    main      4096     -    pass over https to main (both origins https, certificates not checked by either proxy)
fallbacktls tls  /fb-4k.bin      fallback  4096     -    fallback with both origins over https: main answers 404, replayed to the fallback
pass1mtls tls    /hit-1m.bin     main      1048576  -    pass1m over https (a 1 MiB pass-through from an https main)
put64k    plain  /up/put-64k.bin main      65536    -    upload: a 64 KiB PUT streamed to main (nginx WebDAV PUT writes it to a file, then 201)
'
# Targets (issue 3) reported against: scenario -> "metric minimum ratio" (metric: rps or bps).
declare -A TARGET_OF=([hit4k]="rps 1.3" [hit1m]="bps 1.2")
# Request headers a scenario sends (curl checks and wrk alike): plughit's API key.
# Upload scenarios: the request method (the fixture is the body; GET otherwise).
declare -A METHOD_OF=([put64k]=PUT)
declare -A HEADER_OF=([plughit]="x-api-key: bench-key" [plughit64k]="x-api-key: bench-key" [plughit1m]="x-api-key: bench-key")
# Plugin cost (issue 4): scenario -> the scenario it is compared with, on cascade alone,
# and the largest allowed req/s loss.
declare -A PLUGIN_BASE_OF=([plughit]=hit4k [plughit64k]=hit64k [plughit1m]=hit1m [plugnoop]=hit4k [plugcall]=hit4k)
PLUGIN_MAX_COST=0.10
# Balancer cost (issue 13): scenario -> the single-peer scenario it is compared with.
declare -A BALANCER_BASE_OF=([pass2]=pass)
BALANCER_MAX_COST=0.03

declare -A PROFILE_OF PATH_OF FROM_OF SIZE_OF XCACHE_OF WHAT_OF
ALL_SCENARIOS=()
while read -r name profile path from size xcache what; do
  [ -n "$name" ] || continue
  ALL_SCENARIOS+=("$name")
  PROFILE_OF[$name]=$profile PATH_OF[$name]=$path FROM_OF[$name]=$from
  SIZE_OF[$name]=$size XCACHE_OF[$name]=$xcache WHAT_OF[$name]=$what
done <<<"$SCENARIO_TABLE"

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
[ -n "${SCENARIOS// /}" ] || die "SCENARIOS is empty (known: ${ALL_SCENARIOS[*]})"
for s in $SCENARIOS; do
  [ -n "${PROFILE_OF[$s]:-}" ] || die "unknown scenario '$s' (known: ${ALL_SCENARIOS[*]})"
done
case $NGINX_MAIN404 in
# Only main's 404s differ (the fallhit scenario): misses are never measured, and a
# location-level proxy_cache_valid replaces the inherited ones, hence the 200 line again.
locked) MAIN404_CONF="# locked: nothing here (main's 404 is not cached; proxy_cache_lock on is inherited)" ;;
unlocked) MAIN404_CONF="proxy_cache_lock off;  # unlocked: main's 404 is not cached, no lock wait" ;;
cached) MAIN404_CONF="proxy_cache_valid 200 1h; proxy_cache_valid 404 1m;  # cached: main's 404 too" ;;
*) die "NGINX_MAIN404 must be locked, unlocked or cached (got '$NGINX_MAIN404')" ;;
esac
[ -n "${PROXIES// /}" ] || die "PROXIES is empty (known: cascade nginx floor)"
for p in $PROXIES; do
  case $p in cascade | nginx | floor) ;; *) die "unknown proxy '$p' in PROXIES (known: cascade nginx floor)" ;; esac
done
# Canonical order, no duplicates: the report's columns are always cascade then nginx.
RUN_PROXIES=()
for p in cascade nginx floor; do
  case " $PROXIES " in *" $p "*) RUN_PROXIES+=("$p") ;; esac
done
wants() { case " ${RUN_PROXIES[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac }

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
# stop_pids PID...: TERM, a bounded wait, then KILL (with the children) for what is left.
stop_pids() {
  local pid kids i
  for pid in "$@"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "$@"; do
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
    wait "$pid" 2>/dev/null || true
  done
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$WRK_PID" ]; then kill -TERM "$WRK_PID" 2>/dev/null || true; fi
  if [ ${#PIDS[@]} -gt 0 ]; then stop_pids "${PIDS[@]}"; fi
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
if wants floor; then
  if [ "$BUILD" = 1 ]; then
    log "building the Pingora floor (release example, benches/floor.rs)"
    (cd "$ROOT" && cargo build --release --quiet --example floor) || die "cargo build --release --example floor failed"
  fi
  [ -x "$FLOOR_BIN" ] || die "no floor binary at $FLOOR_BIN (cargo build --release --example floor)"
fi
if wants cascade; then
  if [ "$BUILD" = 1 ]; then
    log "building cascade (release, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
    (cd "$ROOT" && cargo build --release --quiet) || die "cargo build --release failed"
  fi
  [ -x "$CASCADE_BIN" ] || die "no cascade binary at $CASCADE_BIN (PROXIES=nginx runs without it)"
  for s in $SCENARIOS; do
    case ${PROFILE_OF[$s]} in plugins | plugnoop | plugcall) ;; *) continue ;; esac
    if [ "$BUILD" = 1 ] || ! ls "$ROOT"/plugins/dist/{auth,tenant-router,headers,noop,ext-auth}.wasm >/dev/null 2>&1; then
      log "building the Wasm plugins (scripts/build-plugins.sh)"
      "$ROOT/scripts/build-plugins.sh" >/dev/null || die "scripts/build-plugins.sh failed"
    fi
    break
  done
fi

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

# start_nginx DIR CONF_TEMPLATE CPUS KEY=VALUE...: render, test and start one nginx in the
# foreground (daemon off) in the (new) directory DIR; sets LAST_PID.
start_nginx() {
  local dir=$1 tpl=$2 cpus=$3
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
pick_port MAIN2_PORT
pick_port FB_PORT
# Each origin also listens with TLS (the tls profile): a self-signed certificate for 127.0.0.1.
pick_port MAIN_TLS_PORT
pick_port MAIN2_TLS_PORT
pick_port FB_TLS_PORT
mkdir -p "$WORK/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
  -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" >"$WORK/tls/openssl.log" 2>&1 ||
  {
    cat "$WORK/tls/openssl.log" >&2
    die "openssl could not make the origins' certificate"
  }
ORIGIN_TLS=(CERT="$WORK/tls/cert.pem" KEY="$WORK/tls/key.pem")

# Each scenario's fixture lives in its origin only (the fallback ones must be 404 on main);
# an upload's is the body it sends (main's WebDAV location writes it to the same path).
for sc in $SCENARIOS; do
  f="$WORK/fixtures/${FROM_OF[$sc]}${PATH_OF[$sc]}"
  if [ "${METHOD_OF[$sc]:-GET}" = PUT ]; then f="$WORK/bodies${PATH_OF[$sc]}"; fi
  if [ ! -f "$f" ]; then
    mkdir -p "$(dirname "$f")"
    head -c "${SIZE_OF[$sc]}" /dev/urandom >"$f"
  fi
done
mkdir -p "$WORK/fixtures/main" "$WORK/fixtures/fallback"
# plugcall's authorization check: an empty 200 from the fallback origin.
: >"$WORK/fixtures/fallback/auth-ok"
fixture_of() { echo "$WORK/fixtures/${FROM_OF[$1]}${PATH_OF[$1]}"; }

start_nginx "$WORK/origin-main" "$BENCH/nginx/origin.conf.template" "$LOAD_CPUS" \
  NAME=main ROOT="$WORK/fixtures/main" PORT="$MAIN_PORT" TLS_PORT="$MAIN_TLS_PORT" "${ORIGIN_TLS[@]}"
MAIN_PID=$LAST_PID
# A second peer of main (the pass2 scenario): the same fixtures on another server.
start_nginx "$WORK/origin-main2" "$BENCH/nginx/origin.conf.template" "$LOAD_CPUS" \
  NAME=main2 ROOT="$WORK/fixtures/main" PORT="$MAIN2_PORT" TLS_PORT="$MAIN2_TLS_PORT" "${ORIGIN_TLS[@]}"
MAIN2_PID=$LAST_PID
start_nginx "$WORK/origin-fallback" "$BENCH/nginx/origin.conf.template" "$LOAD_CPUS" \
  NAME=fallback ROOT="$WORK/fixtures/fallback" PORT="$FB_PORT" TLS_PORT="$FB_TLS_PORT" "${ORIGIN_TLS[@]}"
FB_PID=$LAST_PID
wait_accept "origin main" "$MAIN_PORT" "$MAIN_PID" "$WORK/origin-main/error.log"
wait_accept "origin main2" "$MAIN2_PORT" "$MAIN2_PID" "$WORK/origin-main2/error.log"
wait_accept "origin fallback" "$FB_PORT" "$FB_PID" "$WORK/origin-fallback/error.log"
LOGS=("$WORK/origin-main/error.log" "$WORK/origin-main2/error.log" "$WORK/origin-fallback/error.log")

# ---------------------------------------------------------------------------- proxies
# The proxies run one profile at a time: when the next scenario needs another profile, the
# running ones are stopped (cascade's metrics saved first) and fresh ones started, so every
# profile starts with empty caches and each proxy gets a new work directory.
template_of() { # PROXY PROFILE: the config template, or nothing if the proxy has none
  local t
  case $1,$2 in
  cascade,plain) t="$BENCH/cascade.yaml.template" ;;
  cascade,*) t="$BENCH/cascade-$2.yaml.template" ;;
  nginx,plain) t="$BENCH/nginx/proxy.conf.template" ;;
  nginx,*) t="$BENCH/nginx/proxy-$2.conf.template" ;;
  floor,plain) t="$BENCH/floor.rs" ;; # no config: its arguments (the floor does pass and fallback only)
  *) t="" ;;
  esac
  if [ -f "$t" ]; then echo "$t"; fi
}

declare -A PORT_OF PID_OF DIR_OF
CUR_PROFILE="" ACTIVE=() CASCADE_DIRS=() INSTANCE=0
METRICS_PORT=""

start_proxies() { # PROFILE
  local profile=$1 p tpl dir disk
  CUR_PROFILE=$profile ACTIVE=()
  INSTANCE=$((INSTANCE + 1))
  for p in "${RUN_PROXIES[@]}"; do
    tpl=$(template_of "$p" "$profile")
    if [ -z "$tpl" ]; then
      log "profile $profile: no $p config template, $p sits these scenarios out"
      continue
    fi
    dir="$WORK/$p-$profile-$INSTANCE"
    pick_port "PORT_OF[$p]"
    case $p in
    nginx)
      start_nginx "$dir" "$tpl" "$PROXY_CPUS" \
        THREADS="$THREADS" PORT="${PORT_OF[$p]}" MAIN_PORT="$MAIN_PORT" FB_PORT="$FB_PORT" \
        MAIN2_PORT="$MAIN2_PORT" MAIN404="$MAIN404_CONF" \
        MAIN_TLS_PORT="$MAIN_TLS_PORT" FB_TLS_PORT="$FB_TLS_PORT"
      PID_OF[$p]=$LAST_PID
      LOGS+=("$dir/error.log")
      ;;
    cascade)
      pick_port METRICS_PORT
      mkdir -p -m 700 "$dir/run"  # cascade refuses a runtime dir others may write
      if [ "$CACHE_DISK" = 1 ]; then
        disk="disk: {path: \"$dir/cache-disk\", size: 1GiB}"
      else
        disk="# disk tier off (CACHE_DISK=1 adds one)"
      fi
      render "$tpl" "$dir/gen.yaml" DIR="$dir" THREADS="$THREADS" PORT="${PORT_OF[$p]}" \
        METRICS_PORT="$METRICS_PORT" MAIN_PORT="$MAIN_PORT" FB_PORT="$FB_PORT" CACHE_DISK="$disk" \
        MAIN2_PORT="$MAIN2_PORT" \
        MAIN_TLS_PORT="$MAIN_TLS_PORT" FB_TLS_PORT="$FB_TLS_PORT" \
        CACHE_MEMORY="$CACHE_MEMORY" \
        ROOT="$ROOT" BODIES="$([ "$PLUGIN_BODIES" = 1 ] && echo true || echo false)"
      if [ -n "$CASCADE_SERVER" ]; then
        awk -v extra="$CASCADE_SERVER" '{ print } /^server:/ { n = split(extra, l, ";"); for (i = 1; i <= n; i++) print "  " l[i] }' \
          "$dir/gen.yaml" >"$dir/gen.yaml.tmp" && mv "$dir/gen.yaml.tmp" "$dir/gen.yaml"
      fi
      "$CASCADE_BIN" check -c "$dir/gen.yaml" >"$dir/check.log" 2>&1 ||
        {
          cat "$dir/check.log" >&2
          die "cascade rejected the generated config $dir/gen.yaml"
        }
      (pinned "$PROXY_CPUS" "$CASCADE_BIN" run -c "$dir/gen.yaml") >"$dir/cascade.log" 2>&1 &
      PID_OF[$p]=$!
      PIDS+=("${PID_OF[$p]}")
      LOGS+=("$dir/cascade.log")
      CASCADE_DIRS+=("$dir")
      ;;
    floor)
      mkdir -p "$dir"
      (pinned "$PROXY_CPUS" "$FLOOR_BIN" "${PORT_OF[$p]}" "$THREADS" "127.0.0.1:$MAIN_PORT" "127.0.0.1:$FB_PORT") >"$dir/floor.log" 2>&1 &
      PID_OF[$p]=$!
      PIDS+=("${PID_OF[$p]}")
      LOGS+=("$dir/floor.log")
      ;;
    esac
    DIR_OF[$p]=$dir
    ACTIVE+=("$p")
  done
  for p in "${ACTIVE[@]}"; do
    case $p in
    nginx) wait_accept "nginx ($profile)" "${PORT_OF[$p]}" "${PID_OF[$p]}" "${DIR_OF[$p]}/error.log" ;;
    cascade) wait_accept "cascade ($profile)" "${PORT_OF[$p]}" "${PID_OF[$p]}" "${DIR_OF[$p]}/cascade.log" ;;
    floor) wait_accept "floor ($profile)" "${PORT_OF[$p]}" "${PID_OF[$p]}" "${DIR_OF[$p]}/floor.log" ;;
    esac
  done
  if [ ${#ACTIVE[@]} -gt 0 ]; then log "profile $profile: ${ACTIVE[*]} running"; fi
}

stop_proxies() {
  local p q keep=()
  [ ${#ACTIVE[@]} -gt 0 ] || return 0
  if [ -n "$METRICS_PORT" ] && wants cascade && [ -n "${DIR_OF[cascade]:-}" ]; then
    "$CURL" -sS -m 5 "http://127.0.0.1:$METRICS_PORT/metrics" >"${DIR_OF[cascade]}/metrics.txt" 2>/dev/null || true
  fi
  for p in "${ACTIVE[@]}"; do stop_pids "${PID_OF[$p]}"; done
  for q in "${PIDS[@]}"; do
    for p in "${ACTIVE[@]}"; do [ "$q" != "${PID_OF[$p]}" ] || continue 2; done
    keep+=("$q")
  done
  PIDS=("${keep[@]}")
  for p in "${ACTIVE[@]}"; do unset "PID_OF[$p]" "DIR_OF[$p]"; done
  ACTIVE=() CUR_PROFILE="" METRICS_PORT=""
}

# ---------------------------------------------------------------------------- checks
# header NAME FILE: the value of the (last) response header NAME in a curl -D dump.
header() { awk -v n="$(tr '[:upper:]' '[:lower:]' <<<"$1")" -F': *' \
  'tolower($1) == n { v = $2 } END { sub(/\r$/, "", v); print v }' "$2"; }

# verify PROXY SCENARIO [XCACHE]: one GET must be 200 with the fixture's exact bytes and the
# right X-Served-From (and, if given, X-Cache); anything else aborts, so a run never measures
# error pages or misses. Sets LAST_XCACHE.
verify() {
  if [ "${METHOD_OF[$2]:-GET}" = PUT ]; then
    verify_put "$@"
    return
  fi
  local proxy=$1 sc=$2 want_xc=${3:-} code from role
  local url="http://127.0.0.1:${PORT_OF[$proxy]}${PATH_OF[$sc]}" hdr="$WORK/verify.hdr" body="$WORK/verify.body"
  local extra=()
  if [ -n "${HEADER_OF[$sc]:-}" ]; then extra=(-H "${HEADER_OF[$sc]}"); fi
  code=$("$CURL" -sS -m 10 "${extra[@]}" -o "$body" -D "$hdr" -w '%{http_code}' "$url") || die "$proxy: GET $url failed"
  from=$(header X-Served-From "$hdr")
  LAST_XCACHE=$(header X-Cache "$hdr")
  # An origin of several peers says which one answered: `main/a`.
  if [ "$code" != 200 ] || ! cmp -s "$body" "$(fixture_of "$sc")" ||
    { [ "$from" != "${FROM_OF[$sc]}" ] && [[ "$from" != "${FROM_OF[$sc]}"/* ]]; } ||
    { [ -n "$want_xc" ] && [ "$LAST_XCACHE" != "$want_xc" ]; }; then
    log "$proxy: GET $url gave status $code, $(wc -c <"$body") bytes, X-Served-From '$from', X-Cache '$LAST_XCACHE'; headers:"
    cat "$hdr" >&2
    die "$proxy fails the $sc check (want 200, the ${SIZE_OF[$sc]}-byte fixture, X-Served-From ${FROM_OF[$sc]}${want_xc:+, X-Cache $want_xc})"
  fi
  if [ "$proxy" = cascade ]; then
    role=$(header X-Served-From-Role "$hdr")
    [ "$role" = "${FROM_OF[$sc]}" ] || log "warning: cascade X-Served-From-Role is '$role' for $sc (README says '${FROM_OF[$sc]}')"
  fi
}

# verify_put PROXY SCENARIO: one PUT of the fixture must be 201/204 from main, and the
# object main then holds must be the fixture's exact bytes (it is removed first). Sets
# LAST_XCACHE (none).
verify_put() {
  local proxy=$1 sc=$2 code from url="http://127.0.0.1:${PORT_OF[$1]}${PATH_OF[$2]}" hdr="$WORK/verify.hdr"
  local landed="$WORK/fixtures/main${PATH_OF[$sc]}" body="$WORK/bodies${PATH_OF[$sc]}"
  rm -f "$landed"
  code=$("$CURL" -sS -m 10 -X PUT --data-binary @"$body" -o /dev/null -D "$hdr" -w '%{http_code}' "$url") || die "$proxy: PUT $url failed"
  from=$(header X-Served-From "$hdr")
  LAST_XCACHE=""
  if [[ $code != 20[14] ]] || [ "$from" != main ] || ! cmp -s "$body" "$landed"; then
    log "$proxy: PUT $url gave status $code, X-Served-From '$from'; headers:"
    cat "$hdr" >&2
    die "$proxy fails the $sc check (want 201 or 204 from main, and main holding the ${SIZE_OF[$sc]}-byte body)"
  fi
}

# verify_hit PROXY SCENARIO: verify with the scenario's X-Cache. nginx renames a filled cache
# file only after the response has gone out, so a check right after the fill (WARMUP=0) may
# still see a MISS: up to 5 tries, 0.2 s apart, then fail.
verify_hit() {
  local proxy=$1 sc=$2 want=${XCACHE_OF[$2]} i
  if [ "$want" = - ]; then
    verify "$proxy" "$sc"
    return
  fi
  for ((i = 1; i < 5; i++)); do
    verify "$proxy" "$sc"
    [ "$LAST_XCACHE" != "$want" ] || return 0
    log "  $proxy/$sc: X-Cache '$LAST_XCACHE' (want $want), asking again"
    sleep 0.2
  done
  verify "$proxy" "$sc" "$want"
}

# origin_counts PORT: "accepts requests" of an origin (stub_status; its own request included).
origin_counts() {
  "$CURL" -sS -m 5 "http://127.0.0.1:$1/__origin_status" | awk 'NR == 3 { print $1, $3 }'
}

# cpu_ticks PID: "TOTAL SYS": utime+stime, and stime alone (the kernel's share), of PID and
# its children (nginx workers), in clock ticks.
cpu_ticks() {
  local p s total=0 sys=0 f
  for p in "$1" $(pgrep -P "$1" || true); do
    { s=$(<"/proc/$p/stat"); } 2>/dev/null || continue
    s=${s##*) } # drop "pid (comm) ": field 3 (state) comes first
    read -r -a f <<<"$s"
    total=$((total + f[11] + f[12])) # fields 14 (utime) and 15 (stime)
    sys=$((sys + f[12]))
  done
  echo "$total $sys"
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

# to_bytes SIZE: wrk's Transfer/sec "512.00B" / "4.56KB" / "1.23MB" / "1.02GB" (binary
# units: wrk divides by 1024) in bytes.
to_bytes() {
  awk -v v="$1" 'BEGIN {
    n = split("B KB MB GB TB", u, " ")
    for (i = n; i >= 1; i--) if (substr(v, length(v) - length(u[i]) + 1) == u[i]) {
      printf "%.0f", substr(v, 1, length(v) - length(u[i])) * 1024 ^ (i - 1); exit }
    print "nan" }'
}

run_wrk() { # PROXY SCENARIO DURATION OUTFILE
  local url="http://127.0.0.1:${PORT_OF[$1]}${PATH_OF[$2]}" secs extra=()
  secs=$(to_secs "$3")
  if [ -n "${HEADER_OF[$2]:-}" ]; then extra=(-H "${HEADER_OF[$2]}"); fi
  if [ "${METHOD_OF[$2]:-GET}" != GET ]; then
    # The body is read once, when wrk starts; every request sends it.
    printf 'local f = assert(io.open("%s", "rb"))\nwrk.body = f:read("*a")\nf:close()\nwrk.method = "%s"\n' \
      "$WORK/bodies${PATH_OF[$2]}" "${METHOD_OF[$2]}" >"$WORK/wrk-$2.lua"
    extra+=(-s "$WORK/wrk-$2.lua")
  fi
  # In the background and waited for, so that a signal to this script is handled at once.
  (pinned "$LOAD_CPUS" timeout $((secs + 30)) "$WRK" -t"$WRK_THREADS" -c"$CONNS" -d"$3" \
    --timeout 5s --latency "${extra[@]}" "$url") >"$4" 2>&1 &
  WRK_PID=$!
  if ! wait "$WRK_PID"; then
    WRK_PID=""
    cat "$4" >&2
    die "wrk against $1 failed"
  fi
  WRK_PID=""
}

# working_pids PROXY: the processes doing a proxy's work, one per line (nginx: its workers).
working_pids() {
  if [ "$1" = nginx ]; then pgrep -P "${PID_OF[$1]}"; else echo "${PID_OF[$1]}"; fi
}

# count_syscalls PROXY SCENARIO: a separate 3 s wrk run with every thread of the proxy (and of
# nginx's workers) under `strace -c -f`; SYS[scenario,proxy] = calls per request and the
# five most frequent calls. strace slows the proxy down: the counts are per request, never timed.
declare -A SYS
count_syscalls() {
  local proxy=$1 sc=$2 out="$WORK/strace-$2-$1.txt" wout="$WORK/wrk-strace-$2-$1.txt" pids=() args=() spid reqs i
  command -v strace >/dev/null 2>&1 || die "STRACE=1 needs strace"
  mapfile -t pids < <(working_pids "$proxy")
  for i in "${pids[@]}"; do args+=(-p "$i"); done
  strace -c -f -o "$out" "${args[@]}" 2>/dev/null &
  spid=$!
  sleep 1 # attached (strace has no ready signal; an attach takes milliseconds)
  run_wrk "$proxy" "$sc" 3s "$wout"
  kill -INT "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
  reqs=$(awk '/ requests in / { print $1 }' "$wout")
  # strace -c's fixed columns: calls at 32-40, the syscall name from 52.
  SYS[$sc,$proxy]=$(awk -v n="${reqs:-0}" 'NR > 2 && substr($0, 1, 3) != "---" {
      name = substr($0, 52); calls = substr($0, 32, 9) + 0
      if (name == "total") total = calls; else { c[name] = calls }
    } END {
      if (n == 0 || total == 0) { print "- (nothing counted: is ptrace allowed?)"; exit }
      printf "%.1f per request:", total / n
      k = 0
      while (k < 5) { best = ""; for (x in c) if (best == "" || c[x] > c[best]) best = x; if (best == "" || c[best] / n < 0.05) break
        printf " %s %.2f", best, c[best] / n; delete c[best]; k++ }
    }' "$out")
  log "  $sc $proxy: system calls ${SYS[$sc,$proxy]}"
}

# profile PROXY SCENARIO: a separate 3 s wrk run under `perf record -g`; the flat profile
# (self time by symbol) goes to perf-SCENARIO-PROXY.txt in the work directory.
profile() {
  local proxy=$1 sc=$2 data="$WORK/perf-$2-$1.data" pids
  command -v perf >/dev/null 2>&1 || die "PERF=1 needs perf (linux-perf)"
  pids=$(working_pids "$proxy" | paste -sd,)
  perf record -q -g -F 2000 -o "$data" -p "$pids" -- sleep 4 >/dev/null 2>&1 &
  local ppid=$!
  sleep 0.5
  run_wrk "$proxy" "$sc" 3s "$WORK/wrk-perf-$2-$1.txt"
  wait "$ppid" 2>/dev/null || true
  perf report -q -i "$data" --no-children --sort symbol --percent-limit 0.5 2>/dev/null |
    grep -v '^$' | grep -v '^ *|' | grep -v '^ *-' >"$WORK/perf-$2-$1.txt" || true
  perf report -q -i "$data" --children --sort symbol --percent-limit 2 -g none 2>/dev/null |
    grep -v '^$' >"$WORK/perf-$2-$1-children.txt" || true
  log "  $sc $proxy: profile in $WORK/perf-$2-$1.txt"
}

# ---------------------------------------------------------------------------- measure
declare -A R # R[scenario,proxy,metric] = space-separated values, one per round
add() { R[$1]="${R[$1]:-}${R[$1]:+ }$2"; }

measure() { # PROXY SCENARIO ROUND
  local proxy=$1 sc=$2 round=$3 out="$WORK/wrk-$2-$1-$3.txt"
  local t0 t1 s0 s1 m0 m1 f0 f1 rps bps p99 reqs non2xx sockerr errs first
  verify "$proxy" "$sc" # fills the cache in the cache scenarios
  first=$LAST_XCACHE
  if [ "$WARMUP_S" -gt 0 ]; then run_wrk "$proxy" "$sc" "$WARMUP" "$WORK/warmup.txt"; fi
  verify_hit "$proxy" "$sc"
  [ "${XCACHE_OF[$sc]}" = - ] || log "  $sc round $round $proxy: X-Cache ${first:-none} on the first request, $LAST_XCACHE before the run"
  m0=$(origin_counts "$MAIN_PORT") f0=$(origin_counts "$FB_PORT")
  t0=$(cpu_ticks "${PID_OF[$proxy]}")
  run_wrk "$proxy" "$sc" "$DURATION" "$out"
  t1=$(cpu_ticks "${PID_OF[$proxy]}")
  m1=$(origin_counts "$MAIN_PORT") f1=$(origin_counts "$FB_PORT")
  verify_hit "$proxy" "$sc" # still serving correctly (and from the cache) after the load

  rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
  bps=$(to_bytes "$(awk '/^Transfer\/sec:/ { print $2 }' "$out")")
  p99=$(awk '$1 == "99%" { print $2 }' "$out")
  reqs=$(awk '/ requests in / { print $1 }' "$out")
  non2xx=$(awk -F': *' '/Non-2xx or 3xx responses/ { print $2 }' "$out")
  sockerr=$(awk '/Socket errors/ { gsub(/,/, ""); print $4 + $6 + $8 + $10 }' "$out")
  if [ -z "$rps" ] || [ -z "$p99" ] || ! [[ $bps =~ ^[0-9]+$ ]] || ! [[ $reqs =~ ^[0-9]+$ ]] || [ "$reqs" -eq 0 ]; then
    cat "$out" >&2
    die "cannot parse wrk output for $proxy/$sc"
  fi
  errs=$((${non2xx:-0} + ${sockerr:-0}))
  if [ "$errs" -gt 0 ]; then
    log "WARNING: $proxy/$sc round $round: ${non2xx:-0} non-2xx responses, ${sockerr:-0} socket errors:"
    grep -E 'Non-2xx|Socket errors' "$out" >&2 || true
  fi
  add "$sc,$proxy,rps" "$rps"
  add "$sc,$proxy,bps" "$bps"
  add "$sc,$proxy,p99" "$(to_ms "$p99")"
  add "$sc,$proxy,errs" "$errs"
  add "$sc,$proxy,reqs" "$reqs"
  read -r t0 s0 <<<"$t0"
  read -r t1 s1 <<<"$t1"
  add "$sc,$proxy,cpu" "$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", d * 1e6 / hz / n }')"
  add "$sc,$proxy,sys" "$(awk -v d=$((s1 - s0)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN { printf "%.2f", d * 1e6 / hz / n }')"
  # Upstream connections opened and requests made per 1000 client requests (minus the
  # status request itself).
  add "$sc,$proxy,mconn" "$(awk -v a="$m0" -v b="$m1" -v n="$reqs" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.1f", (y[1] - x[1] - 1) * 1000 / n }')"
  add "$sc,$proxy,fconn" "$(awk -v a="$f0" -v b="$f1" -v n="$reqs" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.1f", (y[1] - x[1] - 1) * 1000 / n }')"
  add "$sc,$proxy,mreq" "$(awk -v a="$m0" -v b="$m1" -v n="$reqs" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.3f", (y[2] - x[2] - 1) / n }')"
  add "$sc,$proxy,freq" "$(awk -v a="$f0" -v b="$f1" -v n="$reqs" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.3f", (y[2] - x[2] - 1) / n }')"
  if [ "$STRACE" = 1 ] && [ "$round" = 1 ]; then count_syscalls "$proxy" "$sc"; fi
  if [ "$PERF" = 1 ] && [ "$round" = 1 ]; then profile "$proxy" "$sc"; fi
  log "  $sc round $round $proxy: $rps req/s, $(awk -v b="$bps" 'BEGIN { printf "%.1f", b / 1048576 }') MiB/s, p99 $p99, $reqs requests, $errs errors"
}

# (`wrk -v` exits 1 after printing its version: `|| true` keeps set -e quiet.)
versions="$("$NGINX" -v 2>&1 | sed 's/.*: //' || true), $("$WRK" -v 2>&1 | head -1 | awk '{ print $1, $2 }' || true)"
if wants floor; then versions="pingora floor, $versions"; fi
if wants cascade; then versions="cascade $("$CASCADE_BIN" --version 2>/dev/null | awk '{ print $NF }'), $versions"; fi
log "$versions"
log "THREADS=$THREADS CONNS=$CONNS WRK_THREADS=$WRK_THREADS DURATION=$DURATION WARMUP=$WARMUP ROUNDS=$ROUNDS PIN=$PIN CPUs=$NCPU PROXIES='${RUN_PROXIES[*]}' CACHE_DISK=$CACHE_DISK CACHE_MEMORY=$CACHE_MEMORY NGINX_MAIN404=$NGINX_MAIN404 PLUGIN_BODIES=$PLUGIN_BODIES"
# The loopback's own bandwidth (one iperf3 TCP stream, 3 s), the reference for the 1 MiB
# scenarios' MiB/s (issue 15: a 1 MiB hit at >= 90% of it).
LOOPBACK_BPS=""
if [[ " $SCENARIOS " =~ \ (hit1m|pass1m|plughit1m)\  ]] && command -v iperf3 >/dev/null 2>&1; then
  pick_port IPERF_PORT
  (pinned "$PROXY_CPUS" iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT") >"$WORK/iperf3-server.log" 2>&1 &
  IPERF_PID=$!
  PIDS+=("$IPERF_PID")
  # Optional: a failing iperf3 leaves the reference out, it never stops the benchmark.
  for ((i = 0; i < STARTUP_TRIES; i++)); do accepting "$IPERF_PORT" && break || sleep 0.1; done
  LOOPBACK_BPS=$( (pinned "$LOAD_CPUS" iperf3 -c 127.0.0.1 -p "$IPERF_PORT" -t 3 -J 2>/dev/null || true) |
    awk -F': *' '/"bits_per_second"/ { v = $2 } END { gsub(/[^0-9.e+]/, "", v); if (v != "") printf "%.0f", v / 8 }')
  stop_pids "$IPERF_PID"
  keep=()
  for q in "${PIDS[@]}"; do [ "$q" = "$IPERF_PID" ] || keep+=("$q"); done
  PIDS=("${keep[@]}")
  if [ -n "$LOOPBACK_BPS" ]; then
    log "loopback, one iperf3 TCP stream: $(awk -v b="$LOOPBACK_BPS" 'BEGIN { printf "%.0f", b / 1048576 }') MiB/s"
  else
    log "iperf3 gave no figure (see $WORK/iperf3-server.log): no loopback reference"
  fi
fi
for sc in $SCENARIOS; do
  if [ "${PROFILE_OF[$sc]}" != "$CUR_PROFILE" ]; then
    stop_proxies
    start_proxies "${PROFILE_OF[$sc]}"
  fi
  [ ${#ACTIVE[@]} -gt 0 ] || die "no proxy has a config for scenario $sc (profile ${PROFILE_OF[$sc]})"
  for ((round = 1; round <= ROUNDS; round++)); do
    # Alternate who goes first, so neither always runs on a warmer (or hotter) machine.
    order=("${ACTIVE[@]}")
    if ((round % 2 == 0)); then
      order=()
      for ((i = ${#ACTIVE[@]} - 1; i >= 0; i--)); do order+=("${ACTIVE[$i]}"); done
    fi
    for proxy in "${order[@]}"; do measure "$proxy" "$sc" "$round"; done
  done
done
stop_proxies

# ---------------------------------------------------------------------------- report
# All helpers print "-" / "n/a" for a proxy that did not run the scenario.
median() {
  [ -n "$1" ] || {
    echo -
    return
  }
  tr ' ' '\n' <<<"$1" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
sum() { tr ' ' '\n' <<<"$1" | awk '{ s += $1 } END { print s + 0 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "-" && b != "-" && b > 0) printf (a / b < 0.1 ? "%.3f" : "%.2f"), a / b; else print "n/a" }'; }
# cell WIDTH FORMAT VALUE [SUFFIX]: VALUE printed with FORMAT and SUFFIX, or "-", right-aligned.
cell() {
  local s
  if [ "$3" = - ]; then s=-; else printf -v s "$2%s" "$3" "${4:-}"; fi
  printf ' %*s' "$1" "$s"
}
mib() { if [ "$1" = - ]; then echo -; else awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; fi; }

echo
echo "cascade vs nginx: THREADS=$THREADS CONNS=$CONNS DURATION=$DURATION (wrk -t$WRK_THREADS), loopback$([ "$ROUNDS" -gt 1 ] && echo ", median of $ROUNDS rounds"), CACHE_DISK=$CACHE_DISK NGINX_MAIN404=$NGINX_MAIN404"
for sc in $SCENARIOS; do printf '  %-9s %-15s %s\n' "$sc" "${PATH_OF[$sc]}" "${WHAT_OF[$sc]}"; done
echo "ratio = cascade / nginx: req/s and MiB/s above 1 are better for cascade; p99 and CPU below 1 are better for cascade"
hdr=$(printf '%-9s %12s %12s %6s %13s %11s %6s %11s %11s %6s' scenario "cascade r/s" "nginx r/s" ratio \
  "cascade MiB/s" "nginx MiB/s" ratio "cascade p99" "nginx p99" ratio)
[ "$CPU" = 1 ] && hdr+=$(printf ' %11s %11s %6s' "cascade CPU" "nginx CPU" ratio)
echo "$hdr"
lines=()
declare -A MED # MED[scenario,proxy,metric] = the median over the rounds, or "-"
c() { echo "${MED[$sc,cascade,$1]}"; } # of the current scenario $sc
n() { echo "${MED[$sc,nginx,$1]}"; }
for sc in $SCENARIOS; do
  for p in cascade nginx floor; do
    for m in rps bps p99 cpu sys mconn fconn mreq freq; do MED[$sc,$p,$m]=$(median "${R[$sc,$p,$m]:-}"); done
  done
  row=$(printf '%-9s' "$sc")
  row+=$(cell 12 '%.0f' "$(c rps)")$(cell 12 '%.0f' "$(n rps)")$(cell 6 '%s' "$(ratio "$(c rps)" "$(n rps)")")
  row+=$(cell 13 '%s' "$(mib "$(c bps)")")$(cell 11 '%s' "$(mib "$(n bps)")")$(cell 6 '%s' "$(ratio "$(c bps)" "$(n bps)")")
  row+=$(cell 11 '%.3f' "$(c p99)" ms)$(cell 11 '%.3f' "$(n p99)" ms)$(cell 6 '%s' "$(ratio "$(c p99)" "$(n p99)")")
  [ "$CPU" = 1 ] && row+=$(cell 11 '%.1f' "$(c cpu)" us/r)$(cell 11 '%.1f' "$(n cpu)" us/r)$(cell 6 '%s' "$(ratio "$(c cpu)" "$(n cpu)")")
  cerr=$(sum "${R[$sc,cascade,errs]:-}") nerr=$(sum "${R[$sc,nginx,errs]:-}")
  if [ "$cerr" -gt 0 ] || [ "$nerr" -gt 0 ]; then row+="  ! errors: cascade $cerr, nginx $nerr"; fi
  echo "$row"
  line="BENCH scenario=$sc threads=$THREADS conns=$CONNS duration=$DURATION rounds=$ROUNDS object_bytes=${SIZE_OF[$sc]}"
  [ "${PROFILE_OF[$sc]}" = plain ] || line+=" cache_disk=$CACHE_DISK nginx_main404=$NGINX_MAIN404"
  line+=" cascade_rps=$(c rps) nginx_rps=$(n rps) rps_ratio=$(ratio "$(c rps)" "$(n rps)")"
  line+=" cascade_bytes_per_s=$(c bps) nginx_bytes_per_s=$(n bps) bps_ratio=$(ratio "$(c bps)" "$(n bps)")"
  line+=" cascade_p99_ms=$(c p99) nginx_p99_ms=$(n p99) p99_ratio=$(ratio "$(c p99)" "$(n p99)")"
  [ "$CPU" = 1 ] && line+=" cascade_cpu_us_per_req=$(c cpu) nginx_cpu_us_per_req=$(n cpu) cpu_ratio=$(ratio "$(c cpu)" "$(n cpu)") cascade_sys_us_per_req=$(c sys) nginx_sys_us_per_req=$(n sys)"
  for p in cascade nginx; do
    line+=" ${p}_errors=$(sum "${R[$sc,$p,errs]:-}")"
    line+=" ${p}_main_conns_per_1k=${MED[$sc,$p,mconn]} ${p}_fb_conns_per_1k=${MED[$sc,$p,fconn]}"
    line+=" ${p}_main_reqs_per_req=${MED[$sc,$p,mreq]} ${p}_fb_reqs_per_req=${MED[$sc,$p,freq]}"
  done
  if [ -n "${TARGET_OF[$sc]:-}" ]; then
    read -r tm tmin <<<"${TARGET_OF[$sc]}"
    tr=$(ratio "$(c "$tm")" "$(n "$tm")")
    line+=" target_metric=${tm}_ratio target_min=$tmin target_met=$(awk -v r="$tr" -v t="$tmin" 'BEGIN { if (r == "n/a") print "n/a"; else print (r + 0 >= t + 0 ? "yes" : "no") }')"
  fi
  lines+=("$line")
done

if [ "$CPU" = 1 ]; then
  # Where the CPU goes: the kernel's share (stime) is the sockets' work, the rest the
  # proxy's own code. A gap in user time is the proxy's; a gap in kernel time is how it
  # uses its sockets (calls, write sizes, wakeups).
  echo
  echo "CPU per request, user + kernel (stime), us:"
  for sc in $SCENARIOS; do
    row=$(printf '  %-9s' "$sc")
    for p in "${RUN_PROXIES[@]}"; do
      [ "${MED[$sc,$p,cpu]:-}" != - ] && [ -n "${MED[$sc,$p,cpu]:-}" ] || continue
      row+=$(awk -v p="$p" -v t="${MED[$sc,$p,cpu]}" -v k="${MED[$sc,$p,sys]}" 'BEGIN { printf "  %s %.1f + %.1f", p, t - k, k }')
    done
    echo "$row"
  done
fi

if [ -n "$LOOPBACK_BPS" ]; then
  echo
  echo "1 MiB objects against the loopback (one iperf3 TCP stream: $(mib "$LOOPBACK_BPS") MiB/s):"
  for sc in $SCENARIOS; do
    [ "${SIZE_OF[$sc]}" = 1048576 ] || continue
    for p in "${RUN_PROXIES[@]}"; do
      [ "${MED[$sc,$p,bps]:-}" != - ] && [ -n "${MED[$sc,$p,bps]:-}" ] || continue
      printf '  %-9s %-8s %s MiB/s = %s of the loopback\n' "$sc" "$p" "$(mib "${MED[$sc,$p,bps]}")" "$(ratio "${MED[$sc,$p,bps]}" "$LOOPBACK_BPS")"
      lines+=("BENCH loopback scenario=$sc proxy=$p bytes_per_s=${MED[$sc,$p,bps]} loopback_bytes_per_s=$LOOPBACK_BPS ratio=$(ratio "${MED[$sc,$p,bps]}" "$LOOPBACK_BPS")")
    done
  done
fi

targets=()
for sc in $SCENARIOS; do [ -z "${TARGET_OF[$sc]:-}" ] || targets+=("$sc"); done
if [ ${#targets[@]} -gt 0 ]; then
  echo
  echo "targets (issue 3), cascade / nginx:"
  for sc in "${targets[@]}"; do
    read -r tm tmin <<<"${TARGET_OF[$sc]}"
    tr=$(ratio "${MED[$sc,cascade,$tm]}" "${MED[$sc,nginx,$tm]}")
    case $tr in
    n/a) verdict="not measured" ;;
    *) verdict=$(awk -v r="$tr" -v t="$tmin" 'BEGIN { print (r + 0 >= t + 0 ? "met" : "NOT met") }') ;;
    esac
    printf '  %-9s %-7s >= %s   measured %s   %s\n' "$sc" "$([ "$tm" = rps ] && echo req/s || echo bytes/s)" "$tmin" "$tr" "$verdict"
  done
fi

# cost_rows KIND BASE_ARRAY MAX_COST WHAT: cascade alone, a scenario against the one it adds
# something to (same run): req/s ratio, cost, target, and the CPU it adds. Fills ROWS and
# appends BENCH lines (KIND_cost) to `lines`.
cost_rows() {
  local kind=$1 max=$3 what=$4 sc base pr cost met row line d
  local -n base_of=$2
  ROWS=()
  for sc in $SCENARIOS; do
    base=${base_of[$sc]:-}
    [ -n "$base" ] && [ -n "${MED[$sc,cascade,rps]:-}" ] && [ "${MED[$sc,cascade,rps]}" != - ] || continue
    if [ -z "${MED[$base,cascade,rps]:-}" ] || [ "${MED[$base,cascade,rps]}" = - ]; then
      ROWS+=("$(printf '  %-9s vs %s: not measured (add %s to SCENARIOS)' "$sc" "$base" "$base")")
      continue
    fi
    pr=$(ratio "${MED[$sc,cascade,rps]}" "${MED[$base,cascade,rps]}")
    cost=$(awk -v r="$pr" 'BEGIN { printf "%.1f", (1 - r) * 100 }')
    met=$(awk -v r="$pr" -v m="$max" 'BEGIN { print (1 - r <= m + 0 ? "met" : "NOT met") }')
    row=$(printf '  %-9s vs %-6s req/s %.0f vs %.0f = %s (cost %s%%, target <= %.0f%%: %s)' "$sc" "$base" \
      "${MED[$sc,cascade,rps]}" "${MED[$base,cascade,rps]}" "$pr" "$cost" \
      "$(awk -v m="$max" 'BEGIN { print m * 100 }')" "$met")
    line="BENCH ${kind}_cost scenario=$sc base=$base rps=${MED[$sc,cascade,rps]} base_rps=${MED[$base,cascade,rps]} rps_ratio=$pr cost_pct=$cost target_max_pct=$(awk -v m="$max" 'BEGIN { print m * 100 }') target_met=$([ "$met" = met ] && echo yes || echo no)"
    if [ "$kind" = plugin ]; then line+=" plugin_bodies=$PLUGIN_BODIES"; fi
    if [ "$CPU" = 1 ]; then
      d=$(awk -v a="${MED[$sc,cascade,cpu]}" -v b="${MED[$base,cascade,cpu]}" 'BEGIN { printf "%.1f", a - b }')
      row+=", CPU ${MED[$sc,cascade,cpu]} vs ${MED[$base,cascade,cpu]} us/req: $what add $d us/req"
      line+=" cpu_us_per_req=${MED[$sc,cascade,cpu]} base_cpu_us_per_req=${MED[$base,cascade,cpu]} ${kind}_cpu_us_per_req=$d"
    fi
    ROWS+=("$row")
    lines+=("$line")
  done
}

cost_rows plugin PLUGIN_BASE_OF "$PLUGIN_MAX_COST" plugins
plugin_rows=("${ROWS[@]}")
cost_rows balancer BALANCER_BASE_OF "$BALANCER_MAX_COST" "the peers"
balancer_rows=("${ROWS[@]}")
if [ ${#balancer_rows[@]} -gt 0 ]; then
  echo
  echo "balancer cost (issue 13), cascade with two peers / cascade with one (same run):"
  printf '%s\n' "${balancer_rows[@]}"
fi

if [ ${#plugin_rows[@]} -gt 0 ]; then
  echo
  echo "plugin chain cost (issue 4), cascade with the plugins / cascade without (same run):"
  printf '%s\n' "${plugin_rows[@]}"
fi

# The Pingora floor (benches/floor.rs): what Pingora alone costs on cascade's settings, and
# so what is cascade's own share of the CPU per request.
floor_rows=()
for sc in $SCENARIOS; do
  [ "${MED[$sc,floor,rps]:-}" != - ] && [ -n "${MED[$sc,floor,rps]:-}" ] || continue
  row=$(printf '  %-9s floor %.0f req/s: cascade/floor %s, floor/nginx %s' "$sc" "${MED[$sc,floor,rps]}" \
    "$(ratio "${MED[$sc,cascade,rps]}" "${MED[$sc,floor,rps]}")" "$(ratio "${MED[$sc,floor,rps]}" "${MED[$sc,nginx,rps]}")")
  line="BENCH floor scenario=$sc floor_rps=${MED[$sc,floor,rps]} cascade_floor_rps_ratio=$(ratio "${MED[$sc,cascade,rps]}" "${MED[$sc,floor,rps]}") floor_nginx_rps_ratio=$(ratio "${MED[$sc,floor,rps]}" "${MED[$sc,nginx,rps]}")"
  if [ "$CPU" = 1 ]; then
    own=$(awk -v a="${MED[$sc,cascade,cpu]}" -v b="${MED[$sc,floor,cpu]}" 'BEGIN { if (a == "-") print "-"; else printf "%.1f", a - b }')
    row+=$(printf '; CPU floor %.1f us/r (floor/nginx %s), cascade %s us/r: cascade'"'"'s own share %s us/r' \
      "${MED[$sc,floor,cpu]}" "$(ratio "${MED[$sc,floor,cpu]}" "${MED[$sc,nginx,cpu]}")" "${MED[$sc,cascade,cpu]}" "$own")
    line+=" floor_cpu_us_per_req=${MED[$sc,floor,cpu]} floor_nginx_cpu_ratio=$(ratio "${MED[$sc,floor,cpu]}" "${MED[$sc,nginx,cpu]}") cascade_own_cpu_us_per_req=$own"
  fi
  floor_rows+=("$row")
  lines+=("$line")
done
if [ ${#floor_rows[@]} -gt 0 ]; then
  echo
  echo "the Pingora floor (benches/floor.rs: a bare ProxyHttp on cascade's Pingora settings), same run:"
  printf '%s\n' "${floor_rows[@]}"
fi

if [ "$STRACE" = 1 ]; then
  echo
  echo "system calls per request (strace -c -f over a separate 3 s run; all threads, nginx's workers):"
  for sc in $SCENARIOS; do
    for p in "${RUN_PROXIES[@]}"; do
      [ -n "${SYS[$sc,$p]:-}" ] || continue
      printf '  %-9s %-8s %s\n' "$sc" "$p" "${SYS[$sc,$p]}"
      lines+=("BENCH syscalls scenario=$sc proxy=$p per_request=$(awk '{ print $1 }' <<<"${SYS[$sc,$p]}")")
    done
  done
fi

echo
echo "per 1000 client requests: upstream connections opened, upstream requests made (main / fallback origin):"
for sc in $SCENARIOS; do
  printf '  %-9s' "$sc"
  for p in cascade nginx floor; do
    [ "$p" != floor ] || [ "${MED[$sc,floor,mconn]}" != - ] || continue
    if [ "${MED[$sc,$p,mconn]}" = - ]; then
      printf '  %s -' "$p"
    else
      printf '  %s conns %.1f / %.1f, reqs %s / %s' "$p" "${MED[$sc,$p,mconn]}" "${MED[$sc,$p,fconn]}" \
        "$(awk -v v="${MED[$sc,$p,mreq]}" 'BEGIN { printf "%.0f", v * 1000 }')" \
        "$(awk -v v="${MED[$sc,$p,freq]}" 'BEGIN { printf "%.0f", v * 1000 }')"
    fi
  done
  echo
done
echo
printf '%s\n' "${lines[@]}"

# Anything cascade or nginx complained about during the run (the work directory goes away).
for d in "${CASCADE_DIRS[@]}"; do
  [ -f "$d/metrics.txt" ] || continue
  bad=$(grep -E '^cascade_(upstream_errors_total|cache_fill_errors_total)' "$d/metrics.txt" | awk '$NF > 0' || true)
  [ -z "$bad" ] || {
    echo
    echo "${d#"$WORK"/}: upstream / cache fill errors (metrics):"
    echo "$bad"
  }
  outcomes=$(grep -E '^cascade_cache_requests_total' "$d/metrics.txt" | awk '$NF > 0' || true)
  [ -z "$outcomes" ] || {
    echo
    echo "${d#"$WORK"/}: cache outcomes (metrics, whole instance lifetime incl. checks and warmups):"
    echo "$outcomes"
  }
done
# Clients cut off when wrk stops mid-request show up in cascade's log as "Fail to proxy:
# Downstream ..." (proxied) or "Fail to serve cache: Downstream ..." (cache hits): expected, a
# few per run. Anything else is worth a look.
down_pat='Fail to (proxy|serve cache): Downstream'
for f in "${LOGS[@]}"; do
  case $f in *cascade.log)
    down=$(grep -Ec "$down_pat" "$f" || true)
    if [ "${down:-0}" -gt 0 ]; then
      echo
      echo "${f#"$WORK"/}: $down 'Fail to proxy/serve cache: Downstream ...' errors (clients cut off when each wrk run stops: expected)"
    fi
    ;;
  esac
done
for f in "${LOGS[@]}"; do
  pat='WARN|ERROR|\[(warn|error|crit|alert|emerg)\]'
  n=$(grep -E "$pat" "$f" 2>/dev/null | grep -Evc "$down_pat" || true)
  if [ "${n:-0}" -gt 0 ]; then
    echo
    echo "${f#"$WORK"/}: $n other warning/error lines, first 5:"
    grep -E "$pat" "$f" | grep -Ev "$down_pat" | head -5
  fi
done
