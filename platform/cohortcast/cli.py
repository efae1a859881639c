"""`cohortcast` command line. Every sub-command takes `--config FILE` and repeated
`--set a.b=c` overrides on top of the typed defaults (see cohortcast.config)."""

from __future__ import annotations

import argparse
import json
import sys

from cohortcast import __version__


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (defaults apply to anything it leaves out)")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one config value, e.g. --set ingest.crop_size=32 (repeatable)",
    )


def _load(args: argparse.Namespace, extra: list[str]):
    from cohortcast.config import load_config

    return load_config(args.config, list(args.overrides) + extra)


def cmd_synth(args: argparse.Namespace) -> int:
    from cohortcast.data.synthetic import generate_cohort

    extra = [f"synth.{k}={v}" for k, v in (("patients", args.patients), ("seed", args.seed)) if v is not None]
    cfg = _load(args, extra)
    out = args.out or cfg.ingest.manifest
    counts = generate_cohort(cfg.synth, out, workers=args.workers, overwrite=args.overwrite)
    print(f"synthetic cohort written to {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from cohortcast.data.ingest import run_ingest
    from cohortcast.data.prepare import format_summary

    extra = [f"ingest.{k}={v}" for k, v in (("manifest", args.manifest), ("output", args.out)) if v]
    extra += ["ingest.overwrite=true"] if args.overwrite else []
    cfg = _load(args, extra)
    card = run_ingest(cfg.ingest, cfg.privacy, cfg.ray)
    print(format_summary(card))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from cohortcast.data.manifest import load_manifest

    m = load_manifest(args.manifest)
    print(
        f"manifest OK: {len(m.patients)} patients, {len(m.studies)} studies, {len(m.findings)} findings, "
        f"{len(m.labels)} labels (fingerprint {m.fingerprint()[:12]})"
    )
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from cohortcast.config import flatten, to_dict

    cfg = _load(args, [])
    if args.flat:
        print(json.dumps(flatten(cfg), indent=2))
    else:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_forecast(args: argparse.Namespace) -> int:
    if args.job == "cldm":
        from cohortcast.inference.cldm_cohort_forecast import forecast_cldm_cohort as run

        section, model = "cldm.forecast", "model"
    else:
        from cohortcast.inference.cohort_forecast import forecast_cohort as run

        section, model = "forecast", "forecaster"
    extra = [
        f"{section}.{k}={v}"
        for k, v in (
            (model, args.forecaster),
            ("ingested", args.ingested),
            ("output", args.out),
            ("split", args.split),
            ("num_samples", args.samples),
            ("seed", args.seed),
        )
        if v is not None
    ]
    print(json.dumps(run(_load(args, extra)), indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cohortcast.evaluation.namd_evaluation import format_result, run_evaluation

    extra = [f"forecast.split={args.split}"] if args.split else []
    print(format_result(run_evaluation(_load(args, extra))))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from cohortcast.tuning.sweep import format_sweep, run_sweep

    extra = ([f"tune.job={args.job}"] if args.job else []) + (["tune.asha.enabled=true"] if args.asha else [])
    print(format_sweep(run_sweep(_load(args, extra))))
    return 0


def cmd_train_cldm(args: argparse.Namespace) -> int:
    from cohortcast.pipeline.cldm import format_report, run_cldm

    print(format_report(run_cldm(_load(args, []))))
    return 0


def cmd_evaluate_cldm(args: argparse.Namespace) -> int:
    from cohortcast.evaluation.cldm_evaluation import format_result, run_cldm_evaluation

    extra = [f"cldm.evaluation.split={args.split}"] if args.split else []
    print(format_result(run_cldm_evaluation(_load(args, extra))))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ray import serve

    from cohortcast.ray_runtime import ensure_ray
    from cohortcast.serving.entry import application, check_before_start

    extra = [
        f"serve.{k}={v}"
        for k, v in (
            ("forecaster", args.forecaster),
            ("evaluator", args.evaluator),
            ("cldm_model", args.cldm_model),
            ("host", args.host),
            ("port", args.port),
        )
        if v is not None
    ]
    cfg = _load(args, extra)
    check_before_start(cfg)
    # The dashboard hosts Ray's job server, which the cohort endpoints submit to.
    dashboard = ensure_ray(cfg.ray, dashboard=True)
    if cfg.serve.jobs_address is None and dashboard:
        cfg.serve.jobs_address = dashboard
    app = application(cfg)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    print(f"serving on http://{cfg.serve.host}:{cfg.serve.port}/ (API docs: /docs); Ctrl-C stops")
    serve.run(app, name="cohortcast", route_prefix=cfg.serve.route_prefix, blocking=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cohortcast", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"cohortcast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic longitudinal chest-CT cohort (DICOM + NIfTI + manifest)")
    _add_config_args(p)
    p.add_argument("--patients", type=int, help="number of patients (synth.patients)")
    p.add_argument("--seed", type=int, help="random seed; same seed, same cohort (synth.seed)")
    p.add_argument(
        "--out", metavar="DIR", help="output folder, which becomes the manifest folder (default: ingest.manifest)"
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes (output does not depend on it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cohort folder")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", help="manifest -> nodule crops, 3D patches, volumes as sharded Parquet (Ray Data)")
    _add_config_args(p)
    p.add_argument("--manifest", metavar="DIR", help="manifest folder (ingest.manifest)")
    p.add_argument("--out", metavar="DIR", help="output folder (ingest.output)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if the output is up to date")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("validate-manifest", help="check a manifest folder and list every problem")
    p.add_argument("manifest", metavar="DIR", help="manifest folder")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "forecast",
        help="forecast every case of a split with a trained model (Ray Data actor pool); "
        "per case Parquet + NIfTI (+ DICOM for NAMD), finished cases skipped",
    )
    _add_config_args(p)
    p.add_argument(
        "--job",
        choices=("namd", "cldm"),
        default="namd",
        help="namd: nodule crops with a Forecaster (the `forecast` section); cldm: whole follow-up studies "
        "with a CLDM training output (`cldm.forecast`; the options below set its keys)",
    )
    p.add_argument(
        "--forecaster", metavar="DIR", help="Forecaster folder (forecast.forecaster; cldm: cldm.forecast.model)"
    )
    p.add_argument("--ingested", metavar="DIR", help="ingested cohort (forecast.ingested)")
    p.add_argument("--split", choices=("train", "val", "test"), help="which split's cases (forecast.split)")
    p.add_argument("--samples", type=int, help="seeded DDIM samples per case (forecast.num_samples)")
    p.add_argument("--seed", type=int, help="base seed (forecast.seed)")
    p.add_argument("--out", metavar="DIR", help="output folder (forecast.output)")
    p.set_defaults(func=cmd_forecast)

    p = sub.add_parser(
        "evaluate",
        help="NAMD's Table 1 on a split: ViT evaluator, ablation, forecasts, AUROC/AUPRC "
        "over seeds, LPIPS, Frechet distance, variance figures, Markdown report",
    )
    _add_config_args(p)
    p.add_argument("--split", choices=("train", "val", "test"), help="which split's cases (forecast.split)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "tune",
        help="Ray Tune grid over lambda and the alignment temperatures (tune.grid): one "
        "Train run per trial, summary table and best config in MLflow; reruns resume",
    )
    _add_config_args(p)
    p.add_argument(
        "--job",
        choices=("namd", "cldm"),
        help="whose stage the trials train (tune.job): namd's conditional LDM or cldm's diffusion stage",
    )
    p.add_argument("--asha", action="store_true", help="stop poor trials early with ASHA (tune.asha.enabled)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "train-cldm",
        help="CLDM part 1 (jobs/train_cldm.py): cohort, ingestion, universal encoder pre-training on "
        "Ray Train + DeepSpeed, study latent cache; MLflow; finished stages skipped",
    )
    _add_config_args(p)
    p.set_defaults(func=cmd_train_cldm)

    p = sub.add_parser(
        "evaluate-cldm",
        help="CLDM Tables 1-2 (jobs/evaluate_cldm.py): forecast ILD masks (Dice, aVD, progression Dice, "
        "HD95) and reports (BLEU-4, ROUGE-L, label F1) with bootstrap CIs, claims, Markdown report",
    )
    _add_config_args(p)
    p.add_argument("--split", choices=("train", "val", "test"), help="which split (cldm.evaluation.split)")
    p.set_defaults(func=cmd_evaluate_cldm)

    p = sub.add_parser("serve", help="start the forecasting service (Ray Serve + FastAPI) and block")
    _add_config_args(p)
    p.add_argument(
        "--forecaster",
        metavar="DIR_OR_URI",
        help="Forecaster folder or MLflow model URI, e.g. models:/namd-forecaster/3 (serve.forecaster)",
    )
    p.add_argument(
        "--evaluator",
        metavar="DIR",
        help="evaluator folder: per-sample malignancy probabilities in answers (serve.evaluator)",
    )
    p.add_argument(
        "--cldm-model",
        metavar="DIR",
        help="a CLDM training output (encoder/, diffusion/, decoders): adds /v1/cldm/* (serve.cldm_model)",
    )
    p.add_argument("--host", help="address to listen on (serve.host)")
    p.add_argument("--port", type=int, help="port (serve.port)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("config", help="print the resolved config (defaults + file + overrides)")
    _add_config_args(p)
    p.add_argument("--flat", action="store_true", help="flattened dotted keys as JSON (MLflow params, Tune spaces)")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cohortcast.console import configure_logging
    from cohortcast.errors import USER_ERRORS

    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        return args.func(args)
    except USER_ERRORS as exc:  # CohortcastError and missing/existing paths (see cohortcast.errors)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
