#!/usr/bin/env bash
# Builds (or reuses) the pinned binaries of the test infrastructure and prints the folder that holds
# them all. Binaries are cached outside the repository, one folder per name and version, so only the
# first run on a machine pays for the builds.
#
# If DIFFTRAIN_TEST_ASSETS or KUBEBUILDER_ASSETS names a folder with ready binaries, the binaries
# found there are used as they are and only the missing ones are built.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${DIFFTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/difftrain}/bin"
out="$cache/testenv-$KUBERNETES_VERSION"
mkdir -p "$out"
export GOFLAGS="${GOFLAGS:-} -trimpath -buildvcs=false"

log() { echo "[testenv] $*" >&2; }

# link_ready NAME: use a ready binary from a folder named by the environment, if there is one.
link_ready() {
  local name=$1 dir
  for dir in "${DIFFTRAIN_TEST_ASSETS:-}" "${KUBEBUILDER_ASSETS:-}"; do
    if [ -n "$dir" ] && [ -x "$dir/$name" ]; then
      ln -sf "$dir/$name" "$out/$name"
      return 0
    fi
  done
  return 1
}

# build_go NAME VERSIONDIR CMD...: run CMD (which writes NAME into $tmp) unless the binary is cached.
build_go() {
  local name=$1 vdir="$cache/$2" lock; shift 2
  if [ ! -x "$vdir/$name" ] && ! link_ready "$name"; then
    # Several test runs on one machine build a binary once: the others wait here for it.
    exec {lock}>"$cache/.lock-$name" && flock "$lock"
  fi
  if [ ! -x "$vdir/$name" ] && ! link_ready "$name"; then
    log "building $name into $vdir (first run on this machine; this takes minutes)"
    local tmp; tmp="$(mktemp -d "$cache/.build.XXXXXX")"
    local start=$SECONDS
    (cd "$here" && tmp="$tmp" "$@") >&2
    mkdir -p "$vdir" && mv "$tmp/$name" "$vdir/$name" && rm -rf "$tmp"
    log "built $name in $((SECONDS - start))s"
  fi
  if [ -n "${lock:-}" ]; then exec {lock}>&-; fi
  if [ -x "$vdir/$name" ]; then ln -sf "$vdir/$name" "$out/$name"; fi
}

# The version is stamped as Kubernetes' own build does, so servers and nodes report v1.30.x (Helm
# checks a chart's kubeVersion against it).
k8s_version_flags() {
  local v=${KUBERNETES_VERSION#v} pkg=k8s.io/component-base/version
  echo "-X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=${v%%.*} -X $pkg.gitMinor=$(echo "$v" | cut -d. -f2)"
}
k8s_build() { (cd k8s && go build -ldflags "-s -w $(k8s_version_flags)" -o "$tmp/" "k8s.io/kubernetes/cmd/$1"); }
go_install() { GOBIN="$tmp" go install -ldflags "-s -w ${2:-}" "$1"; }

for cmd in kube-apiserver kube-controller-manager kubectl kube-scheduler kubelet kube-proxy; do
  build_go "$cmd" "kubernetes-$KUBERNETES_VERSION-stamped" k8s_build "$cmd"
done
build_go minio "minio-$MINIO_MODULE_VERSION" go_install "github.com/minio/minio@$MINIO_MODULE_VERSION"
build_go helm "helm-$HELM_VERSION" go_install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
  "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
build_go kwok "kwok-$KWOK_VERSION" go_install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
build_go coredns "coredns-$COREDNS_VERSION" go_install "github.com/coredns/coredns@$COREDNS_VERSION"
build_go kueue "kueue-$KUEUE_VERSION" go_install "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION" \
  "-X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"

# Kueue's CRDs and webhook configurations, from the same module's source in the Go module cache
# (a ready folder's kueue-manifests/ is used as it is).
kueue_manifests() {
  local vdir="$cache/kueue-$KUEUE_VERSION" dir src tmp
  for dir in "${DIFFTRAIN_TEST_ASSETS:-}" "${KUBEBUILDER_ASSETS:-}"; do
    if [ -n "$dir" ] && [ -d "$dir/kueue-manifests" ]; then
      ln -sfn "$dir/kueue-manifests" "$out/kueue-manifests"
      return 0
    fi
  done
  if [ ! -f "$vdir/manifests/crd-kustomization.yaml" ]; then
    src="$(cd "$cache" && go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" \
      | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [ -d "$src/config/components/crd/bases" ] || { log "no Kueue source for $KUEUE_VERSION"; exit 1; }
    tmp="$(mktemp -d "$cache/.build.XXXXXX")"
    mkdir -p "$tmp/crds"
    cp "$src"/config/components/crd/bases/*.yaml "$tmp/crds/"
    # which CRDs get the conversion webhook (its patches list)
    cp "$src/config/components/crd/kustomization.yaml" "$tmp/crd-kustomization.yaml"
    cp "$src/config/components/webhook/manifests.yaml" "$tmp/webhooks.yaml"
    chmod -R u+w,go+rX "$tmp"
    mkdir -p "$vdir" && rm -rf "$vdir/manifests" && mv "$tmp" "$vdir/manifests"
  fi
  ln -sfn "$vdir/manifests" "$out/kueue-manifests"
}
kueue_manifests

# Prometheus (the version stamped as its release build does) and the Prometheus Operator's
# monitoring.coreos.com CRDs, from that module's source in the Go module cache.
prom_minor=${PROMETHEUS_VERSION#v0.} && prom_minor=${prom_minor%%.*}  # v0.316.0 is 3.16.0
prom_version="$((prom_minor / 100)).$((prom_minor % 100)).${PROMETHEUS_VERSION##*.}"
prom_flags="-X github.com/prometheus/common/version.Version=$prom_version"
# Only the Kubernetes service discovery the tests use is compiled in (the module's own build tags):
# the cloud providers' SDKs are most of a full build's compile time.
prom_go_install() { GOFLAGS="$GOFLAGS -tags=remove_all_sd,enable_kubernetes_sd" go_install "$@"; }
for cmd in prometheus promtool; do
  build_go "$cmd" "prometheus-$PROMETHEUS_VERSION-k8s-sd" prom_go_install \
    "github.com/prometheus/prometheus/cmd/$cmd@$PROMETHEUS_VERSION" "$prom_flags"
done
# module_crds LINK VDIR MODULE@VERSION PATH MARKER: CRD manifests from a module's source in the Go
# module cache (PATH: a folder or one file in it), copied once into VDIR/crds and linked as LINK
# beside the binaries (a ready folder's LINK is used as it is).
module_crds() {
  local link=$1 vdir=$2 module=$3 path=$4 marker=$5 dir src
  for dir in "${DIFFTRAIN_TEST_ASSETS:-}" "${KUBEBUILDER_ASSETS:-}"; do
    if [ -n "$dir" ] && [ -d "$dir/$link" ]; then
      ln -sfn "$dir/$link" "$out/$link"
      return 0
    fi
  done
  local lock=
  if [ ! -f "$vdir/crds/$marker" ]; then
    # as for the binaries: test runs started side by side copy the folder once
    exec {lock}>"$cache/.lock-$link" && flock "$lock"
  fi
  if [ ! -f "$vdir/crds/$marker" ]; then
    src="$(cd "$cache" && GOFLAGS=-mod=mod go mod download -json "$module" \
      | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
    [ -e "$src/$path" ] || { log "no $path in the source of $module"; exit 1; }
    mkdir -p "$vdir" && rm -rf "$vdir/crds.tmp"
    if [ -d "$src/$path" ]; then
      cp -r "$src/$path" "$vdir/crds.tmp"
    else
      mkdir "$vdir/crds.tmp" && cp "$src/$path" "$vdir/crds.tmp/"
    fi
    chmod -R u+w "$vdir/crds.tmp" && rm -rf "$vdir/crds" && mv "$vdir/crds.tmp" "$vdir/crds"
  fi
  if [ -n "$lock" ]; then exec {lock}>&-; fi
  ln -sfn "$vdir/crds" "$out/$link"
}
module_crds prometheus-operator-crds "$cache/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION" \
  "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
  example/prometheus-operator-crd monitoring.coreos.com_podmonitors.yaml

# Argo CD's Application CRD (only the CRD: the API server then validates an Application as a cluster
# with Argo CD would).
module_crds argocd-crds "$cache/argocd-$ARGOCD_VERSION" \
  "github.com/argoproj/argo-cd/v3@$ARGOCD_VERSION" \
  manifests/crds/application-crd.yaml application-crd.yaml

# Debian's packages: etcd, and the real test node's runtime, network and image tools (installed
# when missing and we are root; tests/infra/node.py names what is missing otherwise).
packages=()
if ! link_ready etcd && ! command -v etcd >/dev/null 2>&1; then packages+=(etcd-server); fi
for pair in containerd:containerd runc:runc buildah:buildah debootstrap:debootstrap \
            iptables:iptables gcc:gcc; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || packages+=("${pair#*:}")
done
[ -x /usr/lib/cni/bridge ] || packages+=(containernetworking-plugins)
if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's ${packages[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}") >&2
  elif [[ " ${packages[*]} " == *" etcd-server "* ]]; then
    log "etcd is missing: install Debian's etcd-server or set DIFFTRAIN_TEST_ASSETS"; exit 1
  else
    log "not root: the real node's tests need Debian's ${packages[*]}"
  fi
fi
if ! link_ready etcd; then ln -sf "$(command -v etcd)" "$out/etcd"; fi
echo "$out"
