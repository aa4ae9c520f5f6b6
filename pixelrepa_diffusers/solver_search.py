"""Searches a "searched" solver (see JiTFlowMatchScheduler) for one pipeline, step count and guidance: the evaluation
times and the shares of past x-predictions whose final sample is nearest the official Heun sampler's with many steps,
on a fixed set of noise draws and classes. The network is not trained; only the solver's numbers are."""

import math

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .pipeline_pixelrepa import PixelREPAPipeline
from .scheduling_jit_flow_match import JiTFlowMatchScheduler, in_guidance_interval


def differentiable_log_integrating_factor(t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """The scheduler's `log_integrating_factor` (rho) on a tensor of times, differentiable in them."""
    return -torch.log1p(-t.clamp_max(1 - t_eps)) + (t - (1 - t_eps)).clamp_min(0) / t_eps


class SearchedSolver(torch.nn.Module):
    """
    The searched numbers of `steps` steps, in float64. The times are 0, then the cumulated softmax of one logit per
    step (so they increase and end at exactly 1); the shares of the earlier predictions (j >= 1) are free, and the
    current prediction's share is 1 minus their sum, so every step stays exact for a constant prediction.
    """

    def __init__(self, times: list[float], coefficients: list[list[float]]):
        super().__init__()
        steps = len(times) - 1
        self.step_logits = torch.nn.Parameter(torch.diff(torch.tensor(times, dtype=torch.float64)).log())
        earlier = torch.zeros(steps, steps, dtype=torch.float64)
        for index, row in enumerate(coefficients):
            earlier[index, :index] = torch.tensor(row[1:], dtype=torch.float64)
        self.earlier_shares = torch.nn.Parameter(earlier)
        self.register_buffer("earlier_mask", torch.ones(steps, steps, dtype=torch.float64).tril(-1))

    def times(self) -> torch.Tensor:
        ends = self.step_logits.softmax(0).cumsum(0)[:-1]
        return torch.cat([ends.new_zeros(1), ends, ends.new_ones(1)])

    def coefficients(self) -> torch.Tensor:
        """(steps, steps) shares: row i holds the shares of x_pred_i, x_pred_(i-1), ... in its first i + 1 places."""
        earlier = self.earlier_shares * self.earlier_mask
        return torch.cat([1 - earlier.sum(1, keepdim=True), earlier[:, :-1]], dim=1)

    def scheduler_config(self) -> dict:
        """The searched numbers as JiTFlowMatchScheduler keeps them: times in float32, row i of length i + 1."""
        times = [float(time) for time in self.times().detach().float()]
        coefficients = self.coefficients().detach()
        rows = [coefficients[index, : index + 1].tolist() for index in range(len(times) - 1)]
        return dict(searched_times=times, searched_coefficients=rows)


def sample_with_searched_solver(predict, noise: torch.Tensor, indices: torch.Tensor, times: torch.Tensor,
                                coefficients: torch.Tensor, noise_scale: float, t_eps: float) -> torch.Tensor:
    """
    The "searched" solver's final samples of `noise` (the pipeline's "latent" output), differentiable in times and
    shares. `predict(sample, t, indices)` is the model's (guided) clean-image prediction of the draws `indices`.
    """
    rhos = differentiable_log_integrating_factor(times, t_eps)
    sample = noise * noise_scale
    history = []
    for index in range(len(times) - 1):
        history.insert(0, predict(sample, times[index].float(), indices))
        h = rhos[index + 1] - rhos[index]
        estimate = sum(coefficients[index, j] * x_pred for j, x_pred in enumerate(history))
        sample = torch.exp(-h) * sample + -torch.expm1(-h) * estimate
    return sample


def fit_solver(solver: SearchedSolver, predict, noise: torch.Tensor, target: torch.Tensor, noise_scale: float,
               t_eps: float, search_steps: int, batch_size: int, learning_rate: float) -> tuple[float, float]:
    """
    Adam on the mean squared distance of the solver's final samples to `target`, `batch_size` draws of `noise` a
    step, with a cosine learning rate. Returns the RMS distance over all draws, on the [0, 1] image scale, before and
    after.
    """
    def distance(indices) -> torch.Tensor:
        sample = sample_with_searched_solver(predict, noise[indices], indices, solver.times(), solver.coefficients(),
                                             noise_scale, t_eps)
        return (sample - target[indices]).square().mean()

    def rms_over_all_draws() -> float:
        with torch.no_grad():
            batches = torch.arange(len(noise), device=noise.device).split(batch_size)
            mean_square = sum(distance(indices).item() * len(indices) for indices in batches) / len(noise)
        return mean_square**0.5 / 2  # samples span [-1, 1], images [0, 1]

    before = rms_over_all_draws()
    optimizer = torch.optim.Adam(solver.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, search_steps)
    order = torch.randperm(len(noise), generator=torch.Generator().manual_seed(0)).to(noise.device)
    progress = tqdm(range(search_steps), desc="search")
    for step in progress:
        indices = order.roll(-(step * batch_size % len(noise)))[:batch_size]
        loss = distance(indices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(rms=f"{loss.item() ** 0.5 / 2:.4f}")
    return before, rms_over_all_draws()


def multistep2_solver(num_inference_steps: int, guidance_interval, t_eps: float) -> SearchedSolver:
    """The search's start: `multistep2` on the "guidance" grid as a searched solver (`guidance_interval` None
    without guidance)."""
    multistep = JiTFlowMatchScheduler(solver="multistep2", time_grid="guidance", t_eps=t_eps)
    multistep.set_timesteps(num_inference_steps, guidance_interval=guidance_interval)
    coefficients = []
    for index in range(num_inference_steps):
        h, weights = multistep.multistep_weights(index)
        row = [weight / -math.expm1(-h) for weight in weights]  # as the scheduler's searched_step scales them
        coefficients.append(row + [0.0] * (index + 1 - len(row)))
    return SearchedSolver(multistep.time_grid.double().tolist(), coefficients)


def teacher_samples(pipe: PixelREPAPipeline, noise: torch.Tensor, class_labels: torch.Tensor, teacher_steps: int,
                    guidance_scale: float, guidance_interval, batch_size: int) -> torch.Tensor:
    """The official sampler's (Heun on the uniform grid) final samples of `noise`, `batch_size` at a time."""
    config = pipe.scheduler.config
    teacher = PixelREPAPipeline(transformer=pipe.transformer,
                                scheduler=JiTFlowMatchScheduler(solver="heun", t_eps=config.t_eps,
                                                                noise_scale=config.noise_scale))
    teacher.set_progress_bar_config(disable=True)
    batches = []
    for start in tqdm(range(0, len(noise), batch_size), desc="teacher (Heun)"):
        batches.append(teacher(class_labels[start: start + batch_size], num_inference_steps=teacher_steps,
                               guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                               latents=noise[start: start + batch_size], output_type="latent").images)
    return torch.cat(batches)


def search_solver(pipe: PixelREPAPipeline, num_inference_steps: int, guidance_scale: float, guidance_interval,
                  class_labels: torch.Tensor, generator: torch.Generator, teacher_steps: int, search_steps: int,
                  batch_size: int, learning_rate: float):
    """
    Searches a solver of `num_inference_steps` evaluations for `pipe` at this guidance, from `multistep2` on the
    "guidance" grid, on one noise draw (from `generator`) per class label, against the official Heun with
    `teacher_steps` steps. Returns the searched JiTFlowMatchScheduler and the RMS distances to the teacher (on the
    [0, 1] image scale) over all draws before and after.
    """
    config = pipe.transformer.config
    shape = (len(class_labels), config.in_channels, config.sample_size, config.sample_size)
    device = pipe._execution_device
    noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    class_labels = class_labels.to(device)
    solver = multistep2_solver(num_inference_steps, None if guidance_scale == 1.0 else guidance_interval,
                               pipe.scheduler.config.t_eps).to(device)
    target = teacher_samples(pipe, noise, class_labels, teacher_steps, guidance_scale, guidance_interval, batch_size)

    def predict(sample, t, indices):
        guided = guidance_scale != 1.0 and in_guidance_interval(t.detach().cpu().reshape(1), guidance_interval).item()
        return pipe.predict_clean_image(sample, t, class_labels[indices], guidance_scale if guided else None, "model")

    pipe.transformer.requires_grad_(False)
    before, after = fit_solver(solver, predict, noise, target, pipe.scheduler.config.noise_scale,
                               pipe.scheduler.config.t_eps, search_steps, batch_size, learning_rate)
    scheduler = JiTFlowMatchScheduler.from_config(
        pipe.scheduler.config, solver="searched", searched_guidance_scale=guidance_scale,
        searched_guidance_interval=list(guidance_interval), **solver.scheduler_config())
    return scheduler, before, after
