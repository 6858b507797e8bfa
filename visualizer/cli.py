"""The command line: `python -m visualizer run | compare | toy | samplers | export | bench`."""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

from tqdm import tqdm

from .errors import SettingsError, VisualizerError, user_message
from .engine.models import ALIASES, DTYPE_CHOICES, EMBEDDED_NAMES, LoadOptions, configure
from .engine.run import DEFAULTS, Settings
from .media.export import RUN_FORMATS
from .toy.model import PATTERNS, TOY_DEFAULTS

FORMATS = RUN_FORMATS


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"error: {message}\n")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    """Flags for every Settings field; an absent flag takes the Settings default."""
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--model", help=f"{DEFAULTS['model']} (default), {', '.join(a for a in (*EMBEDDED_NAMES, *ALIASES) if a != DEFAULTS['model'])}, "
                                   "a folder, a checkpoint file (.safetensors, .ckpt, .pt) or a hub id")
    add_load_options(p)
    p.add_argument("--steps", help=f"sampler steps (default {DEFAULTS['num_inference_steps']})")
    p.add_argument("--guidance", help=f"classifier-free guidance scale (default {DEFAULTS['guidance_scale']:g}; Flux: its "
                                      "distilled guidance)")
    p.add_argument("--true-cfg", help="Flux only: true classifier-free guidance scale with the negative prompt "
                                      f"(default {DEFAULTS['true_cfg_scale']:g}: off)")
    p.add_argument("--seed", help=f"default {DEFAULTS['seed']}")
    p.add_argument("--width", help="pixels (default: the model's native size)")
    p.add_argument("--height", help="pixels (default: the model's native size)")
    p.add_argument("--init-image", type=Path, default=None, help="img2img: start from this image")
    p.add_argument("--strength", default=None, help=f"img2img: share of the schedule to run (default {DEFAULTS['strength']:g})")
    p.add_argument("--attention", action="store_true",
                   help="also record each prompt token's cross-attention map at every step (attention.npy)")
    p.add_argument("--attention-token", default=None, metavar="WORD",
                   help="a GIF and a contact sheet of WORD's map over the frames, per run folder (implies --attention)")
    p.add_argument("--view", choices=("xt", "x0", "both"), default="xt", help="frames shown in animations")
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--out", required=True, type=Path)


def add_load_options(p: argparse.ArgumentParser) -> None:
    """Flags for how this process loads models (models.LoadOptions); app.py takes the same."""
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=LoadOptions.dtype,
                   help="the model's compute dtype, the VAE staying fp32 (default auto: on a GPU fp16 for SD 1.x / "
                        "2.x and SDXL, bf16 for SD 3 and Flux; fp32 on the CPU)")
    p.add_argument("--offload", action="store_true",
                   help="GPU only: keep each model part in CPU memory until it runs (less GPU memory, slower)")
    p.add_argument("--model-config", action="append", default=[], metavar="FOLDER",
                   help="a diffusers model folder whose configs single-file checkpoints of its family load with "
                        "(offline, instead of the Hugging Face cache's); repeat for other families")


def load_options(args) -> LoadOptions:
    """The LoadOptions the flags of add_load_options ask for (ModelLoadError if they cannot load)."""
    return LoadOptions(dtype=args.dtype, offload=args.offload, configs=tuple(args.model_config))


HTML_HELP = "write player.html: the player as one self-contained page (open it from disk, or embed it in a blog post)"


def _add_format_flags(p: argparse.ArgumentParser) -> None:
    for fmt in FORMATS:
        p.add_argument(f"--{fmt}", action="store_true", help=HTML_HELP if fmt == "html" else f"write the {fmt} export")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m visualizer", description="See how a diffusion model turns noise into an image.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("run", help="generate one run and write every step's frames")
    p.add_argument("--sampler", help=f"default {DEFAULTS['sampler']}; see `samplers`")
    _add_generation_options(p)
    _add_format_flags(p)
    p.add_argument("--map", action="store_true", help="write map.png: the run's path through image space (2D map)")
    p.add_argument("--map-seeds", type=int, default=1, metavar="K",
                   help="with --map: the paths of K seeds from --seed on (latents only for the extra ones)")
    p = sub.add_parser("compare", help="several samplers (same seed and noise) or models, side by side")
    p.add_argument("--samplers", help='comma-separated, e.g. "Euler,DDIM,DPM++ 2M"')
    p.add_argument("--models", help='instead, 2 to 4 models, comma-separated, e.g. "embedded,sd15,sdxl": each runs the '
                                    "first of --samplers where it fits it (else Euler)")
    _add_generation_options(p)
    p.add_argument("--mp4", action="store_true", help="also write grid.mp4")
    p.add_argument("--html", action="store_true", help=HTML_HELP.replace("the player", "the comparison's player"))
    p.add_argument("--runs-only", action="store_true", help="write only the run folders (no grid or plots)")
    p = sub.add_parser("toy", help="the 2D playground: points flowing from noise onto a pattern")
    toy = TOY_DEFAULTS
    p.add_argument("--pattern", help=f"{', '.join(PATTERNS)} (default {toy['pattern']})")
    p.add_argument("--steps", help=f"sampler steps (default {toy['num_inference_steps']})")
    p.add_argument("--sampler", help=f"default {toy['sampler']}; several, comma-separated, move the same points side "
                                     "by side")
    p.add_argument("--seed", help=f"default {toy['seed']}")
    p.add_argument("--points", help=f"default {toy['points']}")
    p.add_argument("--label", help=f"shapes only: the cluster to ask for ({', '.join(PATTERNS['shapes'][1])})")
    p.add_argument("--guidance", help=f"classifier-free guidance toward --label (default {toy['guidance_scale']:g})")
    p.add_argument("--fps", type=float, default=10)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--gif", action="store_true", help="write points.gif (the points and the field)")
    p.add_argument("--mp4", action="store_true", help="write points.mp4")
    sub.add_parser("samplers", help="list the sampler names")
    p = sub.add_parser("export", help="re-export a saved run folder without regenerating")
    p.add_argument("rundir", type=Path)
    p.add_argument("--view", choices=("xt", "x0", "both"), default="xt")
    p.add_argument("--fps", type=float, default=8)
    p.add_argument("--out", type=Path, default=None, help="defaults to the run folder")
    _add_format_flags(p)
    p = sub.add_parser("bench", help="time capture and decoding against plain diffusers")
    p.add_argument("--quick", action="store_true", help="embedded model only (under a minute)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sd15-size", type=int, default=256, help="image size of the SD 1.5-architecture rows (512 on a GPU)")
    p.add_argument("--sd15-steps", type=int, default=10, help="steps of the SD 1.5-architecture rows (25 on a GPU)")
    p.add_argument("--app", action="store_true",
                   help="also the app in Chromium: time to the final image, slider latency, Play's frame rate")
    p.add_argument("--out", type=Path, default=Path("bench.json"))
    p.add_argument("--page", action="store_true", help="instead: the one-file player's size per WebP quality")
    p.add_argument("--replicas", default=None, metavar="N,M,...",
                   help="instead: 4 concurrent 40-step runs on N, then M, ... Ray Serve replicas (e.g. 1,2)")
    p.add_argument("--replica-threads", type=int, default=1, help="torch threads per replica (with --replicas)")
    p.add_argument("--families", action="store_true",
                   help="instead: capture cost per model family (SD, SDXL, SD 3, Flux) on tiny random models")
    add_load_options(p)
    return parser


def _parse_number(text, kind, label):
    try:
        return kind(text)
    except ValueError:
        raise SettingsError(f"{label} must be a {'whole number' if kind is int else 'number'}, got {text!r}.") from None


FLAGS = {  # Settings field -> (flag, parser)
    "negative_prompt": ("negative_prompt", str), "model": ("model", str), "sampler": ("sampler", str),
    "num_inference_steps": ("steps", int), "guidance_scale": ("guidance", float), "seed": ("seed", int),
    "width": ("width", int), "height": ("height", int), "strength": ("strength", float),
    "true_cfg_scale": ("true_cfg", float),
}


def settings_from_args(args) -> Settings:
    """The run's Settings: the flags given, Settings defaults for the rest."""
    given = {}
    for name, (flag, kind) in FLAGS.items():
        text = getattr(args, flag, None)
        if text is not None:
            given[name] = text if kind is str else _parse_number(text, kind, "--" + flag.replace("_", "-"))
    if args.init_image is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            given["init_image"] = Image.open(args.init_image).convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise SettingsError(f"Could not read the init image {args.init_image}: {error}") from None
    elif "strength" in given:
        raise SettingsError("--strength applies to img2img: give an --init-image too.")
    attention = bool(getattr(args, "attention", False) or getattr(args, "attention_token", None))
    return Settings(prompt=args.prompt, attention=attention, **given).validate()


class _Progress:
    """A tqdm bar that appears with the first finished step (so bad input prints no empty bar)."""

    def __init__(self, runs: int, desc: str):
        self.runs, self.desc, self.bar = runs, desc, None

    def __call__(self, event) -> None:
        if self.bar is None:
            self.bar = tqdm(total=event.total_steps * self.runs, desc=self.desc, unit="step")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cmd_run(args) -> None:
    from . import api
    from .media.export import export_run

    configure(load_options(args))
    settings = settings_from_args(args)
    progress = _Progress(1, settings.sampler)
    try:
        result = api.run(settings, callback=progress)
    finally:
        progress.close()
    _warn_truncation(result)
    result.save(args.out)
    write_plots([result], args.out, schedule=True)
    written = export_run(result, args.out, [f for f in FORMATS if getattr(args, f)], view=args.view, fps=args.fps)
    if args.attention_token:
        from .media.word_maps import export_token

        written.update({f"attention {k}": v for k, v in export_token(result, args.out, args.attention_token,
                                                                     fps=args.fps).items()})
    if args.map:
        written["map"] = write_map(result, args.map_seeds, args.out / "map.png")
    structure = result.info.structure_step
    print(f"{len(result)} steps -> {args.out}/ (run.json, frames/, final.png, convergence.png, schedule.png"
          f"{''.join(', ' + p.name for p in written.values())}); structure appears at step {structure}")


def write_map(run, seeds: int, path: Path) -> Path:
    """map.png: `run` and the same settings from the next `seeds - 1` seeds on the image-space map; prints where
    each ended."""
    import dataclasses

    from PIL import Image

    from . import api
    from .analysis import image_map

    if not 1 <= seeds <= 64:
        raise SettingsError(f"--map-seeds must be from 1 to 64, got {seeds}.")
    runs = [run] + [api.run(dataclasses.replace(run.settings, seed=run.settings.seed + k), frames=())
                    for k in range(1, seeds)]
    picture, summary = image_map.seeds_map(runs)
    Image.fromarray(picture).save(path)
    print(summary)
    return path


def write_plots(runs: list, folder: Path, schedule: bool = False) -> None:
    """convergence.png (one curve per run) in `folder`; with `schedule`, schedule.png of the first run."""
    from PIL import Image

    from .analysis.plots import convergence_plot, figure_png, schedule_plot

    Image.fromarray(figure_png(convergence_plot(runs))).save(folder / "convergence.png")
    if schedule:
        Image.fromarray(figure_png(schedule_plot(runs[0]))).save(folder / "schedule.png")


def cmd_compare(args) -> None:
    from . import api
    from .engine.labels import comparison_labels
    from .media.export import export_grid

    samplers = [s.strip() for s in (args.samplers or "").split(",") if s.strip()]
    models = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    if not samplers and not models:
        raise SettingsError("Give --samplers (2 or more, comma-separated) or --models (2 to 4).")
    configure(load_options(args))
    settings = settings_from_args(args)
    if samplers:
        settings = dataclasses.replace(settings, sampler=samplers[0])
    progress = _Progress(len(models) if models else len(samplers), "models" if models else "lockstep")
    try:
        runs = (api.compare_models(settings, models, callback=progress) if models else
                api.compare(settings, samplers, callback=progress))
    finally:
        progress.close()
    _warn_truncation(runs[0])
    folders = [args.out / slug(label) for label in comparison_labels([r.settings for r in runs])]
    for r, folder in zip(runs, folders):
        r.save(folder)
        if args.attention_token:
            from .media.word_maps import export_token

            export_token(r, folder, args.attention_token, fps=args.fps)
    what = f"{len(runs)} {'models' if models else 'samplers'}"
    if args.runs_only:
        print(f"{what} -> {args.out}/ (one run folder each)")
        return
    extra = [f for f in ("mp4", "html") if getattr(args, f)]
    written = export_grid(runs, args.out, ["png", "gif", *extra], view=args.view, fps=args.fps)
    write_plots(runs, args.out)
    names = ", ".join(p.name for p in written.values())
    print(f"{what} -> {args.out}/ ({names}, convergence.png, one run folder each)")


TOY_FLAGS = {"pattern": ("pattern", str), "num_inference_steps": ("steps", int), "seed": ("seed", int),
             "points": ("points", int), "label": ("label", str), "guidance_scale": ("guidance", float)}


def cmd_toy(args) -> None:
    from .toy import model as toy
    from .toy import render as toy_render

    given = {name: text if kind is str else _parse_number(text, kind, "--" + flag) for name, (flag, kind) in TOY_FLAGS.items()
             if (text := getattr(args, flag)) is not None}
    samplers = [s.strip() for s in (args.sampler or toy.TOY_DEFAULTS["sampler"]).split(",") if s.strip()]
    runs = toy.sample([toy.ToySettings(sampler=s, **given) for s in samplers])
    folders = [runs[0].save(args.out)] if len(runs) == 1 else [r.save(args.out / slug(r.settings.sampler)) for r in runs]
    written = toy_render.export(runs, args.out, [f for f in ("gif", "mp4") if getattr(args, f)], fps=args.fps)
    for r in runs:
        print(f"{r.settings.sampler}: median distance to the pattern {toy.distance_ratio(r):.1%} of the noise's after "
              f"{len(r)} steps")
    print(f"-> {', '.join(str(f) for f in folders)} (run.json, points.npy, x0.npy, field.npy, pattern.npy)"
          f"{''.join(', ' + str(p) for p in written.values())}")


def cmd_samplers(args) -> None:
    from .engine.samplers import KINDS, REGISTRIES, TWO_EVALUATION_SAMPLERS

    for kind, registry in REGISTRIES.items():
        print(f"for {KINDS[kind]}:")
        for name, (class_name, overrides) in registry.items():
            extra = ", two model evaluations per step" if name in TWO_EVALUATION_SAMPLERS else ""
            settings = " flow sigmas, flow_prediction" if callable(overrides) else f" {overrides}" if overrides else ""
            print(f"  {name:16s} {class_name}{settings}{extra}")


def cmd_export(args) -> None:
    from .media.export import export_run
    from .engine.run import Run

    run = Run.load(args.rundir)
    formats = [f for f in FORMATS if getattr(args, f)] or ["gif"]
    written = export_run(run, args.out or args.rundir, formats, view=args.view, fps=args.fps)
    print("wrote " + ", ".join(str(p) for p in written.values()))


def cmd_bench(args) -> None:
    options = load_options(args)
    if args.page:
        from .bench.page import main as bench_page

        bench_page()
        return
    if args.replicas:
        if options != LoadOptions():
            raise SettingsError("--dtype, --offload and --model-config do not reach Ray Serve replicas yet: drop them "
                                "with --replicas.")
        from .bench.serve import main as bench_serve

        bench_serve([_parse_number(n, int, "--replicas") for n in args.replicas.split(",")], args.replica_threads,
                    repeats=args.repeats)
        return
    configure(options)
    if args.families:
        from .bench.families import format_rows, main as bench_families

        print(format_rows(bench_families(repeats=max(args.repeats, 5))))
        return
    from .bench.engine import main as bench_main

    bench_main(quick=args.quick, repeats=args.repeats, out=args.out, sd15_size=args.sd15_size,
               sd15_steps=args.sd15_steps, app=args.app)


def _warn_truncation(run) -> None:
    if run.info.truncated:
        print(f"warning: the prompt is longer than {run.info.token_limit} tokens; "
              f"ignored: {run.info.dropped_text!r}", file=sys.stderr)


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "toy": cmd_toy, "samplers": cmd_samplers, "export": cmd_export, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (VisualizerError, OSError, MemoryError, RuntimeError) as error:
        message = user_message(error) or (f"{error}" if isinstance(error, OSError) else None)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(error, SettingsError) else 1
    return 0


def entry() -> None:
    """The `denoising-visualizer` console script."""
    sys.exit(main())
