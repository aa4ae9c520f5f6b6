"""Flow-matching ODE sampler in JiT time (t = 0 noise, t = 1 clean) for x-predicting models."""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


def velocity_from_x_prediction(x_pred: torch.Tensor, sample: torch.Tensor, t: torch.Tensor, t_eps: float):
    """v = (x_pred - z_t) / max(1 - t, t_eps): the flow velocity implied by a clean-image prediction."""
    return (x_pred - sample) / (1 - t).clamp_min(t_eps)


@dataclass
class JiTFlowMatchSchedulerOutput(BaseOutput):
    """prev_sample: the ODE state at the next evaluation time."""

    prev_sample: torch.Tensor


class JiTFlowMatchScheduler(SchedulerMixin, ConfigMixin):
    """
    Euler or Heun integration of dz/dt = v from t = 0 to 1 over `linspace(0, 1, steps + 1)`; Heun uses Euler on the
    last step, so `steps` Heun steps cost 2 * steps - 1 model evaluations. `step` takes the model's clean-image
    prediction at `timesteps[i]`; with Heun, consecutive calls alternate predictor and corrector.

    Args:
        solver: "heun" or "euler".
        t_eps: lower clamp of 1 - t when converting an x-prediction to a velocity.
        noise_scale: standard deviation of the initial noise (`init_noise_sigma`).
    """

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, solver: str = "heun", t_eps: float = 0.05, noise_scale: float = 1.0):
        if solver not in ("heun", "euler"):
            raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}.")
        if not t_eps > 0:
            raise ValueError(f"t_eps must be > 0, got {t_eps}.")
        if not noise_scale > 0:
            raise ValueError(f"noise_scale must be > 0, got {noise_scale}.")
        self.init_noise_sigma = noise_scale
        self.num_inference_steps = None
        self.timesteps = None
        self.time_grid = None
        self._step_index = 0
        self._predictor_state = None

    @property
    def order(self) -> int:
        return 2 if self.config.solver == "heun" else 1

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Sets `timesteps`, the JiT times at which the model is evaluated, in call order."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}.")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        grid = torch.linspace(0.0, 1.0, num_inference_steps + 1, device=device)
        if self.config.solver == "heun":
            heun_times = torch.stack([grid[:-2], grid[1:-1]], dim=1).flatten()
            self.timesteps = torch.cat([heun_times, grid[-2:-1]])
        else:
            self.timesteps = grid[:-1]
        self.time_grid = grid
        self.num_inference_steps = num_inference_steps
        self._step_index = 0
        self._predictor_state = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Advances the ODE state given the model's clean-image prediction at the current evaluation time."""
        if self.timesteps is None:
            raise ValueError("Call set_timesteps before step.")
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"All {len(self.timesteps)} steps are done; call set_timesteps to sample again.")
        t_eps = self.config.t_eps
        heun_evaluations = 2 * (self.num_inference_steps - 1) if self.config.solver == "heun" else 0
        if self._step_index < heun_evaluations:
            interval, corrector = divmod(self._step_index, 2)
            t, t_next = self.time_grid[interval], self.time_grid[interval + 1]
            if corrector:
                start, v_start = self._predictor_state
                v_end = velocity_from_x_prediction(model_output, sample, t_next, t_eps)
                prev_sample = start + (t_next - t) * (0.5 * (v_start + v_end))
                self._predictor_state = None
            else:
                v_start = velocity_from_x_prediction(model_output, sample, t, t_eps)
                prev_sample = sample + (t_next - t) * v_start
                self._predictor_state = (sample, v_start)
        else:
            interval = heun_evaluations // 2 + self._step_index - heun_evaluations
            t, t_next = self.time_grid[interval], self.time_grid[interval + 1]
            prev_sample = sample + (t_next - t) * velocity_from_x_prediction(model_output, sample, t, t_eps)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return JiTFlowMatchSchedulerOutput(prev_sample=prev_sample)
