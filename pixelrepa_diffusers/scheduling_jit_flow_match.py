"""
Flow-matching ODE sampler in JiT time (t = 0 noise, t = 1 clean) for x-predicting models.

This module is published to the Hub as the scheduler's remote code (`hub.remote_code_files`) and must stand alone
there: it imports torch and diffusers, never another module of this package (`hub.check_standalone` refuses to
publish it otherwise). That is why the guidance-interval rules (`check_guidance_interval`, `in_guidance_interval`),
which the pipeline and the modular blocks import from here, live in this module.
"""

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


# The model's flow settings, which every scheduler that samples it needs in its config (see PixelREPAPipeline).
FLOW_SETTINGS = ("noise_scale", "t_eps")
# The papers' guidance interval in JiT time: the default of every pipeline, training run and card.
GUIDANCE_INTERVAL = (0.1, 1.0)


def velocity_from_x_prediction(x_pred: torch.Tensor, sample: torch.Tensor, t: torch.Tensor, t_eps: float):
    """v = (x_pred - z_t) / max(1 - t, t_eps): the flow velocity implied by a clean-image prediction."""
    return (x_pred - sample) / (1 - t).clamp_min(t_eps)


def check_guidance_interval(guidance_interval) -> None:
    """Raises ValueError unless guidance_interval is (min, max) with 0 <= min < max <= 1."""
    if len(guidance_interval) != 2 or not 0 <= guidance_interval[0] < guidance_interval[1] <= 1:
        raise ValueError(f"guidance_interval must be (min, max) with 0 <= min < max <= 1, got {guidance_interval}.")


def in_guidance_interval(times: torch.Tensor, guidance_interval) -> torch.Tensor:
    """Where classifier-free guidance applies: min < t < max, and t >= 0 when min is 0 (the official test)."""
    low, high = guidance_interval
    return (times < high) & ((times > low) | (low == 0))


def log_integrating_factor(t: float, t_eps: float) -> float:
    """
    rho(t) with d rho / dt = 1 / max(1 - t, t_eps), rho(0) = 0: -log(1 - t) up to 1 - t_eps, linear beyond. In rho the
    ODE is dz/drho = x_pred - z, so z * exp(rho) changes by the integral of x_pred * exp(rho), clamp included.
    """
    if t <= 1 - t_eps:
        return -math.log1p(-t)
    return -math.log(t_eps) + (t - (1 - t_eps)) / t_eps


def exponential_adams_weights(nodes: list[float], h: float) -> list[float]:
    """
    Weights w_j with sum_j w_j x_j = integral over s in [0, h] of exp(s - h) p(s), p the polynomial through
    (nodes[j], x_j). Computed in float64 from the exact moments I_m = h**m - m * I_(m-1), I_0 = 1 - exp(-h).
    """
    moments = [-math.expm1(-h)]
    for m in range(1, len(nodes)):
        moments.append(h**m - m * moments[-1])
    weights = []
    for j, node in enumerate(nodes):
        coefficients = [1.0]  # the Lagrange basis polynomial of node j, lowest power first
        denominator = 1.0
        for k, other in enumerate(nodes):
            if k != j:
                coefficients = [low - other * high for high, low in zip(coefficients + [0.0], [0.0] + coefficients)]
                denominator *= node - other
        weights.append(sum(c * moment for c, moment in zip(coefficients, moments)) / denominator)
    return weights


def check_searched_solver(times, coefficients, guidance_scale, guidance_interval) -> None:
    """Raises ValueError unless these make a "searched" solver: len(times) - 1 rows of coefficients, row i of length
    i + 1, times increasing from 0 to 1, and the guidance they were searched for."""
    if times is None or coefficients is None or guidance_scale is None or guidance_interval is None:
        raise ValueError('solver "searched" needs searched_times, searched_coefficients, searched_guidance_scale and '
                         "searched_guidance_interval (pipelines/search_solver.py writes them).")
    if len(times) < 2 or times[0] != 0 or times[-1] != 1:
        raise ValueError(f"searched_times must run from 0 to 1 with at least 2 points, got {list(times)}.")
    if any(not later > earlier for earlier, later in zip(times[:-1], times[1:])):
        raise ValueError(f"searched_times must be increasing, got {list(times)}.")
    if len(coefficients) != len(times) - 1:
        raise ValueError(f"searched_coefficients must have one row per step ({len(times) - 1} for "
                         f"{len(times)} searched_times), got {len(coefficients)}.")
    lengths = [len(row) for row in coefficients]
    if lengths != list(range(1, len(coefficients) + 1)):
        raise ValueError(f"searched_coefficients row i must have i + 1 shares (1, 2, ..., {len(coefficients)}), got "
                         f"rows of {lengths}.")
    check_guidance_interval(guidance_interval)


@dataclass
class JiTFlowMatchSchedulerOutput(BaseOutput):
    """prev_sample: the ODE state at the next evaluation time."""

    prev_sample: torch.Tensor


class JiTFlowMatchScheduler(SchedulerMixin, ConfigMixin):
    """
    Integrates dz/dt = v = (x_pred - z) / max(1 - t, t_eps) from t = 0 to 1. `step` takes the model's clean-image
    prediction at `timesteps[i]`.

    Solvers:
    - "heun": Heun on each interval and Euler on the last, as the official sampler: `steps` steps cost
      2 * steps - 1 model evaluations; consecutive calls alternate predictor and corrector.
    - "euler": one evaluation a step. Outside the clamp it is the exact step for a constant x-prediction (DDIM).
    - "multistep2", "multistep3": exponential Adams-Bashforth of order 2 and 3 in x-prediction form (DPM-Solver++(2M)
      and (3M)-style, one evaluation a step). In rho = log of the integrating factor the ODE is dz/drho = x_pred - z,
      linear in z also where the clamp holds, so the linear part is integrated exactly and x_pred is interpolated
      through the last evaluations. With less history than its order (the first steps, and the first steps after
      the guidance switches on or off, where x_pred jumps) a step uses all the history it has: order 1, then 2, ...
    - "searched": a solver searched for one model, step count and guidance (`pipelines/search_solver.py`), in the
      multistep form: the linear part exact in rho, the x-prediction combined with searched shares. Step i goes from
      `searched_times[i]` to `searched_times[i + 1]` (the model is evaluated at the first) as
          z_next = exp(-h) z + (1 - exp(-h)) * sum_j searched_coefficients[i][j] * x_pred_(i - j),  h = rho_next - rho
      so row i holds the shares of the current prediction (j = 0) and of each earlier one (j = 1 .. i, newest first)
      in the clean image the step moves towards. Rows that sum to 1 are exact for a constant prediction. `multistep2`
      is the row (w_0, w_1, 0, ...) / (1 - exp(-h)) of its weights. The coefficients hold for the guidance they
      were searched with (`searched_guidance_scale`, `searched_guidance_interval`), checked by `set_timesteps`.

    Time grids (the points the ODE steps between; evaluations happen at each step's start):
    - "uniform": linspace(0, 1, steps + 1), as the official sampler.
    - "guidance": uniform on each piece of [0, 1] cut at the guidance interval's bounds (passed to `set_timesteps`;
      without guidance, uniform), so a point lies exactly on each bound; the steps are shared in proportion to the
      pieces' lengths.
    - "shifted": 1 - t = shift * s / (1 + (shift - 1) * s) for uniform s = 1 - t; shift > 1 is denser near t = 0.

    Args:
        solver: one of `SOLVERS`.
        t_eps: lower clamp of 1 - t when converting an x-prediction to a velocity.
        noise_scale: standard deviation of the initial noise (`init_noise_sigma`).
        time_grid: one of `TIME_GRIDS`.
        shift: the "shifted" grid's shift.
        searched_times: the "searched" solver's steps + 1 times, from 0 to 1, increasing.
        searched_coefficients: its rows of shares, row i of length i + 1.
        searched_guidance_scale, searched_guidance_interval: the guidance its coefficients were searched for.
    """

    # The solvers and how model cards name them.
    SOLVER_LABELS = {
        "heun": "Heun (Euler on the last step)",
        "euler": "Euler",
        "multistep2": "exponential Adams-Bashforth of order 2",
        "multistep3": "exponential Adams-Bashforth of order 3",
        "searched": "searched multistep (times and coefficients searched for this model)",
    }
    SOLVERS = tuple(SOLVER_LABELS)
    TIME_GRIDS = ("uniform", "guidance", "shifted")
    MULTISTEP_ORDERS = {"multistep2": 2, "multistep3": 3}
    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, solver: str = "heun", t_eps: float = 0.05, noise_scale: float = 1.0, time_grid: str = "uniform",
                 shift: float = 3.0, searched_times: list[float] | None = None,
                 searched_coefficients: list[list[float]] | None = None, searched_guidance_scale: float | None = None,
                 searched_guidance_interval: list[float] | None = None):
        if solver not in self.SOLVERS:
            raise ValueError(f"solver must be one of {self.SOLVERS}, got {solver!r}.")
        if time_grid not in self.TIME_GRIDS:
            raise ValueError(f"time_grid must be one of {self.TIME_GRIDS}, got {time_grid!r}.")
        if not t_eps > 0:
            raise ValueError(f"t_eps must be > 0, got {t_eps}.")
        if not noise_scale > 0:
            raise ValueError(f"noise_scale must be > 0, got {noise_scale}.")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift}.")
        searched = (searched_times, searched_coefficients, searched_guidance_scale, searched_guidance_interval)
        if solver == "searched":
            check_searched_solver(*searched)
        elif any(value is not None for value in searched):
            raise ValueError(f'searched_times, searched_coefficients, searched_guidance_scale and '
                             f'searched_guidance_interval belong to solver "searched", not {solver!r}.')
        # noise_scale and t_eps are the model's, not the solver's. They stay in the config at their defaults too
        # (from_config drops default values), so `X.from_config(pipe.scheduler.config)` hands them to any scheduler.
        defaults = [name for name in self.config.get("_use_default_values", []) if name not in FLOW_SETTINGS]
        self.register_to_config(_use_default_values=defaults)
        self.init_noise_sigma = noise_scale
        self.num_inference_steps = None
        self.timesteps = None
        self.time_grid = None
        self._step_index = 0
        self._predictor_state = None
        self._history = []
        self._restarts = set()

    def check_searched_call(self, num_inference_steps: int, guidance_scale, guidance_interval,
                            accept_other_guidance: bool) -> None:
        """Raises ValueError unless the call samples with the step count and guidance the solver was searched for."""
        config = self.config
        steps = len(config.searched_times) - 1
        if num_inference_steps != steps:
            raise ValueError(f'num_inference_steps must be {steps} for this "searched" solver (it was searched for '
                             f"{steps} steps), got {num_inference_steps}; search another for {num_inference_steps}.")
        if accept_other_guidance:
            return
        searched = (config.searched_guidance_scale, list(config.searched_guidance_interval))
        asked = (1.0 if guidance_scale is None else guidance_scale,
                 list(config.searched_guidance_interval if guidance_interval is None else guidance_interval))
        if asked != searched:
            raise ValueError(f"guidance_scale and guidance_interval must be {searched[0]} and {tuple(searched[1])}, "
                             f'which this "searched" solver was searched for, got {asked[0]} and {tuple(asked[1])}; '
                             "pass accept_other_guidance=True to sample with them anyway.")

    @property
    def order(self) -> int:
        return 2 if self.config.solver == "heun" else 1

    def make_time_grid(self, num_inference_steps: int, guidance_interval=None) -> torch.Tensor:
        """The `num_inference_steps + 1` points from 0 to 1 of the configured time grid, in float32."""
        if self.config.time_grid == "uniform":
            return torch.linspace(0.0, 1.0, num_inference_steps + 1)
        if self.config.time_grid == "shifted":
            shift = self.config.shift
            s = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)
            return (1 - shift * s / (1 + (shift - 1) * s)).float()
        inner_bounds = [] if guidance_interval is None else [bound for bound in guidance_interval if 0 < bound < 1]
        bounds = [0.0] + inner_bounds + [1.0]
        if num_inference_steps < len(bounds) - 1:
            raise ValueError(f'time_grid "guidance" needs num_inference_steps >= {len(bounds) - 1} (one step per piece '
                             f"of [0, 1] cut at {guidance_interval}), got {num_inference_steps}.")
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
        counts = [1] * len(lengths)
        for _ in range(num_inference_steps - len(lengths)):  # each further step to the piece with the longest steps
            widest = max(range(len(lengths)), key=lambda index: lengths[index] / counts[index])
            counts[widest] += 1
        pieces = [torch.linspace(start, end, count + 1, dtype=torch.float64)[:-1]
                  for start, end, count in zip(bounds[:-1], bounds[1:], counts)]
        return torch.cat(pieces + [torch.ones(1, dtype=torch.float64)]).float()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None,
                      guidance_interval: tuple[float, float] | None = None, guidance_scale: float | None = None,
                      accept_other_guidance: bool = False) -> None:
        """
        Sets `timesteps`, the JiT times at which the model is evaluated, in call order. `guidance_interval` (None when
        no guidance is used) places the "guidance" grid's points and the multistep solvers' restarts. The "searched"
        solver takes only its own step count, and the guidance it was searched for (`guidance_scale`,
        `guidance_interval`) unless `accept_other_guidance`.
        """
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}.")
        minimum = self.MULTISTEP_ORDERS.get(self.config.solver, 1)
        if num_inference_steps < minimum:
            raise ValueError(f"num_inference_steps must be >= {minimum} for solver {self.config.solver!r}, got "
                             f"{num_inference_steps}.")
        if self.config.solver == "searched":
            self.check_searched_call(num_inference_steps, guidance_scale, guidance_interval, accept_other_guidance)
            grid = torch.tensor(self.config.searched_times, dtype=torch.float32, device=device)
        else:
            grid = self.make_time_grid(num_inference_steps, guidance_interval).to(device)
        if self.config.solver == "heun":
            heun_times = torch.stack([grid[:-2], grid[1:-1]], dim=1).flatten()
            self.timesteps = torch.cat([heun_times, grid[-2:-1]])
        else:
            self.timesteps = grid[:-1]
        self.time_grid = grid
        self.num_inference_steps = num_inference_steps
        self._step_index = 0
        self._predictor_state = None
        self._history = []
        self._restarts = set()
        if guidance_interval is not None:
            guided = in_guidance_interval(self.timesteps.cpu(), guidance_interval).tolist()
            self._restarts = {index for index in range(1, len(guided)) if guided[index] != guided[index - 1]}

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Advances the ODE state given the model's clean-image prediction at the current evaluation time."""
        if self.timesteps is None:
            raise ValueError("Call set_timesteps before step.")
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"All {len(self.timesteps)} steps are done; call set_timesteps to sample again.")
        if self.config.solver == "searched":
            prev_sample = self.searched_step(model_output, sample)
        elif self.config.solver in self.MULTISTEP_ORDERS:
            prev_sample = self.multistep(model_output, sample)
        else:
            prev_sample = self.heun_or_euler(model_output, sample)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return JiTFlowMatchSchedulerOutput(prev_sample=prev_sample)

    def heun_or_euler(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        t_eps = self.config.t_eps
        heun_evaluations = 2 * (self.num_inference_steps - 1) if self.config.solver == "heun" else 0
        if self._step_index < heun_evaluations:
            interval, corrector = divmod(self._step_index, 2)
            t, t_next = self.time_grid[interval], self.time_grid[interval + 1]
            if corrector:
                start, v_start = self._predictor_state
                v_end = velocity_from_x_prediction(model_output, sample, t_next, t_eps)
                self._predictor_state = None
                return start + (t_next - t) * (0.5 * (v_start + v_end))
            v_start = velocity_from_x_prediction(model_output, sample, t, t_eps)
            self._predictor_state = (sample, v_start)
            return sample + (t_next - t) * v_start
        interval = heun_evaluations // 2 + self._step_index - heun_evaluations
        t, t_next = self.time_grid[interval], self.time_grid[interval + 1]
        return sample + (t_next - t) * velocity_from_x_prediction(model_output, sample, t, t_eps)

    def multistep(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """z(rho_next) = exp(-h) z + sum_j w_j x_pred_j: exact linear part, x_pred interpolated in rho."""
        if self._step_index in self._restarts:
            self._history = []
        self._history = ([model_output] + self._history)[: self.MULTISTEP_ORDERS[self.config.solver]]
        h, weights = self.multistep_weights(self._step_index)
        prev_sample = math.exp(-h) * sample
        for weight, x_pred in zip(weights, self._history):
            prev_sample = prev_sample + weight * x_pred
        return prev_sample

    def multistep_weights(self, index: int) -> tuple[float, list[float]]:
        """(h, w): the rho length of multistep step `index` and the weights w_j of the x-predictions it combines, at
        evaluations index, index - 1, ... (newest first, since the last restart, at most the order)."""
        t_eps = self.config.t_eps
        restart = max([0] + [start for start in self._restarts if start <= index])
        first = max(restart, index - self.MULTISTEP_ORDERS[self.config.solver] + 1)
        rhos = [log_integrating_factor(self.time_grid[k].item(), t_eps) for k in range(index, first - 1, -1)]
        h = log_integrating_factor(self.time_grid[index + 1].item(), t_eps) - rhos[0]
        return h, exponential_adams_weights([rho - rhos[0] for rho in rhos], h)

    def searched_step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """z(rho_next) = exp(-h) z + (1 - exp(-h)) sum_j c_j x_pred_j, with the searched shares c of this step."""
        index, t_eps = self._step_index, self.config.t_eps
        rho = log_integrating_factor(self.time_grid[index].item(), t_eps)
        rho_next = log_integrating_factor(self.time_grid[index + 1].item(), t_eps)
        self._history = [model_output] + self._history
        h = rho_next - rho
        prev_sample = math.exp(-h) * sample
        for share, x_pred in zip(self.config.searched_coefficients[index], self._history):
            if share != 0:
                prev_sample = prev_sample + (share * -math.expm1(-h)) * x_pred
        return prev_sample
