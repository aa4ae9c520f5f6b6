"""
diffusers' caches (`transformer.enable_cache(config)`, CacheMixin) on JiTTransformer2DModel: which fit, how close to
the uncached sample they stay on the tiny random model, and why the others do not fit.

The differences are those of a random model (whose samples barely depend on the reused states), not a measure of
image quality; they bound the tests, and a cache that reused nothing would fail them by its attention count.
"""

import ast
import json

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)

from pipelines.benchmark_utils import TINY_CONFIG
from pixelrepa_diffusers import JiTFlowMatchScheduler, JiTTransformer2DModel, PixelREPAPipeline
from pixelrepa_diffusers.scheduling_jit_flow_match import in_guidance_interval
from tests.tiny_models import random_tiny_transformer

STEPS = 16  # Heun: 2 * 16 - 1 = 31 evaluations, the first 3 (t < 0.1) unguided, the other 28 guided
GUIDANCE_INTERVAL = (0.1, 1.0)
FULL_RUNS = 31 * TINY_CONFIG["num_layers"]  # attention computations of an uncached sample
LABELS = [1, 2, 3, 4]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Runs this module's tiny models on one thread: on two busy cores, two threads kept waiting on each other (the
    file took 35-50 s, against 8-10 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    pipeline = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(), guidance_scale=2.0,
                                    guidance_interval=GUIDANCE_INTERVAL)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def reference(pipe):
    images, runs = sample(pipe)
    assert runs == FULL_RUNS
    return images


def sample(pipe):
    """4 images of 16 steps from fixed noise, and how many attention computations ran (a reused block or attention
    output skips its QKV projection)."""
    runs = []
    handles = [block.attn.to_qkv.register_forward_hook(lambda *_: runs.append(1)) for block in pipe.transformer.blocks]
    latents = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    try:
        images = pipe(LABELS, num_inference_steps=STEPS, latents=latents, output_type="latent").images
    finally:
        for handle in handles:
            handle.remove()
    return images, len(runs)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


def diffusers_timestep(pipe) -> float:
    """The running evaluation's time in diffusers' direction and scale, 1000 (noise) to 0 (clean): 1000 * (1 - JiT t).
    PAB's and FasterCache's timestep ranges are in these units."""
    return 1000 * (1 - float(pipe.current_timestep))


def test_the_pipeline_exposes_the_running_evaluation_time(pipe):
    times = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *_: times.append(float(pipe.current_timestep)))
    try:
        pipe(LABELS, num_inference_steps=3, output_type="latent")
    finally:
        handle.remove()
    assert times == pytest.approx(pipe.scheduler.timesteps.tolist()) and pipe.current_timestep is None


def check_cache(pipe, reference, config, bound: float) -> None:
    """
    Samples twice with `config` enabled and once after `disable_cache()`; checks that the cache skipped attention
    computations, that the two cached calls agree exactly (the pipeline's `maybe_free_model_hooks` resets the hooks'
    state after each call), that the cached sample is within `bound` RMS of the uncached one and that disabling
    restores it exactly.
    """
    pipe.transformer.enable_cache(config)
    try:
        cached, runs = sample(pipe)
        again, _ = sample(pipe)
    finally:
        pipe.transformer.disable_cache()
    assert runs < FULL_RUNS
    assert torch.equal(again, cached)
    assert 0 < rms(cached, reference) < bound
    assert torch.equal(sample(pipe)[0], reference)


def guided_evaluations() -> int:
    """How many of the sampler's evaluations run guided: MagCache's step count in the "cond_uncond" context."""
    scheduler = JiTFlowMatchScheduler()
    scheduler.set_timesteps(STEPS)
    return int(in_guidance_interval(scheduler.timesteps, GUIDANCE_INTERVAL).sum())


def test_mag_cache_calibrates_then_skips_the_block_stack(pipe, reference, capsys):
    """
    MagCache fits: it replaces the whole block stack by the last residual while the calibrated magnitude ratios say
    the residual changes little. Its residual is the image tokens' (the in-context tokens join mid-network, and it
    takes the output's last tokens, where the image tokens are). Calibration (no skipping, so the exact uncached
    sample) prints the ratios; its step count is the guided evaluations, which the "cond_uncond" context counts.
    Defaults (threshold 0.06, max_skip_steps 3, retention_ratio 0.2): 56 of 124 attention runs, RMS 3.6e-4 from the
    uncached sample; bound 1e-3.
    """
    steps = guided_evaluations()
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        calibrated, runs = sample(pipe)
    finally:
        pipe.transformer.disable_cache()
    assert runs == FULL_RUNS and torch.equal(calibrated, reference)
    ratios = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(ratios) == steps == 28
    check_cache(pipe, reference, MagCacheConfig(mag_ratios=ratios, num_inference_steps=steps), bound=1e-3)


def test_taylorseer_predicts_the_attention_outputs(pipe, reference):
    """
    TaylorSeer fits: it computes every attention of the first 3 evaluations of each context and then one in 5,
    predicting the others by a first-order Taylor expansion in the evaluation index (fp32 factors, as the weights).
    44 of 124 attention runs, RMS 1.5e-4 from the uncached sample; bound 5e-4.
    """
    config = TaylorSeerCacheConfig(cache_interval=5, disable_cache_before_step=3, max_order=1,
                                   taylor_factors_dtype=torch.float32)
    check_cache(pipe, reference, config, bound=5e-4)


def test_pyramid_attention_broadcast_reuses_attention_outputs(pipe, reference):
    """
    PAB fits: each attention reuses its last output every other evaluation with diffusers' timestep in (100, 800),
    i.e. JiT time in (0.2, 0.9), away from the guidance switch at 0.1 (a reused output has the batch it was computed
    with). 80 of 124 attention runs, RMS 3.8e-6 from the uncached sample; bound 2e-5.
    """
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: diffusers_timestep(pipe),
    )
    check_cache(pipe, reference, config, bound=2e-5)


def test_faster_cache_extrapolates_attention_outputs(pipe, reference):
    """
    FasterCache fits in part, as `is_guidance_distilled=True`: its attention reuse (every other evaluation with
    diffusers' timestep below 681, JiT time above 0.319, the output extrapolated from the last two with weight 0.5)
    without its CFG cache (see the next test). 84 of 124 attention runs, RMS 7.6e-6 from the uncached sample; bound
    3e-5.
    """
    config = FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
        attention_weight_callback=lambda _: 0.5, tensor_format="BCHW", is_guidance_distilled=True,
        current_timestep_callback=lambda: diffusers_timestep(pipe),
    )
    check_cache(pipe, reference, config, bound=3e-5)


def test_faster_cache_cfg_cache_does_not_fit_the_pipelines_guidance_batch(pipe, reference):
    """
    FasterCache's CFG cache does not fit: to skip the unconditional half it splits only keyword inputs named
    `hidden_states`, `timestep`, ... of an [uncond, cond] batch, while the pipeline calls the transformer with
    positional inputs, a [cond, uncond] batch, and guidance only inside the guidance interval. So the whole batch of 8
    runs and adding the 4 images' cached frequency delta to it raises. (Called with keywords, `class_labels` added to
    `_unconditional_conditional_input_kwargs_identifiers` and guidance at every evaluation, it runs, computing the
    uncond half and approximating the cond one.)
    """
    config = FasterCacheConfig(tensor_format="BCHW", current_timestep_callback=lambda: diffusers_timestep(pipe))
    pipe.transformer.enable_cache(config)
    try:
        with pytest.raises(RuntimeError, match=r"size of tensor a \(4\) must match the size of tensor b \(8\)"):
            sample(pipe)
    finally:
        pipe.transformer.disable_cache()
    assert torch.equal(sample(pipe)[0], reference)


def test_text_kv_cache_does_nothing_to_a_class_conditional_model(pipe, reference):
    """TextKVCache does not fit: it caches the text keys and values of NucleusMoEImageTransformerBlock's
    cross-attention; JiT has no text (its class tokens are in the sequence), and diffusers enables it without hooking
    any block, so nothing changes."""
    pipe.transformer.enable_cache(TextKVCacheConfig())
    try:
        images, runs = sample(pipe)
    finally:
        pipe.transformer.disable_cache()
    assert runs == FULL_RUNS and torch.equal(images, reference)


def constant_token_count_transformer() -> JiTTransformer2DModel:
    """The tiny random transformer with its in-context tokens joining before block 0 (in_context_start=0, no preset
    does), so that every block sees as many tokens."""
    transformer = JiTTransformer2DModel(**{**TINY_CONFIG, "in_context_start": 0})
    transformer.load_state_dict(random_tiny_transformer().state_dict())
    return transformer.eval()


@torch.no_grad()
def denoise_directly(transformer, steps: int = 12):
    """`steps` Euler steps of the JiT ODE calling the transformer itself, each call in a cache context with the step,
    sigma (1 - t) and step count SeaCache reads; returns how many attention computations ran."""
    runs = []
    handles = [block.attn.to_qkv.register_forward_hook(lambda *_: runs.append(1)) for block in transformer.blocks]
    latents = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor(LABELS)
    for step in range(steps):
        t = torch.tensor(step / steps)
        with transformer.cache_context("cond", step_index=step, sigma=1 - step / steps, num_inference_steps=steps):
            x_pred = transformer(latents, t.expand(4), labels).sample
        latents = latents + (x_pred - latents) / (steps - step)
    for handle in handles:
        handle.remove()
    return len(runs)


def test_first_block_cache_does_not_fit_the_in_context_tokens():
    """
    FirstBlockCache does not fit: it caches `last block's output - first block's output`, and from block
    in_context_start on the sequence holds in_context_len more tokens (20 against 16 here), so the first call raises.
    With a constant token count (in_context_start=0) it runs and skips blocks (threshold 0.05).
    """
    transformer = random_tiny_transformer()
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    with pytest.raises(RuntimeError, match=r"size of tensor a \(20\) must match the size of tensor b \(16\)"):
        denoise_directly(transformer)
    transformer = constant_token_count_transformer()
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    assert denoise_directly(transformer) < 12 * TINY_CONFIG["num_layers"]


def test_sea_cache_never_skips_with_the_in_context_tokens():
    """
    SeaCache does not fit: it keeps a residual only where the last block's output has the first block's input shape,
    which the in-context tokens joining mid-network break, so it never has one to reuse and runs every block (it
    warns "cache hit without residual history"). With in_context_start=0 it skips. It also needs a callback giving
    the image latents (built in only for Wan and Cosmos 3) and a cache context carrying step_index, sigma and
    num_inference_steps.
    """
    config = SeaCacheConfig(threshold=1.0, raw_vision_callback=lambda module, args, kwargs: list(args[0][:, :, None]))
    transformer = random_tiny_transformer()
    transformer.enable_cache(config)
    assert denoise_directly(transformer) == 12 * TINY_CONFIG["num_layers"]
    transformer = constant_token_count_transformer()
    transformer.enable_cache(config)
    assert denoise_directly(transformer) < 12 * TINY_CONFIG["num_layers"]


def test_the_cache_benchmark_puts_each_cache_beside_each_sampler(tmp_path, pipe):
    from pipelines import benchmark_caches

    pipe.save_pretrained(tmp_path / "model")
    assert benchmark_caches.main([
        "--pretrained_model_name_or_path", str(tmp_path / "model"), "--classes", "1", "2", "--images_per_class", "1",
        "--heun_steps", "8", "--multistep2_steps", "8", "--reference_steps", "8", "--repeats", "1",
        "--output_json", str(tmp_path / "caches.json"), "--output_plot", str(tmp_path / "caches.png")]) == 0
    results = json.loads((tmp_path / "caches.json").read_text())["results"]
    found = {(r["solver"], r["cache"]): r for r in results}
    assert set(found) == {(solver, cache) for solver in ("heun", "multistep2") for cache in benchmark_caches.CACHES}
    assert found[("heun", "none")]["error"] == 0  # the reference's own sampler and noise
    assert all(found[("heun", cache)]["error"] > 0 for cache in ("magcache", "taylorseer"))
    assert found[("heun", "none")]["evaluations"] == 15 and found[("multistep2", "none")]["evaluations"] == 8
    assert (tmp_path / "caches.png").stat().st_size > 10_000
