"""The GPU check of BENCHMARKS.md in one command: training and sampling speed, ours and official, and the bf16
deviation figures, written to <output_dir>/gpu_check.json and a short table (gpu_check.md, also printed).

    bash pipelines/gpu_check.sh --reference_repo PixelREPA --output_dir gpu_check

Runs, each a benchmark CLI in its own process (the official code patches torch globally), until --time_limit_s:
  train_b16          B/16 training, batch 128, bf16, compiled: img/s, MFU, peak memory; ours and the official step
  train_h16_ckpt     H/16 training, batch 128, bf16, compiled, gradient checkpointing (ours only)
  sample_official    B/16 sampling, batch 256, 50-step Heun with CFG: ours in the official regime against the official
                     code in its regime
  sample_<backend>   the fast path (bf16 weights, regional compile) with each attention backend that runs here,
                     against the official regime
  deviation_<name>   bf16 weights, precision official and bf16_sdpa against fp32 samples from the same noise
With --released_model (a converted release, e.g. PixelREPA-B-16) and --fid_statistics_file, two more:
  search_released    pixelrepa-search-solver on it: 10 evaluations, 256 search samples, Heun-100 teacher, gradient
                     checkpointing, timed
                     (skipped when <output_dir>/searched-10 exists, as on a rerun)
  fid_searched       evaluate.py's FID and IS of that searched solver, --fid_num_images images; its shards resume,
                     so a run stopped at the time limit goes on where it stopped when the check is run again
A run that would pass the time limit is stopped and recorded as such. `--tiny` runs the same plan on the tiny test
model without compiling (a dry run of this script on any machine).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers.models.attention_dispatch import attention_backend

from pipelines.benchmark_utils import TINY_CONFIG, TINY_ENCODER, format_bytes
from pixelrepa_diffusers import JiTTransformer2DModel
from pixelrepa_diffusers.commands import OneLineArgumentParser

REPO = Path(__file__).resolve().parents[1]
# Backends of diffusers' dispatch worth timing on a Hopper GPU; those whose package or kernel is missing are skipped.
CANDIDATE_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "_flash_3", "sage",
                      "xformers")
H100_PEAK_TFLOPS = 989.0


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_repo", default=None,
                        help="official kaist-cvml/PixelREPA checkout; without it the baselines are our plain ones")
    parser.add_argument("--output_dir", default="gpu_check")
    parser.add_argument("--peak_tflops", type=float, default=H100_PEAK_TFLOPS,
                        help="the GPU's dense bf16 peak for MFU (H100 SXM 989; H200 the same)")
    parser.add_argument("--time_limit_s", type=float, default=570.0, help="no run goes past this, all runs together")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model and batch sizes (a dry run)")
    parser.add_argument("--released_model", default=None,
                        help="a converted release (pipeline folder) to search a 10-evaluation solver for and measure")
    parser.add_argument("--fid_statistics_file", default=None, help="the reference statistics for fid_searched")
    parser.add_argument("--fid_num_images", type=int, default=50_000, help="images of fid_searched")
    return parser.parse_args(argv)


def available_backends(device: torch.device, candidates=CANDIDATE_BACKENDS) -> dict[str, str]:
    """Each candidate backend: "ok" if a tiny bf16 transformer forward runs with it on `device`, else why not."""
    model = JiTTransformer2DModel(**TINY_CONFIG).to(device=device, dtype=torch.bfloat16).eval()
    x = torch.randn(2, 3, 32, 32, device=device, dtype=torch.bfloat16)
    t, y = torch.rand(2, device=device), torch.tensor([1, 2], device=device)
    status = {}
    for name in candidates:
        with attention_backend("native"):
            try:
                model.set_attention_backend(name)
                with torch.no_grad():
                    model(x, t, y)
                status[name] = "ok"
            except (RuntimeError, ValueError, ImportError) as error:
                status[name] = str(error).strip().splitlines()[0]
    return status


def plan(args, backends) -> dict[str, list[str]]:
    """Run name -> Python arguments (`-m` and the benchmark module first), in the order they run."""
    device = ["--device", args.device]
    reference = [] if args.reference_repo is None else ["--reference_repo", args.reference_repo]
    if args.tiny:
        model = ["--config_overrides", json.dumps(TINY_CONFIG)]
        train = [*model, "--encoder_overrides", json.dumps(TINY_ENCODER), "--batch_size", "2", "--steps", "1",
                 "--repeats", "1", "--warmup", "1"]
        big_train = train
        sample = [*model, "--batch_size", "2", "--num_inference_steps", "3", "--repeats", "1", "--warmup", "0"]
        deviation = sample
    else:
        train = ["--model", "JiT-B/16", "--batch_size", "128", "--steps", "10", "--repeats", "3", "--warmup", "3"]
        big_train = ["--model", "JiT-H/16", "--batch_size", "128", "--steps", "5", "--repeats", "2", "--warmup", "2"]
        sample = ["--model", "JiT-B/16", "--batch_size", "256", "--num_inference_steps", "50", "--guidance_scale",
                  "3.1", "--repeats", "2", "--warmup", "1"]
        deviation = ["--model", "JiT-B/16", "--batch_size", "64", "--num_inference_steps", "50", "--guidance_scale",
                     "3.1", "--repeats", "1", "--warmup", "0"]
    compile_flag = [] if args.tiny else ["--compile"]  # compiling is a GPU matter; the dry run skips it
    training = ["-m", "training.benchmark_training", "--mixed_precision", "bf16", *compile_flag, "--peak_tflops",
                str(args.peak_tflops), *device]
    sampling = ["-m", "pipelines.benchmark_sampling", *device]
    runs = {
        "train_b16": [*training, *train, *reference],
        "train_h16_ckpt": [*training, *big_train, "--gradient_checkpointing", "--skip_baseline"],
        "sample_official": [*sampling, *sample, "--precision", "official", "--baseline_dtype", "bf16", *reference],
    }
    for name, state in backends.items():
        if state == "ok":
            runs[f"sample_{name}"] = [*sampling, *sample, "--dtype", "bf16", *compile_flag, "--attention_backend",
                                      name, "--baseline_dtype", "bf16"]
    for name, regime in (("bf16_weights", ["--dtype", "bf16"]), ("official", ["--precision", "official"]),
                         ("bf16_sdpa", ["--precision", "bf16_sdpa"])):
        runs[f"deviation_{name}"] = [*sampling, *deviation, *regime, "--baseline_dtype", "fp32"]
    if args.released_model is not None:
        searched = str(Path(args.output_dir) / "searched-10")
        if not Path(searched).exists():
            runs["search_released"] = ["-m", "pixelrepa_diffusers.commands.search_solver",
                                       "--pretrained_model_name_or_path", args.released_model, "--output_dir", searched,
                                       "--num_inference_steps", "10", "--num_samples", "256", "--teacher_steps", "100",
                                       "--gradient_checkpointing", *device]
        runs["fid_searched"] = ["-m", "pixelrepa_diffusers.commands.evaluate", "--pretrained_model_name_or_path",
                                searched, "--fid_statistics_file", args.fid_statistics_file, "--num_images",
                                str(args.fid_num_images), "--batch_size", "256", "--num_inference_steps", "10"]
    return runs


def run_all(runs: dict[str, list[str]], output_dir: Path, time_limit_s: float) -> dict:
    """Runs each CLI with --output_json in output_dir; its results, or why there are none."""
    started = time.monotonic()
    results = {}
    for name, command in runs.items():
        remaining = time_limit_s - (time.monotonic() - started)
        if remaining <= 0:
            results[name] = {"skipped": f"the time limit of {time_limit_s:.0f} s was reached"}
            continue
        output = output_dir / f"{name}.json"
        try:
            completed = subprocess.run([sys.executable, *command, "--output_json", str(output)], cwd=REPO,
                                       capture_output=True, text=True, timeout=remaining)
        except subprocess.TimeoutExpired:
            results[name] = {"skipped": f"stopped at the time limit of {time_limit_s:.0f} s"}
            continue
        if completed.returncode != 0:
            results[name] = {"error": (completed.stderr.strip().splitlines() or ["no output"])[-1]}
            continue
        results[name] = json.loads(output.read_text())
    return results


def summary_rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(run, ours img/s, baseline img/s, MFU or deviation, peak memory ours / baseline) per run, as text."""
    rows = []
    for name, result in results.items():
        if "rms_after" in result:
            rows.append((name, "-", "-", f"RMS to Heun-100 {result['rms_before']:.4f} (multistep2) -> "
                                         f"{result['rms_after']:.4f} in {result['seconds']:.0f} s", "-"))
            continue
        if "results" in result:
            metrics = result["results"][0]
            rows.append((name, "-", "-", f"FID {metrics['fid']:.2f}, IS {metrics['inception_score_mean']:.1f} "
                                         f"({result['arguments']['num_images']} images)", "-"))
            continue
        if "ours" not in result:
            rows.append((name, "-", "-", result.get("error") or result.get("skipped"), "-"))
            continue
        ours, baseline = result["ours"], result.get("baseline")
        if name.startswith("deviation_"):
            extra = (f"mean {result['mean_image_difference']:.2e}, max {result['max_image_difference']:.2e}, "
                     f"rel L2 {result['relative_image_difference']:.2e}")
        elif "mfu" in ours:
            extra = "MFU " + " / ".join("-" if entry["mfu"] is None else f"{entry['mfu']:.1%}"
                                        for entry in (ours, baseline) if entry is not None)
        else:
            extra = f"rel L2 to baseline {result['relative_image_difference']:.2e}"
        memory = " / ".join(format_bytes(entry["peak_bytes"]) for entry in (ours, baseline) if entry is not None)
        rows.append((name, f"{ours['images_per_second']:.1f}",
                     "-" if baseline is None else f"{baseline['images_per_second']:.1f}", extra, memory))
    return rows


def table(rows) -> str:
    lines = ["| run | ours img/s | baseline img/s | MFU (ours / baseline) or deviation | peak memory (ours / baseline) "
             "|", "|---|---|---|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.time_limit_s <= 0:
        print(f"error: --time_limit_s must be > 0, got {args.time_limit_s}", file=sys.stderr)
        return 1
    if args.reference_repo is not None and not Path(args.reference_repo).exists():
        print(f"error: --reference_repo {args.reference_repo} does not exist", file=sys.stderr)
        return 1
    if (args.released_model is None) != (args.fid_statistics_file is None):
        print("error: --released_model and --fid_statistics_file go together (the FID of the searched solver needs "
              "both)", file=sys.stderr)
        return 1
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    backends = available_backends(torch.device(args.device))
    results = run_all(plan(args, backends), output_dir, args.time_limit_s - (time.monotonic() - started))
    summary = dict(device=args.device, tiny=args.tiny, reference_repo=args.reference_repo, backends=backends,
                   elapsed_seconds=time.monotonic() - started, runs=results)
    (output_dir / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    text = table(summary_rows(results))
    (output_dir / "gpu_check.md").write_text(text)
    print(text, end="")
    print(f"wrote {output_dir / 'gpu_check.json'} and gpu_check.md in {summary['elapsed_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
