"""`tf_rmvae.export`: versioned SavedModels for TF Serving, checked from a process that never imports tf_rmvae."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import tf_rmvae
from tests.helpers import TEST_SETTINGS
from tf_rmvae import export

LATENT_DIM = 2
COMPONENTS = 3
NUM_SAMPLES = 2000  # importance samples per log-likelihood estimate (served and in-process)
REPLICATES = 16  # in-process estimates that give the sampling distribution of the served one
SAMPLE_SEED = 7
MNIST_IMAGES = os.path.join(os.path.dirname(tf_rmvae.__file__), "data", "mnist", "train-images-idx3-ubyte.gz")


def _digits(count: int) -> np.ndarray:
    """Binarized MNIST digits `[count, 28, 28, 1]` from the vendored files (random binary images without them)."""
    rng = np.random.default_rng(0)
    if os.path.exists(MNIST_IMAGES):
        with gzip.open(MNIST_IMAGES) as f:
            pixels = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:count] / 255.0
    else:
        pixels = np.full((count, 28, 28, 1), 0.2)
    return (rng.random(pixels.shape) < pixels).astype("float32")


def _small_trained_model():
    """A tiny RME model after three short epochs (enough for importance weights without heavy tails), with a
    second component mixed in at eps = 0.3."""
    keras.utils.set_random_seed(0)
    encoder = tf_rmvae.RecursiveMixtureEncoder(LATENT_DIM, COMPONENTS, hidden_units=(32,), seed=1, shared_trunk=False)
    decoder = tf_rmvae.BernoulliDecoder((28, 28, 1), hidden_units=(32,))
    model = tf_rmvae.RecursiveMixtureVAE(encoder, decoder, method="rme", **TEST_SETTINGS)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(_digits(2048), batch_size=32, epochs=3, verbose=0)
    model.add_component()
    model.encoder.set_mixing_proportion(1, 0.3)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Model, exported full and encoder-only versions, the test inputs and the in-process reference outputs."""
    model = _small_trained_model()
    base = tmp_path_factory.mktemp("saved_models")
    full = export.export_model(model, str(base), "rmvae", metrics={"test_elbo": -123.5})
    encoder_only = export.export_encoder(model, str(base), "rmvae")
    x = _digits(6)[2:]
    z = np.random.default_rng(1).standard_normal((3, LATENT_DIM)).astype("float32")
    log_w, loc, scale = (t.numpy() for t in model.encoder.compute_parameters(x))
    weights = np.exp(log_w)
    # REPLICATES independent K-sample estimates [R, B]: the served estimate is one more draw of the same estimator.
    log_likelihoods = np.stack(
        [model.log_likelihood(x, NUM_SAMPLES, chunk_size=NUM_SAMPLES).numpy() for _ in range(REPLICATES)]
    )
    reference = {
        "mixture_weights": weights,
        "loc": loc,
        "scale": scale,
        "posterior_mean": model.posterior_mean(x).numpy(),
        "reconstruction": model(x).numpy(),
        "generated": model.decoder(z).mean().numpy(),
        "sampled": model.generate(5, seed=SAMPLE_SEED).numpy(),
        "log_likelihoods": log_likelihoods,
    }
    return dict(model=model, base=base, full=full, encoder_only=encoder_only, x=x, z=z, reference=reference)


# Runs in a fresh interpreter (-I: no PYTHONPATH, no script directory, no user site) started in a temporary
# directory: it may only use TensorFlow and NumPy, as a serving host would.
_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import os

    import numpy as np
    import tensorflow as tf

    full_dir, encoder_dir, inputs_file, out_file, num_samples = sys.argv[1:6]
    inputs = np.load(inputs_file)
    x, z = tf.constant(inputs["x"]), tf.constant(inputs["z"])
    results, errors = {}, {}
    loaded = tf.saved_model.load(full_dir)
    sigs = loaded.signatures
    results["signatures"] = sorted(sigs)
    for key in ("serving_default", "encode"):
        for name, value in sigs[key](images=x).items():
            results[key + "/" + name] = value.numpy()
    results["reconstruct/reconstruction"] = sigs["reconstruct"](images=x)["reconstruction"].numpy()
    results["log_likelihood/log_likelihood"] = sigs["log_likelihood"](
        images=x, num_samples=tf.constant(int(num_samples)))["log_likelihood"].numpy()
    results["generate/images"] = sigs["generate"](z=z)["images"].numpy()
    results["sample/images"] = sigs["sample"](num_images=tf.constant(5), seed=tf.constant(7))["images"].numpy()
    bad_inputs = {
        "rank": dict(images=tf.zeros([2, 28, 28])),
        "size": dict(images=tf.zeros([2, 27, 28, 1])),
        "dtype": dict(images=tf.zeros([2, 28, 28, 1], tf.float64)),
        "range": dict(images=255.0 * x),
        "nan": dict(images=tf.fill([2, 28, 28, 1], float("nan"))),
    }
    for case, kwargs in bad_inputs.items():
        try:
            sigs["serving_default"](**kwargs)
            errors[case] = None
        except Exception as err:
            errors[case] = type(err).__name__ + ": " + str(err)
    try:
        sigs["log_likelihood"](images=x, num_samples=tf.constant(0))
        errors["num_samples"] = None
    except Exception as err:
        errors["num_samples"] = type(err).__name__ + ": " + str(err)
    encoder = tf.saved_model.load(encoder_dir)
    results["encoder_signatures"] = sorted(encoder.signatures)
    results["encoder/posterior_mean"] = encoder.signatures["serving_default"](images=x)["posterior_mean"].numpy()
    # Variables stored in the encoder-only export's checkpoint (each exactly once).
    stored = tf.train.list_variables(os.path.join(encoder_dir, "variables", "variables"))
    results["encoder/num_variables"] = len([name for name, _ in stored if name.endswith("VARIABLE_VALUE")])
    np.savez(out_file, **{k: np.asarray(v) for k, v in results.items()})
    imported = sorted(m for m in sys.modules if m.split(".")[0] == "tf_rmvae")
    with open(out_file + ".json", "w") as f:
        json.dump({"errors": errors, "tf_rmvae_modules": imported, "sys_path": sys.path}, f)
    """
)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _run(args, cwd) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=300)
    return proc


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    """Outputs of every signature, loaded with `tf.saved_model.load` in a fresh process without tf_rmvae."""
    work = tmp_path_factory.mktemp("serving_host")
    np.savez(work / "inputs.npz", x=exported["x"], z=exported["z"])
    (work / "load.py").write_text(_LOAD_SCRIPT)
    out = str(work / "out.npz")
    args = [sys.executable, "-I", "load.py", exported["full"], exported["encoder_only"], "inputs.npz", out]
    proc = _run(args + [str(NUM_SAMPLES)], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out + ".json") as f:
        info = json.load(f)
    with np.load(out) as data:
        info["results"] = {k: data[k] for k in data.files}
    return info


def _saved_model_cli() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


def _agrees_within_monte_carlo_error(served: np.ndarray, replicates: np.ndarray) -> None:
    """`served [B]` and the in-process `replicates [R, B]` are draws of the same K-sample estimator, so `served`
    must lie within 6 standard deviations of the replicates' mean (the sd estimated from the replicates
    themselves, which, unlike a delta-method error from the weights, is not fooled by heavy-tailed importance
    weights). The typical tolerance is also required to be sharp (median over digits < 1 nat), so that a wrong
    normalisation such as log(K / chunk_size) = log 20 ~ 3 nats cannot pass."""
    centre = replicates.mean(axis=0)
    tolerance = 6.0 * replicates.std(axis=0, ddof=1) * np.sqrt(1.0 + 1.0 / len(replicates)) + 1e-3
    assert np.median(tolerance) < 1.0, tolerance
    np.testing.assert_array_less(np.abs(served - centre), tolerance)


# ---------------------------------------------------------------------------------------------- layout and metadata
@pytest.mark.slow
def test_export_writes_a_tf_serving_version_directory_with_metadata(exported):
    model_dir = exported["base"] / "rmvae"
    assert exported["full"] == str(model_dir / "1")
    assert sorted(os.listdir(model_dir)) == ["1"]  # no temporary directory left behind
    assert {"saved_model.pb", "variables", "assets.extra"} <= set(os.listdir(exported["full"]))
    meta = export.read_metadata(exported["full"])
    assert meta["kind"] == "full" and meta["version"] == 1 and meta["name"] == "rmvae"
    assert meta["image_shape"] == [28, 28, 1] and meta["latent_dim"] == LATENT_DIM
    assert meta["max_components"] == COMPONENTS and meta["active_components"] == 2
    assert meta["mixing_weights"] == pytest.approx([0.7, 0.3, 0.0])
    assert meta["method"] == "rme" and meta["metrics"] == {"test_elbo": -123.5}
    assert meta["model_config"]["encoder"]["config"]["latent_dim"] == LATENT_DIM
    assert set(meta["signatures"]) == {
        "serving_default", "encode", "reconstruct", "log_likelihood", "generate", "sample"}
    assert meta["signatures"]["log_likelihood"]["inputs"]["num_samples"] == {"dtype": "int32", "shape": []}
    assert meta["signatures"]["encode"]["outputs"]["loc"]["shape"] == [-1, COMPONENTS, LATENT_DIM]


@pytest.mark.slow
def test_versions_count_up_and_an_existing_version_is_never_overwritten(exported, tmp_path):
    model = exported["model"]
    assert export.export_encoder(model, str(tmp_path), "m") == str(tmp_path / "m_encoder" / "1")
    assert export.export_encoder(model, str(tmp_path), "m") == str(tmp_path / "m_encoder" / "2")
    with pytest.raises(FileExistsError, match="never overwritten"):
        export.export_encoder(model, str(tmp_path), "m", version=2)
    assert export.export_encoder(model, str(tmp_path), "m", version=10).endswith(os.path.join("m_encoder", "10"))
    (tmp_path / "m_encoder" / "not_a_version").mkdir()
    assert export.next_version(str(tmp_path / "m_encoder")) == 11
    assert export.existing_versions(str(tmp_path / "m_encoder")) == [1, 2, 10]
    with pytest.raises(ValueError, match="non-negative integer"):
        export.export_encoder(model, str(tmp_path), "m", version=-1)


@pytest.mark.slow
def test_a_failed_export_leaves_no_version_directory(exported, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash after the SavedModel was written")

    monkeypatch.setattr(export, "_metadata", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export.export_encoder(exported["model"], str(tmp_path), "m")
    assert os.listdir(tmp_path / "m_encoder") == []


def test_export_of_an_unbuilt_model_is_refused(tmp_path):
    encoder = tf_rmvae.RecursiveMixtureEncoder(2, 2, hidden_units=(8,))
    model = tf_rmvae.RecursiveMixtureVAE(encoder, tf_rmvae.BernoulliDecoder((28, 28, 1), hidden_units=(8,)))
    with pytest.raises(ValueError, match="Build"):
        export.export_model(model, str(tmp_path), "m")
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------- a serving host
@pytest.mark.slow
def test_serving_process_never_imports_tf_rmvae(served):
    assert served["tf_rmvae_modules"] == []
    assert not any(os.path.abspath(p) == os.path.dirname(os.path.dirname(export.__file__)) for p in served["sys_path"])


@pytest.mark.slow
def test_every_signature_matches_the_in_process_model(exported, served):
    out, ref = served["results"], exported["reference"]
    expected = ["encode", "generate", "log_likelihood", "reconstruct", "sample", "serving_default"]
    assert list(out["signatures"]) == expected
    for key in ("serving_default", "encode"):
        for name in ("mixture_weights", "loc", "scale", "posterior_mean"):
            np.testing.assert_allclose(out[f"{key}/{name}"], ref[name], rtol=1e-5, atol=1e-5, err_msg=f"{key}/{name}")
    np.testing.assert_allclose(out["serving_default/mixture_weights"][:, 2], 0.0)  # inactive slot
    np.testing.assert_allclose(out["reconstruct/reconstruction"], ref["reconstruction"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["generate/images"], ref["generated"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["sample/images"], ref["sampled"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_served_log_likelihood_agrees_within_monte_carlo_error(exported, served):
    served_ll = served["results"]["log_likelihood/log_likelihood"]
    assert served_ll.shape == (len(exported["x"]),)
    _agrees_within_monte_carlo_error(served_ll, exported["reference"]["log_likelihoods"])


@pytest.mark.slow
def test_invalid_inputs_fail_with_clear_errors_at_the_serving_boundary(served):
    errors = served["errors"]
    for case in ("rank", "size"):
        assert "InvalidArgumentError" in errors[case] and "is not compatible with expected shape [?,28,28,1]" in errors[
            case
        ], errors[case]
    assert "expected to be a float tensor but is a double tensor" in errors["dtype"]
    assert "images must lie in [0, 1]" in errors["range"]
    assert "images contain NaN or Inf values" in errors["nan"]
    assert "num_samples must lie in [1, 100000]" in errors["num_samples"]


@pytest.mark.slow
def test_encoder_export_serves_only_the_encode_signature(exported, served):
    out = served["results"]
    assert list(out["encoder_signatures"]) == ["encode", "serving_default"]
    np.testing.assert_allclose(out["encoder/posterior_mean"], exported["reference"]["posterior_mean"], atol=1e-5)
    assert int(out["encoder/num_variables"]) == len(exported["model"].encoder.variables)
    assert exported["encoder_only"].endswith(os.path.join("rmvae_encoder", "1"))
    assert export.read_metadata(exported["encoder_only"])["kind"] == "encoder"


# ---------------------------------------------------------------------------------------------- saved_model_cli
@pytest.mark.slow
def test_saved_model_cli_run_matches_the_in_process_model(exported, tmp_path):
    np.save(tmp_path / "x.npy", exported["x"])
    cli = _saved_model_cli() + ["run", "--dir", exported["full"], "--tag_set", "serve"]
    proc = _run(cli + ["--signature_def", "serving_default", "--inputs", "images=x.npy", "--outdir", "enc"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = exported["reference"]
    for name in ("mixture_weights", "loc", "scale", "posterior_mean"):
        np.testing.assert_allclose(np.load(tmp_path / "enc" / f"{name}.npy"), ref[name], rtol=1e-5, atol=1e-5)

    args = ["--signature_def", "log_likelihood", "--inputs", "images=x.npy", "--outdir", "ll"]
    proc = _run(cli + args + ["--input_exprs", f"num_samples={NUM_SAMPLES}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _agrees_within_monte_carlo_error(np.load(tmp_path / "ll" / "log_likelihood.npy"), ref["log_likelihoods"])


@pytest.mark.slow
def test_saved_model_cli_refuses_a_wrong_shape(exported, tmp_path):
    np.save(tmp_path / "x.npy", exported["x"][..., 0])  # [B, 28, 28]: channel axis missing
    cli = _saved_model_cli() + ["run", "--dir", exported["full"], "--tag_set", "serve"]
    proc = _run(cli + ["--signature_def", "serving_default", "--inputs", "images=x.npy", "--outdir", "o"], tmp_path)
    assert proc.returncode != 0
    assert "Cannot feed value of shape (4, 28, 28)" in proc.stderr and "(None, 28, 28, 1)" in proc.stderr


@pytest.mark.slow
def test_serving_example_prints_a_real_rest_response(exported):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "trainers.serving_example", f"--model_dir={exported['full']}", "--index=2"],
        cwd=repo, env=_clean_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    response = json.loads(proc.stdout.split("response:", 1)[1])
    prediction = response["predictions"][0]
    assert set(prediction) == {"mixture_weights", "loc", "scale", "posterior_mean"}
    np.testing.assert_allclose(prediction["mixture_weights"], exported["reference"]["mixture_weights"][0], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("version_name", ["1", "2", "3", "4"])
def test_the_committed_model_is_servable_without_our_code(tmp_path, version_name):
    """`saved_models/rmvae_mnist_rme/<version>` (made by the README's quick command: 1, 2 and 3 with the defaults
    of earlier versions, 4 with today's) loads in a fresh isolated process and gives a trained model's answers on
    real test digits."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    version = os.path.join(repo, "saved_models", "rmvae_mnist_rme", version_name)
    np.save(tmp_path / "x.npy", _digits(8))
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import tensorflow as tf
        model = tf.saved_model.load(sys.argv[1])
        x = tf.constant(np.load("x.npy"))
        weights = model.signatures["serving_default"](images=x)["mixture_weights"].numpy()
        ll = model.signatures["log_likelihood"](images=x, num_samples=tf.constant(50))["log_likelihood"].numpy()
        assert not any(m.startswith("tf_rmvae") for m in sys.modules)
        print(weights.shape[1], weights.sum(axis=1).min(), weights.sum(axis=1).max(), ll.mean())
    """)
    (tmp_path / "serve.py").write_text(script)
    proc = _run([sys.executable, "-I", "serve.py", version], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    components, low, high, mean_ll = (float(v) for v in proc.stdout.split()[-4:])
    # Version 1: four independent networks; versions 2 (lambda = 0.3) and 3 (lambda = 1): eight heads on one trunk;
    # version 4: three heads on one trunk.
    assert components == {"1": 4, "2": 8, "3": 8, "4": 3}[version_name]
    assert abs(low - 1) < 1e-5 and abs(high - 1) < 1e-5
    assert -150.0 < mean_ll < -40.0  # a trained model; chance is 784 log 2 = 543 nats
