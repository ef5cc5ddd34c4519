#!/usr/bin/env bash
# Builds the image with buildah (rootless-capable, no daemon; Debian's `buildah`) and runs the compose
# stack's commands in it: `bash scripts/image_check.sh` as root, or `STAGE=build|stack` for one half.
# Where Docker Hub cannot be reached (this project's machines reach only package registries), the base
# image is a stand-in: Debian bookworm with its Python 3.11 (debootstrap from deb.debian.org), tagged
# for `--from`; torch 2.13.0+cpu comes from pip's find-links ($WHEELS) when PyTorch's index is out of
# reach. On a host that reaches Docker Hub and download.pytorch.org, set STANDIN= to build as written.
set -euo pipefail
cd "$(dirname "$0")/.."
export STORAGE_DRIVER="${STORAGE_DRIVER:-overlay}" BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
WORK="${WORK:-/tmp/loranode-image}"; WHEELS="${WHEELS:-/opt/wheels}"; STANDIN="${STANDIN-localhost/py311-bookworm-standin}"
mkdir -p "$WORK"

standin() {  # python:3.11-slim's stand-in: bookworm's python3.11 as /usr/local/bin/python, pip allowed
  buildah inspect "$STANDIN" >/dev/null 2>&1 && return
  local root="$WORK/rootfs" c m
  [ -x "$root/usr/bin/python3" ] || debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian
  rm -f "$root/usr/lib/python3.11/EXTERNALLY-MANAGED"; ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"  # this host's proxy CA
  printf '[global]\nfind-links = %s\ncert = /etc/ssl/certs/ca-certificates.crt\n' "$WHEELS" > "$root/etc/pip.conf"
  c=$(buildah from scratch); m=$(buildah mount "$c"); cp -a "$root/." "$m/"; buildah umount "$c" >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --env NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt "$c"
  buildah commit -q "$c" "$STANDIN" >/dev/null; buildah rm "$c" >/dev/null
}

build() {  # the working tree's tracked files as the context (.dockerignore applies), cached layers kept
  local ctx="$WORK/context"; rm -rf "$ctx"; mkdir -p "$ctx"
  git ls-files -z | xargs -0 cp --parents -t "$ctx"; cp .dockerignore "$ctx/"
  if [ -n "$STANDIN" ]; then
    standin
    buildah bud --layers --pull=never --from "$STANDIN" -v "$WHEELS:$WHEELS:ro" \
      --build-arg TORCH_INDEX=https://pypi.org/simple -t loranode:local "$ctx"
  else
    buildah bud --layers -t loranode:local "$ctx"
  fi
}

stack() {  # docs/operator.md's first start, backup and restore, every loranode command in the image
  buildah rm loranode-check >/dev/null 2>&1 || true
  buildah from --pull=never --name loranode-check localhost/loranode:local >/dev/null
  cat > "$WORK/in_image.sh" <<'INNER'
#!/usr/bin/env bash
exec buildah run --volume "$SMOKE:$SMOKE" loranode-check -- env $(env | grep ^LORANODE_ | tr '\n' ' ') loranode "$@"
INNER
  chmod +x "$WORK/in_image.sh"
  SMOKE="$WORK/stack" AS_UID=10001 LN="$WORK/in_image.sh" bash scripts/stack_check.sh
}

case "${STAGE:-all}" in
  build) build ;;
  stack) stack ;;
  *) build; stack ;;
esac
