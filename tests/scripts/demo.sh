#!/usr/bin/env bash
# The README's first command (`make demo`): builds what it needs, starts a local control plane
# (real etcd + kube-apiserver), installs the LoadBalancerIPPool CRD and the pool object of
# examples/ip-pool.yaml, runs service-controller-manager with the local load-balancer provider,
# applies examples/ (Nodes and pods made ready as a kubelet would, and one Service of each
# kind), then shows what a user of seed 000 expects: `kubectl get svc` with CLUSTER-IP,
# EXTERNAL-IP and PORT(S) like 8081:32255/TCP, `kubectl get endpointslices`,
# `kubectl get endpoints` and the pool's counts (`kubectl get loadbalancerippools`).
#
#   tests/scripts/demo.sh           run, print, clean up
#   tests/scripts/demo.sh --keep    leave the control plane and the manager running
#   tests/scripts/demo.sh --down    stop what --keep left running
#
# SCM_DEMO_MANAGER=<path> uses an already built manager binary instead of `cargo build`;
# SCM_DEMO_DIR=<dir> keeps the demo's state elsewhere than .scm/demo (tests use both).
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$SCM_ROOT"

DEMO_DIR="${SCM_DEMO_DIR:-$SCM_ROOT/.scm/demo}"
KEEP=0
for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=1 ;;
    --down) MODE=down ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "demo.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

START=$SECONDS
if [ -t 2 ]; then BOLD=$'\033[1m' PLAIN=$'\033[0m'; else BOLD='' PLAIN=''; fi
step() { printf '\n%s==> %s%s (%ds)\n' "$BOLD" "$*" "$PLAIN" "$((SECONDS - START))" >&2; }
note() { printf '    %s\n' "$*" >&2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid() { # pidfile: SIGTERM, wait up to 15 s, then SIGKILL
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

down() {
  stop_pid "$DEMO_DIR/manager.pid"
  stop_pid "$DEMO_DIR/controlplane.pid"
  rm -rf "$DEMO_DIR"
}

if [ "${MODE:-}" = down ]; then
  down
  echo "demo stopped" >&2
  exit 0
fi

if alive "$DEMO_DIR/controlplane.pid" || alive "$DEMO_DIR/manager.pid"; then
  echo "a demo is already running (started with --keep); stop it with: $0 --down" >&2
  exit 1
fi
rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"

KUBECONFIG_PATH="$DEMO_DIR/admin.kubeconfig"
kc() { bin/kubectl --kubeconfig "$KUBECONFIG_PATH" "$@"; }

finish() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo >&2
    echo "demo failed (exit $rc). Last lines of the logs in $DEMO_DIR:" >&2
    for f in controlplane.log manager.log; do
      [ -f "$DEMO_DIR/$f" ] && { echo "--- $f" >&2; tail -n 25 "$DEMO_DIR/$f" >&2; }
    done
  fi
  if [ "$KEEP" = 1 ] && [ "$rc" -eq 0 ]; then
    return
  fi
  down
}
trap finish EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
step "Building tools (control plane, kubectl; cached by pinned version)"
tests/scripts/tools.sh

if [ -n "${SCM_DEMO_MANAGER:-}" ]; then
  MANAGER=$SCM_DEMO_MANAGER
  step "Using the manager at $MANAGER"
else
  step "Building service-controller-manager (cargo build; the first build takes several minutes)"
  cargo build --locked --bin service-controller-manager
  MANAGER="$CARGO_TARGET_DIR/debug/service-controller-manager"
fi
[ -x "$MANAGER" ] || { echo "no manager binary at $MANAGER" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
step "Starting the local control plane (etcd + kube-apiserver, Service CIDR 10.43.0.0/16)"
# setsid: with --keep it must outlive this script and its terminal.
setsid bin/controlplane \
  --data-dir "$DEMO_DIR/data" \
  --kubeconfig "$KUBECONFIG_PATH" \
  --pid-file "$DEMO_DIR/controlplane.pid" \
  --service-cluster-ip-range=10.43.0.0/16 \
  --service-node-port-range=30000-32767 \
  >"$DEMO_DIR/controlplane.out" 2>"$DEMO_DIR/controlplane.log" </dev/null &
for i in $(seq 1 1800); do
  grep -q '^controlplane ready' "$DEMO_DIR/controlplane.out" 2>/dev/null && break
  if [ "$i" -gt 50 ] && ! alive "$DEMO_DIR/controlplane.pid"; then break; fi
  sleep 0.1
done
grep -q '^controlplane ready' "$DEMO_DIR/controlplane.out" || { echo "the control plane did not start" >&2; exit 1; }
note "$(cat "$DEMO_DIR/controlplane.out")"

# ---------------------------------------------------------------------------------------------
step "Installing the LoadBalancerIPPool CRD (service-controller-manager crd) and the pool (examples/ip-pool.yaml)"
"$MANAGER" crd | kc apply -f - >&2
kc wait --for condition=established --timeout=60s crd/loadbalancerippools.service-controller-manager.io >&2
kc apply -f examples/ip-pool.yaml >&2

HTTP_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
step "Starting service-controller-manager (--cloud-provider=local, addresses from the pool object)"
setsid "$MANAGER" \
  --kubeconfig "$KUBECONFIG_PATH" \
  --cloud-provider=local \
  --service-cluster-ip-range=10.43.0.0/16 \
  --http-address="127.0.0.1:$HTTP_PORT" \
  --secure-port=0 \
  >"$DEMO_DIR/manager.log" 2>&1 </dev/null &
echo $! >"$DEMO_DIR/manager.pid"
ok=0
for _ in $(seq 1 600); do
  if curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1; then ok=1; break; fi
  alive "$DEMO_DIR/manager.pid" || break
  sleep 0.1
done
[ "$ok" = 1 ] || { echo "the manager did not become ready" >&2; exit 1; }
for _ in $(seq 1 300); do
  curl -fsS "http://127.0.0.1:$HTTP_PORT/metrics" 2>/dev/null | grep -q '^leader_election_master_status{.*} 1' && break
  sleep 0.1
done
note "ready on http://127.0.0.1:$HTTP_PORT (/healthz, /readyz, /metrics); leading: $(kc -n kube-system get lease service-controller-manager -o jsonpath='{.spec.holderIdentity}')"

# ---------------------------------------------------------------------------------------------
step "Registering Nodes (examples/nodes.yaml) and marking them Ready, as kubelets would"
kc apply -f examples/nodes.yaml >&2
n=1
for node in $(kc get nodes -o name); do
  kc patch "$node" --subresource=status --type=merge -p "{\"status\":{\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"KubeletReady\",\"message\":\"demo\"}],\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"192.0.2.1$n\"},{\"type\":\"Hostname\",\"address\":\"${node#node/}\"}]}}" >/dev/null
  n=$((n + 1))
done

step "Creating the app=alpha pods (examples/pods.yaml) and making them Running and Ready"
kc apply -f examples/pods.yaml >&2
i=0
for pod in $(kc get pods -l app=alpha -o name); do
  ip="10.42.$i.1$i"
  kc patch "$pod" --subresource=status --type=merge -p "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$ip\",\"podIPs\":[{\"ip\":\"$ip\"}],\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\"},{\"type\":\"ContainersReady\",\"status\":\"True\"}]}}" >/dev/null
  note "${pod#pod/}: Ready, $ip"
  i=$((i + 1))
done

step "Applying the Services (examples/services.yaml)"
kc apply -f examples/services.yaml >&2

step "Waiting for the controllers: an EXTERNAL-IP for example, EndpointSlices and Endpoints"
wait_until() { # what, command...
  local what=$1; shift
  for _ in $(seq 1 600); do
    if "$@" >/dev/null 2>&1; then note "$what"; return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for: $what" >&2
  return 1
}
has_lb_ip() { [ -n "$(kc get svc example -o jsonpath='{.status.loadBalancer.ingress[0].ip}')" ]; }
slice_endpoints() { # service -> number of ready endpoints in its EndpointSlices
  kc get endpointslices -l "kubernetes.io/service-name=$1" \
    -o jsonpath='{range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]}{"\n"}{end}' | grep -c .
}
three_in_slices() { [ "$(slice_endpoints "$1")" = 3 ]; }
three_in_endpoints() {
  [ "$(kc get endpoints "$1" -o jsonpath='{range .subsets[*].addresses[*]}{.ip}{"\n"}{end}' 2>/dev/null | grep -c .)" = 3 ]
}
wait_until "example: load balancer address assigned" has_lb_ip
for s in example alpha alpha-nodeport alpha-headless; do
  wait_until "$s: 3 ready endpoints in its EndpointSlices" three_in_slices "$s"
done
for s in example alpha alpha-nodeport alpha-headless; do
  wait_until "$s: 3 addresses in its Endpoints" three_in_endpoints "$s"
done
pool_counts_one() { [ "$(kc get loadbalancerippool demo -o jsonpath='{.status.allocated.ipv4}')" = 1 ]; }
wait_until "pool demo: 1 address allocated in its status" pool_counts_one

# ---------------------------------------------------------------------------------------------
step "Result"
show() { printf '\n$ kubectl %s\n' "$*"; kc "$@" 2> >(grep -v 'v1 Endpoints is deprecated' >&2); }
show get svc
show get endpointslices
show get endpoints
show get loadbalancerippools
printf '\n$ service-controller-manager explain default/example\n'
"$MANAGER" explain default/example --kubeconfig "$KUBECONFIG_PATH"
echo

if [ "$KEEP" = 1 ]; then
  cat <<EOF
The control plane and the manager keep running (--keep). Reach them with:
  export KUBECONFIG=$KUBECONFIG_PATH
  bin/kubectl get svc,endpointslices
  curl http://127.0.0.1:$HTTP_PORT/metrics
Logs: $DEMO_DIR/manager.log, $DEMO_DIR/controlplane.log
Stop them with: $0 --down
EOF
else
  step "Cleaning up (stopping the manager and the control plane; pass --keep to leave them running)"
fi
