#!/usr/bin/env bash
# Set up from nothing and run the main job: train a small MambaVision from scratch on Fashion-MNIST (the real
# dataset bundled through Debian's dataset-fashion-mnist package: 60,000 training and 10,000 test images of
# clothing, 28x28 grayscale, 10 classes) on the CPU, then validate the best checkpoint on the 10,000 test
# images and print its accuracy. Target: >= 90% test accuracy within 10 minutes on 2 CPU cores.
# Where Fashion-MNIST cannot be installed, it says so and trains on scikit-learn's bundled digits instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --data
RUN=runs/main
DATA=fashion_mnist
EXTRA=()
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "main: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); using scikit-learn's digits" >&2
  DATA=digits
  EXTRA=(data.name=digits sched.epochs=30)
fi
rm -rf "$RUN"
.venv/bin/mambazoo train --config configs/fashion_mnist_cpu.yaml --output "$RUN" --set train.progress=false "${EXTRA[@]}"
.venv/bin/mambazoo validate --checkpoint "$RUN/best.pth" --data "$DATA" --threads 2
