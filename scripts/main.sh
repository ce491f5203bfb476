#!/usr/bin/env bash
# Set up from nothing and run the main job.
# For now (until the training pipeline lands): build MambaVision-T, save a RANDOMLY INITIALISED checkpoint
# (no pretrained weights are downloaded: there is no network), load it back, and classify real photographs
# shipped inside scikit-image, printing the top-5 and a throughput line. The predictions are therefore
# meaningless; the job shows the pipeline end to end. Point --checkpoint at the official
# mambavision_tiny_1k.pth.tar to get real predictions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p outputs
images=$(.venv/bin/python -c 'import os, skimage.data as d; print(" ".join(os.path.join(os.path.dirname(d.__file__), f) for f in ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")))')
.venv/bin/mambazoo random-checkpoint --model mambavision_tiny --out outputs/mambavision_tiny_random.pth.tar
.venv/bin/mambazoo predict $images --model mamba_vision_T --checkpoint outputs/mambavision_tiny_random.pth.tar
