#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on the lent GPU machine (Python 3.12, its own CUDA torch, no network).
# Run it HERE, where pip reaches PyPI, once per session that will call the device tool:
#
#   bash benchmarks/prepare_gpu_wheels.sh
#
# It writes two ignored folders (listed in .git/info/exclude, never committed) that the device call carries:
#
#   .whl/       the wheels of what ctrlab's training path imports and the GPU image lacks, for CPython 3.12
#               manylinux x86_64, pinned to the versions of this repo's .venv (`.venv/bin/pip freeze`): polars and
#               its runtime, pydantic and pydantic-core, and their Requires-Dist that the image lacks. The image
#               already has torch, numpy, pyarrow, pyyaml, rich and safetensors (see the device's KINDS.md).
#               mlflow, optuna, torchrec and matplotlib are NOT carried: training with tracking.enabled=false
#               never imports them (gpu_check.py blocks their import to prove it).
#   .gpu_data/  the Frappe x1 csv files (frappe/x1/{train,valid,test}.csv.gz, ~2.7 MB) copied from
#               $CTRLAB_DATA_DIR (default ../shared/datasets), which does not travel to the device machine.
#
# The polars runtime wheel is 54 MB as PyPI ships it (deflate); the script re-packs every wheel over 8 MB with
# LZMA (same files, same RECORD hashes; pip installs it through Python's zipfile, which reads LZMA), which brings
# it to ~33 MB, so the travelling tree (repo + .whl + .gpu_data) stays well under the device's 64 MiB.
# It ends by printing the total and fails above 56 MiB. If a Python 3.12 is found here (PY312=..., python3.12 on
# PATH, or pyenv's), it also installs the wheels with the device's exact pip command and imports them.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
VENV_PY=.venv/bin/python
[ -x "$VENV_PY" ] || { echo "error: .venv missing; run 'make install' first" >&2; exit 2; }
LIMIT_MIB=56

# 1. ignored folders, through .git/info/exclude (no tracked file changes)
mkdir -p .git/info
touch .git/info/exclude
for entry in /.whl/ /.gpu_data/; do
  grep -qxF "$entry" .git/info/exclude || echo "$entry" >>.git/info/exclude
done

# 2. the pinned wheels: the versions this .venv has
CARRIED=(polars polars-runtime-32 pydantic pydantic-core annotated-types typing-inspection typing-extensions)
FREEZE=$(.venv/bin/pip freeze)
pins=()
for name in "${CARRIED[@]}"; do
  version=$(printf '%s\n' "$FREEZE" | "$VENV_PY" -c '
import re, sys
want = re.sub(r"[-_.]+", "-", sys.argv[1]).lower()
for line in sys.stdin:
    if "==" in line:
        name, version = line.strip().split("==", 1)
        if re.sub(r"[-_.]+", "-", name).lower() == want:
            print(version.split("+")[0]); break
' "$name")
  [ -n "$version" ] || { echo "error: $name is not installed in .venv (pip freeze)" >&2; exit 2; }
  pins+=("$name==$version")
done
echo "pins (from .venv/bin/pip freeze): ${pins[*]}"
# .whl/.pins records the pins of a finished earlier run: then the download and the re-pack are skipped
if [ "$(cat .whl/.pins 2>/dev/null)" != "${pins[*]}" ]; then
  rm -rf .whl
  "$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
  fresh=1
else
  echo "  .whl already holds these pins (delete .whl to download them again)"
  fresh=0
fi

# 3. every Requires-Dist (markers evaluated for CPython 3.12 on Linux, extras skipped) is carried or on the image
"$VENV_PY" - "${CARRIED[@]}" <<'EOF'
import re, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
carried = {norm(n) for n in sys.argv[1:]}
# Python packages the device image already has (KINDS.md, "Python packages already there"), that ctrlab needs.
on_image = {"torch", "numpy", "pyarrow", "pyyaml", "rich", "safetensors", "typer", "packaging", "typing-extensions"}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "os_name": "posix", "extra": ""}
missing = []
for wheel in sorted(Path(".whl").glob("*.whl")):
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    needs = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                needs.append(str(req))
                if norm(req.name) not in carried | on_image:
                    missing.append(f"{wheel.name}: {req}")
    print(f"  {wheel.name}: requires {', '.join(needs) or 'nothing'}")
if missing:
    sys.exit("error: needed but neither carried nor on the device image:\n  " + "\n  ".join(missing))
EOF
count=$(ls .whl/*.whl | wc -l)
[ "$count" -eq "${#CARRIED[@]}" ] || { echo "error: expected ${#CARRIED[@]} wheels in .whl, found $count" >&2; exit 1; }

# 4. re-pack large wheels with LZMA (identical members; the RECORD hashes are of the uncompressed files)
[ "$fresh" = 0 ] || "$VENV_PY" - <<'EOF'
import os, zipfile
from pathlib import Path
for wheel in sorted(Path(".whl").glob("*.whl")):
    before = wheel.stat().st_size
    if before < 8 * 2**20:
        continue
    tmp = wheel.with_suffix(".lzma.tmp")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_LZMA)
    with zipfile.ZipFile(wheel) as a, zipfile.ZipFile(tmp) as b:
        assert [(i.filename, i.CRC, i.file_size) for i in a.infolist()] == \
               [(i.filename, i.CRC, i.file_size) for i in b.infolist()], wheel
        assert b.testzip() is None, wheel
    os.replace(tmp, wheel)
    print(f"  re-packed {wheel.name} with LZMA: {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB")
EOF
echo "${pins[*]}" >.whl/.pins

# 5. Frappe x1 into .gpu_data/frappe/x1 (checksums against the card)
SRC=${CTRLAB_DATA_DIR:-../shared/datasets}
rm -rf .gpu_data
if [ -d "$SRC/frappe/x1" ]; then
  mkdir -p .gpu_data/frappe/x1
  cp "$SRC"/frappe/x1/{train,valid,test}.csv.gz .gpu_data/frappe/x1/
  chmod u+w .gpu_data/frappe/x1/*
  "$VENV_PY" - <<'EOF'
import hashlib, yaml
from pathlib import Path
card = yaml.safe_load(Path("datasets/frappe_x1.yaml").read_text())
for split, entry in card["files"].items():
    digest = hashlib.sha256((Path(".gpu_data") / entry["path"]).read_bytes()).hexdigest()
    assert digest == entry["sha256"], f"{entry['path']}: sha256 {digest} != card's {entry['sha256']}"
print("  .gpu_data/frappe/x1: train/valid/test match the card's sha256")
EOF
else
  echo "warning: $SRC/frappe/x1 not found: the GPU check will skip its Frappe configurations" >&2
fi

# 6. optional: the device's exact install command under a local CPython 3.12, then import what was installed
if [ -z "${PY312:-}" ]; then  # the first candidate that really is a CPython 3.12 (a pyenv shim may not be)
  for candidate in $(command -v python3.12 || true) "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [ -x "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY312=$candidate
      break
    fi
  done
fi
if [ -n "${PY312:-}" ]; then
  site=$(mktemp -d)
  "$PY312" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  PYTHONPATH="$site" "$PY312" -c '
import polars as pl, pydantic, pydantic_core, sys
df = pl.DataFrame({"a": [1, 2, 2], "b": ["x", "y", "y"]}).group_by("b").agg(pl.len())
class M(pydantic.BaseModel):
    x: int
assert M(x="3").x == 3 and df.height == 2
print(f"  installed and imported under Python {sys.version.split()[0]}: polars {pl.__version__}, "
      f"pydantic {pydantic.__version__} (core {pydantic_core.__version__})")'
  rm -rf "$site"
else
  echo "  (no local Python 3.12: install test skipped)"
fi

# 7. what travels: tracked files + untracked files git does not ignore + the carried folders
tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r stat -c %s 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
whl_bytes=$(du -sb .whl | cut -f1)
data_bytes=$( [ -d .gpu_data ] && du -sb .gpu_data | cut -f1 || echo 0)
total=$((tree_bytes + whl_bytes + data_bytes))
echo
ls -l .whl
awk -v t="$tree_bytes" -v w="$whl_bytes" -v d="$data_bytes" -v s="$total" 'BEGIN {m = 1048576
  printf "working tree %.1f MiB + .whl %.1f MiB + .gpu_data %.1f MiB = %.1f MiB (device limit 64 MiB)\n", t/m, w/m, d/m, s/m}'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "error: more than $LIMIT_MIB MiB would travel; remove untracked files or carry less" >&2
  exit 1
fi
echo "ready: carry [\".whl\", \".gpu_data\"] and run 'bash benchmarks/gpu_check.sh' (see benchmarks/README.md)"
