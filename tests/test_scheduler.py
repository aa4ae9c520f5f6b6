import pytest
import torch

from pixelrepa_diffusers import JiTFlowMatchScheduler


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
                                           (dict(noise_scale=-1), "noise_scale")])
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
