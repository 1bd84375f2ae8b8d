"""Which part of a fine-tuned model carries over to another domain, and which part breaks it.

    python -m benchmarks.transfer_parts --finetuned RUN/silo-state/Beauty/finetuned-<fp>.safetensors \\
        --source Beauty --domains Beauty Sports [--data-root ../shared/data/amazon] [--users 3000]

Given one silo's fine-tuned weights (the file a silo keeps in its state folder) and the base they started from
(`--backbone KEY=VALUE,...`, BackboneConfig settings, default the pipeline's), evaluates on each domain's test
split (seeded user subsample, the silo's own `evaluate_split`): the base, the fine-tuned model, and for each
top-level part of the light backbone (adaptor, adaptor_mlp, blocks, position) the base with only that part
fine-tuned and the fine-tuned model with only that part reset to the base. A part whose fine-tuned values keep
the base's quality on other domains is safe to merge; a part that breaks them is where task vectors interfere. Writes
benchmarks/results/transfer-parts.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.core import RESULTS
from benchmarks.finetune import parse_settings
from common.core.report import write_table_results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.transfer_parts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--finetuned", type=Path, required=True, help="a silo's fine-tuned state (safetensors)")
    ap.add_argument("--source", required=True, help="the domain the state was fine-tuned on (a label)")
    ap.add_argument("--domains", nargs="+", required=True, help="domains to evaluate on")
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data/amazon"))
    ap.add_argument("--backbone", default="", help="BackboneConfig of the base, KEY=VALUE,...")
    ap.add_argument("--users", type=int, default=3000, help="seeded test subsample per domain (0 = all)")
    ap.add_argument("--out", type=Path, default=RESULTS / "transfer-parts.json")
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    from common.model.backbones import build_backbone, shared_state
    from common.model.config import BackboneConfig
    from common.data.format import load_silo
    from common.model.train import evaluate_split

    torch.set_num_threads(1)
    model = build_backbone(BackboneConfig(**parse_settings(args.backbone)), seed=0)
    base = {k: v.clone() for k, v in shared_state(model).items()}
    tuned = load_file(str(args.finetuned))
    if set(tuned) != set(base):
        raise SystemExit(f"{args.finetuned}: parameter names differ from the base's (another backbone config?)")
    parts = sorted({k.split(".")[0] for k in base})
    states = [("base", base), ("fine-tuned", tuned)]
    for part in parts:
        states.append((f"base + fine-tuned {part}", {k: tuned[k] if k.split(".")[0] == part else base[k] for k in base}))
        states.append((f"fine-tuned, {part} reset", {k: base[k] if k.split(".")[0] == part else tuned[k] for k in base}))
    rows = []
    cmd = "python -m benchmarks.transfer_parts " + " ".join(argv if argv is not None else sys.argv[1:])
    for domain in args.domains:
        silo = load_silo(args.data_root / domain, domain)
        dom = model.domain_inputs(silo.catalog)
        for name, state in states:
            model.load_state_dict(state, strict=False)
            m = evaluate_split(model.eval(), silo, dom, "test", max_users=args.users or None, seed=0)
            rows.append({"fine-tuned on": args.source, "evaluated on": domain, "model": name,
                         "recall@10": round(m["recall@10"], 5), "ndcg@10": round(m["ndcg@10"], 5),
                         "users": int(m["users"])})
            print(rows[-1], file=sys.stderr, flush=True)
        page = write_table_results(args.out, {"command": cmd, "rows": rows}, "Which fine-tuned part transfers")
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
