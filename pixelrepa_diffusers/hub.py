"""Model cards and Hub publishing for PixelREPA / JiT pipelines."""

import importlib
import importlib.resources
import json
import re
from dataclasses import dataclass
from pathlib import Path

import diffusers
import httpx2
import torch
from diffusers.utils import make_image_grid
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from . import modular_pixelrepa
from .alignment import ALIGNMENTS
from .scheduling_jit_flow_match import GUIDANCE_INTERVAL, JiTFlowMatchScheduler, check_guidance_interval
from .transformer_jit import JIT_PRESETS

# The repository's model_cards/ folder, installed as package data (see pyproject.toml).
TEMPLATE_PATH = Path(str(importlib.resources.files("pixelrepa_diffusers.model_cards") / "template.md"))
# The card's sample grid, in the pipeline folder and the repo.
SAMPLE_GRID_FILE = "samples.png"
# The method of each --alignment choice (alignment.ALIGNMENTS) as model cards name it.
CARD_METHODS = {"none": "JiT", "repa": "JiT+REPA", "pixelrepa": "PixelREPA"}
PAPERS = {
    "PixelREPA": ("the PixelREPA paper (arXiv 2603.14366)", "https://arxiv.org/abs/2603.14366"),
    "JiT": ("the JiT paper (arXiv 2511.13720)", "https://arxiv.org/abs/2511.13720"),
}
# Official 600-epoch ImageNet checkpoints by (method, backbone), with their names: FID-50K (and IS where published)
# as the papers report them, and the sampler settings of the authors' evaluation commands (PixelREPA README; JiT
# README for its pre-trained models): Heun, 50 steps, guidance interval [0.1, 1.0], noise scale 1.0 at 256 px and
# 2.0 at 512 px. Parameter counts exclude the mask_token.
CARD_VARIANTS = {
    ("PixelREPA", "JiT-B/16"): dict(name="PixelREPA-B/16", params="131M", guidance_scale=3.1, noise_scale=1.0,
                                    fid=3.17, inception_score=284.6),
    ("PixelREPA", "JiT-L/16"): dict(name="PixelREPA-L/16", params="459M", guidance_scale=2.8, noise_scale=1.0,
                                    fid=2.11, inception_score=309.5),
    ("PixelREPA", "JiT-H/16"): dict(name="PixelREPA-H/16", params="953M", guidance_scale=2.4, noise_scale=1.0,
                                    fid=1.81, inception_score=317.2),
    ("JiT", "JiT-B/16"): dict(name="JiT-B/16", params="131M", guidance_scale=3.0, noise_scale=1.0,
                              fid=3.66, inception_score=275.1),
    ("JiT", "JiT-L/16"): dict(name="JiT-L/16", params="459M", guidance_scale=2.4, noise_scale=1.0,
                              fid=2.36, inception_score=298.5),
    ("JiT", "JiT-H/16"): dict(name="JiT-H/16", params="953M", guidance_scale=2.2, noise_scale=1.0,
                              fid=1.86, inception_score=303.4),
    ("JiT", "JiT-B/32"): dict(name="JiT-B/32", params="133M", guidance_scale=3.0, noise_scale=2.0,
                              fid=4.02, inception_score=None),
    ("JiT", "JiT-L/32"): dict(name="JiT-L/32", params="462M", guidance_scale=2.5, noise_scale=2.0,
                              fid=2.53, inception_score=None),
    ("JiT", "JiT-H/32"): dict(name="JiT-H/32", params="956M", guidance_scale=2.3, noise_scale=2.0,
                              fid=1.94, inception_score=None),
}
# The (method, backbone) of each CARD_VARIANTS entry by its name, e.g. "PixelREPA-B/16" -> ("PixelREPA", "JiT-B/16").
VARIANT_KEYS = {spec["name"]: key for key, spec in CARD_VARIANTS.items()}
NUM_INFERENCE_STEPS = 50
# The weights a converted checkpoint can hold, as the card names them; the papers' metrics are of ema1.
WEIGHTS_DESCRIPTIONS = {"ema1": "EMA 0.9999", "ema2": "EMA 0.9996", "model": "the raw training weights, no EMA"}

PACKAGE = __name__.split(".")[0]
RELATIVE_IMPORT = re.compile(r"^(\s*from\s+)\.(\w+)(\s+import\s)", re.MULTILINE)
PACKAGE_IMPORT = re.compile(rf"^\s*(from|import)\s+{PACKAGE}\b", re.MULTILINE)
UPLOADED_SUFFIXES = (".safetensors", ".json")
# Model folders that are not pipeline components but belong with the weights: the aligners that training exports
# (the PixelREPA adapter, also written by the converter), so training can continue from a published checkpoint.
EXTRA_MODEL_FOLDERS = tuple(method.folder for method in ALIGNMENTS.values() if method.exports_aligner)


@dataclass(frozen=True)
class CardSettings:
    """
    What the model card of a pipeline says of the model, its training and its sampling (see `render_model_card`).

    Args:
        model_name: card title, e.g. "PixelREPA-B/16".
        repo_id: Hub id shown in the usage snippet.
        method: "JiT", "JiT+REPA" or "PixelREPA" (a value of `CARD_METHODS`): how the backbone was trained.
        architecture: the transformer's config (sample_size, patch_size, hidden_size, num_layers,
            num_attention_heads, bottleneck_dim, in_context_start, num_classes).
        training: the training recipe, shown as a table of setting -> value.
        weights_source: one sentence saying where the weights come from.
        guidance_scale, guidance_interval, num_inference_steps, solver, noise_scale: the sampling settings.
        dataset: Hub dataset id of the training data; None (e.g. a local folder) leaves it out of the metadata.
        fid, inception_score: FID-50K and optionally IS, given with `metrics_source`, which says who measured them
            (e.g. "as reported by the PixelREPA paper"), and `metrics_source_url`, where (the Hub's eval results
            need both); optionally `fid_statistics` (the reference statistics file, e.g.
            "fid_stats/jit_in256_stats.npz").
        license: license id of the weights.
    """

    model_name: str
    repo_id: str
    method: str
    architecture: dict
    training: dict
    weights_source: str
    guidance_scale: float
    guidance_interval: tuple[float, float] = GUIDANCE_INTERVAL
    num_inference_steps: int = NUM_INFERENCE_STEPS
    solver: str = "heun"
    noise_scale: float = 1.0
    dataset: str | None = "imagenet-1k"
    fid: float | None = None
    inception_score: float | None = None
    fid_statistics: str | None = None
    metrics_source: str | None = None
    metrics_source_url: str | None = None
    license: str = "mit"

    def __post_init__(self):
        methods = tuple(CARD_METHODS.values())
        if self.method not in methods:
            raise ValueError(f"method must be one of {methods}, got {self.method!r}.")
        if self.solver not in JiTFlowMatchScheduler.SOLVERS:
            raise ValueError(f"solver must be one of {JiTFlowMatchScheduler.SOLVERS}, got {self.solver!r}.")
        check_guidance_interval(self.guidance_interval)
        if not (self.fid is None) == (self.metrics_source is None) == (self.metrics_source_url is None):
            raise ValueError("fid, metrics_source and metrics_source_url must be given together, or all left out.")
        if self.fid is None and (self.inception_score is not None or self.fid_statistics is not None):
            raise ValueError("inception_score and fid_statistics need fid.")
        if self.fid is not None and self.dataset is None:
            raise ValueError("fid and inception_score need the Hub dataset id they were measured on (dataset).")


def render_model_card(settings: CardSettings, sample_grid: dict | None = None) -> ModelCard:
    """
    The model card (README.md) of a pipeline, filled from model_cards/template.md; with `sample_grid` (what
    `write_sample_grid` returned) it shows that grid.
    """
    return ModelCard.from_template(
        card_metadata(settings),
        template_path=str(TEMPLATE_PATH),
        **card_description(settings),
        samples_section="" if sample_grid is None else sample_grid_markdown(sample_grid),
        **card_sampling(settings),
        **card_results(settings),
        architecture=settings.architecture,
        training=settings.training,
    )


def card_metadata(settings: CardSettings) -> ModelCardData:
    """The card's metadata header: library, task, license, dataset, tags and the reported metrics."""
    return ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=settings.license,
        datasets=None if settings.dataset is None else [settings.dataset],
        tags=["pixelrepa-diffusers", *settings.method.lower().split("+"), "class-conditional", "pixel-space-diffusion"],
        model_name=settings.model_name,
        eval_results=card_eval_results(settings),
    )


def card_eval_results(settings: CardSettings) -> list[EvalResult] | None:
    """The metadata's FID-50K and IS results (None without metrics)."""
    if settings.fid is None:
        return None
    resolution = settings.architecture["sample_size"]
    return [
        EvalResult(
            task_type="unconditional-image-generation",
            task_name="Class-conditional image generation",
            dataset_type=settings.dataset,
            dataset_name=f"{settings.dataset} {resolution}x{resolution}",
            metric_type=metric_type,
            metric_name=metric_name,
            metric_value=value,
            source_name=settings.metrics_source,
            source_url=settings.metrics_source_url,
        )
        for metric_type, metric_name, value in (
            ("fid", "FID-50K", settings.fid),
            ("inception_score", "Inception Score", settings.inception_score),
        )
        if value is not None
    ]


def card_description(settings: CardSettings) -> dict:
    """The template values of the card's title, description and usage snippet."""
    num_classes = settings.architecture["num_classes"]
    return dict(
        model_name=settings.model_name,
        method=settings.method,
        resolution=settings.architecture["sample_size"],
        num_classes=num_classes,
        weights_source=settings.weights_source,
        repo_id=settings.repo_id,
        example_labels=list(range(min(4, num_classes))),
    )


def card_sampling(settings: CardSettings) -> dict:
    """The template values of the card's Sampling settings table."""
    return dict(
        solver_label=JiTFlowMatchScheduler.SOLVER_LABELS[settings.solver],
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        guidance_interval=settings.guidance_interval,
        noise_scale=settings.noise_scale,
    )


def card_results(settings: CardSettings) -> dict:
    """The template values of the card's Results section (shown only with an FID)."""
    return dict(
        fid=settings.fid,
        inception_score=settings.inception_score,
        fid_statistics=settings.fid_statistics,
        metrics_source_link=(None if settings.fid is None
                             else f"[{settings.metrics_source}]({settings.metrics_source_url})"),
    )


def sample_grid_markdown(grid: dict) -> str:
    """The card's Samples section, placed before its Sampling settings, for a grid written by write_sample_grid."""
    classes = ", ".join(str(label) for label in grid["class_labels"])
    seeds = ", ".join(str(seed) for seed in grid["seeds"])
    return (f"## Samples\n\n![Samples of classes {classes}]({grid['file']})\n\n"
            f"One row per class ({classes}), one column per seed ({seeds}): `pipe(class_labels, "
            f"generator=[torch.Generator().manual_seed(seed), ...])` with the settings below "
            f"({grid['solver_label']}).\n\n")


def write_sample_grid(pipeline, folder: str | Path, class_labels: list[int | str], seeds: list[int]) -> dict:
    """
    Samples each class (none given: the first 4) with each seed by the pipeline's own sampler and settings (its
    scheduler, 50 steps, its guidance), writes them as one grid to folder/SAMPLE_GRID_FILE (a row per class, a column
    per seed) and returns what the card says of it (`render_model_card(sample_grid=...)`).
    """
    class_labels = list(class_labels) or list(range(min(4, pipeline.transformer.config.num_classes)))
    labels = [label for label in class_labels for _ in seeds]
    generators = [torch.Generator().manual_seed(seed) for _ in class_labels for seed in seeds]
    images = pipeline(labels, generator=generators).images
    make_image_grid(images, rows=len(class_labels), cols=len(seeds)).save(Path(folder) / SAMPLE_GRID_FILE)
    return dict(file=SAMPLE_GRID_FILE, class_labels=list(class_labels), seeds=list(seeds),
                solver_label=JiTFlowMatchScheduler.SOLVER_LABELS[pipeline.scheduler.config.solver])


def training_recipe(
    *,
    data: str,
    optimizer: str,
    learning_rate: str,
    p_mean: float,
    p_std: float,
    t_eps: float,
    noise_scale: float,
    label_dropout: str,
    ema: str,
    precision: str,
    epochs: str | None = None,
    steps: str | None = None,
    dropout: str | None = None,
    alignment: str | None = None,
) -> dict:
    """The training-recipe table of a model card (setting -> value); the run's length in `epochs` or `steps`."""
    if (epochs is None) == (steps is None):
        raise ValueError("pass exactly one of epochs and steps.")
    recipe = {"Data": data}
    recipe.update({"Epochs": epochs} if steps is None else {"Steps": steps})
    recipe.update({
        "Optimizer": optimizer,
        "Learning rate": learning_rate,
        "Diffusion": f"x-prediction with v-loss; t = sigmoid(N({p_mean}, {p_std}^2)); t_eps {t_eps}; "
                     f"noise scale {noise_scale}",
        "Label dropout": label_dropout,
    })
    if dropout is not None:
        recipe["Dropout"] = dropout
    recipe.update({"EMA": ema, "Precision": precision})
    if alignment is not None:
        recipe["Alignment"] = alignment
    return recipe


def alignment_card_text(
    alignment: str, depth: int, mask_ratio: float, encoder: str, weight: float | None
) -> str | None:
    """The "Alignment" row of the card of a model trained with the --alignment choice `alignment` (None for "none")."""
    if alignment == "repa":
        return f"MLP projector on the tokens after block {depth}, cosine loss to {encoder}, weight {weight}"
    if alignment == "pixelrepa":
        return (f"Masked Transformer Adapter on the tokens after block {depth}, {mask_ratio:.0%} masked, cosine loss "
                f"to {encoder}, weight {weight}")
    return None


def released_variant(alignment: str, backbone: str) -> dict | None:
    """
    The released variant (`CARD_VARIANTS` entry) whose guidance scale a run of the --alignment choice `alignment` on
    `backbone` defaults to: its method's, or plain JiT's for a method with none released (REPA); None where there is
    no such variant of `backbone`.
    """
    method = CARD_METHODS[alignment]
    if method not in {released for released, _ in CARD_VARIANTS}:
        method = CARD_METHODS["none"]
    return CARD_VARIANTS.get((method, backbone))


def paper_recipe(method: str, backbone: str) -> dict:
    """The official 600-epoch ImageNet training recipe of a variant, as a card table."""
    resolution = JIT_PRESETS[backbone]["sample_size"]
    dropout = "0"
    if backbone == "JiT-H/16":
        dropout = "projection dropout 0.2 on the middle half of the blocks"
    elif backbone == "JiT-H/32":
        dropout = "as in the checkpoint's args (the JiT README gives projection dropout 0.2 for JiT-H/16 only)"
    alignment = None
    if method == "PixelREPA":
        alignment = (
            "Masked Transformer Adapter (2 JiT blocks) on the backbone's tokens after block "
            f"{JIT_PRESETS[backbone]['in_context_start']}, 20% of tokens masked, cosine loss to frozen DINOv2 "
            "ViT-B/14 patch tokens, weight 0.1"
        )
    return training_recipe(
        data=f"ImageNet-1k train, ADM center crop to {resolution} px, random horizontal flip, pixels in [-1, 1]",
        epochs="600 (8 GPUs, global batch 1024)",
        optimizer="AdamW, betas (0.9, 0.95), weight decay 0, no gradient clipping",
        learning_rate="2e-4 (base 5e-5 x 1024 / 256), 5 linear warm-up epochs, then constant",
        p_mean=-0.8,
        p_std=0.8,
        t_eps=0.05,
        noise_scale={256: 1.0, 512: 2.0}[resolution],
        label_dropout="0.1 (null class for guidance)",
        dropout=dropout,
        ema="0.9999 and 0.9996",
        precision="bf16 autocast",
        alignment=alignment,
    )


def variant_card_settings(variant: str, repo_id: str, weights: str = "ema1") -> CardSettings:
    """
    The card settings of a converted official checkpoint of the `CARD_VARIANTS` entry named `variant`,
    holding `weights` (ema1, ema2 or model); the papers' metrics are shown only for ema1, the weights they were
    measured with.
    """
    if variant not in VARIANT_KEYS:
        raise ValueError(f"Unknown card variant {variant!r}; expected one of {sorted(VARIANT_KEYS)}.")
    if weights not in WEIGHTS_DESCRIPTIONS:
        raise ValueError(f"weights must be one of {sorted(WEIGHTS_DESCRIPTIONS)}, got {weights!r}.")
    method, backbone = VARIANT_KEYS[variant]
    spec = CARD_VARIANTS[method, backbone]
    paper_name, paper_url = PAPERS[method]
    resolution = JIT_PRESETS[backbone]["sample_size"]
    metrics = {}
    if weights == "ema1":
        metrics = dict(
            fid=spec["fid"],
            inception_score=spec["inception_score"],
            fid_statistics=f"fid_stats/jit_in{resolution}_stats.npz",
            metrics_source=f"as reported by {paper_name}",
            metrics_source_url=paper_url,
        )
    return CardSettings(
        model_name=variant,
        repo_id=repo_id,
        method=method,
        architecture={**JIT_PRESETS[backbone], "num_classes": 1000},
        training=paper_recipe(method, backbone),
        weights_source=(
            f"The weights ({spec['params']} parameters) are the authors' official 600-epoch checkpoint "
            f"({WEIGHTS_DESCRIPTIONS[weights]}), converted to diffusers format with pixelrepa-diffusers."
        ),
        guidance_scale=spec["guidance_scale"],
        guidance_interval=GUIDANCE_INTERVAL,
        num_inference_steps=NUM_INFERENCE_STEPS,
        solver="heun",
        noise_scale=spec["noise_scale"],
        **metrics,
    )


def write_variant_cards(directory: str | Path = TEMPLATE_PATH.parent) -> list[Path]:
    """Renders the card of every `CARD_VARIANTS` entry to `<directory>/<variant>.md` (the copies in model_cards/)."""
    paths = []
    for variant in VARIANT_KEYS:
        path = Path(directory) / f"{variant.replace('/', '-')}.md"
        render_model_card(variant_card_settings(variant, f"<user>/{path.stem}")).save(path)
        paths.append(path)
    return paths


def remote_code_files(model_index: dict) -> tuple[dict, dict[str, bytes]]:
    """
    The model index and module files that let diffusers alone load a pipeline with `trust_remote_code=True`.

    Each component's module is published as `<component>/<module>.py` and named [<module>, <class>] in the model
    index; the pipeline's module goes to the repo root and `_class_name` becomes [<module>, <class>]. The files are
    this package's installed source, with the pipeline's relative imports pointed at the component folders. The
    index's `auto_map` names the transformer's class for `AutoModel.from_pretrained(repo, subfolder="transformer")`,
    which reads it there when the repo has a model index.
    """
    hub_index = dict(model_index)
    sources = {}  # path in the repo -> source
    for component in components(model_index):
        library, class_name = model_index[component]
        path = defining_file(library, class_name, f"model_index.json entry {component!r}")
        sources[f"{component}/{path.name}"] = path.read_text()
        if RELATIVE_IMPORT.search(sources[f"{component}/{path.name}"]):
            raise ValueError(f"{path.name} imports a sibling module; a published component module must stand alone.")
        hub_index[component] = [path.stem, class_name]
    pipeline_path = defining_file(PACKAGE, model_index.get("_class_name"), "model_index.json _class_name")
    hub_index["_class_name"] = [pipeline_path.stem, model_index["_class_name"]]
    hub_index["auto_map"] = {"AutoModel": ".".join(hub_index["transformer"])}
    sources[pipeline_path.name] = published_source(pipeline_path, hub_index)
    check_standalone(sources)
    return hub_index, {path: source.encode() for path, source in sources.items()}


def modular_files(folder: Path, hub_index: dict, repo_id: str) -> dict[str, bytes]:
    """
    The files that let diffusers alone build a `ModularPipeline` of `modular_pixelrepa.PixelREPABlocks` with
    `ModularPipeline.from_pretrained(repo_id, trust_remote_code=True)`: the blocks module at the repo root (this
    package's installed source, relative imports pointed at the component folders), `modular_config.json` naming its
    blocks class, and `modular_model_index.json` with the pipeline's config, the scheduler's config and the
    transformer, which `load_components(trust_remote_code=True)` loads from `repo_id` with `AutoModel`.
    """
    blocks_path = Path(modular_pixelrepa.__file__)
    blocks_class = modular_pixelrepa.PixelREPABlocks
    model_index = json.loads((folder / "model_index.json").read_text())
    configs = {key: value for key, value in model_index.items()
               if not key.startswith("_") and key not in components(model_index)}
    configs["scheduler_config"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    expected = sorted(spec.name for spec in blocks_class().expected_configs)
    if sorted(configs) != expected:
        raise ValueError(f"{blocks_class.__name__} takes the configs {expected}, but the pipeline folder {folder} "
                         f"gives {sorted(configs)}; update {blocks_path.name} to match the pipeline.")
    transformer = dict(type_hint=[None, None], pretrained_model_name_or_path=repo_id, subfolder="transformer",
                       variant=None, revision=None)
    source = published_source(blocks_path, hub_index)
    check_standalone({blocks_path.name: source})
    return {
        blocks_path.name: source.encode(),
        "modular_config.json": json_bytes({
            "_class_name": blocks_class.__name__,
            "_diffusers_version": diffusers.__version__,
            "auto_map": {"ModularPipelineBlocks": f"{blocks_path.stem}.{blocks_class.__name__}"},
        }),
        "modular_model_index.json": json_bytes({
            "_blocks_class_name": blocks_class.__name__,
            "_class_name": "ModularPipeline",
            "_diffusers_version": diffusers.__version__,
            "transformer": [None, None, transformer],
            **configs,
        }),
    }


def published_source(path: Path, hub_index: dict) -> str:
    """The source of a module published at the repo root, its relative imports pointed at the component folders."""
    published = {hub_index[name][0]: f"{name}.{hub_index[name][0]}" for name in components(hub_index)}

    def published_import(match: re.Match) -> str:
        if match.group(2) not in published:
            raise ValueError(f"{path.name} imports .{match.group(2)}, which no pipeline component publishes.")
        return f"{match.group(1)}.{published[match.group(2)]}{match.group(3)}"

    return RELATIVE_IMPORT.sub(published_import, path.read_text())


def check_standalone(sources: dict[str, str]) -> None:
    """Raises ValueError if a published module (path in the repo -> source) imports this package."""
    for path, source in sources.items():
        if PACKAGE_IMPORT.search(source):
            raise ValueError(f"{path} imports {PACKAGE}, which users of the remote code do not have.")


def json_bytes(config: dict) -> bytes:
    """A config as diffusers writes it: indented JSON with sorted keys."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def components(model_index: dict) -> list[str]:
    """The component names of a model index: its entries of the form [library, class name]."""
    return [
        key
        for key, value in model_index.items()
        if not key.startswith("_") and isinstance(value, list) and len(value) == 2
        and all(isinstance(item, str) for item in value)
    ]


def defining_file(library: str, class_name: str, where: str) -> Path:
    """The source file of this package that defines `library.class_name`."""
    if not (isinstance(class_name, str) and library.split(".")[0] == PACKAGE
            and hasattr(importlib.import_module(library), class_name)):
        raise ValueError(f"{where} names {library}.{class_name}; expected a class of {PACKAGE}.")
    return Path(importlib.import_module(getattr(importlib.import_module(library), class_name).__module__).__file__)


def upload_operations(folder: str | Path, repo_id: str, card: ModelCard | None = None) -> list[CommitOperationAdd]:
    """
    Everything the pipeline repo `repo_id` needs and nothing else: the card (`card`, else the folder's README.md),
    the remote-code model index and modules, the modular pipeline's files, and the json configs and safetensors
    weights of each component and extra model folder (which the model index tells diffusers not to download). The
    published `transformer/config.json` gains the index's `auto_map`, for `AutoModel`. Files in `folder` are only
    read.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"pipeline_dir {folder} has no model_index.json; expected a saved pipeline folder.")
    if card is None:
        if not (folder / "README.md").is_file():
            raise ValueError(f"pipeline_dir {folder} has no README.md; pass a card (see render_model_card).")
        card = ModelCard.load(folder / "README.md")
    hub_index, module_files = remote_code_files(json.loads((folder / "model_index.json").read_text()))
    extra_folders = [name for name in EXTRA_MODEL_FOLDERS if (folder / name).is_dir()]
    model_files = {}  # path in the repo -> local file
    for name in components(hub_index) + extra_folders:
        files = sorted(path for path in (folder / name).iterdir() if path.name.endswith(UPLOADED_SUFFIXES))
        if (folder / name / "config.json").is_file() and not any(path.suffix == ".safetensors" for path in files):
            raise ValueError(f"{folder / name} has no .safetensors weights; save it with safe_serialization=True.")
        model_files.update({f"{name}/{path.name}": path for path in files})
    hub_index["_ignore_files"] = sorted(path for path in model_files if path.split("/")[0] in extra_folders)
    transformer_config = json.loads(model_files["transformer/config.json"].read_text())
    written = {  # path in the repo -> content
        "README.md": str(card).encode(),
        "model_index.json": json_bytes(hub_index),
        **module_files,
        **modular_files(folder, hub_index, repo_id),
        "transformer/config.json": json_bytes({**transformer_config, "auto_map": hub_index["auto_map"]}),
    }
    if SAMPLE_GRID_FILE in card.text:
        if not (folder / SAMPLE_GRID_FILE).is_file():
            raise ValueError(f"The card shows {SAMPLE_GRID_FILE}, which {folder} lacks; write it with --sample_grid.")
        model_files[SAMPLE_GRID_FILE] = folder / SAMPLE_GRID_FILE
    return [
        *(CommitOperationAdd(path, content) for path, content in written.items()),
        *(CommitOperationAdd(path, str(local_path)) for path, local_path in model_files.items() if path not in written),
    ]


def push_pipeline_to_hub(
    folder: str | Path,
    repo_id: str,
    card: ModelCard | None = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload pipeline with pixelrepa-diffusers",
) -> str:
    """
    Uploads a saved pipeline folder to `repo_id` (created if missing) in one commit; returns the commit URL.

    The card is `card`, else the folder's README.md. Only what `upload_operations` lists is uploaded. The folder is
    only read, so a failed upload leaves it as it was.
    """
    operations = upload_operations(folder, repo_id, card)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=commit_message).commit_url
    except httpx2.TransportError as error:
        raise ConnectionError(f"Could not reach the Hugging Face Hub at {api.endpoint}: {error}") from error
