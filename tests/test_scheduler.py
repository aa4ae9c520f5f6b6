import math

import pytest
import torch

from pixelrepa_diffusers import JiTFlowMatchScheduler
from pixelrepa_diffusers.scheduling_jit_flow_match import in_guidance_interval, log_integrating_factor


def test_heun_timesteps_and_evaluation_count():
    scheduler = JiTFlowMatchScheduler(solver="heun")
    scheduler.set_timesteps(50)
    assert scheduler.order == 2 and len(scheduler.timesteps) == 99
    grid = torch.linspace(0, 1, 51)
    assert torch.equal(scheduler.timesteps[:4], grid[[0, 1, 1, 2]])
    assert scheduler.timesteps[-1] == grid[-2]


def test_euler_integrates_a_linear_path_exactly():
    # A model that predicts the true clean image makes the ODE land on it from any start.
    clean = torch.randn(2, 3, 4, 4)
    for solver in ("euler", "heun"):
        scheduler = JiTFlowMatchScheduler(solver=solver, t_eps=1e-3)
        scheduler.set_timesteps(7)
        sample = torch.randn(2, 3, 4, 4)
        for t in scheduler.timesteps:
            sample = scheduler.step(clean, t, sample).prev_sample
        torch.testing.assert_close(sample, clean, atol=1e-5, rtol=0)


def test_t_eps_clamps_the_velocity():
    scheduler = JiTFlowMatchScheduler(solver="euler", t_eps=0.5)
    scheduler.set_timesteps(1)
    sample, x_pred = torch.zeros(1), torch.ones(1)
    # One step of dt=1 with velocity (1 - 0) / max(1 - 0, 0.5) = 1.
    assert scheduler.step(x_pred, 0.0, sample).prev_sample.item() == pytest.approx(1.0)
    scheduler = JiTFlowMatchScheduler(solver="euler", t_eps=2.0)
    scheduler.set_timesteps(1)
    assert scheduler.step(x_pred, 0.0, sample).prev_sample.item() == pytest.approx(0.5)


def test_config_round_trip(tmp_path):
    scheduler = JiTFlowMatchScheduler(solver="euler", t_eps=0.01, noise_scale=2.0)
    scheduler.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    loaded = JiTFlowMatchScheduler.from_pretrained(tmp_path)
    assert loaded.config.solver == "euler" and loaded.init_noise_sigma == 2.0


@pytest.mark.parametrize("kwargs, match", [(dict(solver="dpm"), "solver"), (dict(t_eps=0), "t_eps"),
                                           (dict(noise_scale=-1), "noise_scale"), (dict(time_grid="cosine"), "time_grid"),
                                           (dict(shift=0), "shift")])
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JiTFlowMatchScheduler(**kwargs)


def test_step_misuse_is_refused():
    scheduler = JiTFlowMatchScheduler(solver="euler")
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1), 0.0, torch.zeros(1))
    scheduler.set_timesteps(1)
    scheduler.step(torch.zeros(1), 0.0, torch.zeros(1))
    with pytest.raises(ValueError, match="steps are done"):
        scheduler.step(torch.zeros(1), 0.0, torch.zeros(1))
    with pytest.raises(TypeError, match="num_inference_steps"):
        scheduler.set_timesteps(2.5)


def integrate(scheduler, x_pred, z, steps, guidance_interval=None):
    """Runs the scheduler from noise z with x_pred(z, t) as the model."""
    scheduler.set_timesteps(steps, guidance_interval=guidance_interval)
    for t in scheduler.timesteps:
        z = scheduler.step(x_pred(z, t), t, z).prev_sample
    return z


def linear_model_solution(z0, a, b, t_eps):
    """z(1) for the model x_pred = a * z + b: in rho the ODE is dz/drho = (a - 1) z + b, clamp included."""
    c = 1 - a
    return b / c + (z0 - b / c) * math.exp(-c * log_integrating_factor(1.0, t_eps))


@pytest.mark.parametrize("a", [0.5, -0.5])
@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2), ("multistep2", 2), ("multistep3", 3)])
def test_solvers_converge_at_their_order_on_a_linear_model(solver, order, a):
    torch.set_default_dtype(torch.float64)
    try:
        z0, b = torch.tensor([1.0, -2.0]), torch.tensor([0.7, -0.3])
        exact = linear_model_solution(z0, a, b, t_eps=0.05)
        errors = [(integrate(JiTFlowMatchScheduler(solver=solver), lambda z, t: a * z + b, z0, steps) - exact)
                  .abs().max().item() for steps in (40, 80, 160, 320)]
    finally:
        torch.set_default_dtype(torch.float32)
    assert errors == sorted(errors, reverse=True)
    observed = math.log2(errors[-2] / errors[-1])
    assert order - 0.2 < observed < order + 0.6, (errors, observed)


@pytest.mark.parametrize("solver", ["multistep2", "multistep3"])
@pytest.mark.parametrize("steps", [3, 7])
def test_multistep_integrates_the_clamped_region_exactly(solver, steps):
    # A constant x-prediction: every step is exact, the steps that end in 1 - t < t_eps included.
    z0, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.3, 0.2, -0.1])
    sample = integrate(JiTFlowMatchScheduler(solver=solver, t_eps=0.2), lambda z, t: b, z0, steps)
    torch.testing.assert_close(sample, linear_model_solution(z0, 0.0, b, t_eps=0.2), rtol=1e-6, atol=1e-6)
    heun = integrate(JiTFlowMatchScheduler(solver="heun", t_eps=0.2), lambda z, t: b, z0, steps)
    assert (heun - sample).abs().max() > 1e-3  # Heun in t is not exact across the clamp


@pytest.mark.parametrize("solver", ["multistep2", "multistep3"])
def test_multistep_restarts_where_guidance_switches(solver):
    # The guided prediction jumps at the first evaluation inside the interval; restarting there keeps a piecewise
    # constant prediction exact, as the first-order (DDIM) steps are on each piece.
    interval, t_eps = (0.1, 1.0), 0.05
    unguided, guided = torch.tensor([0.4]), torch.tensor([-0.6])

    def x_pred(z, t):
        return guided if in_guidance_interval(t, interval) else unguided

    scheduler = JiTFlowMatchScheduler(solver=solver, t_eps=t_eps)
    sample = integrate(scheduler, x_pred, torch.tensor([1.5]), 12, guidance_interval=interval)
    expected = torch.tensor([1.5])
    for t, t_next in zip(scheduler.time_grid[:-1], scheduler.time_grid[1:]):
        decay = math.exp(log_integrating_factor(t.item(), t_eps) - log_integrating_factor(t_next.item(), t_eps))
        expected = x_pred(None, t) + (expected - x_pred(None, t)) * decay
    torch.testing.assert_close(sample, expected, rtol=1e-6, atol=1e-6)
    without_restart = integrate(JiTFlowMatchScheduler(solver=solver, t_eps=t_eps), x_pred, torch.tensor([1.5]), 12)
    assert (without_restart - expected).abs().item() > 1e-4


def test_time_grids():
    uniform = JiTFlowMatchScheduler(time_grid="uniform").make_time_grid(25)
    assert torch.equal(uniform, torch.linspace(0, 1, 26))
    guidance = JiTFlowMatchScheduler(time_grid="guidance").make_time_grid(25, guidance_interval=(0.1, 1.0))
    assert len(guidance) == 26 and guidance[0] == 0 and guidance[-1] == 1
    assert (guidance == torch.tensor(0.1)).sum() == 1, "a point exactly on the interval's lower bound"
    assert (guidance[1:] > guidance[:-1]).all()
    torch.testing.assert_close(JiTFlowMatchScheduler(time_grid="guidance").make_time_grid(25), uniform, rtol=0,
                               atol=1e-7)  # no guidance: uniform
    shifted = JiTFlowMatchScheduler(time_grid="shifted", shift=3.0).make_time_grid(10)
    steps = shifted[1:] - shifted[:-1]
    assert shifted[0] == 0 and shifted[-1] == 1 and (steps[1:] > steps[:-1]).all()  # denser near the noise


def test_multistep_spends_one_evaluation_a_step_and_names_its_minimum():
    scheduler = JiTFlowMatchScheduler(solver="multistep3")
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) == 10
    with pytest.raises(ValueError, match="num_inference_steps must be >= 3 for solver 'multistep3'"):
        scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match='time_grid "guidance" needs num_inference_steps >= 2'):
        JiTFlowMatchScheduler(time_grid="guidance").set_timesteps(1, guidance_interval=(0.1, 1.0))


def test_solvers_and_grids_are_public_and_saved(tmp_path):
    assert JiTFlowMatchScheduler.SOLVERS == ("heun", "euler", "multistep2", "multistep3", "searched")
    assert JiTFlowMatchScheduler.TIME_GRIDS == ("uniform", "guidance", "shifted")
    JiTFlowMatchScheduler(solver="multistep2", time_grid="shifted", shift=2.0).save_pretrained(tmp_path)
    loaded = JiTFlowMatchScheduler.from_pretrained(tmp_path)
    assert (loaded.config.solver, loaded.config.time_grid, loaded.config.shift) == ("multistep2", "shifted", 2.0)
