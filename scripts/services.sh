#!/usr/bin/env bash
# Make sure the services Parley's tests and runtime need are up, installing what is
# missing: PostgreSQL 15 (trust auth on 127.0.0.1:5432) with pgvector >= 0.5 (HNSW),
# and Redis 7 on 127.0.0.1:6379. Runs as root on Debian 12 (bookworm); idempotent, so
# a second run on a ready machine only checks and prints status.
set -euo pipefail

PGVER=15                                  # the cluster version bookworm ships; pgvector is built against it
PG_CONFIG=/usr/lib/postgresql/$PGVER/bin/pg_config
PGVEC_SRC=/etc/apt/sources.list.d/parley-pgvector-src.sources
LOG=/tmp/parley-services.log              # long install/build output goes here, not to the console
WAIT_SECS=30
export DEBIAN_FRONTEND=noninteractive
PSQL=(psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -w -tAqX)   # -w: never prompt, fail instead

: >"$LOG"
TMPDIR_BUILD=""
on_exit() {
  local rc=$?
  if [[ -n $TMPDIR_BUILD ]]; then rm -rf "$TMPDIR_BUILD"; fi
  if ((rc != 0)); then
    echo "services.sh: FAILED (exit $rc); last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2 || true
  fi
}
trap on_exit EXIT

die() { echo "services.sh: $*" | tee -a "$LOG" >&2; exit 1; }
run() { echo "+ $*" >>"$LOG"; "$@" >>"$LOG" 2>&1; }   # verbose commands: output to the log only

# apt-get update once per run, and only if we actually have to install something.
APT_UPDATED=0
apt_update() { ((APT_UPDATED)) || { run apt-get update -qq; APT_UPDATED=1; }; }
# Install only what is absent: "apt-get install" of an installed package would upgrade
# it (and its dependencies, e.g. dpkg itself), which is not this script's business.
apt_install() {
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  apt_update
  run apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# wait_for <what> <command...>: poll until the command succeeds, bounded so CI never hangs.
wait_for() {
  local what=$1 i; shift
  for ((i = 0; i < WAIT_SECS * 2; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "$what not ready after ${WAIT_SECS}s"
}

# ---------------------------------------------------------------- PostgreSQL 15
if [[ ! -d /etc/postgresql/$PGVER/main ]]; then
  echo "postgres: no $PGVER/main cluster, installing postgresql (log: $LOG)"
  apt_install postgresql
  [[ -d /etc/postgresql/$PGVER/main ]] || die "postgresql installed but no $PGVER/main cluster"
  # A fresh cluster uses peer/scram auth; tests and the app connect as postgres over
  # TCP without a password, so switch the stock rules to trust (local machine only).
  sed -ri 's/[[:space:]](peer|scram-sha-256|md5)[[:space:]]*$/ trust/' "/etc/postgresql/$PGVER/main/pg_hba.conf"
  # The package's postinst may already have started it with the old rules: reload.
  if pg_isready -q -h 127.0.0.1 -p 5432; then
    run pg_ctlcluster --skip-systemctl-redirect "$PGVER" main reload
  fi
fi
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  # No systemd in CI containers, so bypass the systemctl redirect and start directly.
  run pg_ctlcluster --skip-systemctl-redirect "$PGVER" main start
fi
wait_for "postgres on 127.0.0.1:5432" pg_isready -q -h 127.0.0.1 -p 5432
"${PSQL[@]}" -c 'select 1' >>"$LOG" 2>&1 \
  || die "postgres is up but 'psql -h 127.0.0.1 -U postgres' fails without a password (need trust auth in pg_hba.conf)"
echo "postgres: ok"

# ---------------------------------------------------------------- pgvector
pgvector_version() { "${PSQL[@]}" -c "select default_version from pg_available_extensions where name='vector'"; }
have=$(pgvector_version)
# HNSW indexes arrived in pgvector 0.5.0; anything older is as good as missing.
if [[ -z $have ]] || dpkg --compare-versions "$have" lt 0.5; then
  echo "pgvector: ${have:-missing}, building from Debian trixie source (takes a few minutes; log: $LOG)"
  # bookworm has no pgvector package, but trixie's source builds fine against PG 15.
  apt_install "postgresql-server-dev-$PGVER" build-essential dpkg-dev
  # Reuse the mirror this machine is already configured with (no hard-coded host).
  uri=""
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [[ -z $uri && -f /etc/apt/sources.list ]]; then   # older one-line format; skip "[opts]"
    uri=$(sed -E 's/\[[^]]*\]//' /etc/apt/sources.list | awk '$1 == "deb" {print $2; exit}' || true)
  fi
  [[ -n $uri ]] || die "cannot find a Debian mirror URI in the apt configuration"
  # deb-src only, in its own file: it lets apt fetch trixie *sources* without ever
  # offering trixie binaries for installation on this bookworm machine.
  printf 'Types: deb-src\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$uri" >"$PGVEC_SRC"
  # Refresh only that source; List-Cleanup=0 keeps the other lists apt already has.
  run apt-get update -qq -o Dir::Etc::sourcelist="$PGVEC_SRC" -o Dir::Etc::sourceparts=- \
    -o APT::Get::List-Cleanup=0
  TMPDIR_BUILD=$(mktemp -d /tmp/parley-pgvector.XXXXXX)
  # Sandbox::User=root: the mktemp dir is root-only, so _apt could not write into it.
  (cd "$TMPDIR_BUILD" && run apt-get source -qq -o APT::Sandbox::User=root pgvector/trixie)
  srcdir=$(find "$TMPDIR_BUILD" -mindepth 1 -maxdepth 1 -type d -name 'pgvector-*' | head -n1)
  [[ -n $srcdir ]] || die "apt-get source pgvector did not unpack a pgvector-* directory"
  # Plain upstream build (not the Debian packaging). OPTFLAGS="" drops upstream's default
  # -march=native (Debian's no-native patch does too) so an image built here runs on any CPU.
  run make -C "$srcdir" -j"$(nproc)" PG_CONFIG="$PG_CONFIG" OPTFLAGS=""
  run make -C "$srcdir" install PG_CONFIG="$PG_CONFIG" OPTFLAGS=""
  have=$(pgvector_version)
  [[ -n $have ]] || die "pgvector built and installed, but postgres still does not list 'vector'"
  dpkg --compare-versions "$have" ge 0.5 || die "pgvector $have installed, but HNSW needs >= 0.5"
fi
echo "pgvector: $have"

# ---------------------------------------------------------------- Redis 7
redis_ping() { [[ $(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null || true) == PONG ]]; }
if ! command -v redis-server >/dev/null; then
  echo "redis: redis-server missing, installing (log: $LOG)"
  apt_install redis-server redis-tools
fi
if ! redis_ping; then
  mkdir -p /var/lib/redis /var/log/redis
  # No persistence: it is a test/CI instance. "-::1" binds IPv6 loopback only if present.
  run redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log \
    --maxmemory-policy noeviction
fi
wait_for "redis on 127.0.0.1:6379" redis_ping
# Parley keeps its job queue in Redis. Under memory pressure an LRU/LFU/TTL eviction
# policy would silently delete queued jobs; noeviction makes writes fail loudly instead.
# Set it at runtime too, in case Redis was started by something else with another policy.
run redis-cli -h 127.0.0.1 -p 6379 config set maxmemory-policy noeviction
policy=$(redis-cli -h 127.0.0.1 -p 6379 config get maxmemory-policy | sed -n 2p)
[[ $policy == noeviction ]] || die "redis maxmemory-policy is '$policy', expected noeviction"
echo "redis: ok ($policy)"
