"""Tiny components for the harness's own tests: no model, numpy on the reference side, taps on ours.

``toy`` passes; ``toy_crash`` raises inside its MLX forward after one layer; ``toy_sleep`` waits
inside its MLX forward (for interrupting it); ``toy_bug`` has a bug outside any forward.
"""
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_impl.taps import tap
from parity.api import Component, ComponentConfig


class ToyConfig(ComponentConfig):
    size: int = 8


class Toy(Component):
    name = "toy"
    config_model = ToyConfig
    default_config = "toy.json"

    def make_inputs(self, config, seed):
        return {"x": np.linspace(-1, 1, config.size, dtype=np.float32)}

    def build_reference(self, config, seed):
        return None

    def reference_weights(self, reference):
        return {}

    def cast_reference(self, reference, dtype):
        return reference

    def run_reference(self, reference, inputs, dtype, capture):
        x = inputs["x"].astype(np.float64)
        capture.add("a", np.tanh(x).astype(np.float32))
        capture.add("b", (2 * np.tanh(x)).astype(np.float32))

    def build_mlx(self, config, weights, dtype):
        return None

    def run_mlx(self, model, inputs, dtype):
        a = tap("a", mx.tanh(mx.array(inputs["x"])))
        tap("b", 2 * a)


class ToyCrash(Toy):
    name = "toy_crash"

    def run_mlx(self, model, inputs, dtype):
        a = tap("a", mx.tanh(mx.array(inputs["x"])))
        raise ValueError(f"[broadcast_shapes] shapes {a.shape} and (3,) cannot be broadcast")


class ToySleep(Toy):
    name = "toy_sleep"

    def run_mlx(self, model, inputs, dtype):
        tap("a", mx.tanh(mx.array(inputs["x"])))
        print("toy_sleep: ready", file=sys.stderr, flush=True)
        time.sleep(120)


class ToyBug(Toy):
    name = "toy_bug"

    def make_inputs(self, config, seed):
        return {"x": [][config.size]}  # IndexError: a bug in the component, not the user's input


COMPONENTS = [Toy(), ToyCrash(), ToySleep(), ToyBug()]
