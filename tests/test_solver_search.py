import json
import math

import pytest
import torch

from pixelrepa_diffusers import JiTFlowMatchScheduler, PixelREPAPipeline
from pixelrepa_diffusers.commands.search_solver import main as search_main
from pixelrepa_diffusers.scheduling_jit_flow_match import log_integrating_factor
from pixelrepa_diffusers.solver_search import (
    differentiable_log_integrating_factor, fit_solver, multistep2_solver, sample_with_searched_solver, search_solver,
)
from tests.tiny_models import random_tiny_transformer

GUIDANCE = dict(searched_guidance_scale=2.0, searched_guidance_interval=[0.1, 1.0])


def tiny_pipeline(scheduler=None):
    pipe = PixelREPAPipeline(random_tiny_transformer(), scheduler or JiTFlowMatchScheduler(), guidance_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, steps, **kwargs):
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    return pipe([0, 3, 7, 9], num_inference_steps=steps, latents=noise, output_type="latent", **kwargs).images


def test_the_differentiable_rho_is_the_schedulers_across_the_clamp():
    times = [0.0, 0.3, 0.9, 0.95, 0.97, 1.0]
    expected = torch.tensor([log_integrating_factor(t, 0.05) for t in times], dtype=torch.float64)
    torch.testing.assert_close(differentiable_log_integrating_factor(torch.tensor(times, dtype=torch.float64), 0.05),
                               expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps", [2, 6, 9])
def test_the_searched_solver_with_multistep2_shares_samples_exactly_as_multistep2(steps):
    solver = multistep2_solver(steps, (0.1, 1.0), 0.05)
    searched = JiTFlowMatchScheduler(solver="searched", **solver.scheduler_config(), **GUIDANCE)
    pipe = tiny_pipeline(JiTFlowMatchScheduler(solver="multistep2", time_grid="guidance"))
    expected = sample(pipe, steps)
    restarts = pipe.scheduler._restarts
    pipe.scheduler = searched
    assert torch.equal(sample(pipe, steps), expected)
    # Including the restart after guidance switches on (at the third evaluation on these grids): from there on the
    # shares of the unguided predictions are 0.
    assert sorted(restarts) == ([] if steps == 2 else [2])
    assert all(share == 0 for row in searched.config.searched_coefficients[2:] for share in row[-2:])


def test_the_search_drives_the_error_down_on_a_linear_model():
    """x_pred = a z + b has the closed form z(1) = z* + (z0 - z*) exp((a - 1) rho(1)), z* = b / (1 - a), with
    rho(1) = 1 - log(t_eps) across the clamp; the search must bring 4 steps much nearer it than multistep2."""
    t_eps, a = 0.05, 0.6
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(1, 3, 4, 4, generator=generator)
    noise = torch.randn(64, 3, 4, 4, generator=generator)
    fixed_point = b / (1 - a)
    exact = fixed_point + (noise - fixed_point) * math.exp((a - 1) * (1 - math.log(t_eps)))
    solver = multistep2_solver(4, None, t_eps)

    def predict(z, t, indices):
        return a * z + b

    before, after = fit_solver(solver, predict, noise, exact, 1.0, t_eps, search_steps=150, batch_size=16,
                               learning_rate=0.05)
    assert after < before / 5, (before, after)
    # The fitted numbers are a valid solver: the scheduler takes them and samples what the search measured.
    scheduler = JiTFlowMatchScheduler(solver="searched", **solver.scheduler_config(), **GUIDANCE)
    scheduler.set_timesteps(4, guidance_scale=2.0, guidance_interval=(0.1, 1.0))
    z = noise.clone()
    for t in scheduler.timesteps:
        z = scheduler.step(predict(z, t, None), t, z).prev_sample
    assert (z - exact).square().mean().sqrt().item() / 2 == pytest.approx(after, rel=1e-3)


def test_a_searched_pipeline_samples_what_the_search_measured_and_reloads_identically(tmp_path):
    pipe = tiny_pipeline()
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    scheduler, before, after = search_solver(pipe, 4, 2.0, (0.1, 1.0), labels, torch.Generator().manual_seed(1),
                                             teacher_steps=20, search_steps=20, batch_size=6, learning_rate=0.01)
    assert after < before
    pipe.scheduler = scheduler
    images = sample(pipe, 4)
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    class_labels = torch.tensor([0, 3, 7, 9])

    def predict(z, t, indices):
        return pipe.predict_clean_image(z, t, class_labels[indices], 2.0 if t > 0.1 else None, "model")

    times = torch.tensor(scheduler.config.searched_times, dtype=torch.float64)
    rows = scheduler.config.searched_coefficients
    shares = torch.tensor([row + [0.0] * (len(rows) - len(row)) for row in rows], dtype=torch.float64)
    with torch.no_grad():
        measured = sample_with_searched_solver(predict, noise, torch.arange(4), times, shares, 1.0, 0.05)
    torch.testing.assert_close(images, measured, rtol=0, atol=1e-5)

    pipe.save_pretrained(tmp_path / "searched")
    reloaded = PixelREPAPipeline.from_pretrained(tmp_path / "searched")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.scheduler.config.solver == "searched"
    assert torch.equal(sample(reloaded, 4), images)


def test_the_cli_writes_a_pipeline_that_samples_with_the_searched_solver(tmp_path, capsys):
    tiny_pipeline().save_pretrained(tmp_path / "model")
    output_dir = tmp_path / "searched"
    assert search_main([
        "--pretrained_model_name_or_path", str(tmp_path / "model"), "--output_dir", str(output_dir),
        "--num_inference_steps", "3", "--num_samples", "8", "--teacher_steps", "10", "--search_steps", "4",
        "--batch_size", "4", "--class_labels", "2", "5", "--output_json", str(tmp_path / "search.json"),
    ]) == 0
    assert "Wrote" in capsys.readouterr().out
    figures = json.loads((tmp_path / "search.json").read_text())
    assert figures["rms_after"] > 0 and figures["rms_before"] > 0 and figures["seconds"] > 0
    config = json.loads((output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert config["solver"] == "searched" and len(config["searched_times"]) == 4
    assert config["searched_guidance_scale"] == 2.0 and config["searched_guidance_interval"] == [0.1, 1.0]
    pipe = PixelREPAPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    original = tiny_pipeline()
    for name, weight in original.transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], weight)
    assert sample(pipe, 3).shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="num_inference_steps must be 3"):
        sample(pipe, 4)
    # The output folder exists now: a second search is refused before it starts.
    assert search_main(["--pretrained_model_name_or_path", str(tmp_path / "model"), "--output_dir",
                        str(output_dir)]) == 1
    assert capsys.readouterr().err.strip().endswith("exists; name a new folder.")


def test_gradient_checkpointing_searches_the_same_solver(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "model")
    configs = []
    for name, extra in (("plain", []), ("checkpointed", ["--gradient_checkpointing"])):
        assert search_main(["--pretrained_model_name_or_path", str(tmp_path / "model"), "--output_dir",
                            str(tmp_path / name), "--num_inference_steps", "3", "--num_samples", "4",
                            "--teacher_steps", "4", "--search_steps", "3", "--batch_size", "4", *extra]) == 0
        configs.append(json.loads((tmp_path / name / "scheduler" / "scheduler_config.json").read_text()))
    start = multistep2_solver(3, (0.1, 1.0), 0.05).scheduler_config()["searched_times"]
    assert max(abs(a - b) for a, b in zip(configs[0]["searched_times"], start)) > 1e-4  # the search moved them
    assert configs[1]["searched_times"] == pytest.approx(configs[0]["searched_times"], abs=1e-6)
    for first, second in zip(configs[0]["searched_coefficients"], configs[1]["searched_coefficients"]):
        assert second == pytest.approx(first, abs=1e-6)


@pytest.mark.parametrize("arguments, message", [
    (["--num_inference_steps", "1"], "num_inference_steps must be >= 2"),
    (["--class_labels", "zebra"], "zebra"),
    (["--guidance_interval", "0.5", "0.2"], "guidance_interval must be"),
    (["--num_samples", "0"], "--num_samples must be >= 1"),
])
def test_the_cli_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, arguments, message):
    tiny_pipeline().save_pretrained(tmp_path / "model")
    code = search_main(["--pretrained_model_name_or_path", str(tmp_path / "model"), "--output_dir",
                        str(tmp_path / "searched"), "--num_samples", "4", "--teacher_steps", "2", "--search_steps",
                        "1", *arguments])
    error = capsys.readouterr().err
    assert code == 1 and message in error and len(error.strip().splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]


SEARCHED = dict(solver="searched", searched_times=[0.0, 0.4, 1.0], searched_coefficients=[[1.0], [1.5, -0.5]],
                **GUIDANCE)


@pytest.mark.parametrize("change, message", [
    (dict(searched_coefficients=[[1.0]]), "one row per step"),
    (dict(searched_coefficients=[[1.0], [1.0]]), "row i must have i \\+ 1 shares"),
    (dict(searched_times=[0.0, 0.7, 0.4, 1.0], searched_coefficients=[[1.0], [1.0, 0.0], [1.0, 0.0, 0.0]]),
     "must be increasing"),
    (dict(searched_times=[0.0, 0.4, 1.2]), "from 0 to 1"),
    (dict(searched_times=[-0.1, 0.4, 1.0]), "from 0 to 1"),
    (dict(searched_guidance_interval=[0.5, 0.2]), "guidance_interval must be"),
    (dict(searched_times=None), "needs searched_times"),
    (dict(solver="multistep2"), 'belong to solver "searched"'),
])
def test_a_malformed_searched_config_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        JiTFlowMatchScheduler(**{**SEARCHED, **change})


def test_a_searched_solver_takes_only_its_step_count_and_guidance_unless_told():
    pipe = tiny_pipeline(JiTFlowMatchScheduler(**SEARCHED))
    with pytest.raises(ValueError, match="num_inference_steps must be 2 for this \"searched\" solver"):
        sample(pipe, 3)
    with pytest.raises(ValueError, match="must be 2.0 and \\(0.1, 1.0\\).*got 3.0 and \\(0.1, 1.0\\).*"
                                         "accept_other_guidance"):
        sample(pipe, 2, guidance_scale=3.0)
    with pytest.raises(ValueError, match="got 2.0 and \\(0.2, 1.0\\)"):
        sample(pipe, 2, guidance_interval=(0.2, 1.0))
    with pytest.raises(ValueError, match="got 1.0 and"):
        sample(pipe, 2, guidance_scale=1.0)
    guided = sample(pipe, 2)
    stronger = sample(pipe, 2, guidance_scale=3.0, accept_other_guidance=True)
    assert stronger.shape == guided.shape and not torch.equal(stronger, guided)


def test_benchmark_solvers_measures_a_searched_solver_beside_the_others(tmp_path, capsys):
    from pipelines import benchmark_solvers

    tiny_pipeline().save_pretrained(tmp_path / "model")
    shares = multistep2_solver(4, (0.1, 1.0), 0.05).scheduler_config()
    tiny_pipeline(JiTFlowMatchScheduler(solver="searched", **shares, **GUIDANCE)).save_pretrained(tmp_path / "searched")
    arguments = ["--pretrained_model_name_or_path", str(tmp_path / "model"), "--classes", "1", "2",
                 "--images_per_class", "1", "--solvers", "multistep2", "--time_grids", "guidance", "--steps", "4",
                 "--reference_steps", "8", "--output_json", str(tmp_path / "s.json"),
                 "--output_plot", str(tmp_path / "s.png")]
    assert benchmark_solvers.main([*arguments, "--searched_solvers", str(tmp_path / "searched")]) == 0
    results = {(r["solver"], r["time_grid"], r["steps"]): r for r in json.loads((tmp_path / "s.json").read_text())[
        "results"]}
    # With multistep2's shares the searched solver is multistep2 on the guidance grid: the same error.
    assert results[("searched", "own", 4)]["error"] == results[("multistep2", "guidance", 4)]["error"] > 0
    capsys.readouterr()
    assert benchmark_solvers.main([*arguments, "--searched_solvers", str(tmp_path / "model")]) == 1
    assert "holds solver 'heun', not a searched one" in capsys.readouterr().err


def test_the_search_benchmark_times_each_search_and_measures_held_out_errors(tmp_path, capsys):
    from pipelines import benchmark_solver_search

    tiny_pipeline().save_pretrained(tmp_path / "model")
    assert benchmark_solver_search.main([
        "--pretrained_model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out"),
        "--classes", "1", "2", "--images_per_class", "1", "--steps", "2", "--num_samples", "4", "--sample_counts", "4",
        "8", "--sweep_steps", "2", "--other_scales", "3.0", "--teacher_steps", "4", "--search_steps", "2",
        "--batch_size", "4", "--reference_steps", "6"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    [budget] = results["budgets"]
    assert budget["steps"] == 2 and budget["search_seconds"] > 0 and budget["error"] > 0
    # The sweep reuses the budget search with the same sample count and runs the other one.
    assert [entry["num_samples"] for entry in results["sample_counts"]] == [4, 8]
    assert results["sample_counts"][0]["error"] == budget["error"]
    assert (tmp_path / "out" / "steps-2-samples-8" / "scheduler" / "scheduler_config.json").exists()
    scales = {entry["guidance_scale"]: entry for entry in results["guidance_scales"]}
    assert set(scales) == {2.0, 3.0} and scales[2.0]["searched_error"] == budget["error"]
    assert scales[3.0]["searched_error"] != scales[2.0]["searched_error"]
