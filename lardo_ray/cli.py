"""`lardo-ray <stage>`: parse arguments, load and validate the config, call the stage. Nothing else."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from lardo_ray.config import ConfigError, PipelineConfig, dump_config, load_config

EPILOG = """\
Config: every subcommand reads one YAML file (--config) validated against the whole pipeline's model;
--set key.sub=value overrides any key (repeatable), e.g. --set dsm.descriptors=[MolLogP,TPSA]
--set dsm.ray.concurrency=4. Unknown keys and wrong types stop the job before any work, naming the key.
Outputs land in <run.output_dir>/<stage>/{data,rejected,_done}/ with a manifest.json; re-running the
same command resumes, skipping finished chunks. Runs are logged to MLflow (tracking.tracking_uri;
default sqlite:///<run.output_dir>/mlflow.db; look at them with `mlflow ui --backend-store-uri ...`).
"""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--config", metavar="FILE.yaml", help="pipeline config (see configs/); defaults apply without one")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set input.chunk_rows=5000 (repeatable)")
    g.add_argument("--input", help="input: file, directory, glob, s3://..., a saved HF dataset dir or hf:NAME (input.path)")
    g.add_argument("--output", help="output root directory or URI (run.output_dir)")
    g.add_argument("--smiles-column", help="SMILES column of the input (input.smiles_column)")
    g.add_argument("--tracking-uri", help="MLflow tracking store (tracking.tracking_uri; default $MLFLOW_TRACKING_URI "
                   "or sqlite:///<output>/mlflow.db), e.g. the store a model was registered in")
    g.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    g.add_argument("-q", "--quiet", action="store_true", help="no per-chunk progress lines")
    g.add_argument("--allow-partial", action="store_true",
                   help="exit 0 although some seeds/methods failed (run.allow_partial); they are still listed")


def _load(args: argparse.Namespace) -> PipelineConfig:
    top = {"input.path": args.input, "run.output_dir": args.output, "input.smiles_column": args.smiles_column,
           "finetune.encoder": getattr(args, "encoder_flag", None), "finetune.dataset": getattr(args, "dataset_flag", None),
           "tracking.tracking_uri": args.tracking_uri}
    if getattr(args, "model_flag", None):
        top[f"{args.command}.model"] = args.model_flag
    if getattr(args, "quiet", False):
        top["run.progress"] = False
    if getattr(args, "allow_partial", False):
        top["run.allow_partial"] = True
    return load_config(args.config, args.overrides, top)


def _reads(stage: str) -> bool:
    """A chunked stage of the pipeline that reads its upstream stage's output (not --input)."""
    from lardo_ray.stages.registry import STAGES, pipeline_order

    st = STAGES.get(stage)
    return st is not None and st.upstream is not None and stage in pipeline_order()


def _upstream(args: argparse.Namespace, cfg: PipelineConfig) -> int | None:
    """--input on a stage that reads its upstream stage: refuse it, or with --with-upstream run the stages
    before it (each resumes: finished ones are skipped) and then this one, as a pipeline."""
    from lardo_ray.stages.registry import get

    stage = args.command
    if not _reads(stage):
        return None
    if not getattr(args, "with_upstream", False):
        if args.input:
            reads = get(stage).upstream_of(cfg)
            raise ConfigError(
                f"{stage} reads the {reads} stage's output under {cfg.run.output_dir}/, not --input; run "
                f"`lardo-ray dsm --input {args.input}` and the stages after it first, or add --with-upstream to "
                f"run the missing upstream stages (dsm ... {stage}) on {args.input}")
        return None
    from lardo_ray.config import PIPELINE_STAGES
    from lardo_ray.stages.pipeline import run_pipeline

    if not cfg.input.path:
        raise ConfigError(f"{stage} --with-upstream: no input (give --input or input.path) for the dsm stage")
    stages = list(PIPELINE_STAGES[: PIPELINE_STAGES.index(stage) + 1])
    cfg = cfg.model_copy(update={"pipeline": cfg.pipeline.model_copy(update={"stages": stages})})
    result = run_pipeline(cfg)
    print("\n".join(result.lines()))
    _print_mlflow_hint(cfg, [])
    return _exit_code(cfg, result)


def cmd_stage(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    """Any registered chunked stage without flags of its own."""
    from lardo_ray.stages.lifecycle import run_stage

    return _print_summary(cfg, run_stage(args.command, cfg))


def cmd_dsm(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    if args.list_descriptors:
        from lardo_ray.chem.descriptors import groups, registry

        for name, calc in registry().items():
            print(f"{name:32s} {calc.group:10s} {calc.unit:6s} {calc.description}")
        print(f"\n{len(registry())} descriptors; groups: " + ", ".join(f"{g} ({len(v)})" for g, v in groups().items()))
        return 0
    return cmd_stage(args, cfg)


def _print_mlflow_hint(cfg: PipelineConfig, not_logged: list[str]) -> None:
    from lardo_ray.tracking import resolve_tracking_uri

    if not cfg.tracking.enabled:
        return
    if not_logged:
        print(f"  MLflow: NOT logged (store unreachable mid-run): {', '.join(not_logged)}")
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.run.output_dir)
    ui = f"mlflow ui --backend-store-uri {uri}" if not uri.startswith("http") else f"open {uri}"
    print(f"  MLflow      experiment '{cfg.tracking.experiment}': {ui}")


def _print_summary(cfg: PipelineConfig, summary) -> int:
    print("\n".join(summary.lines()))
    _print_mlflow_hint(cfg, getattr(summary, "not_logged", []))
    return _exit_code(cfg, summary)


def _exit_code(cfg: PipelineConfig, result) -> int:
    """1 when any seed, method or variant failed (listed on stderr), unless run.allow_partial: a failure is
    never reported as a success, and a table that lost a column is not a result."""
    failures = result.failures() if hasattr(result, "failures") else []
    if not failures:
        return 0
    head = "FAILED (run.allow_partial=true: exiting 0 anyway)" if cfg.run.allow_partial else "FAILED"
    print(f"\n== {head}: {len(failures)} failure(s) ==", file=sys.stderr)
    for line in failures:
        print(f"  {line}", file=sys.stderr)
    print("  (errors in full: the FAILED runs' error.txt in MLflow; re-running resumes and retries only these)",
          file=sys.stderr, flush=True)
    return 0 if cfg.run.allow_partial else 1


def cmd_describe(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    if args.list_tasks:
        from lardo_ray.llm.cards import list_cards, load_card

        for name in list_cards():
            card = load_card(name)
            print(f"{name:14s} {card.task_type:15s} {card.endpoint}")
        return 0
    return cmd_stage(args, cfg)


def cmd_compare(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from lardo_ray.stages.compare import compare, resolved_compare_config

    c = resolved_compare_config(cfg)
    if args.experiment:
        c.experiment = args.experiment
    if args.metric:
        c.metric = args.metric
    if args.published:
        c.include_published = True
    result = compare(c)
    print(result.markdown)
    print(f"\nwrote {result.csv_path}, {result.markdown_path}, {result.png_path}  ({result.n_runs} MLflow runs)")
    return 0


def cmd_pretrain(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from lardo_ray.stages.pretrain import run_pretrain

    return _print_summary(cfg, run_pretrain(cfg))


def cmd_finetune(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from lardo_ray.stages.finetune import run_finetune, run_finetune_grid

    baselines = list(dict.fromkeys(cfg.finetune.baselines + (args.baselines or [])))
    if args.methods or args.datasets or baselines:
        from lardo_ray.stages.finetune import baseline_method

        methods = []
        for item in args.methods or [f"{cfg.finetune.method_label()}={cfg.finetune.encoder or 'scratch'}"]:
            label, _, enc = item.partition("=")
            methods.append((label, None if enc in ("", "scratch", "none") else enc))
        methods += [baseline_method(kind) for kind in baselines]
        result = run_finetune_grid(cfg, methods, args.datasets)
    else:
        result = run_finetune(cfg)
    return _print_summary(cfg, result)


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", dest="encoder_flag", help="pre-trained encoder: export dir, runs:/ID/encoder or "
                   "models:/NAME/VERSION (finetune.encoder); omit for a random init")
    p.add_argument("--dataset", dest="dataset_flag", help="built-in card, e.g. bbbp, bace, tox21, esol (finetune.dataset)")
    p.add_argument("--method", dest="methods", action="append", metavar="LABEL=ENCODER",
                   help="ablation grid: one fine-tune per method on the same splits, e.g. --method scratch= "
                   "--method lardo=outputs/x/pretrain/encoder (repeatable)")
    p.add_argument("--datasets", nargs="+", help="grid over several cards (finetune.data_path = their directory)")
    p.add_argument("--baseline", dest="baselines", action="append", choices=["rf_dsm", "rf_ecfp"],
                   help="add a classical baseline on the same splits and seeds (repeatable; finetune.baselines): "
                   "rf_dsm = random forest on the dsm stage's RDKit descriptors, rf_ecfp = on ECFP4 fingerprints")


def cmd_pipeline(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from lardo_ray.stages.pipeline import run_pipeline

    result = run_pipeline(cfg)
    print()
    print("\n".join(result.lines()))
    if result.compare_markdown:
        print("\n" + result.compare_markdown)
    _print_mlflow_hint(cfg, [])
    return _exit_code(cfg, result)


def cmd_ablate(args: argparse.Namespace, cfg: PipelineConfig) -> int:
    from lardo_ray.stages.ablation import run_ablation

    result = run_ablation(cfg)
    print()
    print("\n".join(result.lines()))
    if result.compare is not None:
        print("\n" + result.compare.markdown)
        print(f"\nwrote {result.compare.csv_path}, {result.compare.markdown_path}, {result.compare.png_path}")
    _print_mlflow_hint(cfg, [])
    return _exit_code(cfg, result)


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", help="MLflow experiment to read (compare.experiment; default tracking.experiment)")
    p.add_argument("--metric", help="roc_auc, rmse or mae (compare.metric; default per task type)")
    p.add_argument("--published", action="store_true", help="add the published anchors (MolCLR, D-MPNN, MoleculeSTM)")


def _model_arg(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--model", dest="model_flag", metavar="URI",
                   help=f"the model ({stage}.model): models:/NAME/VERSION, models:/NAME@alias, runs:/ID/model or a "
                   "directory; `lardo-ray finetune` registers each method's seed ensemble as <dataset>-<method>")


# Stage-specific handlers and flags (name -> (handler, extra-arguments adder)); every other registered
# stage gets cmd_stage. The subcommands themselves, their order and help come from the stage registry.
HANDLERS: dict[str, tuple[Callable, Callable[[argparse.ArgumentParser], None] | None]] = {
    "dsm": (cmd_dsm, lambda p: p.add_argument("--list-descriptors", action="store_true",
                                              help="list the DSM registry and exit")),
    "describe": (cmd_describe, lambda p: p.add_argument("--list-tasks", action="store_true",
                                                        help="list the bundled task cards and exit")),
    "pretrain": (cmd_pretrain, None),
    "predict": (cmd_stage, lambda p: _model_arg(p, "predict")),
    "encode": (cmd_stage, lambda p: _model_arg(p, "encode")),
    "finetune": (cmd_finetune, _finetune_args),
    "compare": (cmd_compare, _compare_args),
}
# Commands that run several stages.
COMPOSITES: dict[str, tuple[str, Callable, Callable[[argparse.ArgumentParser], None] | None]] = {
    "pipeline": (
        "the whole job: dsm -> describe -> embed -> featurize -> pretrain -> finetune -> compare (resumable)",
        cmd_pipeline,
        None,
    ),
    "ablate": (
        "the ablation grid of one dataset: a pre-training per ablation.variants entry, then scratch + every "
        "encoder fine-tuned on the same splits, and the compare table (see configs/ablation_*.yaml)",
        cmd_ablate,
        None,
    ),
}


def subcommands() -> dict[str, tuple[str, Callable, Callable[[argparse.ArgumentParser], None] | None]]:
    from lardo_ray.stages.registry import STAGES

    out = {name: (st.help, *HANDLERS.get(name, (cmd_stage, None))) for name, st in STAGES.items()}
    out.update(COMPOSITES)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lardo-ray",
        description="MolGraph-LarDo on Ray: DSM descriptors, LLM descriptions, graph-text pre-training, "
        "MoleculeNet fine-tuning. One subcommand per stage.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="<stage>")
    for name, (help_text, _, extra) in subcommands().items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p)
        if extra:
            extra(p)
        if _reads(name):
            p.add_argument("--with-upstream", action="store_true",
                           help=f"run the stages before {name} first (dsm ... {name}; finished ones are skipped) "
                           "on --input / input.path")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = _load(args)
        if args.print_config:
            print(dump_config(cfg))
            return 0
        code = _upstream(args, cfg)
        if code is not None:
            return code
        return subcommands()[args.command][1](args, cfg)
    except ConfigError as e:
        print(f"lardo-ray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
