#!/usr/bin/env bash
# The serving stack, started in order and stopped cleanly: (Redis for the traces,) the upstream (vLLM, or a second
# serve.py), its health waited for, then the gateway (serve.py with a small local model under the same name).
# Ctrl-C or SIGTERM stops the gateway first, then the upstream, then Redis; exit 0 once all are gone.
#
#   SMALL=out-small LARGE=out-large scripts/serve_stack.sh                      # a second serve.py upstream
#   UPSTREAM=vllm LARGE=gpt-oss-20b-merged SMALL=out-small MODEL=gpt-oss-20b scripts/serve_stack.sh
#   UPSTREAM=url UPSTREAM_URL=http://gpu-host:8000/v1 SMALL=out-small scripts/serve_stack.sh   # already running
#   REDIS=start ...   (start redis-server on REDIS_PORT for the traces; or REDIS_URL=redis://host:6379/0)
#
# Settings (environment): MODEL (the name clients use; default gpt-oss-20b), SMALL (the gateway's local checkpoint),
# LARGE (the upstream's checkpoint), UPSTREAM=serve|vllm|url, UPSTREAM_PORT (8001), PORT (8000), HOST (127.0.0.1),
# SHORT_PROMPT_CHARS (120), FALLBACK (True: the local model answers when the upstream is down), CONNECT_TIMEOUT
# (3 s), TRACE_CONTENT (False), LOG_DIR (out-stack: each process's log), WAIT (600 s for each health check),
# PYTHON (python), VLLM_ARGS (extra vllm serve flags), GATEWAY_ARGS (extra serve.py flags).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-gpt-oss-20b}
UPSTREAM=${UPSTREAM:-serve}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
UPSTREAM_PORT=${UPSTREAM_PORT:-8001}
SHORT_PROMPT_CHARS=${SHORT_PROMPT_CHARS:-120}
FALLBACK=${FALLBACK:-True}
CONNECT_TIMEOUT=${CONNECT_TIMEOUT:-3}
TRACE_CONTENT=${TRACE_CONTENT:-False}
LOG_DIR=${LOG_DIR:-out-stack}
WAIT=${WAIT:-600}
PYTHON=${PYTHON:-python}
REDIS=${REDIS:-}
REDIS_PORT=${REDIS_PORT:-6379}
REDIS_URL=${REDIS_URL:-}

die() { echo "error: $*" >&2; exit 2; }
say() { echo "serve_stack: $*"; }

[ -n "${SMALL:-}" ] || die "SMALL is not set: give the gateway's local checkpoint, e.g. SMALL=out-small"
case "$UPSTREAM" in
  serve|vllm) [ -n "${LARGE:-}" ] || die "UPSTREAM=$UPSTREAM needs LARGE: the upstream's checkpoint" ;;
  url) [ -n "${UPSTREAM_URL:-}" ] || die "UPSTREAM=url needs UPSTREAM_URL, e.g. http://gpu-host:8000/v1" ;;
  *) die "UPSTREAM must be serve, vllm or url, got '$UPSTREAM'" ;;
esac
[ "$UPSTREAM" != vllm ] || command -v vllm >/dev/null || die "UPSTREAM=vllm but vllm is not installed (pip install vllm)"
[ "$REDIS" != start ] || command -v redis-server >/dev/null || die "REDIS=start but redis-server is not on PATH"
mkdir -p "$LOG_DIR"

pids=()  # started processes, in order; stopped in reverse
stop() {
  trap - INT TERM EXIT
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    if kill -0 "${pids[i]}" 2>/dev/null; then
      kill -TERM "${pids[i]}" 2>/dev/null || true
      for _ in $(seq 100); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.1; done  # 10 s, then KILL
      kill -KILL "${pids[i]}" 2>/dev/null || true
      wait "${pids[i]}" 2>/dev/null || true
    fi
  done
  say "stopped"
}
trap 'stop; exit 0' INT TERM
trap 'stop' EXIT

wait_healthy() {  # URL PID NAME: until URL answers 200, or the process exits, or WAIT seconds pass
  local url=$1 pid=$2 name=$3 deadline=$((SECONDS + WAIT))
  until "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" "$url" 2>/dev/null; do
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
      die "$name exited before it was healthy: see $LOG_DIR/$name.log"
    fi
    [ $SECONDS -lt $deadline ] || die "$name was not healthy at $url within $WAIT s: see $LOG_DIR/$name.log"
    sleep 0.5
  done
  say "$name is up ($url)"
}

if [ "$REDIS" = start ]; then
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >"$LOG_DIR/redis.log" 2>&1 &
  pids+=($!)
  REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0
  until "$PYTHON" -c "import redis, sys; redis.Redis.from_url(sys.argv[1]).ping()" "$REDIS_URL" 2>/dev/null; do
    kill -0 "${pids[-1]}" 2>/dev/null || die "redis-server exited: see $LOG_DIR/redis.log"
    sleep 0.2
  done
  say "redis is up ($REDIS_URL)"
fi

case "$UPSTREAM" in
  serve)
    "$PYTHON" serve.py --init_from="$LARGE" --model_name="$MODEL" --host="$HOST" --port="$UPSTREAM_PORT" \
      --trace_file="$LOG_DIR/upstream-trace.jsonl" >"$LOG_DIR/upstream.log" 2>&1 &
    pids+=($!)
    UPSTREAM_URL=http://$HOST:$UPSTREAM_PORT/v1
    wait_healthy "http://$HOST:$UPSTREAM_PORT/health" "${pids[-1]}" upstream ;;
  vllm)
    # shellcheck disable=SC2086
    vllm serve "$LARGE" --served-model-name "$MODEL" --host "$HOST" --port "$UPSTREAM_PORT" ${VLLM_ARGS:-} \
      >"$LOG_DIR/upstream.log" 2>&1 &
    pids+=($!)
    UPSTREAM_URL=http://$HOST:$UPSTREAM_PORT/v1
    wait_healthy "http://$HOST:$UPSTREAM_PORT/health" "${pids[-1]}" upstream ;;
  url)
    wait_healthy "${UPSTREAM_URL%/}/models" "" upstream ;;
esac

gateway=(--init_from="$SMALL" --model_name="$MODEL" --host="$HOST" --port="$PORT" --upstream="$UPSTREAM_URL"
         --short_prompt_chars="$SHORT_PROMPT_CHARS" --upstream_connect_timeout="$CONNECT_TIMEOUT"
         --trace_content="$TRACE_CONTENT" --trace_file="$LOG_DIR/trace.jsonl")
[ "$FALLBACK" != True ] || gateway+=(--fallback="$MODEL")
[ -z "$REDIS_URL" ] || gateway+=(--trace_redis="$REDIS_URL")
# shellcheck disable=SC2086
"$PYTHON" serve.py "${gateway[@]}" ${GATEWAY_ARGS:-} >"$LOG_DIR/gateway.log" 2>&1 &
pids+=($!)
wait_healthy "http://$HOST:$PORT/health" "${pids[-1]}" gateway

say "ready: http://$HOST:$PORT/v1 serves $MODEL (prompts over $SHORT_PROMPT_CHARS characters go to $UPSTREAM_URL)"
say "try: curl -s http://$HOST:$PORT/health"
wait -n "${pids[@]}" || true  # one of them died: stop the rest
say "a process of the stack exited: see $LOG_DIR/*.log"
stop
exit 1
