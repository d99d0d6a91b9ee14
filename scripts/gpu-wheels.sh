#!/usr/bin/env bash
# Download the wheels scripts/gpu-check.sh installs on a GPU machine that has no network.
#
#   scripts/gpu-wheels.sh [DEST]          # DEST defaults to shared/wheels
#
# Run it on a machine with network access. It fetches, for the GPU machine's platform and Python
# version, every package elmforest needs *except torch* (the GPU machine keeps its own CUDA build),
# plus setuptools (to build the editable install offline) and pytest (for the GPU tests):
# pydantic, pydantic-core, typing-inspection, annotated-types, transformers, tokenizers, ... and
# their dependencies. Packages the GPU machine already has are simply not installed there.
#
# Environment:
#   PYTHON_VERSIONS  Python versions of the GPU machine, e.g. "3.10 3.11 3.12"
#                    (default: this machine's python3 version)
#   PLATFORMS        wheel platform tags (default: manylinux x86_64, glibc 2.17 and 2.28)
#   PIP              the pip to run (default: python3 -m pip)
set -euo pipefail

cd "$(dirname "$0")/.."
DEST=${1:-shared/wheels}
PIP=${PIP:-python3 -m pip}
PYTHON_VERSIONS=${PYTHON_VERSIONS:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
PLATFORMS=${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}

# The [project] dependencies of pyproject.toml, torch left out.
REQUIREMENTS=$(python3 - <<'EOF'
import re
from pathlib import Path

text = Path("pyproject.toml").read_text()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
reqs = re.findall(r'"([^"]+)"', block)
print("\n".join(r for r in reqs if not re.match(r"torch\b", r)))
EOF
)
mkdir -p "$DEST"
platform_args=()
for p in $PLATFORMS; do platform_args+=(--platform "$p"); done
for v in $PYTHON_VERSIONS; do
    echo "== wheels for Python $v ($PLATFORMS) -> $DEST"
    # shellcheck disable=SC2086  # PIP may be "python3 -m pip"
    $PIP download --dest "$DEST" --only-binary=:all: --python-version "$v" --implementation cp \
        "${platform_args[@]}" "setuptools>=77" wheel "pytest>=7.4" $REQUIREMENTS
done
# torch's own wheels must not sneak in (a dependency asking for torch would pull gigabytes).
if ls "$DEST" | grep -Eiq '^(torch|nvidia_|triton)-'; then
    echo "error: $DEST holds torch/nvidia/triton wheels; remove them (the GPU machine keeps its own)" >&2
    exit 1
fi
echo "$(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
