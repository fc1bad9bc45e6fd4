#!/bin/sh
# Start the DIML service. On the first start, when $DIML_INDEX holds no index yet, the service
# indexes the images in $DIML_GALLERY first (readyz says so meanwhile); later starts reuse it.
#
# In the image: DIML_INDEX=/data/index, DIML_GALLERY=/gallery, DIML_HOST=0.0.0.0 (Dockerfiles).
# Outside Docker, from a checkout:  bash docker/entrypoint.sh
#   uses .venv/bin/diml when present, the repository's gallery/ and .diml/index.
# Extra arguments go to `diml serve` (e.g. --port 8080, --device cuda).
# `diml serve` runs the server (service/server.py: connection limit, request-head deadline)
# and refuses to start, exit 2 with one line naming the fix, on settings that could not work.
set -eu
repo=$(CDPATH='' cd -- "$(dirname -- "$0")/.." && pwd)
if [ -z "${DIML_BIN:-}" ] && [ -x "$repo/.venv/bin/diml" ]; then
    DIML_BIN="$repo/.venv/bin/diml"
fi
DIML_INDEX=${DIML_INDEX:-$repo/.diml/index}
DIML_GALLERY=${DIML_GALLERY:-$repo/gallery}
export DIML_INDEX DIML_GALLERY
exec "${DIML_BIN:-diml}" serve --host "${DIML_HOST:-127.0.0.1}" --port "${DIML_PORT:-8000}" "$@"
