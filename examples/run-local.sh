#!/usr/bin/env bash
# The collector and Jaeger of docker-compose.yaml, without Docker: the binaries that
# .ci/build-otel-tools builds from the versions pinned in .ci/versions (it builds them
# on the first run, which needs Go), with the same configuration files, on loopback:
#
#   examples/run-local.sh
#
#   OTLP gRPC   127.0.0.1:4317   (the collector; the services' default endpoint)
#   OTLP HTTP   127.0.0.1:4318
#   Prometheus  http://127.0.0.1:8889/metrics   (the collector's Prometheus exporter)
#   Jaeger UI   http://127.0.0.1:16686          (and its query API, /api/traces)
#
# Ctrl-C stops both. Their logs are in $RUN_DIR (default: a new temporary directory).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
build="$repo/.ci/build-otel-tools"

bash "$build" collector jaeger
collector=$(bash "$build" --path collector)
jaeger=$(bash "$build" --path jaeger)

run_dir=${RUN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/otel-mtls-run-local.XXXXXX")}
mkdir -p "$run_dir"
pids=()
stop() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'stop; exit 0' INT TERM

# Jaeger's own OTLP port is 14317: the collector, in front of it, takes 4317.
JAEGER_OTLP_GRPC_ENDPOINT=127.0.0.1:14317 \
JAEGER_QUERY_HTTP_ENDPOINT=127.0.0.1:16686 \
JAEGER_QUERY_GRPC_ENDPOINT=127.0.0.1:16685 \
  "$jaeger" --config "$repo/examples/jaeger-config.yaml" >"$run_dir/jaeger.log" 2>&1 &
pids+=($!)

OTLP_GRPC_ENDPOINT=127.0.0.1:4317 \
OTLP_HTTP_ENDPOINT=127.0.0.1:4318 \
PROMETHEUS_ENDPOINT=127.0.0.1:8889 \
JAEGER_OTLP_ENDPOINT=127.0.0.1:14317 \
COLLECTOR_TELEMETRY_HOST=127.0.0.1 \
  "$collector" --config "$repo/otel-collector-config.yaml" >"$run_dir/collector.log" 2>&1 &
pids+=($!)

# Up when both answer (30 s at most).
for _ in $(seq 300); do
  if (exec 3<>/dev/tcp/127.0.0.1/16686) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/8889) 2>/dev/null; then
    echo "collector: OTLP on 127.0.0.1:4317 (gRPC) and :4318 (HTTP), metrics on http://127.0.0.1:8889/metrics"
    echo "Jaeger:    http://127.0.0.1:16686"
    echo "logs:      $run_dir/collector.log, $run_dir/jaeger.log"
    echo "Ctrl-C stops both."
    wait -n "${pids[@]}" || true
    echo "run-local.sh: a process exited; its log:" >&2
    tail -n 20 "$run_dir/collector.log" "$run_dir/jaeger.log" >&2
    exit 1
  fi
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$run_dir"/*.log >&2; exit 1; }
  done
  sleep 0.1
done
echo "run-local.sh: the collector or Jaeger did not start within 30 s" >&2
tail -n 20 "$run_dir"/*.log >&2
exit 1
