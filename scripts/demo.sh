#!/usr/bin/env bash
# The main job end to end: install what is needed, build, and run the fashion-shift demo
# (clean accuracy of the committed float32/int8 models, then adaptation to corruptions with
# float32 and fully quantized int8 fine-tuning). Extra arguments go to `mcutrain demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo run --release --locked -p mcutrain -- demo "$@"
