#!/usr/bin/env bash
# Set up from nothing and run the main job: train a small MambaVision (mambavision_nano) from scratch on
# Fashion-MNIST (the real dataset bundled through Debian's dataset-fashion-mnist package: 60,000 training and 10,000
# test images of clothing, 28x28 grayscale, 10 classes) on the CPU. The best checkpoint is chosen on 5,000 training
# images held out for validation; the 10,000 test images are evaluated once, at the end: that is the figure.
# Then the round trip, from the checkpoint's path alone: validate it, classify a few test images saved as PNG files
# (printing Fashion-MNIST's class names), and export it to ONNX checked against PyTorch.
# Target: >= 90% test accuracy within 10 minutes on 2 CPU cores, set-up included.
# Where Fashion-MNIST cannot be installed, it says so and trains on scikit-learn's bundled digits instead.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
bash scripts/setup.sh --data --extras export,examples  # ONNX export and its check on a real photograph
RUN=runs/main
DATA=fashion_mnist
EXTRA=()
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "main: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); using scikit-learn's digits" >&2
  DATA=digits
  EXTRA=(data.name=digits sched.epochs=30)
fi
SETUP=$(date +%s)
# --overwrite: each run of the main job replaces the previous one (a plain `mambazoo train` never does).
.venv/bin/mambazoo train --config configs/fashion_mnist_cpu.yaml --output "$RUN" --overwrite \
  --set train.progress=false "${EXTRA[@]}"
TRAINED=$(date +%s)
.venv/bin/mambazoo validate --checkpoint "$RUN/best.pth" --data "$DATA" --threads 2
.venv/bin/python -c "
import sys
from mambazoo.data.datasets import load_digits, load_fashion_mnist, save_examples
test = load_fashion_mnist(None, 'test') if sys.argv[1] == 'fashion_mnist' else load_digits('val')
save_examples(test, sys.argv[2], 6)" "$DATA" "$RUN/examples"
.venv/bin/mambazoo predict "$RUN"/examples/*.png --checkpoint "$RUN/best.pth" --topk 2
.venv/bin/mambazoo export --checkpoint "$RUN/best.pth" --format onnx --out "$RUN/model.onnx" --verify
END=$(date +%s)
echo "main: $((END - START)) s in all: set-up $((SETUP - START)) s, training and testing $((TRAINED - SETUP)) s," \
     "round trip (validate, predict, ONNX export) $((END - TRAINED)) s"
