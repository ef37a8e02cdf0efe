#!/usr/bin/env bash
# kill -9 in the middle of `galleria index`, then the same command again: every image
# exactly once; four unusable files are reported and skipped. Uses the 500 SMVS photos
# from ../shared/datasets (or $GALLERIA_DATASETS). Run from the repository root:
#   bash examples/kill9_resume.sh [WORKDIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${GALLERIA_DATASETS:-$ROOT/../shared/datasets}/smvs_dvd_covers/jpg
[ -d "$DATA" ] || { echo "missing $DATA (the SMVS DVD covers of ../shared/datasets)" >&2; exit 2; }
W=${1:-$(mktemp -d)}; rm -rf "$W/src" "$W/g"; mkdir -p "$W/src"
G=$ROOT/.venv/bin/galleria; PY=$ROOT/.venv/bin/python
cp -r "$DATA"/* "$W/src/"
head -c 3000 "$W/src/Canon/001.jpg" > "$W/src/zz_corrupt.jpg"      # truncated JPEG
: > "$W/src/zz_empty.jpg"                                            # zero bytes
echo "not an image" > "$W/src/zz_notes.jpg"                          # not an image
$PY -c "from PIL import Image; Image.new('RGB', (1, 1)).save('$W/src/zz_onepixel.png')"
$G index "$W/src" --model effnet-lite0 --out "$W/g" --commit-every 64 -q > "$W/run1.txt" 2>&1 &
PID=$!; sleep "${KILL_AFTER:-3.2}"; kill -9 $PID 2>/dev/null || echo "(finished before the kill: lower KILL_AFTER)"
wait $PID || true
$G index "$W/src" --model effnet-lite0 --out "$W/g" --commit-every 64 --json -q > "$W/run2.json"
$PY - "$W" <<'PYEOF'
import json, pathlib, sqlite3, sys
w = pathlib.Path(sys.argv[1])
run2 = json.loads((w / "run2.json").read_text())
con = sqlite3.connect(w / "g" / "gallery.sqlite")
ids = [r[0] for r in con.execute("SELECT id FROM items")]
n_vec = con.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
good = {str(p.relative_to(w / "src")) for p in (w / "src").rglob("*")
        if p.is_file() and not p.name.startswith("zz_")}
print(f"after kill -9: {run2['already_done']} done; second run embedded {run2['embedded']}")
print(f"items {len(ids)}, distinct {len(set(ids))}, vectors {n_vec}, "
      f"ids == the {len(good)} usable files: {set(ids) == good}")
for f in run2["failures"]:
    print(f"  skipped {f['id']}: {f['reason']}")
PYEOF
