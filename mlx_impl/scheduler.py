"""Helios DMD scheduler and the pyramid stage transitions, ported from diffusers.

Mirrors ``diffusers.HeliosDMDScheduler`` and the distilled (DMD) sampling loop of
``HeliosPyramidPipeline``. Schedules are host-side in the reference, so they are NumPy here,
in the reference's dtypes (float64; float32 for a single-stage scheduler). Latent math is MLX,
channels-last: latents are ``(batch, frames, height, width, channels)``.

The pyramid loop (:func:`pyramid_sample`) taps ``stage{s}/timesteps``, ``stage{s}/sigmas``,
the latents entering each stage (``stage0/downsample``, ``stage{s}/transition``) and the
latents after every step (``stage{s}/step{k}``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlx_impl.taps import tap

TIME_SHIFT_TYPES = ("linear", "exponential")


class StageIndexError(KeyError):
    """A stage index the scheduler has no schedule for (the reference raises a bare KeyError)."""

    def __str__(self) -> str:
        return str(self.args[0])


# --- schedules (NumPy) -------------------------------------------------------------------
def time_shift(mu: float, sigma: float, t: np.ndarray, kind: str, tensor_order: bool = True) -> np.ndarray:
    """Shift ``t`` in [0, 1]: ``mu / (mu + (1/t - 1)**sigma)`` ("linear") or with ``e**mu`` ("exponential").

    For sigma = 1 the linear shift is ``mu*t / (1 + (mu - 1)*t)``; t = 0 maps to 0, t = 1 to 1.
    ``tensor_order`` evaluates ``mu / x`` as ``(1 / x) * mu``, as torch does when ``x`` is a tensor:
    the reference shifts torch tensors (dynamic shifting), except the single-stage ``shift`` of a
    numpy array (one division). Following each keeps schedules bit-identical, so the integer
    timesteps derived from them match too.
    """
    scale = math.exp(mu) if kind == "exponential" else mu
    with np.errstate(divide="ignore"):
        x = scale + (1 / t - 1) ** sigma
        return (1 / x) * scale if tensor_order else scale / x


def corrected_start_sigma(start_sigma: float, gamma: float) -> float:
    """The start sigma of a later stage after upsampling and block-noise re-noising with ``gamma``."""
    signal = 1 - start_sigma
    return 1 - signal / (math.sqrt(1 + 1 / gamma) * (1 - signal) + signal)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The dynamic-shift ``mu`` for a token count: linear from base_shift to max_shift (diffusers')."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def timestep_index(timesteps: np.ndarray, timestep: float) -> int:
    """The index of the schedule entry nearest to ``timestep`` truncated to an integer (as the reference)."""
    return int(np.argmin(np.abs(timesteps - int(timestep))))


class HeliosDMDScheduler:
    """Per-stage flow-matching schedules of Helios' distilled pyramid sampler.

    Takes the keyword arguments of diffusers' ``HeliosDMDScheduler`` (a ``scheduler_config.json``).
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, stages: int = 3,
                 stage_range: Sequence[float] = (0, 1 / 3, 2 / 3, 1), gamma: float = 1 / 3,
                 prediction_type: str = "flow_prediction", use_flow_sigmas: bool = True,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "linear"):
        if prediction_type != "flow_prediction":
            raise ValueError(f"prediction_type: expected 'flow_prediction', got {prediction_type!r}")
        if time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type: expected one of {TIME_SHIFT_TYPES}, got {time_shift_type!r}")
        if len(stage_range) < stages + 1:
            raise ValueError(f"stage_range: expected {stages + 1} boundaries for {stages} stages, "
                             f"got {list(stage_range)}")
        self.num_train_timesteps = num_train_timesteps
        self.shift = shift
        self.stages = stages
        self.stage_range = list(stage_range)
        self.gamma = gamma
        self.use_dynamic_shifting = use_dynamic_shifting
        self.time_shift_type = time_shift_type
        self.train_sigmas, self.train_timesteps = self._train_schedule()
        self._init_stages()
        self.timesteps = self.train_timesteps
        self.sigmas = self.train_sigmas

    def _train_schedule(self) -> tuple[np.ndarray, np.ndarray]:
        """The global training sigmas (shifted by ``shift``, descending from 1) and timesteps."""
        n, shift = self.num_train_timesteps, self.shift
        sigmas = 1.0 - np.linspace(1, 1 / n, n + 1)
        sigmas = np.flip(shift * sigmas / (1 + (shift - 1) * sigmas))[:-1].copy()
        return sigmas, sigmas * n

    def _init_stages(self) -> None:
        """Start/end sigma of each stage, its share of the flow, and its training timesteps/sigmas."""
        n = self.num_train_timesteps
        self.ori_start_sigmas, self.start_sigmas, self.end_sigmas = [], [], []
        for s in range(self.stages):
            start = max(int(self.stage_range[s] * n), 0)
            end = min(int(self.stage_range[s + 1] * n), n)
            start_sigma = float(self.train_sigmas[start])
            self.ori_start_sigmas.append(start_sigma)
            if s != 0:
                start_sigma = corrected_start_sigma(start_sigma, self.gamma)
            self.start_sigmas.append(start_sigma)
            self.end_sigmas.append(float(self.train_sigmas[end]) if end < n else 0.0)
        distance = [a - b for a, b in zip(self.start_sigmas, self.end_sigmas)]
        total = sum(distance)
        self.timestep_ratios = [
            (sum(distance[:s]) / total if s else 0.0,
             0.9999999999999999 if s == self.stages - 1 else sum(distance[:s + 1]) / total)
            for s in range(self.stages)
        ]
        self.timesteps_per_stage, self.sigmas_per_stage = [], []
        for first, last in self.timestep_ratios:
            t_max = min(float(self.train_timesteps[int(first * n)]), 999)
            t_min = float(self.train_timesteps[min(int(last * n), n - 1)])
            self.timesteps_per_stage.append(np.linspace(t_max, t_min, n + 1)[:-1])
            self.sigmas_per_stage.append(np.linspace(0.999, 0, n + 1)[:-1])

    def time_shift(self, mu: float, sigma: float, t: np.ndarray, tensor_order: bool = True) -> np.ndarray:
        return time_shift(mu, sigma, t, self.time_shift_type, tensor_order)

    def set_timesteps(self, num_inference_steps: int, stage_index: int | None = None, mu: float | None = None,
                      is_amplify_first_chunk: bool = False) -> None:
        """Set ``timesteps`` (one per step) and ``sigmas`` (one more, ending at 0) for one stage.

        ``is_amplify_first_chunk`` doubles the steps. ``mu`` is used with dynamic shifting only
        (and ignored otherwise, as the pipeline always passes it).
        """
        if num_inference_steps < 0:
            raise ValueError(f"num_inference_steps: expected a count >= 0, got {num_inference_steps}")
        if self.use_dynamic_shifting and mu is None:
            raise TypeError("use_dynamic_shifting=True: set_timesteps needs mu (see calculate_shift)")
        if self.use_dynamic_shifting and self.shift != 1.0:
            raise ValueError(f"use_dynamic_shifting=True needs shift=1.0, got shift={self.shift}")
        n = num_inference_steps * 2 + 1 if is_amplify_first_chunk else num_inference_steps + 1
        if self.stages == 1:
            sigmas = np.linspace(1, 1 / self.num_train_timesteps, n + 1)[:-1].astype(np.float32)
            if self.shift != 1.0:
                sigmas = self.time_shift(self.shift, 1.0, sigmas, tensor_order=False)
            timesteps = sigmas * self.num_train_timesteps
        else:
            if not isinstance(stage_index, (int, np.integer)) or not 0 <= stage_index < self.stages:
                raise StageIndexError(f"stage_index: expected 0..{self.stages - 1} for {self.stages} stages, "
                                      f"got {stage_index!r}")
            stage_timesteps = self.timesteps_per_stage[stage_index]
            stage_sigmas = self.sigmas_per_stage[stage_index]
            timesteps = np.linspace(stage_timesteps[0], stage_timesteps[-1], n)
            sigmas = np.linspace(stage_sigmas[0], stage_sigmas[-1], n)
        # The last interpolated point is dropped; sigmas keep a final 0 instead.
        self.timesteps = timesteps[:-1]
        self.sigmas = np.concatenate([sigmas[:-1], np.zeros(1, sigmas.dtype)])
        if self.use_dynamic_shifting:
            self.sigmas = self.time_shift(mu, 1.0, self.sigmas)
            if self.stages == 1:
                self.timesteps = self.sigmas[:-1] * self.num_train_timesteps
            else:
                low, high = stage_timesteps.min(), stage_timesteps.max()
                self.timesteps = low + self.sigmas[:-1] * (high - low)

    def sigma_at(self, timestep: float) -> float:
        """The sigma of the current schedule at ``timestep``."""
        return float(self.sigmas[timestep_index(self.timesteps, timestep)])

    def step(self, model_output: mx.array, timestep: float, sample: mx.array, step_index: int,
             start_point: mx.array) -> mx.array:
        """One DMD step: predict x0, then re-noise it to the next timestep from ``start_point``.

        The last step of a stage returns x0 (in the model output's dtype); re-noised latents take
        ``start_point``'s dtype (the reference's ``dmd_noisy_tensor``, the latents the stage began from).
        """
        x0 = convert_flow_pred_to_x0(model_output, sample, self.sigma_at(timestep))
        if step_index < len(self.timesteps) - 1:
            return add_noise(x0, start_point, self.sigma_at(self.timesteps[step_index + 1]))
        return x0


# --- latent math (MLX) -------------------------------------------------------------------
def convert_flow_pred_to_x0(flow_pred: mx.array, xt: mx.array, sigma: float) -> mx.array:
    """``xt - sigma * flow_pred`` in float32 (the reference: float64), returned in ``flow_pred``'s dtype."""
    return (xt.astype(mx.float32) - sigma * flow_pred.astype(mx.float32)).astype(flow_pred.dtype)


def add_noise(sample: mx.array, noise: mx.array, sigma: float) -> mx.array:
    """``(1 - sigma) * sample + sigma * noise`` in float32, returned in ``noise``'s dtype."""
    return ((1 - sigma) * sample.astype(mx.float32) + sigma * noise.astype(mx.float32)).astype(noise.dtype)


def downsample(latents: mx.array) -> mx.array:
    """Half resolution, times 2: the pipeline's ``F.interpolate(bilinear) * 2`` on even sizes (2x2 mean)."""
    b, f, h, w, c = latents.shape
    return latents.reshape(b, f, h // 2, 2, w // 2, 2, c).mean(axis=(3, 5)) * 2


def upsample_nearest(latents: mx.array) -> mx.array:
    """Double resolution by repeating pixels (``F.interpolate(mode="nearest")``)."""
    return mx.repeat(mx.repeat(latents, 2, axis=2), 2, axis=3)


def block_noise(z: np.ndarray, shape: tuple[int, ...], gamma: float, patch_size: Sequence[int]) -> mx.array:
    """Noise correlated within each ``ph x pw`` block (covariance ``(1+gamma) I - gamma``), channels-last.

    ``z`` holds the standard normal draws the reference makes, ``(blocks, ph*pw)`` with blocks in
    ``(batch, channel, frame, row, column)`` order. The covariance (with the reference's 1e-8
    ridge) is factored in float64: at Helios' gamma = 1/3 it is singular for 2x2 blocks, and in
    float32, where the ridge rounds away, the reference's Cholesky fails on CPU LAPACK.
    """
    b, f, h, w, c = shape
    _, ph, pw = patch_size
    size = ph * pw
    cov = np.eye(size) * (1 + gamma) - np.ones((size, size)) * gamma + np.eye(size) * 1e-8
    chol = mx.array(np.linalg.cholesky(cov).astype(np.float32))
    want = (b * c * f * (h // ph) * (w // pw), size)
    if z.shape != want:
        raise ValueError(f"block noise: expected draws of shape {want} for latents {shape}, got {z.shape}")
    noise = (mx.array(z) @ chol.T).reshape(b, c, f, h // ph, w // pw, ph, pw)
    return noise.transpose(0, 2, 3, 5, 4, 6, 1).reshape(b, f, h, w, c)


def stage_transition(latents: mx.array, scheduler: HeliosDMDScheduler, stage: int, z: np.ndarray,
                     patch_size: Sequence[int], dtype: mx.Dtype) -> mx.array:
    """Upsample to the next stage and re-noise with block noise so its start matches ``start_sigmas[stage]``."""
    latents = upsample_nearest(latents)
    signal = 1 - scheduler.ori_start_sigmas[stage]
    alpha = 1 / (math.sqrt(1 + 1 / scheduler.gamma) * (1 - signal) + signal)
    beta = alpha * (1 - signal) / math.sqrt(scheduler.gamma)
    noise = block_noise(z, latents.shape, scheduler.gamma, patch_size).astype(dtype)
    return alpha * latents + beta * noise


Denoiser = Callable[[mx.array, int], mx.array]


def pyramid_sample(scheduler: HeliosDMDScheduler, latents: mx.array, denoiser: Denoiser, steps: Sequence[int],
                   block_noise_draws: Sequence[np.ndarray], patch_size: Sequence[int], dtype: mx.Dtype,
                   is_amplify_first_chunk: bool = False) -> mx.array:
    """The distilled pyramid sampling loop of one chunk, from full-resolution float32 ``latents``.

    ``steps``: steps per stage; ``block_noise_draws[s - 1]``: the normal draws of stage s's block
    noise; ``denoiser(latents, timestep)`` predicts the flow in ``dtype`` (the model's dtype).
    """
    num_stages = len(steps)
    factor = 2 ** (num_stages - 1)
    _, _, height, width, _ = latents.shape
    if height % (factor * patch_size[1]) or width % (factor * patch_size[2]):
        raise ValueError(f"latent size {height}x{width}: expected multiples of {factor * patch_size[1]}x"
                         f"{factor * patch_size[2]} for {num_stages} stages with patch {tuple(patch_size)}")
    if len(block_noise_draws) != num_stages - 1:
        raise ValueError(f"expected block noise draws for {num_stages - 1} stage transitions, "
                         f"got {len(block_noise_draws)}")
    for _ in range(num_stages - 1):
        latents = downsample(latents)
    start_point = tap("stage0/downsample", latents)
    for stage in range(num_stages):
        _, frames, h, w, _ = latents.shape
        mu = calculate_shift(frames * h * w // math.prod(patch_size))  # of the previous stage's latents
        scheduler.set_timesteps(steps[stage], stage, mu=mu, is_amplify_first_chunk=is_amplify_first_chunk)
        tap(f"stage{stage}/timesteps", scheduler.timesteps)
        tap(f"stage{stage}/sigmas", scheduler.sigmas)
        if stage > 0:
            latents = stage_transition(latents, scheduler, stage, block_noise_draws[stage - 1], patch_size, dtype)
            start_point = tap(f"stage{stage}/transition", latents)
        for i, t in enumerate(scheduler.timesteps):
            flow = denoiser(latents.astype(dtype), int(t))
            latents = tap(f"stage{stage}/step{i}", scheduler.step(flow, t, latents, i, start_point))
    return latents
