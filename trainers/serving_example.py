"""Prints a TF Serving REST `predict` request and its response for one test digit, from a real run of an export.

    python -m trainers.serving_example --model_dir saved_models/rmvae_mnist_rme/4

The signature runs through `tf.saved_model.load` (no tf_rmvae code is involved in computing it); the response is
formatted as TF Serving's REST API returns it (row format: `{"predictions": [...]}`), rounded for reading.
TensorFlow's logs are off unless `--tf_log_level` asks for them (`trainers.quiet`), as in the other programs.
"""

from __future__ import annotations

import json
import sys

from trainers import cli, quiet

with quiet.quiet_imports(sys.argv):  # first: TensorFlow reads its log level when it is imported
    import numpy as np
    import tensorflow as tf
    from absl import flags

    from tf_rmvae.data import load_numpy

flags.adopt_module_key_flags(quiet)  # --tf_log_level in --help

flags.DEFINE_string("model_dir", None, "An exported version directory (saved_models/NAME/VERSION).", required=True)
flags.DEFINE_string("signature", "serving_default", "Signature to run.")
flags.DEFINE_string("dataset", "rmvae_mnist", "Dataset of the test digit.")
flags.DEFINE_integer("index", 0, "Index of the test digit (fixed binarization).")
flags.DEFINE_integer("decimals", 4, "Rounding of the printed response.")
FLAGS = flags.FLAGS


def rounded(value, decimals):
    return np.round(np.asarray(value, np.float64), decimals).tolist()


def main(argv):
    del argv
    quiet.quiet_python_logs()
    image = load_numpy(FLAGS.dataset, "test", take=FLAGS.index + 1)[FLAGS.index:FLAGS.index + 1]
    outputs = tf.saved_model.load(FLAGS.model_dir).signatures[FLAGS.signature](images=tf.constant(image))
    request = {"signature_name": FLAGS.signature, "instances": image.tolist()}
    response = {"predictions": [{name: rounded(value[0], FLAGS.decimals) for name, value in sorted(outputs.items())}]}
    print("request (image abbreviated):", json.dumps(request)[:160] + " ...")
    print("response:", json.dumps(response))


if __name__ == "__main__":
    cli.run(main, sys.modules[__name__])
