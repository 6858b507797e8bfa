"""Launch the denoising visualizer: python app.py [--model M] [--dtype D] [--offload] [--model-config FOLDER] [--host H]
[--port P] [--share] [--auth user:pass] [--replicas N [--replica-threads T] [--ray-address ADDR]]"""
import argparse
import logging
import ipaddress
import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv=None) -> None:
    from visualizer.cli import add_load_options, load_options
    from visualizer.errors import ModelLoadError
    from visualizer.engine.models import ALIASES, EMBEDDED, EMBEDDED_NAMES, LoadOptions, configure

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=EMBEDDED,
                        help=f"default model: {', '.join((*EMBEDDED_NAMES, *ALIASES))}, a folder, "
                             "a checkpoint file (.safetensors, .ckpt, .pt) or hub id")
    add_load_options(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public gradio.live link")
    parser.add_argument("--auth", default=None, help="user:password required to open the app")
    parser.add_argument("--allow-any-model", action="store_true",
                        help="let visitors load any local folder or hub id (always on for a loopback host)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where exports are written and served from")
    parser.add_argument("--max-queue", type=int, default=16, help="queued runs beyond this are refused as busy")
    parser.add_argument("--keep-runs", type=int, default=64, help="finished runs kept in memory for the slider")
    parser.add_argument("--frame-cache-mb", type=int, default=512,
                        help="decoded frames kept in memory; older runs are re-decoded from their latents")
    parser.add_argument("--cache-ttl", type=int, default=3600, help="seconds served files are kept before deletion")
    parser.add_argument("--replicas", type=int, default=None,
                        help="run the model on N Ray Serve replicas (one GPU each where there are GPUs); "
                             "this process stays the one web front")
    parser.add_argument("--replica-threads", type=int, default=None,
                        help="torch threads per replica on CPUs (default: the cores divided by the replicas)")
    parser.add_argument("--ray-address", default=None,
                        help="join this Ray cluster (e.g. auto, HEAD:6379) instead of starting a local Ray "
                             "(1 replica unless --replicas says more)")
    args = parser.parse_args(argv)
    if args.replicas is not None and args.replicas < 1 or args.replica_threads is not None and args.replica_threads < 1:
        parser.error("--replicas and --replica-threads take a whole number from 1")
    if args.replica_threads and not (args.replicas or args.ray_address):
        parser.error("--replica-threads applies only with --replicas or --ray-address")
    try:
        options = load_options(args)
    except ModelLoadError as error:
        parser.error(str(error))
    if (args.replicas or args.ray_address) and options != LoadOptions():
        parser.error("--dtype, --offload and --model-config apply to this process only; Ray Serve replicas do not "
                     "take them yet: drop them, or run without --replicas / --ray-address")
    configure(options)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from visualizer.app.layout import CSS, build
    from visualizer.app.runs import AppConfig
    from visualizer.api import warm_up
    from visualizer.engine.decode import use_cores

    public = args.share or not is_loopback(args.host)
    output_dir = args.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    config = AppConfig(output_dir=output_dir, default_model=args.model,
                       allow_any_model=args.allow_any_model or not public, run_capacity=args.keep_runs,
                       frame_budget_mb=args.frame_cache_mb, cache_ttl=args.cache_ttl)
    if args.replicas or args.ray_address:  # Ray is imported only here
        from visualizer import serve

        config.engine = serve.start(args.replicas or 1, args.replica_threads, args.ray_address, args.model)
        config.concurrent_runs = config.engine.replicas  # each replica has warmed the model up
    else:
        use_cores(cores())  # for the frames left after a run's loop, where torch runs one thread (2 cores)
        warm_up(args.model)  # the first Generate streams as fast as later ones
    demo = build(config)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if args.auth and len(auth) != 2:
        sys.exit("error: --auth takes user:password")
    demo.queue(max_size=args.max_queue, default_concurrency_limit=1)
    # run_history off: Gradio's browser-side history kept every run's outputs (the player's props, ~70 KB a run) in
    # localStorage and rewrote all of it while each run streamed (every 0.5 s): after 40 runs the page spent 1.5 CPU-s
    # a run, not 0.8
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                allowed_paths=[str(output_dir)], max_file_size="10mb", enable_monitoring=False,
                css=CSS, footer_links=["api"], ssr_mode=False, run_history=False)


def leave_a_core() -> None:
    """torch's CPU threads for this process: every core but one, left to this server and to a browser on the same
    machine. With torch's threads on every core, whatever else runs stalls all of them at their next join (measured
    on 2 cores, the app in Chromium, `bench --app`: the final image on screen 1.99 s with 2 threads, 1.39 s with 1).
    Only an environment variable read when torch loads does this: torch.set_num_threads(n >= 2) made every later run
    on the engine thread 2x slower (0.80 s -> 1.6 s). An OMP_NUM_THREADS already set wins."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores() - 1)))


def cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if __name__ == "__main__":
    leave_a_core()  # before torch is imported
    main()
