"""The `sdworker` command line: generate images, list models and schedulers."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sdworker.engine.schedulers import SCHEDULERS
from sdworker.errors import InvalidJobError, SdworkerError
from sdworker.jobs import JobSpec, ResizeMode, describe_validation_error
from sdworker.options import Preset, ReferenceType, RefinerMode
from sdworker.settings import Settings

app = typer.Typer(
    help="sdworker: self-hosted image and video generation (SD 1.5/2.1, SDXL, SD3, Wan2.1).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help texts use [brackets] for defaults, not rich markup
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)
stdout = Console(soft_wrap=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn every user error into one line on stderr and a non-zero exit, no traceback."""
    try:
        yield
    except ValidationError as exc:
        raise _fail(describe_validation_error(exc)) from None
    except SdworkerError as exc:
        raise _fail(exc.message) from None
    except RuntimeError as exc:  # e.g. an explicit device that is not there
        raise _fail(str(exc), code=1) from None


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        raise _fail(f"settings: {describe_validation_error(exc)}") from None


def _quiet_libraries() -> None:
    # diffusers/transformers log at warning level for routine events (dtype casts in
    # img2img, image-processor fallbacks); the CLI shows only errors from them.
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _named_value(text: str, key: str, kind: type[float] | type[int]) -> dict[str, Any]:
    """'NAME[:VALUE]' -> {"name": NAME, key: VALUE} (a Windows-style 'C:' stays a name)."""
    name, sep, value = text.rpartition(":")
    if not sep or not name or "/" in value or "\\" in value:
        return {"name": text}
    try:
        return {"name": name, key: kind(value)}
    except ValueError:
        raise InvalidJobError(
            f"{text!r}: {value!r} is not a number; use NAME:{key.upper()}", field=key
        ) from None


def output_paths(output: Path | None, seeds: list[int]) -> list[Path]:
    """Where images go: -o as given for one image, NAME-i.EXT for several; a timestamped
    file in ./outputs when -o is not given."""
    if output is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return [Path("outputs") / f"{stamp}-{seed}.png" for seed in seeds]
    if len(seeds) == 1:
        return [output]
    return [
        output.with_name(f"{output.stem}-{i}{output.suffix or '.png'}") for i in range(len(seeds))
    ]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw. Empty string for none.")],
    negative: Annotated[
        str | None, typer.Option("--negative", "-n", help="What to avoid (negative prompt).")
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(
            "--size",
            "-s",
            help="WIDTHxHEIGHT, multiples of 8 [default: model's, 1024x1024 for SDXL].",
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps, 1-150 [default: 30].")] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            "--guidance", "-g", help="Classifier-free guidance scale, 0-30 [default: 7.5]."
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="0 to 2^32-1; image i uses seed+i [default: random, printed]."),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="Sampler name or alias; see `sdworker schedulers` [default: euler]."),
    ] = None,
    num_images: Annotated[int, typer.Option("--num-images", "-b", help="Images in one batch.")] = 1,
    image: Annotated[
        str | None,
        typer.Option("--image", "-i", help="Init image (path or URL): makes this img2img."),
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(help="img2img/inpaint denoise strength 0-1 [default: 0.75 / 1.0]."),
    ] = None,
    mask: Annotated[
        str | None,
        typer.Option("--mask", "-m", help="Inpaint mask, white = repaint (needs --image)."),
    ] = None,
    exact_copy: Annotated[
        bool,
        typer.Option("--exact-copy", help="Near-identical copy of --image (strength <= 0.05)."),
    ] = False,
    resize_mode: Annotated[
        ResizeMode, typer.Option(help="How --image/--mask are fitted to --size.")
    ] = ResizeMode.CROP,
    model: Annotated[
        str | None,
        typer.Option(
            help="Checkpoint file, diffusers folder, hub id or tiny-sdxl [default: SDWORKER_MODEL]."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="PNG path; NAME-i.png for several images [default: ./outputs/TIME-SEED.png].",
        ),
    ] = None,
    save_latents: Annotated[
        Path | None,
        typer.Option(help="Also write the final latents as raw float16 NCHW bytes here."),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="auto, cpu, mps, cuda or cuda:N [default: SDWORKER_DEVICE or auto]."),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="fp16, bf16 or fp32 [default: fp16 on GPU, fp32 on CPU].")
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            "-l",
            help="NAME[:WEIGHT] from the LoRA folder (or a .safetensors path); "
            "repeat for several [weight 1.0].",
        ),
    ] = None,
    style: Annotated[
        str | None, typer.Option(help="NAME[:LEVEL] from the style file (SDWORKER_STYLES_FILE).")
    ] = None,
    weighting: Annotated[
        bool, typer.Option("--weighting", "-w", help="Parse (word:1.3), word++, .blend() ...")
    ] = False,
    preset: Annotated[
        Preset | None, typer.Option(help="Named defaults: steps, guidance, scheduler, refiner.")
    ] = None,
    refiner: Annotated[
        RefinerMode | None,
        typer.Option(help="Use the refiner (SDWORKER_REFINER): ensemble or refine."),
    ] = None,
    upscale: Annotated[
        int | None, typer.Option(help="Upscale --image by 2 or 4 (task upscale).")
    ] = None,
    upscaler: Annotated[
        str | None,
        typer.Option(help="lanczos, hires or a model in SDWORKER_UPSCALER_DIR [lanczos]."),
    ] = None,
    reference_type: Annotated[
        ReferenceType | None,
        typer.Option(help="How --image steers: composition (img2img), style or character."),
    ] = None,
) -> None:
    """Generate images: from a prompt (text2img), an init image (img2img), image + mask
    (inpaint), or upscale an image. LoRAs, styles, the refiner and prompt weighting
    apply to each."""
    settings = _settings(device=device, dtype=dtype)
    with _user_errors():
        spec = JobSpec(
            prompt=prompt, negative_prompt=negative, size=size, steps=steps,
            guidance_scale=guidance, seed=seed, scheduler=scheduler, num_images=num_images,
            image=image, strength=strength, mask=mask, exact_copy_mode=exact_copy,
            resize_mode=resize_mode, model=model, return_latents=save_latents is not None,
            loras=[_named_value(item, "weight", float) for item in lora or []],
            style=_named_value(style, "level", int) if style else None,
            prompt_weighting=weighting, preset=preset, refiner=refiner,
            upscale_factor=upscale, upscaler=upscaler, reference_type=reference_type,
        )  # fmt: skip
        _quiet_libraries()
        from sdworker.engine.engine import Cancelled, Engine

        engine = Engine(settings)
        plan = engine.plan(spec)
        started = time.perf_counter()
        with console.status(f"Loading {engine.source(spec.model).name} on {engine.device}..."):
            load_s = engine.load(spec.model).load_s
        with _progress() as progress:
            bar = progress.add_task("Denoising", total=plan.denoise_steps, visible=False)

            def on_step(step: int, total: int) -> None:
                progress.update(bar, completed=step, total=total, visible=True)

            result = engine.run(spec, on_step=on_step)
    if isinstance(result, Cancelled):  # nothing cancels a CLI run; kept for completeness
        raise _fail("cancelled", code=1)
    paths = output_paths(output, result.seeds)
    from sdworker.media import encode_png, generation_parameters

    for picture, path, image_seed in zip(result.images, paths, result.seeds, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        parameters = generation_parameters(result.plan, image_seed, result.model, picture.size)
        path.write_bytes(encode_png(picture, parameters))
    if save_latents is not None and result.latents is not None:
        save_latents.write_bytes(result.latents.data)
        stdout.print(f"latents: {save_latents} shape={list(result.latents.shape)} float16")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    for path, image_seed in zip(paths, result.seeds, strict=True):
        stdout.print(f"{path}  seed={image_seed}", highlight=False)
    stdout.print(
        f"{len(paths)} image(s) in {time.perf_counter() - started:.1f}s "
        f"(load {load_s:.1f}s, inference {result.timings['inference_s']:.1f}s) "
        f"on {result.device} {result.dtype}",
        highlight=False,
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


@app.command()
def schedulers() -> None:
    """List the schedulers (samplers) and the aliases accepted for each."""
    table = Table("name", "label", "aliases", "diffusers class")
    for choice in SCHEDULERS:
        table.add_row(choice.name, choice.label, ", ".join(choice.aliases), choice.class_name)
    stdout.print(table)


@app.command()
def models(
    server: Annotated[
        str | None,
        typer.Option(
            help="Also show which models the workers of a running server hold loaded "
            "(its base URL, e.g. http://127.0.0.1:7860).",
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="SDWORKER_API_KEY", help="API key for --server.")
    ] = None,
) -> None:
    """Show the model registry, the default and video models, and every model found
    (built-in tiny models, the model root, the Hugging Face cache)."""
    from sdworker.engine.catalog import list_models
    from sdworker.model_registry import load_model_registry

    settings = _settings()
    stdout.print(f"default model: [bold]{settings.model}[/]", highlight=False)
    video = settings.video_model if settings.register_video_model else "(off: DOWNLOAD_WAN2_MODEL)"
    stdout.print(f"video model:   {video}", highlight=False)
    stdout.print(f"model root:    {settings.model_root or '(not set: SDWORKER_MODEL_ROOT)'}")
    stdout.print(f"memory budget: {settings.model_memory_budget}", highlight=False)
    with _user_errors():
        registry = load_model_registry(settings)
    if registry:
        table = Table("name", "family", "source", "defaults", title="model registry")
        for name, entry in registry.items():
            defaults = entry.model_dump(
                exclude={"source", "family", "description"}, exclude_none=True
            )
            table.add_row(
                name,
                entry.family or "(detected)",
                entry.source,
                ", ".join(f"{k}={v}" for k, v in defaults.items()),
            )
        stdout.print(table)
    table = Table("name", "kind", "family", "location", title="available")
    for row in list_models(settings):
        table.add_row(row.name, row.kind, row.family, row.location)
    stdout.print(table)
    if server:
        _print_loaded(server, api_key)


def _print_loaded(server: str, api_key: str | None) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        reply = httpx.get(f"{server.rstrip('/')}/status", headers=headers, timeout=10)
        reply.raise_for_status()
    except httpx.HTTPError as exc:
        console.print(f"error: could not read {server}/status: {exc}")
        raise typer.Exit(1) from None
    table = Table("name", "family", "tasks", "loaded on", title=f"served by {server}")
    for entry in reply.json().get("models", []):
        table.add_row(
            entry["name"],
            entry.get("family") or entry.get("problem", ""),
            ", ".join(entry.get("tasks", [])),
            ", ".join(entry.get("loaded_on", [])) or "-",
        )
    stdout.print(table)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


def _export(**values: object) -> None:
    """Put CLI overrides into the environment so the worker process gets them too."""
    for name, value in values.items():
        if value is not None:
            os.environ[f"SDWORKER_{name.upper()}"] = str(value)


@app.command()
def serve(
    host: Annotated[
        str | None,
        typer.Option(help="Interface to listen on [default: 127.0.0.1; 0.0.0.0 for all]."),
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: 7860].")] = None,
    model: Annotated[
        str | None, typer.Option(help="Model to serve [default: SDWORKER_MODEL or tiny-sdxl].")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Queue and assets folder [default: ~/.local/share/sdworker]."),
    ] = None,
) -> None:
    """Run the whole service on this machine: HTTP API, SQLite queue, local storage and a
    supervised worker process. Ctrl-C drains: the running job finishes (or is re-queued)."""
    _export(host=host, port=port, model=model, data_dir=data_dir)
    settings = _settings()
    import uvicorn

    from sdworker.api.app import create_app

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with _user_errors():
        application = create_app(settings, manage_worker=settings.run_worker)
    stdout.print(f"sdworker serving {settings.model} at {settings.base_url}", highlight=False)
    stdout.print(f"API docs: {settings.base_url}/docs   data: {settings.data_dir}", highlight=False)
    stdout.print(f"other APIs: {_dialect_summary(settings)}", highlight=False)
    uvicorn.run(application, host=settings.host, port=settings.port, log_level="info")


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Interface to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: 7860].")] = None,
) -> None:
    """Run only the HTTP API (no worker); workers run with `sdworker worker`."""
    _export(host=host, port=port)
    settings = _settings()
    import uvicorn

    from sdworker.api.app import create_app

    with _user_errors():
        application = create_app(settings)
    stdout.print(f"sdworker API at {settings.base_url} (docs: {settings.base_url}/docs)")
    stdout.print(f"other APIs: {_dialect_summary(settings)}", highlight=False)
    uvicorn.run(application, host=settings.host, port=settings.port, log_level="info")


@app.command()
def worker(
    worker_id: Annotated[
        str | None, typer.Option(help="Worker id [default: SDWORKER_WORKER_ID or generated].")
    ] = None,
    device: Annotated[str | None, typer.Option(help="Device, e.g. cuda:1 [default: auto].")] = None,
    parent_pid: Annotated[
        int | None, typer.Option(hidden=True, help="Stop once this process is gone (serve).")
    ] = None,
) -> None:
    """Run a worker: claim jobs from the queue and generate them on one device."""
    _export(device=device)
    settings = _settings()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _quiet_libraries()
    from ulid import ULID

    from sdworker.worker import run_worker_process

    with _user_errors():
        worker_id = worker_id or settings.worker_id or f"worker-{ULID()}"
        code = run_worker_process(settings, worker_id, parent_pid)
    raise typer.Exit(code)


def _dialect_summary(settings: Settings) -> str:
    """Where each mounted dialect answers, e.g. 'a1111 /, lcm /lcm' (SDWORKER_DIALECTS)."""
    mounted = settings.dialect_prefixes
    return ", ".join(f"{name} {prefix or '/'}" for name, prefix in mounted.items()) or "none"


def _root_dialects(name: str) -> str:
    """SDWORKER_DIALECTS with `name` mounted at the root, the user's other entries kept."""
    import json

    raw = os.environ.get("SDWORKER_DIALECTS", "").strip()
    try:
        current = json.loads(raw) if raw else {}
    except ValueError:
        raise _fail(f"settings: SDWORKER_DIALECTS is not JSON: {raw!r}") from None
    if not isinstance(current, dict):
        raise _fail(f"settings: SDWORKER_DIALECTS must be a JSON object, not {raw!r}")
    return json.dumps(current | {name: "/"})


@app.command("candle-worker")
def candle_worker(
    worker_id: Annotated[
        str,
        typer.Option(envvar="WORKER_ID", help="This worker's id, as the orchestrator knows it."),
    ],
    sd_version: Annotated[
        str,
        typer.Option(
            envvar="SD_VERSION",
            help="v1-5, v2-1, xl or turbo: the model served (unless --model-path) and, for "
            "turbo, its defaults (4 steps, guidance 0).",
        ),
    ],
    port: Annotated[
        int | None, typer.Option(envvar="PORT", help="Port [default: SDWORKER_PORT or 7860].")
    ] = None,
    callback_url: Annotated[
        str | None,
        typer.Option(
            envvar="CALLBACK_URL",
            help="Orchestrator URL that gets the registration and heartbeats (POST JSON) "
            "[default: SDWORKER_ORCHESTRATOR_URL; none: not sent].",
        ),
    ] = None,
    cuda_device: Annotated[
        int | None,
        typer.Option(
            envvar="CUDA_DEVICE", help="CUDA device index [default: auto: cuda > mps > cpu]."
        ),
    ] = None,
    use_f16: Annotated[
        bool, typer.Option("--use-f16", envvar="USE_F16", help="Run in float16.")
    ] = False,
    use_flash_attn: Annotated[
        bool,
        typer.Option(
            "--use-flash-attn",
            envvar="USE_FLASH_ATTN",
            help="Accepted for compatibility: PyTorch SDPA uses flash attention on its own.",
        ),
    ] = False,
    model_path: Annotated[
        str | None,
        typer.Option(
            envvar="MODEL_PATH",
            help="Checkpoint file, diffusers folder, hub id or tiny-sdxl; wins over the "
            "model of --sd-version.",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Interface to listen on [default: 127.0.0.1].")
    ] = None,
    heartbeat_interval: Annotated[
        float | None,
        typer.Option(
            min=0.1, help="Seconds between heartbeats [default: SDWORKER_HEARTBEAT_INTERVAL_S]."
        ),
    ] = None,
) -> None:
    """Run as an sd-worker-rbee (Candle SD worker) replacement: the whole service, like
    `serve`, with POST /execute, /img2img and /inpaint (SSE) and GET /health at the root,
    registering with the orchestrator at --callback-url and sending it heartbeats."""
    from sdworker.orchestrator import parse_sd_version

    with _user_errors():
        version = parse_sd_version(sd_version)
    _export(
        worker_id=worker_id,
        host=host,
        port=port,
        model=model_path or version.model,
        model_variant=version.variant,
        device=f"cuda:{cuda_device}" if cuda_device is not None else None,
        dtype="fp16" if use_f16 else None,
        orchestrator_url=callback_url,
        dialects=_root_dialects("candle"),
    )
    settings = _settings()
    from sdworker.api.app import create_app
    from sdworker.candle_worker import run_candle_worker

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with _user_errors():
        application = create_app(settings, manage_worker=settings.run_worker)
    stdout.print(
        f"candle worker {settings.worker_id} serving {settings.model} at {settings.base_url}",
        highlight=False,
    )
    run_candle_worker(settings, application, version.name, heartbeat_interval)
