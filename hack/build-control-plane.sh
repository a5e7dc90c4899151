#!/usr/bin/env bash
# Build etcd, kube-apiserver and kube-controller-manager from the pinned Go
# modules and cache them, keyed by version, under
# ${XDG_CACHE_HOME:-~/.cache}/openchecker-operator/bin. A cached version is
# never rebuilt. Prints the folder that holds the binaries on its last line.
#
# A cold build downloads about 1 GB of modules and compiles for 10-20 minutes
# on 2 cores; the Go build cache makes later builds of other versions faster.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/versions.env
source "$here/versions.env"

cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/openchecker-operator/bin
kube_dir=$cache_root/kubernetes-$KUBERNETES_VERSION
etcd_dir=$cache_root/etcd-$ETCD_VERSION
assets_dir=$cache_root/assets-$KUBERNETES_VERSION-etcd-$ETCD_VERSION

if ! command -v go >/dev/null 2>&1; then
    echo "error: the Go toolchain is not on PATH; install Go 1.26 or newer," \
        "or set KUBEBUILDER_ASSETS to a folder holding etcd and kube-apiserver." >&2
    exit 1
fi

export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local

build() {
    # build MODULE_DIR PACKAGE OUTPUT LDFLAGS
    local module_dir=$1 package=$2 output=$3 ldflags=$4
    if [ -x "$output" ]; then
        return
    fi
    echo "Building $package into $output." >&2
    mkdir -p "$(dirname "$output")"
    # Build to a temporary name so an interrupted build never leaves a
    # truncated binary that a later run would take as cached.
    if ! (cd "$module_dir" && go build -trimpath -tags selinux,notest \
        -ldflags "$ldflags" -o "$output.tmp" "$package"); then
        rm -f "$output.tmp"
        echo "error: building $package failed; see the Go output above." \
            "Check that the Go module proxy is reachable and rerun." >&2
        exit 1
    fi
    mv "$output.tmp" "$output"
}

kube_minor=${KUBERNETES_VERSION#v1.}
kube_minor=${kube_minor%%.*}
version_pkg=k8s.io/component-base/version
kube_ldflags="-s -w \
    -X $version_pkg.gitVersion=$KUBERNETES_VERSION \
    -X $version_pkg.gitMajor=1 \
    -X $version_pkg.gitMinor=$kube_minor \
    -X $version_pkg.gitTreeState=clean \
    -X $version_pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"

build "$here/etcd-build" go.etcd.io/etcd/server/v3 "$etcd_dir/etcd" "-s -w"
build "$here/kube-build" k8s.io/kubernetes/cmd/kube-apiserver \
    "$kube_dir/kube-apiserver" "$kube_ldflags"
build "$here/kube-build" k8s.io/kubernetes/cmd/kube-controller-manager \
    "$kube_dir/kube-controller-manager" "$kube_ldflags"
if ! command -v kubectl >/dev/null 2>&1; then
    build "$here/kube-build" k8s.io/kubernetes/cmd/kubectl "$kube_dir/kubectl" "$kube_ldflags"
fi

# One folder in the layout envtest expects (KUBEBUILDER_ASSETS).
mkdir -p "$assets_dir"
for binary in "$etcd_dir/etcd" "$kube_dir"/*; do
    ln -sf "$binary" "$assets_dir/$(basename "$binary")"
done
echo "$assets_dir"
