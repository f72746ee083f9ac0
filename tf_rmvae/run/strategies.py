"""`tf.distribute` strategies and mixed-precision policies by name, and who writes the run's files.

    strategy = make_strategy("mirrored")          # all local GPUs (or CPU); "default": the current device
    with strategy.scope():
        model = ...                               # variables mirrored on every replica
    is_chief(strategy)                            # this process writes config, history, checkpoints, metrics

Names: "default" (no distribution: one device), "mirrored" (`MirroredStrategy`: every GPU of this host),
"multi_worker_mirrored" (`MultiWorkerMirroredStrategy`: the cluster in the `TF_CONFIG` environment variable, one
process per host), "tpu" (`TPUStrategy` on the TPU that `TPUClusterResolver` finds; a clear error when none is).

`MultiWorkerMirroredStrategy` must be created before TensorFlow runs any op (it configures the collective ops of the
eager context): make the strategy first thing in a program.

Testing on a machine without accelerators: `RMVAE_CPU_DEVICES=N` (environment variable) splits the CPU into N logical
devices before TensorFlow initialises, so `mirrored` has N replicas.
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from tf_rmvae.choices import PRECISIONS, STRATEGIES

CPU_DEVICES_ENV = "RMVAE_CPU_DEVICES"


class StrategyError(ValueError):
    """A strategy that cannot be made here (unknown name, no TPU, TensorFlow already initialised, bad TF_CONFIG)."""


def split_cpu(num_devices: int) -> None:
    """Splits the first physical CPU into `num_devices` logical devices (must run before TensorFlow initialises)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration()] * int(num_devices)
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == len(wanted):
        return
    try:
        tf.config.set_logical_device_configuration(cpu, wanted)
    except RuntimeError as e:
        raise StrategyError(f"{CPU_DEVICES_ENV}={num_devices}: TensorFlow was initialised before the CPU could be "
                            f"split ({e}).") from e


def _apply_cpu_split_from_env() -> None:
    value = os.environ.get(CPU_DEVICES_ENV, "")
    if value:
        try:
            count = int(value)
        except ValueError:
            raise StrategyError(f"{CPU_DEVICES_ENV} must be a positive integer; got {value!r}.") from None
        if count < 1:
            raise StrategyError(f"{CPU_DEVICES_ENV} must be a positive integer; got {value!r}.")
        if count > 1:
            split_cpu(count)


def _local_devices() -> list[str] | None:
    """Devices of `MirroredStrategy`: the GPUs if any, else every logical CPU (None lets TF choose)."""
    if tf.config.list_logical_devices("GPU"):
        return None
    cpus = tf.config.list_logical_devices("CPU")
    return [device.name for device in cpus] if len(cpus) > 1 else None


def _fix_keras_multi_worker_reduction() -> None:
    """Makes Keras 3's `fit` work under `MultiWorkerMirroredStrategy` (tensorflow/tensorflow#72388).

    Keras reduces the per-replica outputs of every train step (the metrics) with
    `strategy.reduce("MEAN", value, axis=0)` under a multi-worker strategy, which fails on scalars ("Invalid reduction
    dimension 0 for input with 0 dimensions"). Scalars are instead averaged over the replicas (`axis=None`), as
    Keras does for `MirroredStrategy`; everything else goes to Keras unchanged. Idempotent.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.reduce_per_replica
    if getattr(original, "_rmvae_fixed", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            def mean(value):
                local = strategy.experimental_local_results(value)[0]
                axis = None if local.shape.rank == 0 else 0
                return strategy.reduce("MEAN", value, axis=axis)

            return tf.nest.map_structure(mean, values)
        return original(values, strategy, reduction)

    reduce_per_replica._rmvae_fixed = True
    tf_trainer.reduce_per_replica = reduce_per_replica


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The `tf.distribute.Strategy` called `name` (one of `STRATEGIES`); `StrategyError` if it cannot be made."""
    if name not in STRATEGIES:
        raise StrategyError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {name!r}.")
    _apply_cpu_split_from_env()
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(_local_devices())
    if name == "multi_worker_mirrored":
        tf_config = os.environ.get("TF_CONFIG", "")
        if tf_config:
            try:
                json.loads(tf_config)
            except ValueError as e:
                raise StrategyError(f"TF_CONFIG is not valid JSON ({e}): {tf_config!r}") from None
        _fix_keras_multi_worker_reduction()
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as e:  # "Collective ops must be configured at program startup"
            raise StrategyError(
                f"--strategy=multi_worker_mirrored must be created before TensorFlow runs any op ({e})."
            ) from e
    # tpu
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu="")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        raise StrategyError(f"--strategy=tpu: no TPU found ({type(e).__name__}: {e}).") from e
    return tf.distribute.TPUStrategy(resolver)


def worker_info(strategy: tf.distribute.Strategy) -> tuple[str | None, int]:
    """`(task_type, task_id)` of this process in a multi-worker cluster; `(None, 0)` otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or isinstance(resolver, tf.distribute.cluster_resolver.TPUClusterResolver):
        return None, 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files: always, except on the non-chief workers of a cluster (the chief
    is task "chief", or worker 0 when the cluster has no "chief" task)."""
    task_type, task_id = worker_info(strategy)
    if task_type is None or task_type == "chief":
        return True
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def set_precision(policy: str) -> str:
    """Sets Keras's global dtype policy to `policy` (one of `PRECISIONS`); returns the previous policy's name."""
    if policy not in PRECISIONS:
        raise StrategyError(f"--mixed_precision must be one of {', '.join(PRECISIONS)}; got {policy!r}.")
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    return previous
