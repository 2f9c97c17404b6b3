#!/usr/bin/env bash
# The example gateway against the LiteLLM proxy, in front of the same upstream, with the same
# client (BENCHMARKS.md, "Against the LiteLLM proxy"). Not run by CI.
#
#   bash benches/litellm.sh
#
# - upstream: an OpenAI-compatible server written like Python's `http.server` (threaded,
#   keep-alive HTTP/1.1, a response's head and body in two writes), answering
#   /v1/chat/completions with a fixed completion and its `usage`; twice: with Nagle's
#   algorithm on, as `http.server` leaves it (a client that delays its ACKs stalls 40 ms on
#   each answer), and with TCP_NODELAY, as asyncio servers (uvicorn) set it;
# - the gateway (release build of the example, memory store): one key whose tier limits
#   requests, tokens and concurrency per user, and the model's own requests and tokens per
#   minute, all far above what the run sends;
# - the LiteLLM proxy (PyPI `litellm[proxy]`, pinned below, in a venv, one worker, no
#   database): the master key, and the model's requests and tokens per minute enforced by
#   its router (usage-based-routing-v2 with pre-call checks: past the limit it answers
#   "No deployments available"), equally far above the load. Limits per key need LiteLLM's
#   database (virtual keys), so it has none here. A second LiteLLM runs without the limits;
# - client: wrk, a 2 KB chat completion POSTed on keep-alive connections: 1 connection
#   (latency p50/p99) and 8 connections (throughput), to each, for each upstream; and the
#   CPU time each server spends per request.
#
# LiteLLM 1.106.12 is the newest release whose `[proxy]` extra installed here: later ones pin
# builds of litellm-proxy-extras / litellm-enterprise the package index didn't have.
#
# Everything listens on free loopback ports and is stopped on exit. About 4 minutes once
# the venv and the release build exist. Environment: BENCH_SECONDS (per measurement, 10),
# LITELLM_VENV (target/litellm-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

LITELLM_VERSION=1.106.12
SECONDS_EACH=${BENCH_SECONDS:-10}
venv=${LITELLM_VENV:-target/litellm-venv}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do pkill -TERM -P "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

if ! command -v wrk >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
fi
if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('litellm') != '$LITELLM_VERSION')" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "litellm[proxy]==$LITELLM_VERSION"
fi
cargo build --quiet --release --example gateway

# CPU time, in clock ticks, of a process and its children (user + system).
cpu_ticks() {
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Waits up to 120 s for URL to answer 200 (with an optional bearer key).
wait_ready() {
  local url=$1 key=${2:-}
  for _ in $(seq 1 240); do
    if curl -fs -o /dev/null --max-time 2 ${key:+-H "Authorization: Bearer $key"} "$url"; then return 0; fi
    sleep 0.5
  done
  echo "not ready after 120 s: $url" >&2
  exit 1
}

cat >"$work/upstream.py" <<'EOF'
import http.server, json, sys
RESPONSE = json.dumps({"id": "chatcmpl-bench", "object": "chat.completion",
    "created": 1700000000, "model": "bench-model", "choices": [{"index": 0, "message":
    {"role": "assistant", "content": "Hello! How can I help you today?"}, "logprobs": None,
    "finish_reason": "stop"}], "usage": {"prompt_tokens": 412, "completion_tokens": 9,
    "total_tokens": 421}}).encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "bench-model", "object": "model"}]}).encode()
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = sys.argv[2] == "nodelay"
    def answer(self, body):
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()          # the head: one write
        self.wfile.write(body)      # the body: another
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.answer(RESPONSE)
    def do_GET(self):
        self.answer(MODELS)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients closing their connections when a run ends
Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
EOF

# The client's request: a 2 KB OpenAI chat body for model argv[2], the key from the environment.
for model in bench-model bench-model-nodelay; do python3 - "$work/$model.lua" "$model" <<'EOF'
import json, sys
prose = ("Revenue grew in every region this quarter, led by the enterprise segment, while "
         "operating costs stayed flat and the hiring plan moved to the second half. ")
def body(pad):
    return json.dumps({"model": sys.argv[2], "messages": [
        {"role": "system", "content": "You are a concise assistant for financial analysts."},
        {"role": "user", "content": pad}], "max_tokens": 256, "temperature": 0.2},
        separators=(",", ":"))
base = len(body(""))
pad = (prose * 40)[: 2048 - base]
text = body(pad)
assert len(text) == 2048
open(sys.argv[1], "w").write(f"""
wrk.method = "POST"
wrk.body = [==[{text}]==]
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.status + summary.errors.timeout
  io.write(string.format("RESULT %d %.1f %d %d %d\\n", summary.requests,
    summary.requests / (summary.duration / 1e6), latency:percentile(50), latency:percentile(99),
    errors))
end
""")
EOF
done

upstream_port=$(free_port)
python3 "$work/upstream.py" "$upstream_port" nagle & pids+=($!); upstream_pid=$!
nodelay_port=$(free_port)
python3 "$work/upstream.py" "$nodelay_port" nodelay & pids+=($!); nodelay_pid=$!

gateway_port=$(free_port)
cat >"$work/gateway.toml" <<EOF
listen = "127.0.0.1:$gateway_port"
[models.bench-model]
upstream = "http://127.0.0.1:$upstream_port/v1"
api_key = "sk-upstream"
rpm = 100_000_000
tpm = 100_000_000_000
[models.bench-model-nodelay]
upstream = "http://127.0.0.1:$nodelay_port/v1"
api_key = "sk-upstream"
rpm = 100_000_000
tpm = 100_000_000_000
[tiers.bench]
rpm = 100_000_000
tpm = 100_000_000_000
concurrent = 10_000
[keys]
sk-bench-gateway = { user = "bench", tier = "bench" }
EOF
RUST_LOG=warn target/release/examples/gateway --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 & pids+=($!); gateway_pid=$!

litellm_port=$(free_port)
cat >"$work/litellm.yaml" <<EOF
model_list:
  - model_name: bench-model
    litellm_params:
      model: openai/bench-model
      api_base: http://127.0.0.1:$upstream_port/v1
      api_key: sk-upstream
      rpm: 100000000
      tpm: 100000000000
  - model_name: bench-model-nodelay
    litellm_params:
      model: openai/bench-model-nodelay
      api_base: http://127.0.0.1:$nodelay_port/v1
      api_key: sk-upstream
      rpm: 100000000
      tpm: 100000000000
router_settings:
  routing_strategy: usage-based-routing-v2
  enable_pre_call_checks: true
general_settings:
  master_key: sk-bench-litellm
EOF
# No network but the registries here: LiteLLM's model price map from its package.
LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR \
  "$venv/bin/litellm" --config "$work/litellm.yaml" --host 127.0.0.1 --port "$litellm_port" \
  --num_workers 1 >"$work/litellm.log" 2>&1 & pids+=($!); litellm_pid=$!
# The same without its limits, to tell what they cost from what the proxy costs.
plain_port=$(free_port)
grep -vE '^ +(rpm|tpm|routing_strategy|enable_pre_call_checks):|^router_settings:' \
  "$work/litellm.yaml" >"$work/litellm-plain.yaml"
LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_LOG=ERROR \
  "$venv/bin/litellm" --config "$work/litellm-plain.yaml" --host 127.0.0.1 --port "$plain_port" \
  --num_workers 1 >"$work/litellm-plain.log" 2>&1 & pids+=($!); plain_pid=$!

wait_ready "http://127.0.0.1:$upstream_port/v1/models"
wait_ready "http://127.0.0.1:$nodelay_port/v1/models"
wait_ready "http://127.0.0.1:$gateway_port/healthz"
wait_ready "http://127.0.0.1:$litellm_port/v1/models" sk-bench-litellm
wait_ready "http://127.0.0.1:$plain_port/v1/models" sk-bench-litellm

# One request each, shown, so a wrong answer can't pass for a fast one.
for target in "upstream http://127.0.0.1:$upstream_port -" "gateway http://127.0.0.1:$gateway_port sk-bench-gateway" \
  "litellm http://127.0.0.1:$litellm_port sk-bench-litellm" "litellm-plain http://127.0.0.1:$plain_port sk-bench-litellm"; do
  set -- $target
  auth=(); [ "$3" != - ] && auth=(-H "Authorization: Bearer $3")
  status=$(curl -s -o "$work/answer.json" -w '%{http_code}' --max-time 30 "${auth[@]}" \
    -H 'Content-Type: application/json' --data-binary "$(sed -n 's/^wrk.body = \[==\[\(.*\)\]==\]$/\1/p' "$work/bench-model.lua")" \
    "$2/v1/chat/completions")
  echo "$1: $status $(head -c 160 "$work/answer.json")"
  [ "$status" = 200 ] || { echo "$1 did not answer 200" >&2; tail -20 "$work/$1.log" 2>/dev/null >&2; exit 1; }
done

echo "load before: $(uptime)"
# CPU per request: the CPU time the server (the upstream itself, the gateway, LiteLLM) spent
# during the 8-connection run over the requests answered; it depends less on the machine's
# load than the latencies do.
printf '\n| upstream | path | 1 connection: req/s | p50 | p99 | 8 connections: req/s | p50 | p99 | CPU per request | errors |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n'
hz=$(getconf CLK_TCK)
for upstream in "Nagle on|bench-model|$upstream_port|$upstream_pid" "TCP_NODELAY|bench-model-nodelay|$nodelay_port|$nodelay_pid"; do
  IFS='|' read -r kind model port direct_pid <<<"$upstream"
  for target in "directly|http://127.0.0.1:$port||$direct_pid" \
    "the gateway|http://127.0.0.1:$gateway_port|sk-bench-gateway|$gateway_pid" \
    "LiteLLM proxy|http://127.0.0.1:$litellm_port|sk-bench-litellm|$litellm_pid" \
    "LiteLLM proxy, no limits|http://127.0.0.1:$plain_port|sk-bench-litellm|$plain_pid"; do
    IFS='|' read -r name url key server_pid <<<"$target"
    row="| $kind | $name"
    errors=0
    for conns in 1 8; do
      threads=$((conns < 2 ? 1 : 2))
      # A short warm-up (connections, LiteLLM's caches), then the measurement.
      BENCH_KEY=$key wrk -t"$threads" -c"$conns" -d2s -s "$work/$model.lua" "$url/v1/chat/completions" >/dev/null
      before=$(cpu_ticks "$server_pid")
      read -r _ n rate p50 p99 errs < <(BENCH_KEY=$key wrk -t"$threads" -c"$conns" -d"${SECONDS_EACH}s" \
        --timeout 10s -s "$work/$model.lua" "$url/v1/chat/completions" | grep '^RESULT')
      cpu=$(($(cpu_ticks "$server_pid") - before))
      row+=$(printf ' | %s | %s µs | %s µs' "$(printf '%.0f' "$rate")" "$p50" "$p99")
      errors=$((errors + errs))
    done
    row+=$(printf ' | %s µs' $((cpu * 1000000 / hz / (n > 0 ? n : 1))))
    echo "$row | $errors |"
  done
done
echo
echo "load after: $(uptime)"
