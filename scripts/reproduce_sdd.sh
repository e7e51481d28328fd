#!/usr/bin/env bash
# Sparse double descent reproductions (thesis sec. 2.4). Usage: scripts/reproduce_sdd.sh [mnist1d|cifar10|cifar100|distill]
# CPU preset: two single-thread processes at a time through Hydra's joblib launcher (hydra-joblib-launcher).
set -euo pipefail
what=${1:-mnist1d}
common=(logger.progress=plain)
case "$what" in
  mnist1d)  # CPU: 2 noise levels x 3 seeds, ~31 rounds x 60 epochs each
    OMP_NUM_THREADS=1 regstory-run -m experiment=sdd_mnist1d noise.rate=0.2,0.5 seed=0,1,2 trainer.num_threads=1 \
      hydra/launcher=joblib hydra.launcher.n_jobs=2 "${common[@]}" ;;
  cifar10)  # Fig. 2.7 (a): GPU, 34 rounds x 160 epochs per noise level
    regstory-run -m experiment=sdd_resnet18_cifar10 noise.rate=0.1,0.2,0.5 "${common[@]}" ;;
  cifar100) # Fig. 2.7 (b)
    regstory-run -m experiment=sdd_resnet18_cifar100 noise.rate=0.1,0.2,0.5 "${common[@]}" ;;
  distill)  # Fig. 2.8: VGG-like student with and without distillation (teacher trained first in each run)
    regstory-run -m experiment=sdd_distill_cifar10 noise.rate=0.2,0.5 "${common[@]}"
    regstory-run -m experiment=sdd_resnet18_cifar10 arch=vgg_small noise.rate=0.2,0.5 "${common[@]}" ;;
  *) echo "usage: $0 [mnist1d|cifar10|cifar100|distill]" >&2; exit 2 ;;
esac
