#!/usr/bin/env bash
# Fashion-MNIST without internet: Debian's dataset-fashion-mnist (IDX .gz files in /usr/share/datasets/fashion-mnist).
# Elsewhere, the pipeline reads data.root or downloads MNIST / CIFAR-10 through torchvision when allowed.
set -euo pipefail
dir=/usr/share/datasets/fashion-mnist
[ -f "$dir/train-images-idx3-ubyte.gz" ] && exit 0
if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "get-data: installing Debian's dataset-fashion-mnist (30 MB)" >&2
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
    echo "get-data: no apt-get here; put Fashion-MNIST's four .gz files in data.root (params.yaml) or use data.dataset: digits" >&2
fi
