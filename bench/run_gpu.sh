#!/usr/bin/env bash
# Every GPU case of the performance targets in one go (estimated at about 15 minutes on one H100):
# Qwen3-VL-4B dimensions with a 1024x1024 and a 2048x2048 image, and Qwen3-VL-30B-A3B's
# mixture-of-experts dimensions with a 1024x1024 image; 3 steps, --mask-mode both, all variants; and the
# flow case (4B, 1024x1024, W = 9, units->last); the attention measure against plain generate (4B, 1024x1024).
#   bash bench/run_gpu.sh [results directory, default bench/results]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results}"
python=${PYTHON:-python}
gpu=$($python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())")
$python bench/bench_engine.py --preset qwen3-vl-4b --image-size 1024 --device cuda --json "$out/${gpu}_4b_1024px.json"
$python bench/bench_engine.py --preset qwen3-vl-4b --image-size 2048 --device cuda --repeats 1 \
    --reference-samples 2 --json "$out/${gpu}_4b_2048px.json"
$python bench/bench_engine.py --preset qwen3-vl-30b-a3b --image-size 1024 --device cuda --repeats 1 \
    --reference-samples 2 --json "$out/${gpu}_30b_a3b_1024px.json"
# Flow analysis at Qwen3-VL-4B dimensions: units->last over all 36 windows of 9 layers, one step.
$python bench/bench_engine.py --preset qwen3-vl-4b --image-size 1024 --device cuda --measure flow --window 9 \
    --steps 1 --repeats 1 --reference-samples 3 --json "$out/${gpu}_4b_1024px_flow_w9.json"
# The attention measure (default variants) against plain generate, and each one's peak memory.
$python bench/bench_engine.py --preset qwen3-vl-4b --image-size 1024 --device cuda --measure attention --steps 3 \
    --vision-attention causal --repeats 5 --json "$out/${gpu}_4b_1024px_attention_causal.json"
# Video inputs against transformers' own video processors (needs torchvision; says "skipped" without it).
$python bench/check_video_processor.py --json "$out/${gpu}_video_processor_check.json"
# A 16-frame video at Qwen3-VL's default video resolution (1024 px frames -> the clip's pixel budget), layer and flow.
$python bench/bench_engine.py --preset qwen3-vl-4b --image-size 1024 --video-frames 16 --device cuda \
    --json "$out/${gpu}_4b_video16x1024px.json"
$python bench/bench_engine.py --preset qwen3-vl-4b --image-size 1024 --video-frames 16 --device cuda --measure flow \
    --window 9 --steps 1 --repeats 1 --reference-samples 3 --json "$out/${gpu}_4b_video16x1024px_flow_w9.json"
# The encoder measure inside Qwen3-VL-4B's tower (24 blocks), a 448x448 picture: every block x 196 cells.
$python bench/bench_encoder.py --preset qwen3-vl-4b --image-size 448 --device cuda --json "$out/${gpu}_4b_448px_encoder.json"
# encoder-flow at 4B dimensions, a 448x448 picture: 49 2x2 regions x (24 windows of 3 blocks + 2 after the projector),
# against one full forward per configuration, and without the reuse of the blocks before each window.
$python bench/bench_encoder_flow.py --preset qwen3-vl-4b --image-size 448 --device cuda \
    --json "$out/${gpu}_4b_448px_encoder_flow_w3.json"
