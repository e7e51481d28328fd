#!/usr/bin/env bash
# The CUDA benchmarks of issue 8 in one go: ResNet-18 on CIFAR-sized inputs (3x32x32, crop + flip on the device),
# regstory's loop against the plain DataLoader + .item() baseline, eager and with CUDA graphs
# (trainer.compile=true trainer.compile_mode=reduce-overhead), then two end-to-end regstory-run pruning runs on the GPU,
# then a small MLP eager and with CUDA graphs, then several seeds of it at once: stacked (scripts/bench_parallel_seeds.py) and as a joblib sweep of
# concurrent regstory-run jobs against one job alone (sweeps.txt: wall-clock of each).
# Each bench prints images/s, the ratio and the fraction of peak bf16 FLOP/s. Results of 2026-11-27 on an H200:
# docs/bench/h200-2026-11-27/.
#   bash scripts/bench_gpu.sh [OUT_DIR]      (default outputs/bench_gpu; one .txt per bench)
# PEAK (FLOP/s) sets the utilisation line's peak (default: H100/H200 SXM dense bf16, 989e12); PYTHON the interpreter.
set -uo pipefail
out=${1:-outputs/bench_gpu}
mkdir -p "$out"
peak=${PEAK:-989e12}
py=${PYTHON:-python3}
bench() {  # bench NAME TIMEOUT ARGS...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$py" scripts/bench_train.py --arch resnet18 --dataset synthetic32 --device cuda --num-train 20480 \
    --batch-size 128 --repeats 5 --warmup 2 --peak-flops "$peak" "$@" 2>&1 | grep -v Warning | tee "$out/$name.txt"
}
e2e() {  # e2e NAME OVERRIDES...: a short IMP run of regstory-run on the GPU
  local name=$1; shift
  echo "== end-to-end: $name"
  rm -rf "$out/$name"
  timeout 300 "$py" -m regstory.train dataset=digits arch=lenet5 trainer.device=cuda trainer.precision=bf16 \
    trainer.epochs=3 method=imp method.rounds=2 logger.wandb.mode=disabled logger.progress=plain \
    hydra.run.dir="$out/$name" "$@" 2>&1 | grep -v Warning | tail -4 | tee "$out/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
bench bf16_workers0 300 --precision bf16 --workers 0 --repeats 3 --warmup 1
bench bf16_workers8 300 --precision bf16 --workers 8 --no-floor --no-masks
bench fp32_workers0 300 --precision fp32 --workers 0 --no-masks
bench bf16_b512_workers8 300 --precision bf16 --workers 8 --batch-size 512 --no-masks
bench bf16_cudagraphs_workers8 600 --precision bf16 --workers 8 --no-floor --no-masks --compile --compile-mode reduce-overhead
bench bf16_b512_cudagraphs_workers8 600 --precision bf16 --workers 8 --batch-size 512 --no-floor --no-masks --compile \
  --compile-mode reduce-overhead
bench bf16_cudagraphs_masks_workers8 900 --precision bf16 --workers 8 --repeats 3 --no-floor --compile \
  --compile-mode reduce-overhead
echo "== small MLP (digits, 64-512-512-10): eager, then CUDA graphs"
timeout 300 "$py" scripts/bench_train.py --arch mlp --dataset digits --device cuda --repeats 5 --warmup 2 \
  --peak-flops "$peak" 2>&1 | grep -v Warning | tee "$out/mlp_eager.txt"
timeout 600 "$py" scripts/bench_train.py --arch mlp --dataset digits --device cuda --repeats 5 --warmup 2 \
  --peak-flops "$peak" --no-floor --compile --compile-mode reduce-overhead 2>&1 | grep -v Warning \
  | tee "$out/mlp_cudagraphs.txt"
e2e e2e trainer.compile=false
e2e e2e_cudagraphs trainer.compile=true trainer.compile_mode=reduce-overhead
echo "== several seeds at once: stacked MLPs"
timeout 300 "$py" scripts/bench_parallel_seeds.py --device cuda --ks 1 4 16 64 --repeats 3 2>&1 | grep -v Warning \
  | tee "$out/parallel_seeds.txt"
echo "== several seeds at once: concurrent jobs (hydra/launcher=local_parallel)"
sweep() {  # sweep K: K seeds of the digits MLP, K jobs at once; prints the wall-clock
  local k=$1 start
  start=$(date +%s%N)
  rm -rf "$out/sweep$k"
  timeout 600 "$py" -m regstory.train -m hydra/launcher=local_parallel hydra.launcher.n_jobs="$k" \
    seed="$(seq -s, 0 $((k - 1)))" dataset=digits arch=mlp trainer.device=cuda trainer.epochs=400 \
    trainer.eval_every=1000 trainer.checkpoint_every=1000 logger.wandb.mode=disabled logger.progress=none \
    hydra.sweep.dir="$out/sweep$k" >"$out/sweep$k.log" 2>&1
  echo "$k seeds, $k jobs at once: $(( ($(date +%s%N) - start) / 1000000 )) ms" | tee -a "$out/sweeps.txt"
}
rm -f "$out/sweeps.txt"
sweep 1
sweep 8
sweep 16
