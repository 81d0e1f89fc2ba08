#!/usr/bin/env bash
# What benchmarks/gpu_check.py needs on a GPU machine that cannot download anything, and the way to run it there.
#
#   benchmarks/gpu_bundle.sh [DIR]                 here: DIR (default runs/gpu-bundle, git-ignored) gets the
#                                                  wheels of fedblock's dependencies that such an image may
#                                                  lack, for CPython 3.12 on manylinux x86_64; prints the size
#                                                  and the command to run on the device (DIR is what travels
#                                                  besides the work tree: the device tool's `carry`)
#   benchmarks/gpu_bundle.sh --run DIR [ARGS...]   there, from the repository root: unpacks the wheels whose
#                                                  modules that Python cannot import into DIR/site, makes DIR/pkg
#                                                  a `fedblock` package of the work tree (symlinks common, server,
#                                                  client: what pyproject's package-dir maps, with no install and
#                                                  no setuptools), then runs gpu_check.py ARGS (default
#                                                  --out $OUT) with both on PYTHONPATH
#
# The image brings torch, transformers, safetensors, grpcio, protobuf and peft (and with them numpy, PyYAML,
# tokenizers); zstandard is missing. The wheels are unpacked, not pip-installed (a wheel is a zip, and pip
# may be absent), and only where the module is missing, so nothing the image has is shadowed. $PYTHON picks
# the interpreter (default: the first of python3, python that imports torch).
set -euo pipefail

WHEELS=(zstandard prometheus-client PyYAML grpcio-health-checking grpcio-reflection)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ "${1:-}" != "--run" ]; then
    dir=${1:-runs/gpu-bundle}
    pip=${PIP:-"$ROOT/.venv/bin/python -m pip"}
    rm -rf "$dir/wheels" "$dir/site" "$dir/pkg"  # site and pkg: made on the device (pkg's links point here)
    mkdir -p "$dir/wheels"
    # Versions as constraints.txt pins them; binary wheels for the device's interpreter, not this one's.
    $pip download -q --disable-pip-version-check --only-binary=:all: --no-deps --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -c "$ROOT/constraints.txt" -d "$dir/wheels" "${WHEELS[@]}"
    ls -1 "$dir/wheels"
    echo "bundle: $(du -sh "$dir" | cut -f1) in $dir (carry: [\"$dir\"])"
    echo "on the device, from the repository root: bash benchmarks/gpu_bundle.sh --run $dir"
    exit 0
fi

dir=${2:?usage: gpu_bundle.sh --run DIR [gpu_check.py arguments]}
shift 2
[ $# -gt 0 ] || set -- --out "${OUT:-runs/bench/gpu}"
python=""
for candidate in ${PYTHON:-} python3 python; do
    if "$candidate" -c "import torch" 2> /dev/null; then python=$candidate; break; fi
done
[ -n "$python" ] || { echo "no Python with torch here (set PYTHON)" >&2; exit 2; }

dir=$(cd "$dir" && pwd)
rm -rf "$dir/site" "$dir/pkg"
mkdir -p "$dir/site" "$dir/pkg/fedblock"
for part in common server client; do
    ln -s "$ROOT/$part" "$dir/pkg/fedblock/$part"
done
"$python" - "$dir/wheels" "$dir/site" << 'EOF'
import importlib.util, sys, zipfile
from pathlib import Path

wheels, site = Path(sys.argv[1]), Path(sys.argv[2])
for wheel in sorted(wheels.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
        modules = {t.removesuffix(".py") for t in tops if not t.endswith((".dist-info", ".data"))}
        missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
        if missing:
            z.extractall(site)
        print(f"{wheel.name}: {'unpacked for ' + ', '.join(missing) if missing else 'already importable'}")
EOF
export PYTHONPATH="$dir/pkg:$dir/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
"$python" -c "import sys, torch, transformers, fedblock.common.blocks as b
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'transformers', transformers.__version__, 'fedblock from', b.__file__)"
exec "$python" "$ROOT/benchmarks/gpu_check.py" "$@"
