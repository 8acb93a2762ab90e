"""UniPC multistep sampler for flow matching, as Wan2.1/2.2 run it, ported from diffusers.

Mirrors ``diffusers.UniPCMultistepScheduler`` (schedulers/scheduling_unipc_multistep.py) on the
path Wan's pipelines use: ``use_flow_sigmas=True``, ``prediction_type="flow_prediction"``,
``predict_x0=True``, ``final_sigmas_type="zero"`` (or ``"sigma_min"``), ``solver_type`` bh2 (or
bh1), any ``solver_order``, ``lower_order_final``, ``disable_corrector``. Everything else of the
scheduler (VP betas, Karras/exponential/beta sigmas, thresholding, dynamic shifting, solver_p)
is off that path and rejected.

Split, as in the reference:

- **schedules** (host side, NumPy, in the reference's dtypes): sigmas are built in float64 and
  stored as float32, timesteps are int64 (``sigmas * num_train_timesteps`` truncated);
- **scalar solver coefficients** (lambda = log(alpha) - log(sigma), h, r_k, h*phi_k, B(h), the
  rho vectors): host side in float32, the dtype of the reference's 0-d sigma tensors, in the
  reference's order of operations; the rho solve of orders >= 2 is a float32 LAPACK solve as
  the reference's ``torch.linalg.solve``;
- **latent math** (x0 conversion, predictor, corrector): MLX, channels-last
  ``(batch, frames, height, width, channels)``. A coefficient times a tensor is a Python float
  times an MLX array, which rounds the coefficient to the array's dtype first, exactly as torch
  does with a 0-d float32 tensor times a bf16 tensor.

Two schedule conventions (``schedule=``):

- ``"diffusers"`` (``UniPCMultistepScheduler.set_timesteps``, use_flow_sigmas branch):
  ``s = linspace(1, 1/num_train_timesteps, N + 1)[:-1]``, shifted ``shift*s / (1 + (shift-1)*s)``,
  then ``s[0] -= 1e-6`` when it is 1 (log(alpha) = log(0) otherwise);
- ``"original"`` (Wan's ``wan/utils/fm_solvers_unipc.py`` ``FlowUniPCMultistepScheduler``, built
  as Wan's ``generate`` code builds it: ``shift=1`` at construction, ``set_timesteps(N, shift=shift)``):
  training sigmas ``1 - linspace(1, 1/n, n)[::-1]`` in float32, so ``sigma_max = float32(0.999)``
  and ``sigma_min = 0``; ``s = linspace(sigma_max, sigma_min, N + 1)[:-1]``, shifted the same way,
  no 1e-6 nudge. Unshifted, this is diffusers' grid minus 0.001 (same spacing 0.999 / N).

Both end in a final sigma 0 and take ``timesteps = int64(s * num_train_timesteps)``. The solver
math (``step``) is the same in both codes (Wan's file is diffusers' v0.31 scheduler converted
for flow matching). :meth:`UniPCMultistepScheduler.set_schedule` takes an explicit schedule
instead, e.g. to run the reference on our sigmas.

Taps: :func:`sample` taps ``sigmas`` and ``timesteps`` (sigmas first: the reference derives the
timesteps from them), and per step ``step{k}/corrector`` (steps whose corrector runs: k >= 1
unless disabled), ``step{k}/predictor`` and ``step{k}/sample`` (the step's result, which is the
predictor's).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import mlx.core as mx
import numpy as np

from mlx_impl.taps import tap

SCHEDULES = ("diffusers", "original")
F32 = np.float32

#: Keys of diffusers' config that only matter off the flow-sigma path (VP betas, thresholding
#: values, "leading" spacing, dynamic-shift type): accepted and ignored.
UNUSED_KEYS = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
               "dynamic_thresholding_ratio", "sample_max_value", "steps_offset", "time_shift_type")
#: Keys that must keep these values: the features they switch on are not ported.
FIXED_KEYS = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "predict_x0": True,
              "thresholding": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
              "use_beta_sigmas": False, "use_dynamic_shifting": False, "solver_p": None,
              "shift_terminal": None, "sigma_min": None, "sigma_max": None}


# --- schedules (NumPy) -------------------------------------------------------------------
def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """``shift * s / (1 + (shift - 1) * s)``, in the dtype of ``sigmas`` (float64 in both references)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def finish_schedule(sigmas: np.ndarray, num_train_timesteps: int, final_sigmas_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Timesteps ``int64(s * n)`` (truncated, as torch's ``.to(torch.int64)``) and float32 sigmas with the final one."""
    if final_sigmas_type == "zero":
        last = 0.0
    elif final_sigmas_type == "sigma_min":
        last = sigmas[-1]
    else:
        raise ValueError(f"final_sigmas_type: expected 'zero' or 'sigma_min', got {final_sigmas_type!r}")
    timesteps = (sigmas * num_train_timesteps).astype(np.int64)
    return np.concatenate([sigmas, [last]]).astype(np.float32), timesteps


def diffusers_flow_sigmas(num_inference_steps: int, num_train_timesteps: int = 1000, flow_shift: float = 1.0,
                          final_sigmas_type: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """``UniPCMultistepScheduler.set_timesteps`` with ``use_flow_sigmas``: (sigmas float32 N + 1, timesteps int64 N)."""
    sigmas = np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)[:-1]
    sigmas = shift_sigmas(sigmas, flow_shift)
    if np.fabs(sigmas[0] - 1) < 1e-6:  # the reference's guard against log(alpha) = log(0) in the first update
        sigmas[0] -= 1e-6
    return finish_schedule(sigmas, num_train_timesteps, final_sigmas_type)


def original_flow_sigmas(num_inference_steps: int, num_train_timesteps: int = 1000, shift: float = 1.0,
                         final_sigmas_type: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """Wan's ``FlowUniPCMultistepScheduler(shift=1).set_timesteps(N, shift=shift)``: (sigmas float32 N + 1, timesteps int64 N).

    Only ``final_sigmas_type="zero"``: Wan's "sigma_min" branch reads ``alphas_cumprod``, which that class never sets.
    """
    if final_sigmas_type != "zero":
        raise ValueError(f"schedule 'original' supports final_sigmas_type='zero' only, got {final_sigmas_type!r}")
    train = (1.0 - np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1]).astype(np.float32)
    sigma_max, sigma_min = float(train[0]), float(train[-1])  # .item() of float32 tensors; shift=1 leaves them exact
    sigmas = np.linspace(sigma_max, sigma_min, num_inference_steps + 1)[:-1]
    return finish_schedule(shift_sigmas(sigmas, shift), num_train_timesteps, final_sigmas_type)


# --- scalar coefficients (NumPy float32, as the reference's 0-d sigma tensors) ------------
def alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """``_sigma_to_alpha_sigma_t`` with flow sigmas: ``(1 - sigma, sigma)``."""
    return F32(1) - sigma, sigma


def log_snr(sigma: np.float32) -> np.float32:
    """lambda = log(alpha) - log(sigma); +inf at sigma = 0 (the final step, as in the reference)."""
    alpha, sigma = alpha_sigma(sigma)
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma)


def solver_coefficients(sigmas: np.ndarray, t: int, s0: int, previous: Sequence[int], order: int,
                        solver_type: str) -> dict[str, Any]:
    """The B(h) update's scalars for moving from ``sigmas[s0]`` to ``sigmas[t]``, with earlier points ``previous``.

    As ``multistep_uni_p_bh_update`` / ``multistep_uni_c_bh_update`` (predict_x0) compute them:
    ``h = lambda_t - lambda_s0``, ``r_i = (lambda_si - lambda_s0) / h``, ``hh = -h``,
    ``h_phi_1 = expm1(hh)``, ``B_h = hh`` (bh1) or ``expm1(hh)`` (bh2), and the order-``order``
    system ``R`` (rows ``r**(i-1)``), ``b_i = h_phi_k * i! / B_h``.
    """
    sigma_t, sigma_s0 = sigmas[t], sigmas[s0]
    alpha_t, _ = alpha_sigma(sigma_t)
    lambda_t, lambda_s0 = log_snr(sigma_t), log_snr(sigma_s0)
    h = lambda_t - lambda_s0
    hh = -h
    with np.errstate(divide="ignore", invalid="ignore"):  # h = inf (final sigma 0) or 0 (final "sigma_min")
        rks = [(log_snr(sigmas[si]) - lambda_s0) / h for si in previous[: order - 1]]
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - F32(1)
        if solver_type == "bh1":
            b_h = hh
        elif solver_type == "bh2":
            b_h = np.expm1(hh)
        else:
            raise NotImplementedError(f"solver_type {solver_type!r}")
        r = np.array([*rks, F32(1)], dtype=np.float32)
        rows, b, factorial = [], [], 1
        for i in range(1, order + 1):
            rows.append(r ** (i - 1))
            b.append(h_phi_k * F32(factorial) / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - F32(1 / factorial)
    return {
        "sigma_ratio": sigma_t / sigma_s0,  # sigma_t / sigma_s0, times x
        "alpha_h_phi_1": alpha_t * h_phi_1,  # alpha_t * h_phi_1, times m0
        "alpha_b_h": alpha_t * b_h,  # alpha_t * B_h, times the residual
        "rks": rks, "R": np.stack(rows).astype(np.float32), "b": np.array(b, dtype=np.float32),
    }


def solve(R: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``torch.linalg.solve`` in float32 (LAPACK gesv on both sides; may differ by an ulp between LAPACK builds)."""
    return np.linalg.solve(R.astype(np.float32), b.astype(np.float32)).astype(np.float32)


# --- latent math (MLX) -------------------------------------------------------------------
def convert_model_output(model_output: mx.array, sample: mx.array, sigma: np.float32) -> mx.array:
    """x0 = sample - sigma * flow: the product in ``model_output``'s dtype (sigma rounded to it, as torch
    does with a 0-d float32 tensor), the difference promoted to ``sample``'s dtype."""
    return sample - model_output * float(sigma)


def weighted_differences(rhos: Sequence[float], d1s: Sequence[mx.array]) -> mx.array | None:
    """``einsum("k,bkc...->bc...", rhos, stack(D1s, 1))``: sum of rho_k * D1_k (one product for k = 1)."""
    if not d1s:
        return None
    total = d1s[0] * float(rhos[0])
    for rho, d1 in zip(rhos[1:], d1s[1:]):
        total = total + d1 * float(rho)
    return total


class UniPCMultistepScheduler:
    """diffusers' ``UniPCMultistepScheduler`` on Wan's flow-matching path (see the module docstring).

    Takes the keyword arguments of its ``scheduler_config.json`` (keys starting with ``_`` and the
    :data:`UNUSED_KEYS` are ignored; the :data:`FIXED_KEYS` must keep their values) plus ``schedule``.
    """

    def __init__(self, num_train_timesteps: int = 1000, solver_order: int = 2, solver_type: str = "bh2",
                 lower_order_final: bool = True, disable_corrector: Sequence[int] = (), flow_shift: float = 1.0,
                 timestep_spacing: str = "linspace", final_sigmas_type: str = "zero", schedule: str = "diffusers",
                 **config: Any):
        unknown = {k: v for k, v in config.items()
                   if not k.startswith("_") and k not in UNUSED_KEYS and k not in FIXED_KEYS}
        if unknown:
            raise TypeError(f"UniPCMultistepScheduler: unknown config keys {sorted(unknown)}")
        wrong = {k: config[k] for k, v in FIXED_KEYS.items() if k in config and config[k] != v}
        if wrong:
            raise ValueError(f"UniPCMultistepScheduler ports the flow-matching path only; expected "
                             f"{ {k: FIXED_KEYS[k] for k in wrong} }, got {wrong}")
        if "use_flow_sigmas" not in config:
            raise ValueError("UniPCMultistepScheduler: the config must set use_flow_sigmas=True "
                             "(diffusers' default False is the VP schedule, not ported)")
        if solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type: expected 'bh1' or 'bh2', got {solver_type!r}")
        if timestep_spacing not in ("linspace", "leading", "trailing"):
            raise ValueError(f"timestep_spacing: expected linspace, leading or trailing, got {timestep_spacing!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
        if solver_order < 1:
            raise ValueError(f"solver_order: expected >= 1, got {solver_order}")
        self.num_train_timesteps = num_train_timesteps
        self.solver_order = solver_order
        self.solver_type = solver_type
        self.lower_order_final = lower_order_final
        self.disable_corrector = list(disable_corrector)
        self.flow_shift = flow_shift
        # with flow sigmas the spacing's timesteps are overwritten by sigmas * n: no effect (validated only)
        self.timestep_spacing = timestep_spacing
        self.final_sigmas_type = final_sigmas_type
        self.schedule = schedule
        self.sigmas = np.zeros(0, np.float32)
        self.timesteps = np.zeros(0, np.int64)
        self._reset()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **overrides: Any) -> "UniPCMultistepScheduler":
        return cls(**{**config, **overrides})

    def _reset(self) -> None:
        self.model_outputs: list[mx.array | None] = [None] * self.solver_order
        self.lower_order_nums = 0
        self.last_sample: mx.array | None = None
        self.this_order = 0
        self.step_index = 0
        #: the order each predictor / corrector call ran at, in call order (for tests and reports)
        self.orders: dict[str, list[int]] = {"predictor": [], "corrector": []}

    # schedules
    def set_timesteps(self, num_inference_steps: int) -> None:
        """The ``schedule`` convention's sigmas and timesteps for ``num_inference_steps`` steps."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected >= 1, got {num_inference_steps}")
        if self.schedule == "diffusers":
            sigmas, timesteps = diffusers_flow_sigmas(num_inference_steps, self.num_train_timesteps,
                                                      self.flow_shift, self.final_sigmas_type)
        else:
            sigmas, timesteps = original_flow_sigmas(num_inference_steps, self.num_train_timesteps,
                                                     self.flow_shift, self.final_sigmas_type)
        self.set_schedule(sigmas, timesteps)

    def set_schedule(self, sigmas: np.ndarray, timesteps: np.ndarray | None = None) -> None:
        """Use an explicit schedule: ``sigmas`` (N + 1 values, the last one the final sigma) as float32,
        ``timesteps`` (N) as int64, by default ``int64(sigmas[:-1] * num_train_timesteps)``."""
        sigmas = np.asarray(sigmas, np.float32)
        if sigmas.ndim != 1 or len(sigmas) < 2:
            raise ValueError(f"sigmas: expected N + 1 >= 2 values (the last the final sigma), got shape {sigmas.shape}")
        if timesteps is None:
            timesteps = (sigmas[:-1].astype(np.float64) * self.num_train_timesteps).astype(np.int64)
        timesteps = np.asarray(timesteps, np.int64)
        if timesteps.shape != (len(sigmas) - 1,):
            raise ValueError(f"timesteps: expected {len(sigmas) - 1} values for {len(sigmas)} sigmas, got {timesteps.shape}")
        self.sigmas, self.timesteps = sigmas, timesteps
        self._reset()

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    # solver
    def uses_corrector(self, step_index: int) -> bool:
        """``step``'s rule: the corrector runs from the second step on, unless disabled for the previous step."""
        return step_index > 0 and step_index - 1 not in self.disable_corrector and self.last_sample is not None

    def step_order(self, step_index: int) -> int:
        """The predictor's order at ``step_index``: ``solver_order``, lowered for warm-up and (lower_order_final) at the end."""
        order = min(self.solver_order, len(self.timesteps) - step_index) if self.lower_order_final else self.solver_order
        return min(order, self.lower_order_nums + 1)

    def predictor(self, sample: mx.array, order: int) -> mx.array:
        """``multistep_uni_p_bh_update`` (predict_x0): from ``sigmas[k]`` to ``sigmas[k + 1]``."""
        k = self.step_index
        m0 = self.model_outputs[-1]
        c = solver_coefficients(self.sigmas, k + 1, k, [k - i for i in range(1, order)], order, self.solver_type)
        d1s = [(self.model_outputs[-(i + 1)] - m0) / float(rk) for i, rk in enumerate(c["rks"], start=1)]
        x_t = sample * float(c["sigma_ratio"]) - m0 * float(c["alpha_h_phi_1"])
        if d1s:  # order >= 2; order 2 uses rho = 0.5 instead of the solve, as the reference
            rhos = np.array([0.5], np.float32) if order == 2 else solve(c["R"][:-1, :-1], c["b"][:-1])
            x_t = x_t - weighted_differences(rhos, d1s) * float(c["alpha_b_h"])
        else:
            # The reference still subtracts alpha_t * B_h * 0: a no-op, except with bh1 and a final sigma
            # of 0, where B_h = -inf and -inf * 0 makes its last step NaN. Mirrored, not fixed.
            zero = float(c["alpha_b_h"]) * 0.0
            if zero != 0:
                x_t = x_t - zero
        return x_t.astype(sample.dtype)

    def corrector(self, model_t: mx.array, last_sample: mx.array, this_sample: mx.array, order: int) -> mx.array:
        """``multistep_uni_c_bh_update`` (predict_x0): corrects the sample at ``sigmas[k]`` reached from ``last_sample``.

        Restarts from ``last_sample`` with the new x0 ``model_t``; ``this_sample`` (the predictor's result) is not
        read, as in the reference, which only takes its device."""
        k = self.step_index
        m0 = self.model_outputs[-1]
        c = solver_coefficients(self.sigmas, k, k - 1, [k - (i + 1) for i in range(1, order)], order, self.solver_type)
        d1s = [(self.model_outputs[-(i + 1)] - m0) / float(rk) for i, rk in enumerate(c["rks"], start=1)]
        rhos = np.array([0.5], np.float32) if order == 1 else solve(c["R"], c["b"])
        x_t = last_sample * float(c["sigma_ratio"]) - m0 * float(c["alpha_h_phi_1"])
        d1_t = model_t - m0
        residual = d1_t * float(rhos[-1])
        corr = weighted_differences(rhos[:-1], d1s)
        if corr is not None:
            residual = corr + residual
        return (x_t - residual * float(c["alpha_b_h"])).astype(last_sample.dtype)

    def step(self, model_output: mx.array, sample: mx.array) -> mx.array:
        """One UniPC step from ``sample`` at ``sigmas[step_index]``; returns the sample at the next sigma.

        ``model_output`` is the model's flow prediction (any dtype); ``sample`` keeps its dtype (float32 in Wan).
        Taps ``step{k}/corrector`` (when it runs) and ``step{k}/predictor``.
        """
        k = self.step_index
        if k >= len(self.timesteps):
            raise IndexError(f"step {k}: the schedule has {len(self.timesteps)} steps; call set_timesteps first")
        use_corrector = self.uses_corrector(k)
        x0 = convert_model_output(model_output, sample, self.sigmas[k])
        if use_corrector:
            self.orders["corrector"].append(self.this_order)
            sample = tap(f"step{k}/corrector", self.corrector(x0, self.last_sample, sample, self.this_order))
        self.model_outputs = [*self.model_outputs[1:], x0]
        self.this_order = self.step_order(k)
        self.last_sample = sample
        self.orders["predictor"].append(self.this_order)
        prev_sample = tap(f"step{k}/predictor", self.predictor(sample, self.this_order))
        self.lower_order_nums = min(self.lower_order_nums + 1, self.solver_order)
        self.step_index += 1
        return prev_sample


Denoiser = Callable[[mx.array, int], mx.array]


Forced = Sequence[tuple[np.ndarray, "np.ndarray | None"]]


def sample(scheduler: UniPCMultistepScheduler, latents: mx.array, denoiser: Denoiser, dtype: mx.Dtype,
           forced: Forced | None = None) -> mx.array:
    """The Wan pipelines' denoising loop over ``scheduler``'s current schedule (one model, no guidance).

    ``latents``: channels-last float32 (the pipeline's ``prepare_latents(dtype=torch.float32)``);
    ``denoiser(latents, timestep)`` predicts the flow in ``dtype`` (the model's dtype).

    ``forced`` (teacher forcing): per step k, ``(x_k, last_k)`` (channels-last) replace the latents
    entering step k and the scheduler's ``last_sample`` (the corrected sample of step k - 1, from
    which the corrector restarts; ``None`` at step 0). UniPC carries both, and the corrector
    recomputes from ``last_sample``, so forcing ``x_k`` alone would let an error chain through it;
    with both forced, each step's error is local (the history of x0 predictions is then computed
    from forced samples too). Taps ``sigmas``, ``timesteps`` and per step the solver's taps and
    ``step{k}/sample``.
    """
    if forced is not None and len(forced) < len(scheduler.timesteps):
        raise ValueError(f"forced: expected a state for each of the {len(scheduler.timesteps)} steps, got {len(forced)}")
    tap("sigmas", scheduler.sigmas)
    tap("timesteps", scheduler.timesteps)
    for k, t in enumerate(scheduler.timesteps):
        if forced is not None:
            x_k, last_k = forced[k]
            latents = mx.array(np.asarray(x_k)).astype(latents.dtype)
            if last_k is not None:
                scheduler.last_sample = mx.array(np.asarray(last_k)).astype(latents.dtype)
        flow = denoiser(latents.astype(dtype), int(t))
        latents = tap(f"step{k}/sample", scheduler.step(flow, latents))
    return latents
