"""A Gradio demo of a PixelREPAPipeline: sample classes with the paper's sampler or a fast one, side by side, and
sweep the guidance scale.

    python pipelines/demo.py --pretrained_model_name_or_path quickstart_output/model

As a Hugging Face Space's app.py, it reads the model from the PIXELREPA_MODEL environment variable. Needs the demo
extra: pip install "pixelrepa-diffusers[demo]".
"""

import argparse
import os
import sys
import time

import gradio as gr
import torch

from pixelrepa_diffusers import PRECISIONS, JiTFlowMatchScheduler, PixelREPAPipeline
from pixelrepa_diffusers.scheduling_jit_flow_match import FLOW_SETTINGS
from pixelrepa_diffusers.commands import OneLineArgumentParser

PAPER = "official Heun (the paper's)"
FAST = "multistep2, guidance grid"
SEARCHED = "searched (this folder's)"


class Demo:
    """The pipeline and the samplers the page offers; each method returns what one part of the page shows."""

    def __init__(self, pipeline: PixelREPAPipeline):
        self.pipeline = pipeline
        config = pipeline.scheduler.config
        flow = {name: config[name] for name in FLOW_SETTINGS}
        self.schedulers = {PAPER: JiTFlowMatchScheduler(solver="heun", **flow),
                           FAST: JiTFlowMatchScheduler(solver="multistep2", time_grid="guidance", **flow)}
        self.default_steps = 25
        if config.solver == "searched":
            self.schedulers[SEARCHED] = pipeline.scheduler
            self.default_steps = len(config.searched_times) - 1
        names = pipeline.config.id2label
        self.class_choices = [f"{index}: {names.get(index, index)}"
                              for index in range(pipeline.transformer.config.num_classes)]

    def labels(self, chosen: list[str], typed: str) -> list[int | str]:
        """Class ids from the picker ("id: name") and from the text box (ids or names, comma-separated)."""
        labels = [int(choice.split(":")[0]) for choice in chosen or []]
        for entry in (typed or "").split(","):
            entry = entry.strip()
            if entry:
                labels.append(int(entry) if entry.isdigit() else entry)
        if not labels:
            raise ValueError("Pick at least one class, or type its id or name.")
        return labels

    def sample(self, labels, per_class: int, seed: int, solver: str, steps: int, guidance_scale: float,
               interval: tuple[float, float], precision: str):
        """Images of each label (`per_class` each) from noise seeded `seed` + i, with their seconds and evaluations."""
        labels = [label for label in labels for _ in range(int(per_class))]
        self.pipeline.scheduler = self.schedulers[solver]
        generators = [torch.Generator().manual_seed(int(seed) + index) for index in range(len(labels))]
        start = time.perf_counter()
        images = self.pipeline(labels, num_inference_steps=int(steps), guidance_scale=guidance_scale,
                               guidance_interval=interval, generator=generators, precision=precision).images
        return images, time.perf_counter() - start, self.pipeline.num_timesteps

    def grid(self, chosen, typed, per_class, seed, solver, steps, guidance_scale, interval_min, interval_max,
             precision, progress=gr.Progress(track_tqdm=True)):
        labels = self.labels(chosen, typed)
        images, seconds, evaluations = self.sample(labels, per_class, seed, solver, steps, guidance_scale,
                                                   (interval_min, interval_max), precision)
        captions = [str(label) for label in labels for _ in range(int(per_class))]
        return (list(zip(images, captions)),
                f"{len(images)} images in {seconds:.2f} s, {evaluations} model evaluations each ({solver}).")

    def side_by_side(self, chosen, typed, seed, solver, steps, guidance_scale, interval_min, interval_max, precision,
                     progress=gr.Progress(track_tqdm=True)):
        """The first class from the same noise through the paper's sampler (50 steps) and the chosen one."""
        label = self.labels(chosen, typed)[:1]
        interval = (interval_min, interval_max)
        paper, paper_seconds, paper_evaluations = self.sample(label, 1, seed, PAPER, 50, guidance_scale, interval,
                                                              precision)
        fast, fast_seconds, fast_evaluations = self.sample(label, 1, seed, solver, steps, guidance_scale, interval,
                                                           precision)
        return (paper[0], fast[0], f"Paper: {paper_evaluations} evaluations, {paper_seconds:.2f} s. {solver}: "
                                   f"{fast_evaluations} evaluations, {fast_seconds:.2f} s.")

    def sweep(self, chosen, typed, seed, solver, steps, scales, interval_min, interval_max, precision,
              progress=gr.Progress(track_tqdm=True)):
        """The first class from the same noise at each guidance scale of `scales` (comma-separated)."""
        label = self.labels(chosen, typed)[:1]
        try:
            values = [float(scale) for scale in scales.split(",") if scale.strip()]
        except ValueError:
            raise ValueError(f"Guidance scales must be numbers separated by commas, got {scales!r}.") from None
        row = []
        for scale in values:
            images, _, _ = self.sample(label, 1, seed, solver, steps, scale, (interval_min, interval_max), precision)
            row.append((images[0], f"guidance {scale:g}"))
        return row


def shown_in_page(method):
    """`method` with its ValueError and TypeError (the pipeline's messages for bad input) shown in the page."""
    def run(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error)) from None
    return run


def build_app(pipeline: PixelREPAPipeline) -> gr.Blocks:
    demo = Demo(pipeline)
    config = pipeline.config
    with gr.Blocks(title="PixelREPA") as app:
        gr.Markdown("# PixelREPA: class-conditional pixel-space diffusion")
        with gr.Row():
            chosen = gr.Dropdown(demo.class_choices, multiselect=True, filterable=True, label="Classes (type to search)",
                                 value=demo.class_choices[:2])
            typed = gr.Textbox(label="More classes: ids or names, comma-separated")
        with gr.Row():
            per_class = gr.Slider(1, 8, value=2, step=1, label="Images per class")
            seed = gr.Number(0, precision=0, label="Seed")
            solver = gr.Radio(list(demo.schedulers), value=list(demo.schedulers)[-1], label="Solver")
            steps = gr.Slider(1, 100, value=demo.default_steps, step=1, label="Steps")
        with gr.Row():
            guidance_scale = gr.Slider(1.0, 8.0, value=config.guidance_scale, step=0.1, label="Guidance scale")
            interval_min = gr.Slider(0.0, 1.0, value=config.guidance_interval[0], step=0.05,
                                     label="Guidance interval: from t")
            interval_max = gr.Slider(0.0, 1.0, value=config.guidance_interval[1], step=0.05, label="to t")
            precision = gr.Radio(list(PRECISIONS), value="model", label="Precision")
        settings = [seed, solver, steps]
        guidance = [interval_min, interval_max, precision]
        with gr.Tab("Grid"):
            generate = gr.Button("Generate", variant="primary")
            gallery = gr.Gallery(label="Samples", columns=4, format="png")
            info = gr.Markdown()
        with gr.Tab("Side by side"):
            compare = gr.Button("Compare with the paper's sampler")
            with gr.Row():
                paper_image = gr.Image(label=f"{PAPER}, 50 steps", format="png")
                fast_image = gr.Image(label="Chosen solver", format="png")
            compare_info = gr.Markdown()
        with gr.Tab("Guidance sweep"):
            scales = gr.Textbox("1.0, 1.5, 2.0, 3.0, 4.0", label="Guidance scales")
            sweep = gr.Button("Sweep")
            row = gr.Gallery(label="One image per scale", columns=6, format="png")
        generate.click(shown_in_page(demo.grid), [chosen, typed, per_class, *settings, guidance_scale, *guidance],
                       [gallery, info], api_name="grid")
        compare.click(shown_in_page(demo.side_by_side), [chosen, typed, *settings, guidance_scale, *guidance],
                      [paper_image, fast_image, compare_info], api_name="side_by_side")
        sweep.click(shown_in_page(demo.sweep), [chosen, typed, *settings, scales, *guidance], row, api_name="sweep")
    return app


def main(argv=None) -> int:
    parser = OneLineArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", default=os.environ.get("PIXELREPA_MODEL"),
                        help="A pipeline folder or Hub id (default: the PIXELREPA_MODEL environment variable).")
    parser.add_argument("--server_name", default="127.0.0.1", help="Address to serve on (0.0.0.0 in a Space).")
    parser.add_argument("--server_port", type=int, default=7860)
    args = parser.parse_args(argv)
    if args.pretrained_model_name_or_path is None:
        parser.error("--pretrained_model_name_or_path (or PIXELREPA_MODEL) is required")
    try:
        pipeline = PixelREPAPipeline.from_pretrained(args.pretrained_model_name_or_path)
    except (OSError, ValueError) as error:
        print(f"demo.py: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    pipeline.set_progress_bar_config(desc="sampling")
    build_app(pipeline).queue().launch(server_name=args.server_name, server_port=args.server_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
