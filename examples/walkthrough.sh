#!/usr/bin/env bash
# Every dmqn command once, on a small synthetic log, in a workspace of its own.
# Usage: bash examples/walkthrough.sh [WORKSPACE]   (default: ./walkthrough-workspace)
set -euo pipefail
export DMQN_WORKSPACE="${1:-walkthrough-workspace}"
mkdir -p "$DMQN_WORKSPACE"

# 1. A synthetic log in the Taobao UserBehavior format (user,item,category,behavior,timestamp).
dmqn synth "$DMQN_WORKSPACE/log.csv" --scale tiny --seed 0

# 2. Long-sequence CTR samples: last click = test, the one before = validation, earlier = training.
dmqn prep "$DMQN_WORKSPACE/log.csv" --format taobao --out walkthrough --train-targets 10 --overwrite

# 3. The popularity floor, DMQN, and DMQN without ICIM (the paper's Table 3 ablation).
dmqn train walkthrough --model pop
dmqn train walkthrough --model dmqn --config "$(dirname "$0")/dmqn.toml" --epochs 3
dmqn train walkthrough --model dmqn-simple --epochs 3

# 4. Metrics of the latest run on the validation split, then everything the run store holds.
dmqn eval --split valid
dmqn runs
dmqn runs show

# 5. Every model under one budget, the paper's Tables 2 and 3 (run it again: it resumes, nothing is redone).
dmqn bench walkthrough --models all --seeds 1 --epochs 2
