#!/usr/bin/env bash
# Interop with the newest claudemesh clients, run on demand (not in CI: it installs the
# CLI's npm dependencies). Builds CLI 1.37.0 from the reference monorepo at 213a6b3,
# starts a real `meshd serve` on its embedded defaults, enrolls two members with the
# CLI, and runs the HEAD-era commands against meshd with CLAUDEMESH_API_URL pointed at
# it. Prints a table (command, result, evidence) and exits non-zero if a row failed.
#
#   tests/interop/run.sh                       # clones github.com/alezmad/claudemesh
#   CLAUDEMESH_GIT=/path/to/repo.git tests/interop/run.sh   # a local clone or mirror
#   INTEROP_MESHD=target/release/meshd tests/interop/run.sh     # skip the cargo build
#
# Needs: bun (https://bun.sh), git, curl; cargo unless INTEROP_MESHD is given.
set -euo pipefail

COMMIT=213a6b3
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/meshd-interop.XXXXXX)
PORT=${PORT:-$((20000 + RANDOM % 20000))}
MESHD_PID=
TAILS=()
cleanup() {
  for p in "${TAILS[@]}"; do kill "$p" 2>/dev/null || true; done
  # The CLI starts a background daemon of its own (`daemon up`) on some commands.
  pkill -f "$WORK/cm/apps/cli" 2>/dev/null || true
  [ -n "$MESHD_PID" ] && kill "$MESHD_PID" 2>/dev/null && wait "$MESHD_PID" 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

command -v bun >/dev/null || { echo "bun is required (https://bun.sh)" >&2; exit 2; }

# 1. The clients, from the reference at $COMMIT.
SRC=${CLAUDEMESH_GIT:-}
if [ -z "$SRC" ]; then
  for m in /work/.mirror/alezmad+claudemesh/repo; do [ -d "$m" ] && SRC=$m; done
fi
if [ -z "$SRC" ]; then
  git clone --quiet --bare https://github.com/alezmad/claudemesh.git "$WORK/repo.git"
  SRC=$WORK/repo.git
fi
mkdir -p "$WORK/cm"
git --git-dir="$SRC" archive "$COMMIT" apps/cli packages/sdk | tar -x -C "$WORK/cm"
( cd "$WORK/cm/apps/cli"
  # Dev tooling (test runners, bundlers) is not needed to run the CLI from source.
  bun -e 'const f="package.json";const p=JSON.parse(require("fs").readFileSync(f));delete p.devDependencies;require("fs").writeFileSync(f,JSON.stringify(p,null,2))'
  bun install --silent >/dev/null )
# The SDK, from the same commit, for a long-lived connection (kick and disconnect need one).
mkdir -p "$WORK/cm/run"
cp -r "$WORK/cm/packages/sdk/src" "$WORK/cm/run/sdk"
ln -s "$WORK/cm/apps/cli/node_modules" "$WORK/cm/run/node_modules"
cat > "$WORK/cm/run/hold.ts" <<'TS'
// Connects a member with @claudemesh/sdk and stays until the broker closes it.
import { readFileSync } from "node:fs";
import { MeshClient } from "./sdk/index.ts";
const m = JSON.parse(readFileSync(`${process.env.HOME}/.claudemesh/config.json`, "utf8")).meshes[0];
const c = new MeshClient({ brokerUrl: m.brokerUrl, meshId: m.meshId, memberId: m.memberId, pubkey: m.pubkey,
  secretKey: m.secretKey, displayName: process.env.HOLD_NAME, peerType: "ai", channel: "sdk" });
await c.connect();
console.log("connected");
(c as any).ws.on("close", (code: number, reason: Buffer) => { console.log(`closed ${code} ${reason}`); process.exit(0); });
setTimeout(() => { console.log("still connected"); process.exit(0); }, 30000);
TS
mkdir -p "$WORK/bin"
printf '#!/bin/sh\nexec bun %s/cm/apps/cli/src/entrypoints/cli.ts "$@"\n' "$WORK" > "$WORK/bin/claudemesh"
chmod +x "$WORK/bin/claudemesh"
export PATH="$WORK/bin:$PATH"

# 2. meshd, on its embedded defaults (SQLite in its data directory).
if [ -z "${INTEROP_MESHD:-}" ]; then
  ( cd "$ROOT" && cargo build --release --locked -p meshd --bin meshd >/dev/null )
  INTEROP_MESHD=${CARGO_TARGET_DIR:-$ROOT/target}/release/meshd
fi
MESHD="$INTEROP_MESHD --data-dir $WORK/data"
export MESHD_WATCH_ALLOW_PRIVATE=true   # the watch row fetches meshd's own /health
$MESHD serve --listen "127.0.0.1:$PORT" --public-url "ws://127.0.0.1:$PORT/ws" >"$WORK/meshd.log" 2>&1 &
MESHD_PID=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
$MESHD mesh create interop --slug interop >/dev/null
invite() { $MESHD invite create --mesh interop --role "$1" --public-url "ws://127.0.0.1:$PORT/ws" --json | bun -e 'console.log(JSON.parse(await Bun.stdin.text()).url)'; }
export CLAUDEMESH_API_URL="http://127.0.0.1:$PORT"
as() { local who=$1; shift; HOME="$WORK/home/$who" timeout 40 claudemesh "$@" 2>&1; }
mkdir -p "$WORK/home/alice" "$WORK/home/bob"
# The CLI enrolls as `<hostname>-<pid>`; the names are read back from meshd.
newest() { $MESHD member list --mesh interop --json | bun -e 'const m=JSON.parse(await Bun.stdin.text()).members;console.log(m[m.length-1].display_name)'; }
as alice join "$(invite admin)" >/dev/null
ALICE=$(newest)
as bob join "$(invite member)" >/dev/null
BOB=$(newest)
echo "alice enrolled as $ALICE, bob as $BOB"

# 3. The commands. Each row: who, the command, a pattern its output must match.
ROWS=()
FAILED=0
check() {
  local who=$1 pattern=$2; shift 2
  local out rc=0
  out=$(as "$who" "$@") || rc=$?
  local evidence
  evidence=$(printf '%s' "$out" | grep -E -m1 -- "$pattern" | tr -d '\r' | cut -c1-70 || true)
  if [ "$rc" -eq 0 ] && [ -n "$evidence" ]; then
    ROWS+=("| \`$who: claudemesh $*\` | ok | ${evidence//|/\\|} |")
  else
    FAILED=$((FAILED + 1))
    ROWS+=("| \`$who: claudemesh $*\` | **FAILED** (exit $rc) | $(printf '%s' "$out" | tr '\n|' ' /' | cut -c1-90) |")
  fi
}
refused() { # who, pattern, command…: the command must be refused with `pattern`
  local who=$1 pattern=$2; shift 2
  local out rc=0
  out=$(as "$who" "$@") || rc=$?
  if printf '%s' "$out" | grep -qE -- "$pattern"; then
    ROWS+=("| \`$who: claudemesh $*\` | ok (refused, exit $rc) | $(printf '%s' "$out" | grep -E -m1 -- "$pattern" | cut -c1-70) |")
  else
    FAILED=$((FAILED + 1))
    ROWS+=("| \`$who: claudemesh $*\` | **FAILED** (not refused) | $(printf '%s' "$out" | tr '\n|' ' /' | cut -c1-300) |")
  fi
}
tail_for() { # who, seconds, topic: runs `topic tail` in the background into $WORK/tail-<who>.txt
  ( HOME="$WORK/home/$1" timeout "$2" claudemesh topic tail "$3" --mesh interop --limit 5 >"$WORK/tail-$1.txt" 2>&1 || true ) &
  TAILS+=($!)
}

check alice 'deploys' topic create deploys --mesh interop
check bob 'deploys' topic list --mesh interop
check bob '' topic join deploys --mesh interop
check alice "$BOB" topic members deploys --mesh interop
check alice 'hello|sent|post|✔|ok' topic post deploys "hello @$BOB, ship it" --mesh interop
# alice's tail re-seals the topic key for bob; bob's tail then decrypts the backfill.
tail_for alice 12 deploys
sleep 4
tail_for bob 8 deploys
wait "${TAILS[@]}" 2>/dev/null || true
TAILS=()
if grep -q "re-sealed topic key for $BOB" "$WORK/tail-alice.txt"; then
  ROWS+=("| \`alice: claudemesh topic tail deploys\` | ok | re-sealed topic key for $BOB |")
else FAILED=$((FAILED + 1)); ROWS+=("| \`alice: claudemesh topic tail deploys\` | **FAILED** | $(tr '\n|' ' /' <"$WORK/tail-alice.txt" | cut -c1-90) |"); fi
if grep -q "hello @$BOB, ship it" "$WORK/tail-bob.txt"; then
  ROWS+=("| \`bob: claudemesh topic tail deploys\` | ok | $(grep -m1 'hello @' "$WORK/tail-bob.txt" | sed 's/^ *//' | cut -c1-70) |")
else FAILED=$((FAILED + 1)); ROWS+=("| \`bob: claudemesh topic tail deploys\` | **FAILED** | $(tr '\n|' ' /' <"$WORK/tail-bob.txt" | cut -c1-90) |"); fi
check alice "$BOB" member list --mesh interop
check bob 'interop' me
check bob 'deploys' me topics
check bob "deploys|$ALICE|mention" notification list
check alice 'release' state set release 1.2.3
check bob 'release' state list
check alice 'remember|stored|✔|ok|saved' remember "deploys go out on fridays"
check bob 'fridays' recall fridays
check alice 'created|task|✔' task create "write the release notes"
check bob 'release notes' task list
check alice 'API_TOKEN|stored|✔' vault set API_TOKEN s3cret
check alice 'API_TOKEN' vault list
check alice 'API_TOKEN|deleted|✔' vault delete API_TOKEN -y
check alice 'w_|watch|✔' watch add "http://127.0.0.1:$PORT/health" --label health
check alice 'health' watch list
check alice "$BOB|banned" ban "$BOB" -y
refused bob 'banned|revoked|removed' peers --mesh interop
check alice "$BOB" bans
check alice "$BOB|unbanned" unban "$BOB" -y
check bob "$ALICE|peer" peers --mesh interop
# bob stays connected through the SDK (a plain hello: a control-plane connection, which
# kick leaves alone as the reference does, and disconnect closes).
( cd "$WORK/cm/run" && HOME="$WORK/home/bob" HOLD_NAME="$BOB" timeout 40 bun hold.ts >"$WORK/hold.txt" 2>&1 || true ) &
TAILS+=($!)
for _ in $(seq 1 100); do grep -q connected "$WORK/hold.txt" 2>/dev/null && break; sleep 0.1; done
check alice "refused: $BOB|control-plane" kick "$BOB" -y
check alice "Disconnected 1 peer" peer disconnect "$BOB" -y
wait "${TAILS[@]}" 2>/dev/null || true
if grep -q 'closed 1000 disconnected' "$WORK/hold.txt"; then
  ROWS+=("| bob's SDK connection | ok | $(grep -m1 closed "$WORK/hold.txt") |")
else FAILED=$((FAILED + 1)); ROWS+=("| bob's SDK connection | **FAILED** | $(tr '\n|' ' /' <"$WORK/hold.txt" | cut -c1-90) |"); fi

echo
echo "| command | result | evidence |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
echo "$FAILED failed; meshd log: $WORK/meshd.log (kept with KEEP=1)"
[ "$FAILED" -eq 0 ]
