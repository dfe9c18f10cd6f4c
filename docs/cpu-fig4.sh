#!/usr/bin/env bash
# The README's CPU measurements: ADV-1/2 and LLR-1/2 (μ = 0) on WRN-10-1, 15 epochs on 10,000
# CIFAR-10 JPEG training images; the suite + APGD-T on 500 test images; a strength sweep; loss
# surfaces; and the figures in docs/figures. Each step is skipped when its output exists.
# Needs the JPEG copy of CIFAR-10 in data/cifar10-jpeg (see README: Train on CIFAR-10).
set -e
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -d data/cifar10-10k ]; then  # the first 1,000 training images of each class (by file name), all test images
  for dir in data/cifar10-jpeg/train/*/; do
    class=$(basename "$dir"); mkdir -p data/cifar10-10k/train/$class
    ls "$dir" | sort | head -1000 | while read -r f; do ln -s "$PWD/$dir$f" data/cifar10-10k/train/$class/$f; done
  done
  ln -s "$PWD/data/cifar10-jpeg/test" data/cifar10-10k/test
fi
COMMON="--arch wrn-10-1 --data-dir data/cifar10-10k --epochs 15 --lr-decay-at 0.5,0.75 --eval-every 3 --eval-n 500 --log-gamma-every 100 --gamma-n 64"
RUNS=""
for spec in "adv-1:--method adv --adv-steps 1" "adv-2:--method adv --adv-steps 2" \
            "llr-1:--method llr --llr-steps 1 --llr-mu 0" "llr-2:--method llr --llr-steps 2 --llr-mu 0"; do
  name=${spec%%:*}; flags=${spec#*:}; run=runs/$name; ckpt=$run/last.safetensors; RUNS="$RUNS $run"
  [ -f $ckpt ] || $PY train_cifar.py $COMMON $flags --out $run
  [ -f $run/last.eval.json ] || $PY eval.py $ckpt --eps 8/255 --data-dir data/cifar10-jpeg --n 500 --gamma \
      --autoattack --aa-version custom --aa-attacks apgd-t --out $run/last.eval.json
  [ -f $run/last.strength.json ] || $PY eval.py $ckpt --eps 8/255 --data-dir data/cifar10-jpeg --n 200 \
      --strength --strengths 10x1,20x1,50x1,100x2 --out $run/last.strength.json
  [ -f $run/last.surface.json ] || $PY eval.py $ckpt --eps 8/255 --data-dir data/cifar10-jpeg --surface 126 \
      --out $run/last.surface.json
  [ -f $run/last.surface-14.json ] || $PY eval.py $ckpt --eps 8/255 --data-dir data/cifar10-jpeg --surface 14 \
      --out $run/last.surface-14.json
done
files() { for r in $RUNS; do echo $r/$1; done; }
$PY plots.py curves $(files log.jsonl) --out docs/figures/curves.png
$PY plots.py gamma $(files log.jsonl) --out docs/figures/gamma-training.png
$PY plots.py gamma-hist $(files last.eval.json) --out docs/figures/gamma-test.png
$PY plots.py strength $(files last.strength.json) --out docs/figures/strength.png
$PY plots.py surface $(files last.surface.json) --out docs/figures/surface-126.png
$PY plots.py surface $(files last.surface-14.json) --out docs/figures/surface-14.png
