#!/usr/bin/env bash
# The GPU check, for a machine with a GPU and this project installed: the tests that touch
# device placement, a short run in fp32 and in bf16, and the benchmark at batch sizes 32 to
# 512; then one table. Usage: bash benchmarks/gpu_check.sh [path/to/mnist.npz]
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-${CVAE_DATA:-}}"
out=output/gpu_check
mkdir -p "$out"

python - <<'PY'
import machinery, tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
names = [tf.config.experimental.get_device_details(gpu).get("device_name", "a GPU") for gpu in gpus]
print("TensorFlow", tf.__version__, "with", ", ".join(names) or "no GPU")
raise SystemExit(0 if gpus else "gpu_check.sh: no GPU found; this check is for a machine with one")
PY

CVAE_DATA="$data" python -m pytest -q tests/test_distribute.py tests/test_train.py \
    tests/test_speed.py tests/test_real_data.py
for precision in fp32 bf16; do
  python train.py ${data:+--data "$data"} --epochs 2 --precision "$precision" \
      --out-dir "$out/run_$precision" --overwrite
done
for batch in 32 128 512; do
  python benchmarks/benchmark.py ${data:+--data "$data"} --repeats 3 --batch-size "$batch" \
      --variants tutorial,fp32,bf16 --out-dir "$out/bench_$batch"
done

python - "$out" <<'PY'
import csv, json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("\n| run | epochs | test ELBO | seconds per epoch |\n|---|---|---|---|")
for precision in ("fp32", "bf16"):
    rows = list(csv.DictReader(open(out / f"run_{precision}" / "metrics.csv")))
    seconds = [float(row["seconds"]) for row in rows[1:]]
    print(f"| {precision} | {rows[-1]['epoch']} | {float(rows[-1]['test_elbo']):.2f} | "
          f"{' / '.join(f'{s:.1f}' for s in seconds)} |")
print("\n| batch | variant | ms/step | images/s | epoch s | epoch ratio | eval s |\n|---|---|---|---|---|---|---|")
for path in sorted(out.glob("bench_*/benchmark.json"), key=lambda p: int(p.parent.name.split("_")[1])):
    report = json.loads(path.read_text())
    for row in report["table"]:
        print(f"| {report['settings']['batch_size']} | {row['variant']} | {row['ms_per_step']:.2f} | "
              f"{row['images_per_second']:.0f} | {row['epoch_seconds']:.2f} | {row['epoch_ratio']:.2f} | "
              f"{row['eval_seconds']:.2f} |")
PY
