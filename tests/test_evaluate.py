"""evaluate.py and the maths beyond the tutorial: the IWAE bound, the analytic KL,
TensorBoard logs, and every picture."""

from __future__ import annotations

import inspect
import json
import shutil
import signal
import subprocess
import sys
import time
import types

from machinery import records, resumable

import imageio.v3 as iio
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, assert_one_line_error, make_mnist_arrays, run_main, run_script
from google.protobuf import text_format
from tensorboard.plugins import projector

import dataset
import evaluate
import export
import network


@pytest.fixture(scope="module")
def model() -> network.CVAE:
    tf.keras.utils.set_random_seed(5)
    return network.CVAE(2)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return dataset.binarize(make_mnist_arrays(num_train=1, num_test=128, seed=5)["x_test"]).numpy()


def per_image_compute_loss(model, images, eps, kl="mc") -> np.ndarray:
    return np.array([float(network.compute_loss(model, images[i:i + 1], eps[i:i + 1], kl))
                     for i in range(len(images))])


def test_the_elbo_of_each_image_is_minus_its_compute_loss(model, images):
    x, eps = images[:16], tf.random.stateless_normal((16, 2), seed=(1, 1))
    for kl in network.KL_ESTIMATORS:
        elbo, _, _ = evaluate.elbo_parts(model, x, eps, kl)
        np.testing.assert_allclose(-elbo, per_image_compute_loss(model, x, eps, kl), rtol=1e-5)


def test_iwae_with_one_sample_is_the_elbo_estimator(model, images):
    x, eps = images[:16], tf.random.stateless_normal((16, 2), seed=(1, 1))
    bound = evaluate.iwae_bound(model, tf.constant(x), eps[:, tf.newaxis])
    np.testing.assert_allclose(bound, -per_image_compute_loss(model, x, eps), rtol=1e-5)


def test_iwae_bound_grows_with_k(model, images):
    x = tf.constant(images[:32])
    bounds = [evaluate.iwae_bound(model, x, evaluate.noise(0, 0, 1, (32, k, 2))).mean() for k in (1, 10, 100)]
    assert bounds[0] < bounds[1] < bounds[2], bounds


def test_iwae_chunks_change_nothing_but_memory(model, images, monkeypatch):
    x, eps = tf.constant(images[:8]), evaluate.noise(3, 0, 1, (8, 50, 2))
    whole = evaluate.iwae_bound(model, x, eps)
    monkeypatch.setattr(evaluate, "DECODES_PER_CALL", 8 * 7)  # chunks of 7 draws: 8 calls
    chunked = evaluate.iwae_bound(model, x, eps)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)  # the same draws; the sums' rounding


def test_a_bigger_decoder_decodes_fewer_images_a_call():
    assert evaluate.decodes_per_call(network.CVAE(2)) == evaluate.DECODES_PER_CALL
    assert evaluate.decodes_per_call(network.CVAE(2, filters=512)) == evaluate.DECODES_PER_CALL // 16


def test_iwae_is_finite_for_extreme_logits_and_large_k(images):
    tf.keras.utils.set_random_seed(6)
    extreme = network.CVAE(2)
    last = extreme.decoder.layers[-1]
    last.kernel.assign(last.kernel * 1e7)  # logits of ~1e5: importance weights of ~e^-1e6
    bound = evaluate.iwae_bound(extreme, tf.constant(images[:4]), evaluate.noise(0, 0, 1, (4, 2000, 2)))
    assert np.all(np.isfinite(bound)) and np.all(bound < -1000)


def test_analytic_kl_is_the_mean_of_the_monte_carlo_estimate():
    mean = tf.constant([[0.5, -1.0], [2.0, 0.1]])
    logvar = tf.constant([[-1.0, 0.5], [0.2, -2.0]])
    eps = tf.random.stateless_normal((200_000, 2, 2), seed=(2, 2))
    z = mean + tf.exp(logvar / 2) * eps
    monte_carlo = tf.reduce_mean(network.log_normal_pdf(z, mean, logvar, raxis=2)
                                 - network.log_normal_pdf(z, 0.0, 0.0, raxis=2), axis=0)
    logpz, logqz_x = network.expected_log_normal_pdfs(mean, logvar)
    np.testing.assert_allclose(monte_carlo, logqz_x - logpz, atol=0.02)
    # The closed form, 1/2 sum(sigma^2 + mu^2 - 1 - log sigma^2), and zero for q = p.
    by_hand = 0.5 * np.sum(np.exp(logvar) + mean**2 - 1 - logvar, axis=1)
    np.testing.assert_allclose(logqz_x - logpz, by_hand, rtol=1e-5)
    logpz, logqz_x = network.expected_log_normal_pdfs(tf.zeros((1, 3)), tf.zeros((1, 3)))
    assert float(logqz_x[0] - logpz[0]) == 0.0


def test_the_elbos_parts_are_those_of_compute_loss(model, images):
    """log p(x|z) by hand at the same z, and for the single-sample KL, log q(z|x) - log p(z)."""
    x, eps = tf.constant(images[:16]), tf.random.stateless_normal((16, 2), seed=(4, 4))
    mean, logvar = model.encode(x)
    z = model.reparameterize(mean, logvar, eps)
    p = tf.sigmoid(model.decode(z)).numpy().astype(np.float64)
    logpx_z = (images[:16] * np.log(p) + (1 - images[:16]) * np.log(1 - p)).sum(axis=(1, 2, 3))
    kl_terms = {"mc": network.log_normal_pdf(z, mean, logvar) - network.log_normal_pdf(z, 0.0, 0.0),
                "analytic": 0.5 * tf.reduce_sum(tf.exp(logvar) + mean**2 - 1. - logvar, axis=1)}
    for kl, kl_term in kl_terms.items():
        elbo, reconstruction, kl_part = evaluate.elbo_parts(model, x, eps, kl)
        np.testing.assert_allclose(elbo, -per_image_compute_loss(model, images[:16], eps, kl), rtol=1e-5)
        np.testing.assert_allclose(reconstruction, logpx_z, rtol=1e-4)
        np.testing.assert_allclose(kl_part, kl_term, atol=2e-3)  # a difference of two sums of ~-150


def edited(function, old: str, new: str) -> object:
    """network.py's `function` with a line of it edited, as a user might."""
    source = inspect.getsource(function)
    assert old in source, old
    namespace = dict(vars(network))
    exec(source.replace(old, new), namespace)
    return namespace[function.__name__]


def figures_afresh(model, images, monkeypatch) -> dict:
    """evaluate_run's figures with its compiled functions traced anew, as in a new process."""
    for compiled in (evaluate.elbo_parts, evaluate.log_weights):
        monkeypatch.setattr(evaluate, compiled.__name__, tf.function(compiled.python_function))
    return evaluate.evaluate_run(model, images[:32], iw_samples=3, kl="mc", seed=1)


def test_an_edit_of_a_part_shows_in_every_figure_and_of_the_weighting_in_none(images, monkeypatch):
    """log p(x|z) lowered by 5 nats in elbo_terms moves the ELBO, its reconstruction part and
    the IWAE bound by -5 and the KL by 0; compute_loss's return edited to weigh the KL by 0
    (a beta-VAE) changes training alone: the figures stay the ELBO's."""
    tf.keras.utils.set_random_seed(5)
    model = network.CVAE(2)
    codes = model.encoder.layers[-1]
    codes.kernel.assign(codes.kernel * 100)  # posteriors far from the prior: a KL of tens of nats
    figures = {"as written": figures_afresh(model, images, monkeypatch)}
    line = "logpx_z = -tf.reduce_sum(cross_ent, axis=[1, 2, 3])"
    with monkeypatch.context() as patch:
        patch.setattr(network, "elbo_terms", edited(network.elbo_terms, line, line + " - 5."))
        figures["log p(x|z) - 5"] = figures_afresh(model, images, patch)
    with monkeypatch.context() as patch:
        patch.setattr(network, "compute_loss", edited(network.compute_loss, "beta * logpz - beta * logqz_x",
                                                      "0. * logpz - 0. * logqz_x"))
        figures["beta 0"] = figures_afresh(model, images, patch)
    before = figures["as written"]
    assert before["kl"]["mean"] > 10
    for key, shift in (("elbo", -5), ("reconstruction_log_likelihood", -5), ("kl", 0),
                       ("iwae_log_likelihood", -5)):
        assert figures["log p(x|z) - 5"][key]["mean"] == pytest.approx(before[key]["mean"] + shift, abs=1e-3)
        assert figures["beta 0"][key]["mean"] == before[key]["mean"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run trained with the analytic KL, then evaluated."""
    folder = tmp_path_factory.mktemp("eval")
    data = folder / "mnist.npz"
    np.savez(data, **make_mnist_arrays(num_train=256, num_test=48))
    out = folder / "run"
    result = run_script("train.py", "--data", data, "--out-dir", out, "--epochs", "2",
                        "--kl", "analytic", "--latent-dim", "3", "--learning-rate", "1e-3")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_script("evaluate.py", "--out-dir", out, "--iw-samples", "20")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result


def test_evaluate_writes_a_complete_report(trained_run):
    out, result = trained_run
    report = json.loads((out / "evaluation.json").read_text())
    assert report["epoch"] == 2 and report["test_images"] == 48 and report["kl_estimator"] == "analytic"
    for figure in ("elbo", "reconstruction_log_likelihood", "kl", "iwae_log_likelihood"):
        assert np.isfinite(report[figure]["mean"]) and report[figure]["stderr"] > 0  # images differ
    assert report["iwae_log_likelihood"]["k"] == 20
    assert report["iwae_log_likelihood"]["mean"] > report["elbo"]["mean"]
    # --kl analytic: the KL is the closed form of the encoder's q(z|x), worked out here in NumPy.
    settings = export.read_settings(out)
    test_images = dataset.load_run_data(settings, settings.data, check=True).test[0]
    mean, logvar = (part.numpy().astype(np.float64) for part in
                    network.load_model(out).encode(dataset.binarize(test_images)))
    kl_per_dimension = 0.5 * (np.exp(logvar) + mean**2 - 1 - logvar)
    kl = kl_per_dimension.sum(axis=1)
    assert report["kl"]["mean"] == pytest.approx(kl.mean(), rel=1e-4)
    assert report["kl"]["stderr"] == pytest.approx(kl.std(ddof=1) / np.sqrt(len(kl)), rel=1e-3)
    # KL health: each dimension's share of it, and the active units (Burda et al. 2016).
    np.testing.assert_allclose(report["kl_per_dimension"], kl_per_dimension.mean(axis=0), atol=1e-4)
    assert report["active_units"] == int(np.sum(np.var(mean, axis=0) > 0.01))
    assert f"{report['active_units']:9d} of 3; KL per dimension" in result.stdout
    assert "IWAE bound with K = 20" in result.stdout


def test_evaluate_draws_every_picture(trained_run):
    out, _ = trained_run
    for name in ("reconstructions.png", "prior_samples.png", "latent_space.png", "interpolation.png",
                 "training_curves.png"):
        image = iio.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0, name
    assert not (out / "latent_manifold.png").exists()  # latent_dim 3: no manifold


def test_tensorboard_logs_hold_the_expected_tags(trained_run):
    out, _ = trained_run
    tags, scalars = {}, {}
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                tags.setdefault(value.tag, set()).add(event.step)
                if value.metadata.plugin_data.plugin_name == "scalars":
                    scalars[value.tag, event.step] = float(tf.make_ndarray(value.tensor))
    assert tags["test/elbo"] == {0, 1, 2}
    assert tags["samples"] == {0, 1, 2}
    assert tags["epoch/seconds"] == {1, 2}
    assert tags["train/loss"] == {8, 16}  # the last step of each 8-step epoch
    # The KL health by epoch: at the last one, what evaluate.py finds on the same checkpoint.
    for tag in ("test/kl", "test/active_units", "kl_per_dimension/z00", "kl_per_dimension/z02"):
        assert tags[tag] == {0, 1, 2}, tag
    assert "kl_per_dimension/z03" not in tags  # latent_dim 3
    report = json.loads((out / "evaluation.json").read_text())
    for dimension, kl in enumerate(report["kl_per_dimension"]):
        assert scalars[f"kl_per_dimension/z{dimension:02d}", 2] == pytest.approx(kl, abs=1e-3)
    assert scalars["test/kl", 2] == pytest.approx(sum(report["kl_per_dimension"]), abs=1e-3)
    assert scalars["test/active_units", 2] == report["active_units"]
    last = records.read_metrics(out / "metrics.csv")[-1]
    assert last["test_kl"] == pytest.approx(scalars["test/kl", 2], abs=1e-3)
    assert last["active_units"] == report["active_units"]


def test_tensorboard_projector_files_hold_the_latent_means(trained_run):
    """What tensorboard --logdir RUN's Projector reads (projector_config.pbtxt and the files
    it names): the test images' latent means (latent_dim 3), their classes and a sprite."""
    out, result = trained_run
    assert "for TensorBoard's Projector" in result.stdout
    folder = out / "tensorboard"
    config = text_format.Parse((folder / "projector_config.pbtxt").read_text(), projector.ProjectorConfig())
    embedding, = config.embeddings
    assert embedding.tensor_name == "latent_means" and list(embedding.sprite.single_image_dim) == [28, 28]
    means = np.loadtxt(folder / embedding.tensor_path, delimiter="\t")
    settings = export.read_settings(out)
    test_images, test_labels = dataset.load_run_data(settings, settings.data, check=True).test
    encoded = network.load_model(out).encode(dataset.binarize(test_images))[0].numpy()
    np.testing.assert_allclose(means, encoded, rtol=1e-4, atol=1e-5)  # 48 points of 3 dimensions
    rows = (folder / embedding.metadata_path).read_text().splitlines()
    assert rows[0] == "label\tclass" and rows[1:] == [f"{label}\t{label}" for label in test_labels]
    assert iio.imread(folder / embedding.sprite.image_path).shape[:2] == (7 * 28, 7 * 28)


def test_a_resumed_evaluations_eta_counts_only_the_work_it_does(tmp_path, monkeypatch, capsys):
    """Going on after two kept batches of four images, a batch that takes 10 s leaves one
    to do: ETA 10 s, not the 3 s of the kept work counted as done in no time; a terminal's
    bar counts the work left, from before its first batch."""
    now = [0.0]
    monkeypatch.setattr(resumable, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(resumable, "PROGRESS_SECONDS", 0.0)
    for terminal in (False, True):
        monkeypatch.setattr(sys.stdout, "isatty", lambda terminal=terminal: terminal)
        kept = tmp_path / f"kept-{terminal}.npz"
        first = resumable.BatchResults(kept, {"a": 1}, 16)
        for i in range(2):  # then stopped
            now[0] += 10
            first.batch(i, lambda: np.zeros(4), 4 * (i + 1))
        capsys.readouterr()
        again = resumable.BatchResults(kept, {"a": 1}, 16)
        assert again.resumed == 2
        bar_before_the_batch = []

        def compute(results=again, seen=bar_before_the_batch) -> np.ndarray:
            seen.append(results.bar is not None)
            return np.zeros(4)

        for i in range(3):
            now[0] += 10 if i == 2 else 0
            again.batch(i, compute, 4 * (i + 1))
        if terminal:  # the bar's clock (Keras' own) starts before the batch it times
            assert bar_before_the_batch == [True]
            assert (again.bar.target, again.bar._seen_so_far) == (8, 4)
        else:
            assert capsys.readouterr().out == "12/16 images, 10 s, ETA 10 s\n"


def test_evaluate_refuses_a_folder_without_a_run(tmp_path, capsys, monkeypatch):
    code, stderr = run_main(evaluate.main, ["--out-dir", tmp_path], "evaluate.py", capsys, monkeypatch)
    assert_one_line_error(stderr, "evaluate.py", f"no run in {tmp_path}", 2, code)


def test_a_stopped_evaluation_goes_on_from_its_last_batch(model, images, tmp_path, monkeypatch):
    """Stopped (Ctrl-C) in its third batch of the IWAE bound, evaluated again with the same
    settings: it keeps the first two and gives the figures of an evaluation never stopped;
    with other settings, it starts afresh."""
    x, kept = images[:96], tmp_path / "kept.npz"  # three batches of 32
    whole = evaluate.evaluate_run(model, x, iw_samples=4, kl="mc", seed=2)
    original, calls = evaluate.iwae_bound, []

    def counted(*args):
        calls.append(1)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(evaluate, "iwae_bound", counted)
    for stop_at, k, computed in ((3, 4, 3), (0, 4, 1), (3, 4, 3), (0, 5, 3)):
        calls.clear()
        if stop_at:
            with pytest.raises(KeyboardInterrupt):
                evaluate.evaluate_run(model, x, iw_samples=k, kl="mc", seed=2, kept=kept, work={"a": 1})
            assert kept.is_file()
        else:
            again = evaluate.evaluate_run(model, x, iw_samples=k, kl="mc", seed=2, kept=kept, work={"a": 1})
            assert not kept.is_file()  # complete: nothing left kept
            if k == 4:
                assert again == whole
        assert len(calls) == computed


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT, which Windows lacks")
def test_ctrl_c_ends_a_long_evaluation_in_one_line(trained_run):
    out, _ = trained_run
    command = [sys.executable, str(ROOT / "evaluate.py"), "--out-dir", str(out), "--iw-samples", "20000"]
    process = subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while "Evaluating" not in (line := process.stdout.readline()):
            assert line, process.stderr.read()[-2000:]
        time.sleep(2)  # into the IWAE bound's first batches
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "evaluate.py: interrupted"
    assert "Traceback" not in stderr and not list(out.glob(".*.tmp.*"))  # no file left half written
    (out / ".evaluation-kept.npz").unlink(missing_ok=True)  # another test's evaluation starts afresh


def test_evaluate_takes_a_moved_data_file_a_test_size_and_a_seed(trained_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained_run[0], out)
    moved = tmp_path / "moved.npz"
    shutil.copy(export.read_settings(out).data, moved)
    elbos = []
    for seed in (1, 1, 2):
        evaluate.main(["--out-dir", str(out), "--data", str(moved), "--test-size", "16", "--seed", str(seed),
                       "--iw-samples", "2"])
        report = json.loads((out / "evaluation.json").read_text())
        assert (report["data"], report["test_images"], report["seed"]) == (str(moved), 16, seed)
        elbos.append(report["elbo"]["mean"])
    assert elbos[0] == elbos[1] != elbos[2]  # a seed repeats the draws of z; another draws others
