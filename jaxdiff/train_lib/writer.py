"""Where training metrics go: ``metrics.jsonl`` (one JSON object a line) and TensorBoard event files
(TFRecord-framed events written with the ``tensorboard`` package's record writer on a plain file: its
``EventFileWriter`` would import TensorFlow, several seconds of start-up). Only process 0 writes."""
from __future__ import annotations

import json
import math
import os
import socket
import time
from typing import Mapping

import jax


class MetricWriter:
    """Append scalars per step. ``tensorboard=None`` uses it when available, ``False`` never."""

    def __init__(self, workdir: str, tensorboard: bool | None = None):
        self.active = jax.process_index() == 0
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard is not False:
            try:
                from tensorboard.compat.proto.event_pb2 import Event
                from tensorboard.compat.proto.summary_pb2 import Summary
                from tensorboard.summary.writer.record_writer import RecordWriter
            except ImportError:
                if tensorboard:
                    raise
            else:
                folder = os.path.join(workdir, "tensorboard")
                os.makedirs(folder, exist_ok=True)
                name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
                self._file = open(os.path.join(folder, name), "wb")
                self._event, self._summary = Event, Summary
                self._tb = RecordWriter(self._file)
                self._tb.write(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """Record ``scalars`` (python floats) at ``step``."""
        if not self.active:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items() if v is not None]
            self._tb.write(self._event(wall_time=time.time(), step=int(step),
                                       summary=self._summary(value=values)).SerializeToString())
            self._file.flush()

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            if self._tb is not None:
                self._file.close()


def read_metrics(workdir: str) -> list[dict]:
    """All records of ``<workdir>/metrics.jsonl`` (a resumed run appends; later records win per step)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
