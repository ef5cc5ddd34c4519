#!/usr/bin/env bash
# docs/operator.md's first start, backup and restore as processes on this host: the same loranode
# commands and environment as docker-compose.yml's services, on an anvil dev chain, with the local
# PostgreSQL (trust login as postgres) and Redis. LN runs `loranode` (default: this checkout's venv;
# scripts/image_check.sh points it into the built image, AS_UID=10001 its user). Exits non-zero at the
# first check that fails; stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD; S="${SMOKE:-/tmp/loranode-stack}"; LN="${LN:-$ROOT/.venv/bin/python -m node}"
PG="${PG:-postgresql://postgres@127.0.0.1:5432}"; DB=loranode_stack_check; REDIS_DB="${REDIS_DB:-13}"
RPC_PORT=18545 API_PORT=18000 ADMIN_PORT=18001
PIDS=(); declare -A PID
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
step() { echo; echo "== $(date -u +%T) $*"; }
fail() { echo "FAILED: $*"; exit 1; }

rm -rf "$S"; mkdir -p "$S/data" "$S/secrets" "$S/models"; chmod 700 "$S/secrets"
echo 0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80 > "$S/secrets/operator_key"  # anvil dev 0
echo 0xdf57089febbacf7ba0bc227dafbffa9fc08a93fdc68e1e42411a14efcf23656e > "$S/secrets/x402_gas_key"  # anvil dev 19
echo not-used-on-a-trust-login > "$S/secrets/postgres_password"
openssl rand -hex 32 > "$S/secrets/admin_token"
"$ROOT/.venv/bin/python" -c "from node.devkit import make_tiny_model; make_tiny_model('$S/models/base')" >/dev/null
chmod -R a+rX "$S/models"  # the image's user reads the model (compose mounts it read-only)
[ -n "${AS_UID:-}" ] && chown -R "$AS_UID" "$S/data" "$S/secrets"
psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DB" -c "CREATE DATABASE $DB"
redis-cli -n "$REDIS_DB" flushdb >/dev/null
export LORANODE_DATABASE_URL="postgresql+psycopg://${PG#postgresql://}/$DB" \
  LORANODE_DATABASE_PASSWORD_FILE="$S/secrets/postgres_password" LORANODE_BROKER_URL="redis://127.0.0.1:6379/$REDIS_DB" \
  LORANODE_RPC_URL="http://127.0.0.1:$RPC_PORT" LORANODE_CHAIN_ID=31337 LORANODE_OPERATOR_KEY_FILE="$S/secrets/operator_key" \
  LORANODE_DATA_DIR="$S/data" LORANODE_DEPLOYMENT_FILE="$S/data/deployments/31337.json" LORANODE_MODEL_PATH="$S/models/base"

step "rpc: anvil (the dev profile)"
node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil --port $RPC_PORT --chain-id 31337 --hardfork cancun \
  --block-time 1 > "$S/anvil.log" 2>&1 & PIDS+=($!)
sleep 3
step "migrate: db upgrade"; $LN db upgrade
step "chain deploy"; $LN chain deploy --rpc-url "$LORANODE_RPC_URL" --out "$S/data/deployments" --dev-account 0 | tail -1

start() {  # name, then the command and its extra environment
  local name=$1; shift
  env "$@" > "$S/$name.log" 2>&1 & PIDS+=($!); PID[$name]=$!
}
up() {
  start api LORANODE_ADMIN_TOKEN_FILE="$S/secrets/admin_token" LORANODE_ADMIN_HOST=127.0.0.1 \
    LORANODE_ADMIN_PORT=$ADMIN_PORT LORANODE_X402_GAS_KEY_FILE="$S/secrets/x402_gas_key" $LN api --host 127.0.0.1 --port $API_PORT
  start indexer $LN indexer; start worker $LN worker; start beat $LN beat
  for i in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$API_PORT/ready" >/dev/null && { echo "api ready after ${i} s"; return 0; }
    sleep 1
  done
  tail -20 "$S/api.log"; fail "the api was not ready in 240 s"
}
health() {  # the compose health checks, each retried for a minute as compose's start period allows
  for svc in indexer worker beat; do
    for i in $(seq 1 12); do $LN health $svc && continue 2; sleep 5; done
    fail "loranode health $svc"
  done
}

step "up: api, indexer, worker, beat"; up; health
step "status"; status=$($LN status --node-url "http://127.0.0.1:$API_PORT"); head -3 <<< "$status"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$ADMIN_PORT/admin/adapters/1/pin")
[ "$code" = 401 ] || fail "the admin port answered $code without a token"
code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$API_PORT/admin/adapters/1/pin")
[ "$code" = 404 ] || fail "the public port answered $code on /admin"
echo "admin port: 401 without the token; public port: no /admin (404)"

step "backup: pg_dump -Fc"; pg_dump -Fc "$PG/$DB" > "$S/backup.dump"; ls -l "$S/backup.dump"
sleep 10  # blocks the backup's mirror has not seen
step "restore: stop, pg_restore --clean --if-exists, migrate, up"
for name in api indexer worker beat; do kill "${PID[$name]}"; done; sleep 5
pg_restore --clean --if-exists -d "$PG/$DB" < "$S/backup.dump"
$LN db upgrade; up; health
cursor=$(psql -At "$PG/$DB" -c "select last_block from indexer_cursor")
echo "the indexer re-indexed from the restored cursor to block $cursor"
step "stack check passed"
