#!/usr/bin/env bash
# Runs Parley with its embedded defaults (sandbox sender, local LLM, hash embeddings) on a fresh
# machine: brings up PostgreSQL (with pgvector) and Redis, builds the release binary, creates and
# seeds the `parley` database, then serves on http://127.0.0.1:${PORT:-3000}.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh

# The development default DATABASE_URL points at this database; create it once.
if [[ -z ${DATABASE_URL:-} ]]; then
  if ! psql -h 127.0.0.1 -U postgres -d postgres -tAc "select 1 from pg_database where datname = 'parley'" | grep -q 1; then
    createdb -h 127.0.0.1 -U postgres parley
  fi
fi

echo "== building (release)"
cargo build --release --locked --bin parley
bin=target/release/parley

"$bin" migrate
"$bin" seed >/dev/null
cat <<MSG

Parley is starting on http://127.0.0.1:${PORT:-3000} (Ctrl-C stops it).
Talk to it from another terminal:
  $bin simulate "Bonjour"
Its structured events (one JSON line each) follow below.

MSG
exec "$bin" serve
