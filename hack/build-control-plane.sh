#!/usr/bin/env bash
# Build etcd, kube-apiserver and kube-controller-manager from the pinned Go
# modules and cache them, keyed by version, under
# ${XDG_CACHE_HOME:-~/.cache}/openchecker-operator/bin. A cached version is
# never rebuilt, and a run that finds every binary cached needs no Go
# toolchain. kubectl is built only when PATH has none. Prints the folder that
# contains the binaries on its last line.
#
# A cold build downloads about 1 GB of modules and then compiles; the
# compile took 4 minutes on a 2-core machine with an empty Go build cache.
# The Go build cache makes later builds of other versions faster.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=hack/versions.env
source "$here/versions.env"

cache_root=${XDG_CACHE_HOME:-$HOME/.cache}/openchecker-operator/bin
kube_dir=$cache_root/kubernetes-$KUBERNETES_VERSION
etcd_dir=$cache_root/etcd-$ETCD_VERSION
assets_dir=$cache_root/assets-$KUBERNETES_VERSION-etcd-$ETCD_VERSION

binaries=(
    "$etcd_dir/etcd"
    "$kube_dir/kube-apiserver"
    "$kube_dir/kube-controller-manager"
)
if ! command -v kubectl >/dev/null 2>&1; then
    binaries+=("$kube_dir/kubectl")
fi

missing=()
for binary in "${binaries[@]}"; do
    [ -x "$binary" ] || missing+=("$binary")
done

if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v go >/dev/null 2>&1; then
        echo "error: the Go toolchain is not on PATH, and it is needed to build" \
            "${missing[*]##*/}; install Go 1.26 or newer, or set KUBEBUILDER_ASSETS" \
            "to a folder holding etcd and kube-apiserver." >&2
        exit 1
    fi
    # Two runs at once (make env-up next to a test session) would write the
    # same temporary files; the second waits here and then finds the cache.
    mkdir -p "$cache_root"
    exec 9>"$cache_root/.build.lock"
    if command -v flock >/dev/null 2>&1; then
        flock 9
    fi
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
for binary in "${binaries[@]}"; do
    name=${binary##*/}
    if [ "$name" != etcd ]; then
        build "$here/kube-build" "k8s.io/kubernetes/cmd/$name" "$binary" "$kube_ldflags"
    fi
done

# One folder in the layout envtest expects (KUBEBUILDER_ASSETS). Only the
# finished binaries are linked, never a leftover *.tmp of a killed build.
mkdir -p "$assets_dir"
for binary in "${binaries[@]}"; do
    ln -sf "$binary" "$assets_dir/${binary##*/}"
done
echo "$assets_dir"
