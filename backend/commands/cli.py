"""sam-backend serve | worker | warm | prelabel | train | heads | export | download | connect | doctor | bench"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from backend.settings import MODEL_TYPES, Settings, SettingsError


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"configuration error: {exc}")


def cmd_serve(args) -> int:
    from backend.web.server import serve

    settings = _settings()
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers),
                                   ("threads", args.threads)) if v is not None}
    return serve(settings.replace(**overrides))


def cmd_download(args) -> int:
    from model.checkpoints import CheckpointError, resolve_checkpoint

    settings = _settings()
    logging.basicConfig(level=settings.log_level)
    try:
        path = resolve_checkpoint(args.model_type or settings.sam_model_type, None, settings.model_dir)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def cmd_worker(args) -> int:
    from backend.jobs.worker import run_worker
    from backend.services import Services

    settings = _settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_worker(Services.build(settings), args.queues.split(","), burst=args.burst)


def cmd_warm(args) -> int:
    from backend.commands.project_jobs import warm_project

    return warm_project(_settings(), args.project, wait=args.wait)


def cmd_prelabel(args) -> int:
    from backend.commands.project_jobs import prelabel_project

    return prelabel_project(_settings(), args.project, wait=args.wait)


def cmd_train(args) -> int:
    from backend.commands.train import train

    settings = _settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return train(settings, args.project, inline=args.inline, wait=not args.no_wait, every=args.every)


def cmd_heads(args) -> int:
    from backend.commands.train import heads

    return heads(_settings(), args.project, args.rollback, args.off)


def cmd_export(args) -> int:
    from backend.commands.export_coco import export_project

    out = args.out or f"project-{args.project}-coco.json"
    return export_project(_settings(), args.project, args.source, args.model_version, out)


def cmd_connect(args) -> int:
    from backend.commands.connect import connect

    settings = _settings()
    url = args.url or f"http://127.0.0.1:{settings.port}"
    return connect(settings, args.project, url, args.title, show_our_drafts=args.show_our_drafts)


def cmd_doctor(args) -> int:
    from backend.commands.doctor import doctor

    return doctor(_settings(), args.project, args.url)


def _bench(run, print_table, args, passed=lambda figures: True) -> int:
    """Every bench: the readable table, then one JSON object with every figure as the last line."""
    figures = run(args)
    print_table(figures)
    print(json.dumps(figures, separators=(",", ":")))
    return 0 if passed(figures) else 1


def cmd_bench_click(args) -> int:
    from backend.bench.click import print_click_table, run_click_bench

    return _bench(run_click_bench, print_click_table, args)


def cmd_bench_encoder(args) -> int:
    from backend.bench.encoder import print_encoder_table, run_encoder_bench

    return _bench(run_encoder_bench, print_encoder_table, args)


def cmd_bench_learn(args) -> int:
    from backend.bench.learn import print_learn_table, run_learn_bench

    return _bench(run_learn_bench, print_learn_table, args, lambda f: f["never_promoted_regression"])


def cmd_bench_prelabel(args) -> int:
    from backend.bench.prelabel import print_prelabel_table, run_prelabel_bench

    return _bench(run_prelabel_bench, print_prelabel_table, args)


def cmd_bench_fidelity(args) -> int:
    from backend.bench.fidelity import print_fidelity_table, run_fidelity_bench

    return _bench(run_fidelity_bench, print_fidelity_table, args, lambda f: all(t["met"] for t in f["targets"].values()))


def cmd_bench_load(args) -> int:
    from backend.bench.load import print_load_table, run_load_bench

    args.think_range = tuple(float(v) for v in args.think.split(","))
    return _bench(run_load_bench, print_load_table, args, lambda f: f["failed"] == 0 and f["wrong"] == 0)


def _add_serving_commands(sub) -> None:
    """serve, download, worker: running the backend."""
    serve = sub.add_parser("serve", help="start the backend under gunicorn (embedded Redis if REDIS_URL is unset)")
    serve.add_argument("--host", help="interface to bind (env HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (env PORT, default 9090)")
    serve.add_argument("--workers", type=int, help="gunicorn worker processes (env WORKERS, default 1)")
    serve.add_argument("--threads", type=int, help="threads per worker (env THREADS, default 4)")
    serve.set_defaults(func=cmd_serve)

    download = sub.add_parser("download", help="download the official SAM checkpoint into MODEL_DIR/checkpoints")
    download.add_argument("--model-type", choices=MODEL_TYPES)
    download.set_defaults(func=cmd_download)

    worker = sub.add_parser("worker", help="run an RQ worker for background embedding, pre-labelling and training (needs REDIS_URL)")
    worker.add_argument("--queues", default="sam-warm,sam-prelabel,sam-train",
                        help="comma list of queues, first served first (default sam-warm,sam-prelabel,sam-train)")
    worker.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    worker.set_defaults(func=cmd_worker)


def _add_project_commands(sub) -> None:
    """warm, prelabel, train, heads, export, connect: work on one Label Studio project."""
    warm = sub.add_parser("warm", help="queue the embedding of every task's image in a project")
    warm.add_argument("--project", type=int, required=True, help="Label Studio project id")
    warm.add_argument("--wait", action="store_true", help="show progress until every image is embedded")
    warm.set_defaults(func=cmd_warm)

    prelabel = sub.add_parser("prelabel", help="post a draft prediction for every task of a project, through workers")
    prelabel.add_argument("--project", type=int, required=True, help="Label Studio project id")
    prelabel.add_argument("--wait", action="store_true", help="show progress until every task is drafted")
    prelabel.set_defaults(func=cmd_prelabel)

    train = sub.add_parser("train", help="train, evaluate and gate a refinement head on the project's annotations")
    train.add_argument("--project", type=int, required=True, help="Label Studio project id")
    train.add_argument("--inline", action="store_true", help="train in this process instead of on a worker")
    train.add_argument("--no-wait", action="store_true", help="queue the run and return")
    train.add_argument("--every", help="keep running: train again every DURATION (e.g. 6h, 30m, 1d)")
    train.set_defaults(func=cmd_train)

    heads = sub.add_parser("heads", help="list a project's refinement heads with their metrics; roll back")
    heads.add_argument("--project", type=int, required=True, help="Label Studio project id")
    heads.add_argument("--rollback", metavar="VERSION", help="serve this earlier version (e.g. v0002)")
    heads.add_argument("--off", action="store_true", help="serve plain SAM for this project")
    heads.set_defaults(func=cmd_heads)

    export = sub.add_parser("export", help="a project's masks as COCO instance polygons (for CVAT)")
    export.add_argument("--project", type=int, required=True, help="Label Studio project id")
    export.add_argument("--format", choices=("coco",), default="coco")
    export.add_argument("--source", choices=("predictions", "annotations"), default="predictions",
                        help="the newest prediction (default) or the newest annotation of each task")
    export.add_argument("--model-version", help="only predictions of this model version")
    export.add_argument("--out", help="output file (default project-ID-coco.json)")
    export.set_defaults(func=cmd_export)

    conn = sub.add_parser("connect", help="register this backend with a Label Studio project (idempotent)")
    conn.add_argument("--project", type=int, required=True, help="Label Studio project id")
    conn.add_argument("--url", help="the backend's URL as Label Studio reaches it (default http://127.0.0.1:PORT)")
    conn.add_argument("--title", default="SAM (sam-backend)")
    conn.add_argument("--show-our-drafts", action="store_true",
                      help="make this backend the project's model version, so the editor pre-fills our drafts "
                           "rather than another model's imported predictions")
    conn.set_defaults(func=cmd_connect)

    doc = sub.add_parser("doctor", help="check, in order, what makes smart tools do nothing or drafts never appear")
    doc.add_argument("--project", type=int, required=True, help="Label Studio project id")
    doc.add_argument("--url", help="the backend's URL as registered (default: the project's interactive backend)")
    doc.set_defaults(func=cmd_doctor)


def _weights_options(parser) -> None:
    parser.add_argument("--random-weights", action="store_true",
                        help="use a randomly initialised SAM of the real architecture (timing only: masks are noise)")
    parser.add_argument("--model-type", default="vit_b", choices=MODEL_TYPES)


def _add_bench_commands(sub) -> None:
    """bench click | encoder | learn | prelabel | fidelity | load."""
    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    click = bench_sub.add_parser("click", help="cold and warm click latency through the real HTTP stack")
    _weights_options(click)
    click.add_argument("--sizes", default="1MP,20MP", help="comma list of 1MP, 20MP")
    click.add_argument("--outputs", default="brush,polygon", help="comma list of brush, polygon, bitmask")
    click.add_argument("--cold", type=int, default=3, help="cold clicks per size (each encodes a new image)")
    click.add_argument("--warm", type=int, default=20, help="warm clicks per size and output")
    click.add_argument("--threads", type=int, default=4)
    click.add_argument("--device", default="auto")
    click.add_argument("--head", action="store_true",
                       help="also time warm clicks on a project served a refinement head")
    click.set_defaults(func=cmd_bench_click)

    enc = bench_sub.add_parser("encoder", help="every installed model family and size: encoder seconds, peak RSS, "
                                                "stored embedding, warm clicks through the real HTTP stack")
    enc.add_argument("--models", default="", help="comma list of SAM_MODEL_TYPE values (default: all installed)")
    enc.add_argument("--repeat", type=int, default=3, help="encodes per model (the median is reported)")
    enc.add_argument("--sizes", default="1MP,20MP", help="image sizes of the click timings")
    enc.add_argument("--warm", type=int, default=10, help="warm clicks per size and output (0: encoder figures only)")
    enc.add_argument("--threads", type=int, default=0, help="torch threads (0: library default)")
    enc.add_argument("--batch", type=int, default=1,
                     help="also time forward passes of this many images (images/s batched vs one by one; for GPUs)")
    enc.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                     help="ENCODE_PRECISION of the encoder (auto: fp32 on a CPU, fp16/bf16 on CUDA where masks hold)")
    enc.add_argument("--device", default="auto")
    enc.set_defaults(func=cmd_bench_encoder)

    learn = bench_sub.add_parser("learn", help="held-out mIoU / NoC@90 of base vs refinement head as corrections arrive")
    learn.add_argument("--rounds", default="10,25,50,100", help="corrections available after each round (cumulative)")
    learn.add_argument("--heldout", type=int, default=30, help="held-out images")
    learn.add_argument("--steps", type=int, default=250, help="training steps per round")
    learn.add_argument("--margin", type=float, default=1.0, help="promotion margin in mIoU points")
    learn.add_argument("--seed", type=int, default=0)
    learn.set_defaults(func=cmd_bench_learn)

    pre = bench_sub.add_parser("prelabel", help="images/minute of pre-labelling with 1 and 2 workers (real Label Studio)")
    _weights_options(pre)
    pre.add_argument("--models", default="",
                     help="comma list of SAM_MODEL_TYPE values compared in one run (with --random-weights), e.g. vit_b,l0")
    pre.add_argument("--images", type=int, default=6)
    pre.add_argument("--width", type=int, default=1280)
    pre.add_argument("--height", type=int, default=800)
    pre.add_argument("--workers", default="1,2", help="comma list of worker counts, one round each")
    pre.add_argument("--points-per-side", type=int, default=16)
    pre.add_argument("--search", default="coarse", choices=("coarse", "grid"), help="PRELABEL_SEARCH of the workers")
    pre.add_argument("--min-area", type=float, default=0.05, help="PRELABEL_MIN_AREA, percent of the image")
    pre.add_argument("--everything-scenes", type=int, default=20,
                     help="stand-in scenes for objects found, full grid vs coarse search")
    pre.add_argument("--timed-scenes", type=int, default=2,
                     help="scenes timed with the real decoder for each search (0: none)")
    pre.add_argument("--threads", type=int, default=2, help="decoder threads for the timed scenes")
    pre.add_argument("--no-rounds", dest="rounds", action="store_false",
                     help="segment everything figures only: no Label Studio, no workers")
    pre.add_argument("--device", default="auto")
    pre.add_argument("--label-studio-venv", help="virtualenv holding label-studio (default ./.ls-venv)")
    pre.set_defaults(func=cmd_bench_prelabel)

    fid = bench_sub.add_parser("fidelity", help="mask fidelity on synthetic 20 MP screens: whole-image vs zoom path "
                                                 "(stand-in decoder: the ceiling), and zoomed click latency")
    _weights_options(fid)
    fid.add_argument("--checkpoint", help="time clicks with this SAM checkpoint instead of --random-weights")
    fid.add_argument("--screens", type=int, default=2, help="synthetic screens (11 defects each)")
    fid.add_argument("--width", type=int, default=5472)
    fid.add_argument("--height", type=int, default=3648)
    fid.add_argument("--input-side", type=int, default=1024, help="the stand-in encoder's input side")
    fid.add_argument("--threshold", type=float, default=0.25, help="ZOOM_THRESHOLD")
    fid.add_argument("--max-zoom", type=int, default=4, help="ZOOM_MAX")
    fid.add_argument("--max-windows", type=int, default=32, help="ZOOM_MAX_WINDOWS")
    fid.add_argument("--no-edges", action="store_true", help="no edge windows for large objects")
    fid.add_argument("--no-timing", dest="timing", action="store_false",
                     help="only the fidelity figures (no server, no SAM)")
    fid.add_argument("--cold", type=int, default=3, help="cold zoomed clicks (one window encode each)")
    fid.add_argument("--warm", type=int, default=20, help="warm zoomed clicks per output")
    fid.add_argument("--threads", type=int, default=4)
    fid.add_argument("--device", default="auto")
    fid.set_defaults(func=cmd_bench_fidelity)

    load = bench_sub.add_parser("load", help="simulated annotators on the real stack, with optional faults")
    _weights_options(load)
    load.add_argument("--annotators", type=int, default=16)
    load.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    load.add_argument("--think", default="0.5,2.0", help="think time between clicks: min,max seconds")
    load.add_argument("--sizes", default="1MP,20MP", help="comma list of 1MP, 20MP")
    load.add_argument("--images", type=int, default=2, help="images per size (embedded before the load starts)")
    load.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    load.add_argument("--threads", type=int, default=8, help="threads per worker")
    load.add_argument("--device", default="auto")
    load.add_argument("--baseline-clicks", type=int, default=20, help="single-user warm clicks before the load")
    load.add_argument("--slow-clients", type=int, default=0, help="clients that never finish sending a body")
    load.add_argument("--hung-image-host", action="store_true",
                      help="also click a task whose image host accepts connections and never answers")
    load.add_argument("--kill-redis-at", type=float, help="kill the cache Redis after this many seconds (back 5 s later)")
    load.add_argument("--image-timeout", type=float, default=5.0, help="IMAGE_TIMEOUT for the backend under load")
    load.set_defaults(func=cmd_bench_load)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-backend", description="Label Studio ML backend for Segment Anything")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serving_commands(sub)
    _add_project_commands(sub)
    _add_bench_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from backend.errors import BackendError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BackendError as exc:  # the one place a command's typed error becomes a message and exit code
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
