"""pipelines/demo.py served on 127.0.0.1 and driven through gradio_client, the real client."""

import socket

import numpy as np
import PIL.Image
import pytest
import torch

from pixelrepa_diffusers import JiTFlowMatchScheduler, PixelREPAPipeline
from tests.tiny_models import random_tiny_transformer

gr = pytest.importorskip("gradio", reason="the demo extra: pip install -e '.[demo]'")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from pipelines import demo  # noqa: E402

NAMES = {index: name for index, name in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven",
                                                    "eight", "nine"])}
SETTINGS = dict(seed=7, solver=demo.FAST, steps=4, interval_min=0.1, interval_max=1.0, precision="model")


def tiny_pipeline():
    pipe = PixelREPAPipeline(random_tiny_transformer(), JiTFlowMatchScheduler(), id2label=NAMES, guidance_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def client():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = demo.build_app(tiny_pipeline()).queue()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        app.close()


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def expected_images(scheduler, steps, labels, seed):
    """The pipeline's own images of `labels` in one batch, image i from noise seeded `seed` + i, as the demo draws."""
    pipe = tiny_pipeline()
    pipe.scheduler = scheduler
    generators = [torch.Generator().manual_seed(seed + index) for index in range(len(labels))]
    return [np.asarray(image) for image in pipe(labels, num_inference_steps=steps, generator=generators).images]


def test_the_grid_holds_the_asked_images_with_their_cost(client):
    gallery, info = client.predict(["1: one"], "two, 3", 2, SETTINGS["seed"], demo.FAST, 4, 2.0, 0.1, 1.0, "model",
                                   api_name="/grid")
    assert [entry["caption"] for entry in gallery] == ["1", "1", "two", "two", "3", "3"]
    assert info.startswith("6 images in ") and "4 model evaluations each" in info
    # The pipeline's own samples of the same batch, image i from noise seeded 7 + i.
    expected = expected_images(JiTFlowMatchScheduler(solver="multistep2", time_grid="guidance"), 4,
                               [1, 1, 2, 2, 3, 3], 7)
    for entry, image in zip(gallery, expected):
        np.testing.assert_array_equal(pixels(entry["image"]), image)


def test_side_by_side_runs_the_same_noise_through_both_samplers(client):
    paper, fast, info = client.predict(["5: five"], "", 3, demo.FAST, 4, 2.0, 0.1, 1.0, "model",
                                       api_name="/side_by_side")
    np.testing.assert_array_equal(pixels(paper), expected_images(JiTFlowMatchScheduler(), 50, [5], 3)[0])
    np.testing.assert_array_equal(pixels(fast), expected_images(
        JiTFlowMatchScheduler(solver="multistep2", time_grid="guidance"), 4, [5], 3)[0])
    assert "Paper: 99 evaluations" in info and "4 evaluations" in info


def test_the_sweep_draws_one_image_per_scale(client):
    row = client.predict(["2: two"], "", 0, demo.FAST, 4, "1.0, 2.5, 4", 0.1, 1.0, "model", api_name="/sweep")
    assert [entry["caption"] for entry in row] == ["guidance 1", "guidance 2.5", "guidance 4"]
    assert not np.array_equal(pixels(row[0]["image"]), pixels(row[2]["image"]))


@pytest.mark.parametrize("arguments, message", [
    ((["1: one"], "zebra", 1, 0, demo.FAST, 4), "zebra"),
    ((["1: one"], "", 1, 0, demo.FAST, 1), "num_inference_steps must be >= 2"),
    (([], "", 1, 0, demo.FAST, 4), "Pick at least one class"),
])
def test_bad_input_shows_the_pipelines_message_and_the_app_keeps_serving(client, arguments, message):
    with pytest.raises(AppError, match=message):
        client.predict(*arguments, 2.0, 0.1, 1.0, "model", api_name="/grid")
    gallery, _ = client.predict(["1: one"], "", 1, 0, demo.FAST, 2, 2.0, 0.1, 1.0, "model", api_name="/grid")
    assert len(gallery) == 1


def test_an_unknown_model_is_one_line_at_start_up(tmp_path, capsys):
    assert demo.main(["--pretrained_model_name_or_path", str(tmp_path / "missing")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("demo.py: error: ") and error.count("\n") == 1


@pytest.mark.slow
def test_a_headless_chromium_renders_the_controls_and_an_image(client, tmp_path):
    """Needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and selenium."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1100"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))
    try:
        browser.get(client.src)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda page: page.find_elements(By.XPATH, "//button[normalize-space()='Generate']"))
        text = browser.find_element(By.TAG_NAME, "body").text
        for control in ("Classes (type to search)", "Images per class", "Seed", "Solver", "Steps", "Guidance scale",
                        "Precision", "Side by side", "Guidance sweep"):
            assert control in text, control
        browser.find_element(By.XPATH, "//button[normalize-space()='Generate']").click()
        wait.until(lambda page: [image for image in page.find_elements(By.CSS_SELECTOR, "img")
                                 if page.execute_script("return arguments[0].naturalWidth", image) == 32])
        browser.save_screenshot(str(tmp_path / "demo.png"))
    finally:
        browser.quit()
    screenshot = np.asarray(PIL.Image.open(tmp_path / "demo.png").convert("L"))
    assert screenshot.shape[1] >= 1000 and screenshot.min() < 100 < screenshot.max()  # a rendered page, not blank


def test_a_space_reads_the_model_from_the_environment_and_an_uncached_hub_id_offline_is_one_line(
        tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIXELREPA_MODEL", "someone/never-downloaded")
    assert demo.main([]) == 1
    error = capsys.readouterr().err
    assert error.startswith("demo.py: error: ") and error.count("\n") == 1
    assert "cannot find the requested files in the local cache" in error or "offline" in error.lower(), error
