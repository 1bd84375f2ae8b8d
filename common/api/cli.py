"""The `mergerec` command's model and data commands (the launch commands, `simulate` and `certs`, are added by
deployment/cli.py, the installed entry point: common/ never imports the launchers above it).

    mergerec recommend --model runs/latest/model --catalog .cache/demo-data/garden --history KEY,KEY -k 10
    mergerec recommend --model runs/latest/model --catalog .cache/demo-data/garden --history-texts --history "TEXT"
    mergerec evaluate  --model runs/latest/model --data .cache/demo-data/garden --split test
    mergerec export    --model .cache/silo-state/garden/finetuned-....safetensors --out models/garden
    mergerec simulate  [--data-root DIR --domains a,b,c --run-config "k=v ..."]
    mergerec demo-data --out DIR
    mergerec convert-amazon --reviews R.json.gz --meta M.json.gz --out data/Category
    mergerec certs --out certs --domains a,b,c

`mergerec <command> --help` explains every option. A bad option or input is one line on stderr naming it and a
non-zero exit status (1; 2 for options argparse refuses).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

MODEL_HELP = ("a model folder (config.json + model.safetensors, e.g. a run's model/), a silo's fine-tuned "
              ".safetensors file, or base:init / base:bundled for the shared base model")
SEED_MAX = 2**63 - 1  # common.model.config.SEED_MAX (not imported: `mergerec --help` stays fast)


class _Parser(argparse.ArgumentParser):
    """argparse, with a refused option reported as one line (naming the option and pointing at --help) instead of
    the usage block and the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int, high: int | None = None):
    """argparse type: a whole number >= low (and <= high)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be at least {low}" + (f" and at most {high}" if high else "")
                                             + f", got {value}")
        return value
    return parse


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
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA when available; default cpu)")
    p.add_argument("--format", choices=["table", "json"], default="table", help="output format (default table)")


def _history(args) -> list:
    if args.history_file:
        path = Path(args.history_file)
        if not path.is_file():
            raise ValueError(f"--history-file {path}: no such file")
        text = path.read_text()
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = [line.strip() for line in text.splitlines() if line.strip()]
        if not isinstance(items, list):
            raise ValueError(f"--history-file {path}: expected a JSON list or one item per line")
        return items
    return [h.strip() for h in (args.history or "").split(",") if h.strip()]


def _catalog(spec: str):
    """The --catalog's CatalogView (read, not yet encoded)."""
    from common.api.recommend import catalog_from_items
    from common.data.format import load_catalog

    path = Path(spec)
    if path.is_file():  # a JSON list of item texts or {"key", "title", "brand", "category"} objects
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError:
            items = None
        if not isinstance(items, list):
            raise ValueError(f"--catalog {spec}: expected a JSON list of items")
        return catalog_from_items(items)
    if not path.is_dir():
        raise ValueError(f"--catalog {spec}: no such domain folder or JSON file")
    return load_catalog(path)


def _load(args):
    """The model, after checking the options that would otherwise fail deep inside torch or transformers."""
    from common.model.config import resolve_device

    try:
        resolve_device(args.device)
    except ValueError as exc:
        raise ValueError(f"--device: {exc}") from None
    if args.encoder not in (None, "minilm") and not Path(args.encoder).expanduser().is_dir():
        raise ValueError(f"--encoder {args.encoder}: no such model folder (give 'minilm' or a local model folder)")
    from common.api.recommend import MergedRecommender

    return MergedRecommender.from_pretrained(args.model, cache_dir=args.cache_dir, encoder=args.encoder,
                                             device=args.device)


def cmd_recommend(args) -> int:
    history = _history(args)
    if not history:
        raise ValueError("give a history: --history KEY,KEY,... or --history-file FILE")
    catalog = _catalog(args.catalog)
    if args.history_texts:  # every entry is an item's text, even one that equals some item's key
        history = [{"title": h} if isinstance(h, str) else h for h in history]
    else:  # strings are item keys; {title, brand, category} objects (--history-file) are texts anyway
        keys = set(catalog.item_keys)
        unknown = [h for h in history if isinstance(h, str) and h not in keys]
        if unknown:
            option = "--history-file" if args.history_file else "--history"
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise ValueError(f"{option}: {unknown[0]!r} is not an item key of --catalog {args.catalog}{more}; "
                             "for raw item texts add --history-texts")
    rec = _load(args).index(catalog)
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
        res = rec.evaluate(folder, args.split, max_users=args.max_users, seed=args.seed, seen_items=args.seen_items)
        rows.append({"domain": Path(folder).name, "split": args.split, "seen_items": args.seen_items, **res})
    if args.format == "json":
        print(json.dumps(rows, indent=1))
    else:
        from common.core.report import markdown_table

        print(markdown_table(rows, ["domain", "split", "seen_items", "recall@10", "ndcg@10", "recall@50", "ndcg@50",
                                    "users"]))
    return 0


def cmd_export(args) -> int:
    from common.core.fingerprint import fingerprint
    from common.api.model_folder import load_weights, save_model_folder

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file is there; give a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ValueError(f"--out {out}: the folder is not empty (--force writes the model files into it anyway)")
    cfg, state = load_weights(args.model)
    if state is None:
        from common.model.backbones import build_backbone, shared_state

        state = shared_state(build_backbone(cfg.backbone, seed=cfg.seed))
    cfg = cfg.model_copy(update={"fingerprint": fingerprint(state), "method": cfg.method or "base"})
    card = (f"# {cfg.method}\n\nExported from `{args.model}`. Load with `mergerec recommend --model <this folder>` "
            "or `MergedRecommender.from_pretrained(<this folder>)`.\n")
    print(save_model_folder(out, state, cfg, card))
    return 0


def build_parser(delegated: dict | None = None) -> argparse.ArgumentParser:
    """The parser; `delegated` (command -> (main, help)) adds commands that parse their own options."""
    delegated = data_commands() if delegated is None else delegated
    ap = _Parser(prog="mergerec", description=__doc__,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="command")
    rec = sub.add_parser("recommend", help="top-k items of a catalog for one history",
                         description="Top-k recommendations from a model for one user history.")
    _model_options(rec)
    rec.add_argument("--catalog", required=True, help="a domain folder (meta_data.json + smap.json) or a JSON "
                     "file with a list of item texts or {key, title, brand, category} objects")
    rec.add_argument("--history", help="comma list of the catalog's item keys, oldest first (an unknown key is an "
                     "error; raw item texts: add --history-texts)")
    rec.add_argument("--history-file", help="the history as a JSON list or one item per line: item keys, "
                     "{title, brand, category} objects, or raw texts with --history-texts")
    rec.add_argument("--history-texts", action="store_true", help="the --history / --history-file entries are raw "
                     "item texts (titles), matched to catalog items by text or encoded as new items")
    rec.add_argument("-k", type=_int_at_least(1), default=10, help="how many items to return (default 10)")
    rec.add_argument("--include-seen", action="store_true", help="also return items already in the history")
    rec.set_defaults(func=cmd_recommend)
    ev = sub.add_parser("evaluate", help="full-ranking Recall@k / NDCG@k of a model on domain folders",
                        description="Full-ranking evaluation with the pipeline's own code and metrics; the data "
                                    "stays where it is.")
    _model_options(ev)
    ev.add_argument("--data", required=True, nargs="+", help="one or more domain folders")
    ev.add_argument("--split", choices=["val", "test"], default="test", help="which split (default test)")
    ev.add_argument("--max-users", type=_int_at_least(1), default=None,
                    help="evaluate a seeded subsample of this many users (default all)")
    ev.add_argument("--seed", type=_int_at_least(0, SEED_MAX), default=0,
                    help="subsample and tie-breaking seed (default 0)")
    ev.add_argument("--seen-items", choices=["exclude", "rank"], default="exclude",
                    help="exclude: a user's history items are left out of the ranking, as recommend serves users "
                    "(default); rank: every item is ranked")
    ev.set_defaults(func=cmd_evaluate)
    ex = sub.add_parser("export", help="write a model folder (config.json, model.safetensors, README.md)",
                        description="Turn a silo's fine-tuned weights file or the base model into a model folder.")
    ex.add_argument("--model", required=True, help=MODEL_HELP)
    ex.add_argument("--out", type=Path, required=True, help="model folder to write (new or empty)")
    ex.add_argument("--force", action="store_true", help="write into a non-empty --out folder")
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
    except (ModelFolderError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
