"""Metric writers (console + TensorBoard), console progress with ETA, and the final metrics JSON.

`create_metric_writer` picks the back end at run time:

* `clu.metric_writers.create_default_writer` when TensorFlow is already loaded (the TFDS input
  pipeline imported it): console logging + TF summary files, written asynchronously.
* otherwise a TF-free writer: console logging + TensorBoard event files written with the
  `tensorboard` package's own event writer. `clu.metric_writers` imports TensorFlow when it is
  imported, so this module never imports it unless TensorFlow is already there; only the input
  pipeline may import TensorFlow.

Both expose `write_scalars(step, scalars)`, `write_hparams(hparams)`, `flush()` and `close()`.
"""

import glob
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from absl import logging


class MetricWriter(Protocol):
    """The subset of `clu.metric_writers.MetricWriter` that training uses."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def write_hparams(self, hparams: Mapping[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class ConsoleWriter:
    """Logs scalars as `[step] name=value, ...` (the format of clu's `LoggingWriter`)."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        text = ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items()))
        logging.info("[%d] %s", step, text)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        logging.info("[hparams] %s", flatten(hparams))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """TensorBoard event files without TensorFlow, on a local filesystem.

    Records are written with `tensorboard`'s own `RecordWriter` to a plain file: tensorboard's
    `EventFileWriter` would import TensorFlow for its file system layer when it is installed.
    """

    def __init__(self, logdir: str):
        from tensorboard.summary.writer.record_writer import RecordWriter

        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._records = RecordWriter(open(os.path.join(logdir, name), "wb"))
        self._add_event(file_version="brain.Event:2")

    def _add_event(self, step: int = 0, **fields: Any) -> None:
        from tensorboard.compat.proto import event_pb2

        event = event_pb2.Event(wall_time=time.time(), step=step, **fields)
        self._records.write(event.SerializeToString())

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        values = [
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
            for tag, value in scalars.items()
        ]
        self._add_event(step, summary=summary_pb2.Summary(value=values))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        from tensorboard.plugins.hparams import summary_v2

        flat = {
            k: v if isinstance(v, bool | int | float | str) else str(v)
            for k, v in flatten(hparams).items()
        }
        self._add_event(0, summary=summary_v2.hparams_pb(flat))

    def flush(self) -> None:
        self._records.flush()

    def close(self) -> None:
        self._records.close()


class MultiWriter:
    """Forwards every call to each writer."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self._writers = tuple(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for writer in self._writers:
            writer.write_scalars(step, scalars)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        for writer in self._writers:
            writer.write_hparams(hparams)

    def flush(self) -> None:
        for writer in self._writers:
            writer.flush()

    def close(self) -> None:
        for writer in self._writers:
            writer.close()


def create_metric_writer(logdir: str, write_files: bool = True) -> MetricWriter:
    """Console + TensorBoard writer for `logdir`; console only when `write_files` is False.

    Pass `write_files=jax.process_index() == 0` so that one host writes the event files.
    """
    if "tensorflow" in sys.modules:
        from clu import metric_writers

        return metric_writers.create_default_writer(logdir, just_logging=not write_files)
    writers = [ConsoleWriter()]
    if write_files:
        writers.append(TensorBoardWriter(logdir))
    return MultiWriter(writers)


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressLogger:
    """Console progress: step, percent done, steps/s, images/s and ETA.

    Rates are measured over the window since the previous call (so they include input, the
    train step and any evaluation in the window); the ETA extrapolates the latest rate.
    """

    def __init__(self, num_train_steps: int, global_batch_size: int, start_step: int):
        self._num_train_steps = num_train_steps
        self._global_batch_size = global_batch_size
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def __call__(self, step: int) -> dict[str, float]:
        """Logs progress after `step` steps; returns {'steps_per_sec', 'images_per_sec'}."""
        now = time.perf_counter()
        steps_per_sec = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self._num_train_steps - step) / max(steps_per_sec, 1e-9)
        logging.info(
            "step %d/%d (%.1f%%), %.2f steps/s, %.1f images/s, ETA %s",
            step,
            self._num_train_steps,
            100.0 * step / self._num_train_steps,
            steps_per_sec,
            steps_per_sec * self._global_batch_size,
            _format_duration(eta),
        )
        return {
            "steps_per_sec": steps_per_sec,
            "images_per_sec": steps_per_sec * self._global_batch_size,
        }


def write_json(path: str, metrics: Mapping[str, Any]) -> None:
    """Writes `metrics` (numbers and strings) as indented JSON to `path`."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(metrics), f, indent=2, sort_keys=True)
        f.write("\n")


def _records(path: str) -> Iterator[bytes]:
    """The records of a TFRecord file (length, its CRC, data, its CRC), up to a torn end."""
    with open(path, "rb") as f:
        while len(header := f.read(12)) == 12:
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data


def read_scalars(logdir: str, step: int) -> dict[str, float]:
    """The scalars written at `step` to the TensorBoard event files in `logdir` (by either writer
    of `create_metric_writer`; a later file's value wins)."""
    from tensorboard.compat.proto import event_pb2

    values = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in map(event_pb2.Event.FromString, _records(path)):
            if event.step != step:
                continue
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    values[value.tag] = value.simple_value
                elif value.tensor.dtype in _TENSOR_DTYPES:
                    values[value.tag] = _tensor_scalar(value.tensor)
    return values


# TensorFlow's DataType enum -> numpy dtype, for the scalar tensors of TF2 summaries.
_TENSOR_DTYPES = {1: np.float32, 2: np.float64}


def _tensor_scalar(tensor) -> float:
    """The value of a scalar TensorProto: in float_val/double_val, or packed in tensor_content
    (as TensorFlow's summary writer, clu's with TensorFlow present, stores it)."""
    if tensor.tensor_content:
        return float(np.frombuffer(tensor.tensor_content, _TENSOR_DTYPES[tensor.dtype])[0])
    return float((*tensor.float_val, *tensor.double_val)[0])
