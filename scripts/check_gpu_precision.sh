#!/usr/bin/env bash
# Half-precision paths on a GPU in a few minutes, for a session that is lent one (issue 8: fp16 was never run on a
# GPU). Short regstory-run runs on digits: IMP with SGD momentum (the GradScaler branch; fused SGD is off under fp16),
# every debiasing preset (plugins with their own fp32 heads), and KD distillation, each in bf16 and fp16. Then one
# fp16 ResNet-18 bench line. Prints one line per run: ok/FAIL, its final metrics or its last error line.
#   bash scripts/check_gpu_precision.sh [OUT_DIR]     (default outputs/check_gpu_precision)
# DEVICE=cpu PRECISIONS=bf16 runs the same checks on a CPU (fp16 is refused there, with a one-line error).
# BENCH=0 skips the bench line. JOBS=N runs N checks at once (default 1; a GPU host's cores and memory take 8 of these tiny runs side by side).
set -uo pipefail
out=${1:-outputs/check_gpu_precision}
device=${DEVICE:-cuda}
precisions=${PRECISIONS:-"bf16 fp16"}
py=${PYTHON:-python3}
jobs=${JOBS:-1}
mkdir -p "$out"
names=()
check() {  # check NAME OVERRIDES...: runs in the background, at most $jobs at once; writes $out/NAME.result
  local name=$1; shift
  names+=("$name")
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
  run_check "$name" "$@" >"$out/$name.result" &
}
run_check() {
  local name=$1; shift
  rm -rf "${out:?}/$name"
  if timeout 300 "$py" -m regstory.train trainer.device="$device" logger.wandb.mode=disabled logger.progress=none \
      trainer.num_threads=0 hydra.run.dir="$out/$name" "$@" >"$out/$name.log" 2>&1; then
    echo "ok    $name: $("$py" -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: round(v, 3) for k, v in s.items() if k in ('final_train_loss', 'final_test_acc', 'last_test_unbiased_acc', 'final_sparsity')})" "$out/$name/summary.json")"
  else
    echo "FAIL  $name: $(grep -v Warning "$out/$name.log" | tail -1)"
  fi
}
for p in $precisions; do
  check "imp_sgd_$p" dataset=digits arch=lenet5 trainer.precision="$p" trainer.epochs=2 method=imp method.rounds=2
  for preset in debias_digits debias_digits_end debias_digits_groupdro debias_digits_irene debias_digits_lff \
      debias_digits_voronoi; do
    check "${preset}_$p" experiment="$preset" trainer.precision="$p" trainer.epochs=2 dataset.test_colours=1 \
      dataset.val_colours=1 debias.probe_steps=20
  done
  check "kd_$p" dataset=digits trainer.precision="$p" trainer.epochs=2 distill=kd distill.teacher_epochs=2
done
wait
failures=0
for name in "${names[@]}"; do
  cat "$out/$name.result"
  grep -q '^ok' "$out/$name.result" || failures=$((failures + 1))
done
if [ "$device" = cuda ] && [ "${BENCH:-1}" != 0 ]; then
  echo "== fp16 ResNet-18 bench (regstory vs the usual loop, both fp16)"
  timeout 300 "$py" scripts/bench_train.py --arch resnet18 --dataset synthetic32 --device cuda --num-train 20480 \
    --batch-size 128 --repeats 3 --warmup 1 --precision fp16 --workers 8 --no-floor 2>&1 | grep -v Warning \
    | tee "$out/bench_fp16.txt"
fi
echo "$failures failed"
exit $((failures > 0))
