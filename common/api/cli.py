"""The `mergerec` command's model and data commands (the launch commands, `simulate` and `certs`, are added by
deployment/cli.py, the installed entry point: common/ never imports the launchers above it).

    mergerec recommend --model runs/latest/model --catalog .cache/demo-data/garden --history KEY,KEY -k 10
    mergerec evaluate  --model runs/latest/model --data .cache/demo-data/garden --split test
    mergerec export    --model .cache/silo-state/garden/finetuned-....safetensors --out models/garden
    mergerec simulate  [--data-root DIR --domains a,b,c --run-config "k=v ..."]
    mergerec demo-data --out DIR
    mergerec convert-amazon --reviews R.json.gz --meta M.json.gz --out data/Category
    mergerec certs --out certs --domains a,b,c

`mergerec <command> --help` explains every option.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

MODEL_HELP = ("a model folder (config.json + model.safetensors, e.g. a run's model/), a silo's fine-tuned "
              ".safetensors file, or base:init / base:bundled for the shared base model")


def data_commands() -> dict:
    """command -> (main(argv, prog), one-line help) of the commands that parse their own options."""
    from common.data import amazon, demo

    return {"demo-data": (demo.main, "write synthetic demo domains"),
            "convert-amazon": (amazon.main, "convert raw Amazon review + metadata files into a domain folder")}


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where item-text embeddings are cached (default: the model's setting, .cache/item_embeddings)")
    p.add_argument("--encoder", default=None,
                   help="text encoder: 'minilm' (bundled) or a local model folder (default: the model's setting)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--format", choices=["table", "json"], default="table", help="output format (default table)")


def _history(args) -> list:
    if args.history_file:
        text = Path(args.history_file).read_text()
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = [line.strip() for line in text.splitlines() if line.strip()]
        if not isinstance(items, list):
            raise SystemExit("--history-file: expected a JSON list or one item per line")
        return items
    return [h.strip() for h in (args.history or "").split(",") if h.strip()]


def _catalog(spec: str):
    path = Path(spec)
    if path.is_file():  # a JSON list of item texts or {"key", "title", "brand", "category"} objects
        items = json.loads(path.read_text())
        if not isinstance(items, list):
            raise SystemExit(f"--catalog {spec}: expected a JSON list of items")
        return items
    return path


def _load(args):
    from common.api.recommend import MergedRecommender

    return MergedRecommender.from_pretrained(args.model, cache_dir=args.cache_dir, encoder=args.encoder,
                                             device=args.device)


def cmd_recommend(args) -> int:
    history = _history(args)
    if not history:
        raise SystemExit("give a history: --history KEY,KEY,... or --history-file FILE")
    rec = _load(args).index(_catalog(args.catalog))
    recs = rec.recommend(history, k=args.k, exclude_seen=not args.include_seen)
    if args.format == "json":
        print(json.dumps([r.model_dump() for r in recs], indent=1))
    else:
        from common.core.report import markdown_table

        print(markdown_table([r.model_dump() for r in recs], ["rank", "key", "title", "score"]))
    return 0


def cmd_evaluate(args) -> int:
    rec = _load(args)
    rows = []
    for folder in args.data:
        res = rec.evaluate(folder, args.split, max_users=args.max_users, seed=args.seed)
        rows.append({"domain": Path(folder).name, "split": args.split, **res})
    if args.format == "json":
        print(json.dumps(rows, indent=1))
    else:
        from common.core.report import markdown_table

        print(markdown_table(rows, ["domain", "split", "recall@10", "ndcg@10", "recall@50", "ndcg@50", "users"]))
    return 0


def cmd_export(args) -> int:
    from common.core.fingerprint import fingerprint
    from common.api.model_folder import load_weights, save_model_folder

    cfg, state = load_weights(args.model)
    if state is None:
        from common.model.backbones import build_backbone, shared_state

        state = shared_state(build_backbone(cfg.backbone, seed=cfg.seed))
    cfg = cfg.model_copy(update={"fingerprint": fingerprint(state), "method": cfg.method or "base"})
    card = (f"# {cfg.method}\n\nExported from `{args.model}`. Load with `mergerec recommend --model <this folder>` "
            "or `MergedRecommender.from_pretrained(<this folder>)`.\n")
    print(save_model_folder(args.out, state, cfg, card))
    return 0


def build_parser(delegated: dict | None = None) -> argparse.ArgumentParser:
    """The parser; `delegated` (command -> (main, help)) adds commands that parse their own options."""
    delegated = data_commands() if delegated is None else delegated
    ap = argparse.ArgumentParser(prog="mergerec", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="command")
    rec = sub.add_parser("recommend", help="top-k items of a catalog for one history",
                         description="Top-k recommendations from a model for one user history.")
    _model_options(rec)
    rec.add_argument("--catalog", required=True, help="a domain folder (meta_data.json + smap.json) or a JSON "
                     "file with a list of item texts or {key, title, brand, category} objects")
    rec.add_argument("--history", help="comma list of item keys or raw item texts, oldest first (texts that "
                     "contain commas: use --history-file)")
    rec.add_argument("--history-file", help="the history as a JSON list or one item (key or text) per line")
    rec.add_argument("-k", type=int, default=10, help="how many items to return (default 10)")
    rec.add_argument("--include-seen", action="store_true", help="also return items already in the history")
    rec.set_defaults(func=cmd_recommend)
    ev = sub.add_parser("evaluate", help="full-ranking Recall@k / NDCG@k of a model on domain folders",
                        description="Full-ranking evaluation with the pipeline's own code and metrics; the data "
                                    "stays where it is.")
    _model_options(ev)
    ev.add_argument("--data", required=True, nargs="+", help="one or more domain folders")
    ev.add_argument("--split", choices=["val", "test"], default="test", help="which split (default test)")
    ev.add_argument("--max-users", type=int, default=None, help="evaluate a seeded subsample of users (default all)")
    ev.add_argument("--seed", type=int, default=0, help="subsample and tie-breaking seed (default 0)")
    ev.set_defaults(func=cmd_evaluate)
    ex = sub.add_parser("export", help="write a model folder (config.json, model.safetensors, README.md)",
                        description="Turn a silo's fine-tuned weights file or the base model into a model folder.")
    ex.add_argument("--model", required=True, help=MODEL_HELP)
    ex.add_argument("--out", type=Path, required=True, help="model folder to write")
    ex.set_defaults(func=cmd_export)
    for name, (_, text) in delegated.items():
        sub.add_parser(name, help=text, add_help=False)
    return ap


def main(argv: list[str] | None = None, extra: dict | None = None) -> int:
    """`extra`: more self-parsing commands (command -> (main, help)), e.g. deployment/cli.py's launchers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = {**data_commands(), **(extra or {})}
    if argv and argv[0] in delegated:  # these parse their own options (and their own --help)
        return delegated[argv[0]][0](argv[1:], prog=f"mergerec {argv[0]}")
    args = build_parser(delegated).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from common.api.model_folder import ModelFolderError

    try:
        return args.func(args)
    except (ModelFolderError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
