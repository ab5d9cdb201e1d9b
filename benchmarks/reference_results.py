"""Reference results (docs/results.md): train.py and evaluate.py run as a user runs them, over
a recipe's seeds, with the test ELBO at every epoch, log p(x) by the IWAE bound, the KL, the
active units and the wall time of each run; saved in machinery/reference_results.json, which
train.py quotes at a run's end.

    python benchmarks/reference_results.py tutorial --data mnist.npz     # 5 seeds, about 40 min
    python benchmarks/reference_results.py latent-16 --data mnist.npz    # the other recipes: 1 seed
    python benchmarks/reference_results.py fashion-mnist --data /usr/share/datasets/fashion-mnist
    python benchmarks/reference_results.py colour-folder --data photos   # see docs/results.md
    python benchmarks/reference_results.py --list                        # the recipes and their flags
    python benchmarks/reference_results.py --table                       # docs/results.md's tables

A run already evaluated in --work is read, not run again: a stopped benchmark goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules

from machinery import hardware, records, references  # noqa: E402  (TensorFlow, quietly)
from machinery.settings import CONFIG_FILE  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


class Recipe(NamedTuple):
    title: str
    flags: tuple[str, ...]  # train.py's, beyond --data, --seed and --out-dir
    seeds: tuple[int, ...]
    iw_images: int | None = 1000  # the test images log p(x) is bounded on (None: all)


FIRST_SEED = 42  # train.py's default: the tutorial's row includes the README's run
RECIPES = {
    "tutorial": Recipe("the tutorial's recipe (MNIST, latent 2, 10 epochs)", (), tuple(range(42, 47))),
    "latent-16": Recipe("MNIST, latent 16", ("--latent-dim", "16"), (42,)),
    "fashion-mnist": Recipe("Fashion-MNIST, the tutorial's recipe", ("--dataset", "fashion_mnist"), (42,)),
    "latent-32": Recipe("MNIST, latent 32", ("--latent-dim", "32"), (42,)),
    "latent-32-warmup": Recipe("MNIST, latent 32, KL warm-up over 5 epochs",
                               ("--latent-dim", "32", "--kl-warmup", "5"), (42,)),
    "latent-32-cyclical": Recipe("MNIST, latent 32, cyclical KL weight (4 cycles)",
                                 ("--latent-dim", "32", "--kl-cycle", "2.5"), (42,)),
    "colour-folder-tutorial": Recipe("a colour folder at 32x32, the tutorial's latent 2",
                                     ("--image-size", "32", "--epochs", "30", "--learning-rate", "1e-3"),
                                     (42,), None),
    "colour-folder": Recipe("a colour folder at 32x32, the recipe for your own pictures",
                            ("--image-size", "32", "--epochs", "30", "--learning-rate", "1e-3",
                             "--latent-dim", "32"), (42,), None),
}
IW_SAMPLES = 1000


def run(args: list[str], log: Path) -> float:
    """Run a script of the project as a user would, its output into `log`; its wall time."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed with exit code {done.returncode}: see {log}")
    return time.perf_counter() - start


def one_run(recipe: Recipe, seed: int, work: Path, args: argparse.Namespace) -> dict:
    """Train and evaluate one seed of `recipe` in work/seed_N (read again where done), with
    the flags of `args` that try it on less."""
    out = work / f"seed_{seed}"
    result_file = out / "reference_run.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    data_flags = ["--data", args.data] if args.data else []
    quick = [flag for name in ("epochs", "train_size") if (value := getattr(args, name)) is not None
             for flag in (f"--{name.replace('_', '-')}", str(value))]
    print(f"  seed {seed}: training into {out} ...", flush=True)
    train_seconds = run(["train.py", *recipe.flags, *quick, *data_flags, "--seed", str(seed),
                         "--out-dir", str(out), "--overwrite"], out / "train.log")
    iw_images = args.iw_images or recipe.iw_images
    sizes = [] if iw_images is None else ["--test-size", str(iw_images)]
    print(f"  seed {seed}: trained in {train_seconds / 60:.1f} min; evaluating ...", flush=True)
    evaluate_seconds = run(["evaluate.py", "--out-dir", str(out), "--iw-samples", str(args.iw_samples),
                            *sizes], out / "evaluate.log")
    figures = json.loads((out / "evaluation.json").read_text())
    metrics = records.read_metrics(out / "metrics.csv")
    result = {"seed": seed, "test_elbo": [row["test_elbo"] for row in metrics],
              "settings": json.loads((out / CONFIG_FILE).read_text()),
              "iwae_test_images": figures["test_images"],
              **{name: figures[name]["mean"]
                 for name in ("elbo", "kl", "iwae_log_likelihood", "bits_per_dim")},
              "active_units": figures["active_units"], "kl_per_dimension": figures["kl_per_dimension"],
              "train_seconds": round(train_seconds, 1), "evaluate_seconds": round(evaluate_seconds, 1)}
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def spread(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (0 for one value), rounded for the table."""
    values = np.asarray(values, dtype=float)
    sd = float(np.std(values, axis=0, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": round(float(np.mean(values)), 3), "sd": round(sd, 3)}


def summary(name: str, recipe: Recipe, runs: list[dict], iw_samples: int) -> dict:
    """The recipe's row: each figure's mean and spread over the seeds, and where it was measured."""
    elbo_by_epoch = np.array([run["test_elbo"] for run in runs])
    return {"recipe": name, "title": recipe.title, "flags": list(recipe.flags),
            "settings": references.comparable(runs[0]["settings"]),
            "seeds": [run["seed"] for run in runs],
            "test_elbo_by_epoch": [spread(column) for column in elbo_by_epoch.T],
            "iw_samples": iw_samples, "iwae_test_images": runs[0]["iwae_test_images"],
            **{name: spread([run[name] for run in runs])
               for name in ("elbo", "iwae_log_likelihood", "kl", "active_units", "bits_per_dim")},
            "train_minutes": spread([run["train_seconds"] / 60 for run in runs]),
            "evaluate_minutes": spread([run["evaluate_seconds"] / 60 for run in runs]),
            "machine": f"{hardware.describe_cpu()}, {os.cpu_count()} cores, {platform.system()}",
            "tensorflow": tf.__version__, "date": datetime.date.today().isoformat()}


def tables(results: dict) -> str:
    """docs/results.md's tables, in Markdown, from the saved rows (in RECIPES' order); a
    spread where there are seeds to spread over."""
    results = {name: results[name] for name in sorted(results, key=lambda name: list(RECIPES).index(name)
                                                      if name in RECIPES else len(RECIPES))}

    def figure(value: dict, row: dict) -> str:
        spread = f" +- {value['sd']:.2f}" if len(row["seeds"]) > 1 else ""
        return f"{value['mean']:.2f}{spread}"

    lines = ["| recipe | seeds | test ELBO | log p(x) >= | KL | active units | bits/dim | train min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results.values():
        last, bound = row["test_elbo_by_epoch"][-1], row["iwae_log_likelihood"]
        flags = " ".join(row["flags"]) or "(the defaults)"
        lines.append(f"| {row['recipe']}: `{flags}` | {len(row['seeds'])} | {figure(last, row)} | "
                     f"{figure(bound, row)} | "
                     f"{row['kl']['mean']:.2f} | {row['active_units']['mean']:g} | "
                     f"{row['bits_per_dim']['mean']:.4f} | {row['train_minutes']['mean']:.1f} |")
    lines += ["", "Measured on: " + "; ".join(sorted({row["machine"] for row in results.values()}))]
    for row in results.values():
        if len(row["seeds"]) > 1:  # the test ELBO at every epoch, where there is a spread
            epochs = row["test_elbo_by_epoch"]
            lines += ["", f"{row['recipe']}, test ELBO by epoch (mean +- sd over seeds {row['seeds']}):",
                      "", "| epoch | " + " | ".join(str(epoch) for epoch in range(len(epochs))) + " |",
                      "| --- |" + " --- |" * len(epochs),
                      "| test ELBO | " + " | ".join(f"{e['mean']:.2f} +- {e['sd']:.2f}" for e in epochs)
                      + " |"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("recipe", nargs="?", choices=tuple(RECIPES), help="the recipe to measure")
    parser.add_argument("--data", default=None, help="train.py's --data (default: its own)")
    parser.add_argument("--seeds", type=int, choices=range(1, 101), metavar="N", default=None,
                        help="how many seeds, from 42 on (default: the recipe's)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "reference",
                        help="where the runs go, a folder per recipe and seed")
    parser.add_argument("--results", type=Path, default=references.RESULTS_FILE,
                        help="the JSON the row is saved in, beside the other recipes'")
    parser.add_argument("--iw-samples", type=int, default=IW_SAMPLES, help="evaluate.py's K")
    parser.add_argument("--iw-images", type=int, default=None,
                        help="the test images evaluate.py bounds log p(x) on (default: the recipe's)")
    parser.add_argument("--epochs", type=int, default=None, help="to try it quickly: train.py's --epochs")
    parser.add_argument("--train-size", type=int, default=None,
                        help="to try it quickly: train.py's --train-size")
    parser.add_argument("--list", action="store_true", help="list the recipes and their flags")
    parser.add_argument("--table", action="store_true",
                        help="print the saved rows as docs/results.md's tables")
    args = parser.parse_args(argv)
    if args.table:
        if not args.results.is_file():
            parser.error(f"--results {args.results}: no such file; run a recipe first")
        print(tables(references.saved_rows(args.results)))
        return
    if args.list or not args.recipe:
        for name, recipe in RECIPES.items():
            print(f"{name:24s} {len(recipe.seeds)} seed(s)  train.py {' '.join(recipe.flags)}")
        return
    recipe = RECIPES[args.recipe]
    seeds = recipe.seeds if args.seeds is None else tuple(range(FIRST_SEED, FIRST_SEED + args.seeds))
    print(f"{args.recipe}: {recipe.title}, seeds {', '.join(map(str, seeds))}; "
          f"{hardware.describe_cpu()}, {os.cpu_count()} cores", flush=True)
    runs = [one_run(recipe, seed, args.work / args.recipe, args) for seed in seeds]
    row = summary(args.recipe, recipe, runs, args.iw_samples)
    results = references.saved_rows(args.results)
    results[args.recipe] = row
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    last = row["test_elbo_by_epoch"][-1]
    print(f"{args.recipe}: test ELBO {last['mean']:.2f} +- {last['sd']:.2f} (sd over {len(runs)} seeds), "
          f"log p(x) >= {row['iwae_log_likelihood']['mean']:.2f} (K = {args.iw_samples}, "
          f"{row['iwae_test_images']} test images), KL {row['kl']['mean']:.2f}, "
          f"active units {row['active_units']['mean']:g}, {row['bits_per_dim']['mean']:.4f} bits/dim, "
          f"{row['train_minutes']['mean']:.1f} min to train; saved in {args.results}")


if __name__ == "__main__":
    main()
