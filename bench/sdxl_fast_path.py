"""Full-size SDXL on one GPU, no downloads: plain diffusers against sdworker's fast path.

Builds the SDXL base architecture from the configs shipped in src/sdworker/engine/configs
with random weights (meta-device init, then filled on the device with a small std so fp16
stays finite), saves it as a diffusers folder, and times in one run, on those weights:

- baseline: plain diffusers StableDiffusionXLPipeline, fp16, SDPA, default settings;
- sdworker: the Engine with its fast path (settings from the environment, SDWORKER_*).

Figures: batch-1 latency end to end (text encoding and VAE decode included), throughput
at batch 4 and 8 (sdworker runs them as cross-job batches of 1-image jobs), peak device
memory at batch 1, achieved UNet TFLOP/s (FLOPs counted by torch's FlopCounterMode on the
real shapes), VAE decode time, host synchronisations inside the denoising loop, time to
ready (a fresh process: weights from disk onto the device, compiled, warmed; with a cold
and then a warm compile cache) and the fidelity of sdworker's image to the baseline's
for the same seed. Medians of --repeats runs after warm-up; CUDA synchronised.

    python bench/sdxl_fast_path.py                      # full size, needs a GPU
    python bench/sdxl_fast_path.py --config small       # the same code path on a CPU

--config small builds the tiny-sdxl architecture instead (CPU-sized, 256x256).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdworker.engine.engine import Engine
from sdworker.engine.models import CONFIGS_DIR
from sdworker.engine.tiny import clip_tokenizers, ensure_tiny_model
from sdworker.jobs import JobSpec
from sdworker.settings import Settings

PROMPT = "a lighthouse on a cliff at dusk, dramatic clouds, highly detailed"
SEED = 1234
CONFIGS = {
    # name: (size, steps, guidance, batch sizes for throughput)
    "full": (1024, 30, 7.5, (4, 8)),
    "small": (256, 30, 7.5, (4, 8)),
}


# --------------------------------------------------------------------------- weights


def _config_folder(config: str, cache_dir: Path) -> Path:
    if config == "full":
        return CONFIGS_DIR / "sdxl-base"
    return ensure_tiny_model("tiny-sdxl", cache_dir)  # only its config files are used


@torch.no_grad()
def _fill(model: torch.nn.Module, std: float, generator: torch.Generator) -> None:
    """Random weights that keep activations finite in fp16: matrices ~N(0, min(std,
    1/sqrt(fan_in))), norm scales 1, biases 0; CLIP's position ids rebuilt."""
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            param.normal_(0.0, min(std, fan_in**-0.5), generator=generator)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)
    for name, buffer in model.named_buffers():
        if name.endswith("position_ids"):
            buffer.copy_(torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer))


def build_random_sdxl(
    config: str, out: Path, device: torch.device, dtype: torch.dtype, cache_dir: Path
) -> dict[str, float]:
    """Write a diffusers SDXL folder with random weights; returns build timings."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    source = _config_folder(config, cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device).manual_seed(0)
    started = time.perf_counter()
    params = 0
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "unet": lambda: UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(source / "unet")
        ),
        "vae": lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(source / "vae")),
        "text_encoder": lambda: CLIPTextModel(
            CLIPTextConfig.from_pretrained(source / "text_encoder")
        ),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(source / "text_encoder_2")
        ),
    }
    fill_s = save_s = 0.0
    for name, build in builders.items():
        with torch.device("meta"):
            model = build()
        filled = time.perf_counter()
        model.to_empty(device=device)
        _fill(model, 0.02, generator)
        model.to(dtype)
        params += sum(p.numel() for p in model.parameters())
        saved = time.perf_counter()
        fill_s += saved - filled
        model.save_pretrained(out / name)
        save_s += time.perf_counter() - saved
        del model
    scheduler = EulerDiscreteScheduler.from_config(
        EulerDiscreteScheduler.load_config(source / "scheduler")
    )
    scheduler.save_pretrained(out / "scheduler")
    tokenizer, tokenizer_2 = clip_tokenizers()
    tokenizer.save_pretrained(out / "tokenizer")
    tokenizer_2.save_pretrained(out / "tokenizer_2")
    shutil.copy(source / "model_index.json", out / "model_index.json")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "params_billion": params / 1e9,
        "fill_s": fill_s,
        "save_s": save_s,
        "total_s": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, call: Callable[[], Any]) -> tuple[float, Any]:
    _sync(device)
    started = time.perf_counter()
    result = call()
    _sync(device)
    return time.perf_counter() - started, result


def _median_time(device: torch.device, call: Callable[[], Any], repeats: int) -> float:
    return statistics.median(_timed(device, call)[0] for _ in range(repeats))


def _unet_inputs(pipe: Any, size: int, batch: int) -> dict[str, Any]:
    """The tensors one CFG denoising step hands the UNet (batch x2 for guidance)."""
    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    latent = size // pipe.vae_scale_factor
    rows = 2 * batch
    text_dim = unet.config.cross_attention_dim
    pooled_dim = pipe.text_encoder_2.config.projection_dim
    return {
        "sample": torch.randn(rows, 4, latent, latent, device=device, dtype=dtype),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": torch.randn(rows, 77, text_dim, device=device, dtype=dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(rows, pooled_dim, device=device, dtype=dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * rows, device=device).to(
                dtype
            ),
        },
    }


def unet_flops(pipe: Any, size: int) -> int:
    """FLOPs of one CFG UNet call at batch 1 (two rows), counted on the real shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = _unet_inputs(pipe, size, 1)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        pipe.unet(**inputs)
    return int(counter.get_total_flops())


def unet_step_time(pipe: Any, size: int, device: torch.device, repeats: int) -> float:
    """Seconds per CFG UNet call at batch 1, the module as the pipeline runs it."""
    inputs = _unet_inputs(pipe, size, 1)
    with torch.inference_mode():
        for _ in range(2):
            pipe.unet(**inputs)
        return _median_time(device, lambda: pipe.unet(**inputs), repeats * 3)


def vae_decode_time(pipe: Any, size: int, device: torch.device, repeats: int) -> float:
    """Seconds to decode one image's latents, including the pipeline's own fp16 upcast
    when its VAE asks for one (diffusers converts the VAE to fp32 and back per call)."""
    vae = pipe.vae
    latents = (
        torch.randn(1, 4, size // 8, size // 8, device=device, dtype=pipe.unet.dtype)
        / vae.config.scaling_factor
    )

    def decode() -> Any:
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        out = vae.decode(latents.to(vae.dtype) if upcast else latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        return out

    with torch.inference_mode():
        decode()
        return _median_time(device, decode, repeats)


def host_syncs_in_loop(
    device: torch.device, run: Callable[[Callable[[int, int], None]], Any]
) -> int | None:
    """Synchronising CUDA calls made between the first and the last denoising step (CUDA's
    sync debug mode warns on each); None on a CPU."""
    if device.type != "cuda":
        return None
    marks: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def syncs() -> int:
            return sum("synchroniz" in str(w.message) for w in caught)

        def on_step(step: int, total: int) -> None:
            if step == 1:
                marks["first"] = syncs()
            if step == total:
                marks["last"] = syncs()

        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(on_step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return marks.get("last", 0) - marks.get("first", 0)


def _image_array(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def fidelity(reference: Any, candidate: Any) -> dict[str, float]:
    """Pixel differences (0-255) and PSNR of the fast path's image against the baseline's."""
    a, b = _image_array(reference), _image_array(candidate)
    diff = np.abs(a - b)
    mse = float((diff**2).mean())
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "psnr_db": float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse),
    }


# --------------------------------------------------------------------------- contenders


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def _spec(size: int, steps: int, guidance: float, seed: int, prompt: str = PROMPT) -> JobSpec:
    return JobSpec(
        prompt=prompt,
        size=f"{size}x{size}",
        steps=steps,
        guidance_scale=guidance,
        scheduler="euler",
        seed=seed,
    )


class Baseline:
    """Plain diffusers, default settings."""

    name = "diffusers"

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype, config: str):
        from diffusers import StableDiffusionXLPipeline

        self.size, self.steps, self.guidance, _ = CONFIGS[config]
        self.load_s, self.pipe = _timed(
            device,
            lambda: StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype).to(device),
        )
        self.pipe.set_progress_bar_config(disable=True)

    def generate(self, batch: int, on_step: Callable[[int, int], None] | None = None) -> Any:
        def step_end(_pipe: Any, index: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step(index + 1, self.steps)
            return kwargs

        return self.pipe(
            prompt=[f"{PROMPT} #{i}" if batch > 1 else PROMPT for i in range(batch)],
            width=self.size,
            height=self.size,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=_generators([SEED + i for i in range(batch)]),
            callback_on_step_end=step_end if on_step else None,
        ).images


class Sdworker:
    """sdworker's Engine; batches are cross-job batches of one-image jobs."""

    name = "sdworker"

    def __init__(self, folder: Path, device: torch.device, args: argparse.Namespace):
        self.size, self.steps, self.guidance, _ = CONFIGS[args.config]
        self.engine = Engine(engine_settings(folder, device, args))
        self.load_s, self.loaded = _timed(device, self.engine.load)
        self.pipe = self.loaded.pipelines.base

    def generate(self, batch: int, on_step: Callable[[int, int], None] | None = None) -> Any:
        if batch == 1:
            spec = _spec(self.size, self.steps, self.guidance, SEED)
            return self.engine.run(spec, on_step=on_step).images  # type: ignore[union-attr]
        specs = [
            _spec(self.size, self.steps, self.guidance, SEED + i, f"{PROMPT} #{i}")
            for i in range(batch)
        ]
        results = self.engine.run_batch(specs, on_step=on_step)
        return [image for result in results for image in result.images]  # type: ignore[union-attr]


def engine_settings(folder: Path, device: torch.device, args: argparse.Namespace) -> Settings:
    """Fast-path switches come from the environment (SDWORKER_COMPILE=..., etc.)."""
    return Settings(
        model=str(folder),
        device=str(device),
        dtype=args.dtype,
        cache_dir=args.work / "cache",
        compile_cache_dir=args.work / "compile-cache",
        max_num_images=64,
    )


def peak_memory_gb(device: torch.device, run: Callable[[], Any], resident: int) -> float | None:
    """Most device memory held while `run` ran, less `resident` bytes that belong to the
    other contender (loaded at the same time)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - resident) / 1e9


def measure(
    contenders: list[Any], device: torch.device, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Interleaved timings: each repeat runs every contender once, so drift in clocks or
    load hits both alike."""
    size, _steps, _guidance, batches = CONFIGS[args.config]
    figures: dict[str, dict[str, Any]] = {c.name: {"load_s": c.load_s} for c in contenders}
    for contender in contenders:
        for batch in (1, *batches):  # warm-up; a new batch size may compile once more
            for _ in range(args.warmup if batch == 1 else 1):
                contender.generate(batch)
    cases = [(1, args.repeats)] + [(b, max(1, args.repeats // 2)) for b in batches]
    for batch, repeats in cases:
        times: dict[str, list[float]] = {c.name: [] for c in contenders}
        for _ in range(repeats):
            for contender in contenders:
                seconds, _ = _timed(device, lambda c=contender, b=batch: c.generate(b))
                times[contender.name].append(seconds)
        for contender in contenders:
            median = statistics.median(times[contender.name])
            key = "latency_s" if batch == 1 else f"batch{batch}_img_per_s"
            figures[contender.name][key] = median if batch == 1 else batch / median
    for contender in contenders:
        fig = figures[contender.name]
        fig["unet_step_s"] = unet_step_time(contender.pipe, size, device, args.repeats)
        fig["vae_decode_s"] = vae_decode_time(contender.pipe, size, device, args.repeats)
        fig["host_syncs_in_loop"] = host_syncs_in_loop(
            device, lambda callback, c=contender: c.generate(1, callback)
        )
    return figures


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ready_probe(folder: Path, device: torch.device, args: argparse.Namespace) -> None:
    """Child process: time Engine.load (disk -> device, compile, warm-up) and print JSON."""
    started = time.perf_counter()
    engine = Engine(engine_settings(folder, device, args))
    loaded = engine.load()
    _sync(device)
    print(json.dumps({"ready_s": time.perf_counter() - started, "warmup_s": loaded.warmup_s}))


def time_to_ready(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """A fresh process each, timed from its start (imports included) to a loaded,
    compiled, warmed engine: first with an empty compile cache, then with the one it left."""
    cache = args.work / "compile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        env.pop(name, None)  # the probe's settings point both into `cache`
    figures = {}
    for label in ("cold_cache", "warm_cache"):
        command = [
            sys.executable, __file__, "--probe-ready", str(folder), "--config", args.config,
            "--device", args.device, "--dtype", args.dtype, "--work", str(args.work),
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"time-to-ready probe failed ({done.returncode})")
        probe = json.loads(done.stdout.strip().splitlines()[-1])
        figures[f"ready_s_{label}"] = wall
        figures[f"load_s_{label}"] = probe["ready_s"]  # Engine.load alone, no imports
    return figures


# --------------------------------------------------------------------------- report


def _row(name: str, base: Any, ours: Any, fmt: str = "{:.3f}") -> str:
    def cell(value: Any) -> str:
        return "n/a" if value is None else fmt.format(value)

    ratio = ""
    if isinstance(base, float) and isinstance(ours, float) and ours:
        ratio = (
            f"{base / ours:.2f}x"
            if "img/s" not in name and "TFLOP" not in name
            else f"{ours / base:.2f}x"
        )
    return f"| {name} | {cell(base)} | {cell(ours)} | {ratio} |"


def report(result: dict[str, Any]) -> str:
    base, ours = result["baseline"], result["sdworker"]
    size, steps, guidance, batches = CONFIGS[result["config"]]

    def tflops(fig: dict[str, Any]) -> float:
        return float(result["unet_flops"] / fig["unet_step_s"] / 1e12)

    lines = [
        f"device: {result['device_name']}; config {result['config']} "
        f"({size}x{size}, {steps} steps, CFG {guidance}, Euler, {result['dtype']}); "
        f"{result['params_billion']:.2f} B parameters",
        "",
        "| figure | diffusers | sdworker | speed-up |",
        "|---|---:|---:|---:|",
        _row("batch-1 latency, s", base["latency_s"], ours["latency_s"]),
        *(
            _row(
                f"batch {b} throughput, img/s",
                base[f"batch{b}_img_per_s"],
                ours[f"batch{b}_img_per_s"],
            )
            for b in batches
        ),
        _row("peak memory at batch 1, GB", base["peak_gb"], ours["peak_gb"], "{:.2f}"),
        _row("UNet CFG step, ms", base["unet_step_s"] * 1e3, ours["unet_step_s"] * 1e3, "{:.1f}"),
        _row("achieved UNet TFLOP/s", tflops(base), tflops(ours), "{:.3g}"),
        _row("VAE decode, ms", base["vae_decode_s"] * 1e3, ours["vae_decode_s"] * 1e3, "{:.1f}"),
        _row(
            "host syncs inside the loop",
            base["host_syncs_in_loop"],
            ours["host_syncs_in_loop"],
            "{}",
        ),
        _row(
            "load in-process, s (sdworker: + compile, warm-up)",
            base["load_s"],
            ours["load_s"],
            "{:.1f}",
        ),
    ]
    ready = result.get("time_to_ready")
    if ready:
        lines.append(
            f"| time to ready (fresh process, cold / warm compile cache), s | | "
            f"{ready['ready_s_cold_cache']:.1f} / {ready['ready_s_warm_cache']:.1f} | |"
        )
    fid = result["fidelity"]
    lines += [
        "",
        f"UNet FLOPs per CFG step (batch 1): {result['unet_flops'] / 1e12:.3g} TFLOP; "
        f"per image: {result['unet_flops'] * steps / 1e12:.3g} TFLOP",
        f"fidelity, same seed, sdworker vs diffusers (0-255): max |diff| {fid['max_abs']:.0f}, "
        f"mean |diff| {fid['mean_abs']:.3f}, PSNR {fid['psnr_db']:.1f} dB",
        f"sdworker fast path: {json.dumps(ours['speed'])}",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-ready", action="store_true", help="skip time to ready")
    parser.add_argument("--work", type=Path, default=None, help="folder for weights and caches")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--probe-ready", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.probe_ready is not None:
        ready_probe(args.probe_ready, device, args)
        return 0
    args.work = args.work or Path(tempfile.mkdtemp(prefix="sdxl-bench-"))
    folder = args.work / f"sdxl-random-{args.config}"
    print(f"building random SDXL ({args.config}) in {folder} ...", flush=True)
    build = build_random_sdxl(args.config, folder, device, dtype, args.work / "cache")
    print("loading plain diffusers ...", flush=True)
    baseline = Baseline(folder, device, dtype, args.config)
    _sync(device)
    base_resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    base_peak = peak_memory_gb(device, lambda: baseline.generate(1), 0)
    ready = None
    if not args.skip_ready:
        print("time to ready (two fresh processes) ...", flush=True)
        ready = time_to_ready(folder, args)
    print("loading sdworker ...", flush=True)
    ours = Sdworker(folder, device, args)
    our_peak = peak_memory_gb(device, lambda: ours.generate(1), base_resident)
    print("timing both, interleaved ...", flush=True)
    figures = measure([baseline, ours], device, args)
    base, mine = figures["diffusers"], figures["sdworker"]
    base["peak_gb"], mine["peak_gb"] = base_peak, our_peak
    mine["speed"] = ours.loaded.speed.describe()
    mine["warmup_in_load_s"] = ours.loaded.warmup_s
    mine["warnings"] = ours.loaded.warnings
    base_image, our_image = baseline.generate(1)[0], ours.generate(1)[0]
    flops = unet_flops(baseline.pipe, CONFIGS[args.config][0])
    result = {
        "config": args.config,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "dtype": args.dtype,
        "torch": torch.__version__,
        "params_billion": build["params_billion"],
        "build": build,
        "unet_flops": flops,
        "baseline": base,
        "sdworker": mine,
        "time_to_ready": ready,
        "fidelity": fidelity(base_image, our_image),
    }
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
