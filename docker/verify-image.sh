#!/usr/bin/env bash
# Build the service image and run it, on a machine with no Docker engine and no base image to pull.
#
#   bash docker/verify-image.sh (as root) [--gpu] [--report FILE] [--env KEY=VALUE]...
#
# 1. A Debian base image made here: mmdebstrap (bookworm, python3, python3-venv, ca-certificates)
#    from the host's apt sources, imported with buildah (reused while it exists).
# 2. docker/Dockerfile built FROM it with buildah (chroot isolation; RUN steps use the host's
#    network), timed.
# 3. The built image's own file system mounted and its ENTRYPOINT run in a chroot, as the image's
#    USER, with the image's ENV (plus each --env), in fresh network, mount and PID namespaces (so
#    it listens on its own port 8000, as in a container) and an empty folder as its VOLUME: the
#    first start must index the baked-in gallery into /data; then /readyz, a search with a photo
#    of the image's own gallery, the image's HEALTHCHECK command, and the sha256 of the baked
#    MobileNetV2 weights.
# --gpu builds the GPU image's layers instead (docker-compose.yml's build arguments: gcc for
# Triton's launcher, DIML_DEVICE=cuda; python3-dev too, as Debian's Python keeps its headers
# there) and runs it on the CPU (DIML_DEVICE=cpu: no GPU here), checking that the fused Sinkhorn
# kernel would be used. Where PyTorch's CPU index is out of reach, the CPU image takes a CPU-only
# torch wheel from a folder of pip's find-links (this project's machines have torch 2.13.0+cpu
# there: the service needs no torchvision, so any CPU build serves); failing that, both take
# PyPI's CUDA build. The report gives the image's size in bytes (its file system) and its torch.
# A JSON report (the image's config, size, build time and each check) goes to FILE; the exit
# status is non-zero when a step fails. Needs root (chroot, mounts, namespaces); installs
# mmdebstrap and buildah with apt-get when they are missing.
#
# Environment:
#   DEBIAN_SOURCES  apt sources for the base (default: the host's debian.sources)
#   TORCH_INDEX     the index for torch: default PyTorch's CPU index when it answers, else (CPU
#                   image) a local CPU-only wheel as above, else the first local (file://) index
#                   of pip's configuration that serves torch, mounted into the build at that path
#   TORCH           the torch requirement (default: the Dockerfile's, or the local wheel's version)
#   CA_BUNDLE       a CA bundle for pip inside the build (default: the host's, which trusts what
#                   the host trusts, e.g. a TLS-intercepting proxy)
#   IMAGE           the tag to build (default localhost/diml-retrieval:verify)
#   KEEP_IMAGE=1    keep the built image (default: removed after the checks)
set -euo pipefail

field() {  # CONFIG KEY: a field of the image's config, shell-quoted words
    python3 -c 'import json, shlex, sys
v = json.load(open(sys.argv[1]))[sys.argv[2]]
print(shlex.join(v if isinstance(v, list) else [str(v)]))' "$1" "$2"
}

inside() {  # ROOT DATA UID GID OUTDIR: in new mount, network and PID namespaces (see below)
    local root=$1 data=$2 uid=$3 gid=$4 out=$5 envs workdir entrypoint healthcheck server start code
    mapfile -t envs <"$out/env"
    workdir=$(field "$out/config.json" WorkingDir)
    entrypoint=$(field "$out/config.json" Entrypoint)
    healthcheck=$(python3 -c 'import json, shlex, sys
t = json.load(open(sys.argv[1]))["Healthcheck"]["Test"]
assert t[0] == "CMD", t
print(shlex.join(t[1:]))' "$out/config.json")
    ip link set lo up
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount --bind "$data" "$root/data"
    mount -t tmpfs tmpfs "$root/tmp"
    # As the image's USER, with its ENV only, in its WORKDIR (chroot, env and sh all exec, so
    # that the server's PID is the one started here).
    local as_user=(chroot --userspec="$uid:$gid" "$root" env -i "${envs[@]}"
        sh -c "cd $workdir && exec \"\$@\"" sh)
    local -a entry health
    eval "entry=($entrypoint)"
    eval "health=($healthcheck)"

    start=$(date +%s)
    "${as_user[@]}" "${entry[@]}" >"$out/server.log" 2>&1 &
    server=$!
    : >"$out/readyz.jsonl"
    while :; do
        if ! kill -0 "$server" 2>/dev/null; then
            echo "verify-image: the entrypoint exited before /readyz" >&2
            return 1
        fi
        code=$(curl -s -o "$out/readyz.json" -w '%{http_code}' http://127.0.0.1:8000/readyz || true)
        [ "$code" = 200 ] && break
        if [ -s "$out/readyz.json" ]; then
            cat "$out/readyz.json" >>"$out/readyz.jsonl"
            echo >>"$out/readyz.jsonl"
        fi
        if (( $(date +%s) - start > ${READY_TIMEOUT:-900} )); then
            echo "verify-image: not ready after ${READY_TIMEOUT:-900} s" >&2
            return 1
        fi
        sleep 0.5
    done
    echo $(( $(date +%s) - start )) >"$out/ready_seconds"
    curl -s -o "$out/search.json" -w '%{http_code}' \
        -F "image=@$root/gallery/cat/cat-mirror.jpg;type=image/jpeg" \
        'http://127.0.0.1:8000/search?k=4' >"$out/search_status"
    if "${as_user[@]}" "${health[@]}"; then echo 0; else echo $?; fi >"$out/healthcheck_status"
    "${as_user[@]}" python -c 'import hashlib; from model.backbones import find_mobilenet_v2_weights as f
p = f(); print(p); print(hashlib.sha256(p.read_bytes()).hexdigest())' >"$out/weights.txt"
    "${as_user[@]}" python -c 'from model import ot_kernel; print(int(ot_kernel.available()))' \
        >"$out/fused_kernel" 2>/dev/null || true
    kill -INT "$server"  # as Docker stops a container: a signal, then a kill after a grace time
    for _ in $(seq 60); do kill -0 "$server" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$server" 2>/dev/null || true
    wait "$server" || true
    ls -ln "$data/index" >"$out/data_index.txt"
    stat -c '%u' "$data/index" >"$out/data_index_owner"
}

if [ "${1:-}" = --inside ]; then
    shift
    inside "$@"
    exit
fi

here=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
report=""
gpu=""
extra_env=()
while [ $# -gt 0 ]; do
    case $1 in
        --report) report=$2; shift 2 ;;
        --gpu) gpu=1; shift ;;
        --env) extra_env+=("$2"); shift 2 ;;
        *) echo "usage: $0 [--gpu] [--report FILE] [--env KEY=VALUE]..." >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" != 0 ]; then
    echo "verify-image: needs root (chroot, mounts, namespaces)" >&2
    exit 2
fi
if ! command -v mmdebstrap >/dev/null || ! command -v buildah >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap buildah >/dev/null
fi

image=${IMAGE:-localhost/diml-retrieval:verify}
base=localhost/diml-base:bookworm
work=$(mktemp -d /var/tmp/diml-verify.XXXXXX)
ctr=""
cleanup() {
    [ -n "$ctr" ] && { buildah umount "$ctr" >/dev/null 2>&1; buildah rm "$ctr" >/dev/null 2>&1; }
    [ -z "${KEEP_IMAGE:-}" ] && buildah rmi "$image" >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

# 1. The base image.
base_seconds=0
if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    t0=$(date +%s)
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$work/rootfs.tar" "${DEBIAN_SOURCES:-/etc/apt/sources.list.d/debian.sources}"
    c=$(buildah from scratch)
    buildah add --quiet "$c" "$work/rootfs.tar" /
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
    buildah commit --quiet "$c" "$base" >/dev/null
    buildah rm "$c" >/dev/null
    rm "$work/rootfs.tar"
    base_seconds=$(( $(date +%s) - t0 ))
fi

# 2. The image.
build_args=(--build-arg "BASE_IMAGE=$base")
if [ -n "$gpu" ]; then
    build_args+=(--build-arg "SYSTEM_PACKAGES=gcc libc6-dev python3-dev" --build-arg DEVICE=cuda)
    extra_env+=(DIML_DEVICE=cpu)
fi
volumes=()
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$ca" ]; then
    volumes+=(--volume "$ca:/etc/ssl/host-ca.crt:ro")
    build_args+=(--build-arg CA_BUNDLE=/etc/ssl/host-ca.crt)
fi
cpu_wheel() {  # a CPU-only torch wheel for the base's Python in a find-links folder of pip's
    local c py folder
    c=$(buildah from --quiet "$base")
    py=$(buildah run --isolation chroot "$c" python3 -c 'import sys; print("cp%d%d" % sys.version_info[:2])' || true)
    buildah rm "$c" >/dev/null
    [ -n "$py" ] || return 0
    for folder in $(python3 -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p"); do
        for wheel in "$folder"/torch-*+cpu-"$py"-"$py"-*linux*_x86_64.whl; do
            [ -f "$wheel" ] && { echo "$wheel"; return 0; }
        done
    done
}
torch_index=${TORCH_INDEX:-}
torch_req=${TORCH:-}
wheel=""
if [ -z "$torch_index" ] && ! curl -sf --max-time 10 -o /dev/null https://download.pytorch.org/whl/cpu/torch/; then
    if [ -z "$gpu" ] && [ -z "$torch_req" ]; then wheel=$(cpu_wheel); fi
    if [ -n "$wheel" ]; then
        version=$(basename "$wheel" | cut -d- -f2)
        torch_req="torch==${version%+cpu}"
        wheels=$(dirname "$wheel")
        torch_index=file://$wheels  # for the report; pip gets the folder as find-links instead
        build_args+=(--build-arg "TORCH_FIND_LINKS=$wheels" --build-arg TORCH_INDEX=)
        volumes+=(--volume "$wheels:$wheels:ro")
    else
        for url in $(python3 -m pip config list 2>/dev/null | sed -n "s/.*index-url='\(.*\)'/\1/p"); do
            folder=${url#file://}
            if [ "$folder" != "$url" ] && [ -e "$folder/torch" ]; then
                torch_index=$url
                break
            fi
        done
    fi
fi
[ -n "$torch_req" ] && build_args+=(--build-arg "TORCH=$torch_req")
if [ -n "$torch_index" ] && [ -z "$wheel" ]; then
    build_args+=(--build-arg "TORCH_INDEX=$torch_index")
    if [ "${torch_index#file://}" != "$torch_index" ]; then  # a local index: its files beside it
        mirror=$(dirname "${torch_index#file://}")
        volumes+=(--volume "$mirror:$mirror:ro")
    fi
fi
echo "verify-image: building $image (${torch_req:-the pinned torch} from ${torch_index:-the CPU index of PyTorch})" >&2
t0=$(date +%s)
buildah bud --quiet --isolation chroot --format docker --layers=false "${volumes[@]}" \
    "${build_args[@]}" -f "$here/docker/Dockerfile" -t "$image" "$here" >"$work/build.log" 2>&1 || {
    tail -40 "$work/build.log" >&2
    exit 1
}
build_seconds=$(( $(date +%s) - t0 ))

# 3. Run it.
buildah inspect --type image "$image" \
    | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["Docker"]["config"]))' \
    >"$work/config.json"
ctr=$(buildah from "$image")
root=$(buildah mount "$ctr")
du -sb --one-file-system "$root" | cut -f1 >"$work/size_bytes"  # its file system, before it runs
chroot "$root" /opt/venv/bin/python -c 'import torch; print(torch.__version__); print(torch.version.cuda or "")' \
    >"$work/torch.txt" 2>/dev/null || true
uid=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["User"])' "$work/config.json")
gid=$(awk -F: -v u="$uid" '$3 == u {print $4}' "$root/etc/passwd")
python3 - "$work/config.json" "${extra_env[@]}" >"$work/env" <<'EOF'
import json, sys
env = dict(e.split("=", 1) for e in json.load(open(sys.argv[1]))["Env"])
env.update(e.split("=", 1) for e in sys.argv[2:])
print("\n".join(f"{k}={v}" for k, v in env.items()))
EOF
data=$work/data  # a new named volume: empty, owned by the image's user
mkdir "$data"
chown "$uid:${gid:-0}" "$data"
echo "verify-image: running its entrypoint (first start: indexing the gallery)" >&2
unshare --mount --net --pid --fork bash "$0" --inside "$root" "$data" "$uid" "${gid:-0}" "$work" \
    || status=$?

python3 - "$work" "$image" "$build_seconds" "$base_seconds" "${status:-0}" \
    "$(buildah images --format '{{.Size}}' "$image")" "${torch_index:-}" >"$work/report.json" <<'EOF'
import json, sys
from pathlib import Path

work, image, build_s, base_s, status, size, torch_index = sys.argv[1:]
w = Path(work)
def read(name):
    p = w / name
    return p.read_text().strip() if p.exists() else None
readyz = [json.loads(line) for line in (read("readyz.jsonl") or "").splitlines() if line]
search = json.loads(read("search.json")) if read("search.json") else None
weights = (read("weights.txt") or "\n").splitlines()
torch_lines = (read("torch.txt") or "\n").splitlines() + [""]
report = {
    "image": image,
    "size": size,
    "size_bytes": int(read("size_bytes") or 0),
    "torch_version": torch_lines[0] or None,
    "torch_cuda": torch_lines[1] or None,
    "build_seconds": int(build_s),
    "base_seconds": int(base_s),
    "torch_index": torch_index or "PyTorch's CPU index",
    "config": json.loads(read("config.json")),
    "run_status": int(status),
    "ready_seconds": int(read("ready_seconds")) if read("ready_seconds") else None,
    "readyz_messages": sorted({r.get("error", {}).get("message", "") for r in readyz}),
    "search_status": int(read("search_status") or 0),
    "search_labels": [r["label"] for r in search["results"]] if search and "results" in search else None,
    "healthcheck_status": int(read("healthcheck_status")) if read("healthcheck_status") else None,
    "weights_path": weights[0] if weights[0] else None,
    "weights_sha256": weights[1] if len(weights) > 1 else None,
    "data_index": (read("data_index.txt") or "").splitlines()[1:],
    "data_index_owner": int(read("data_index_owner")) if read("data_index_owner") else None,
    "fused_kernel_available": read("fused_kernel") == "1",
}
print(json.dumps(report, indent=2))
EOF
if [ -n "$report" ]; then cp "$work/report.json" "$report"; else cat "$work/report.json"; fi
if [ "${status:-0}" != 0 ]; then
    tail -40 "$work/server.log" >&2 || true
    exit 1
fi
echo "verify-image: done: build ${build_seconds}s, image $(buildah images --format '{{.Size}}' "$image") ($(cat "$work/size_bytes") bytes of files), torch $(head -1 "$work/torch.txt")" >&2
