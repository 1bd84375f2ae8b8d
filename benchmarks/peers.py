"""MergeRec against what a Flower user would try instead, on the same model, silos and evaluation:

    python -m benchmarks.peers [--data-root ../shared/data/amazon] [--domains Beauty,Sports,Toys]
                               [--extra-root ../shared/data/public --extra-domains Scientific,Office,Games]
                               [--rounds 1,3,10] [--prox-mu 0.01] [--hybrid-rounds 1,3] [--joint-epochs 8]
                               [--run-config "eval-max-users=5000 ..."] [--out benchmarks/results/peers.json]

A driver over the federation's own code: every row comes from a run of the pipeline (server/pipeline.py) over
in-process silos (benchmarks/driver.py), configured like `flwr run` (pyproject + `--run-config`):
- each domain's own fine-tuned model on its own domain, and MergeRec one-shot (the model the run ships, and
  MergeRec layer- and task-wise): the default pipeline run;
- FedAvg after R rounds for every R in --rounds: one strategy=fedavg run of max(R) rounds, the stored global
  model of round R evaluated at the silos; FedProx at --prox-mu the same way;
- the hybrid (FedAvg rounds from the best merged model) after R rounds for every R in --hybrid-rounds: a copy of
  the MergeRec run directory resumed with strategy=fedavg fedavg-init=merged (the MergeRec stages are reused);
- joint training on the pooled data (the non-private reference), --joint-epochs epochs.
Columns: test Recall@10 / NDCG@10 per domain and their mean, rounds, bytes up and down per silo (mean over the
silos, every message of the strategy), silo compute seconds (summed over silos) and the run's wall seconds
(in-process silos run one after another: a deployment runs them in parallel). With --extra-domains the same table
is measured again with those domains as silos too (public data, for this benchmark only; the base stays the
untrained one, so that no silo's data was seen by it).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from benchmarks.core import RESULTS
from benchmarks.driver import Stages, silo_pipeline
from common.core.report import markdown_table, write_results
from common.data.format import load_silo
from common.model.backbones import shared_state
from common.model.train import refit
from server.config import app_defaults, parse_overrides, pipeline_config

log = logging.getLogger("benchmarks.peers")
ROOT = Path(__file__).resolve().parents[1]


def _ints(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


class Peers:
    def __init__(self, args, command: str):
        self.args, self.command = args, command
        self.rows: list[dict] = []
        self.stage = Stages()

    # ------------------------------------------------------------------ helpers
    def config(self, **extra):
        over = parse_overrides(self.args.run_config) | {"cache-dir": str(self.args.cache)}
        cfg, _, _ = pipeline_config(app_defaults() | over | extra)
        return cfg

    def add(self, scale: str, method: str, metrics: dict, *, rounds: int, up: float, down: float, compute_s: float,
            wall_s: float) -> None:
        """metrics: domain -> AggregateMetrics dict of one model (test split)."""
        row = {"silos": scale, "method": method}
        for d, m in sorted(metrics.items()):
            row[f"{d} R@10"], row[f"{d} N@10"] = m["values"]["recall@10"], m["values"]["ndcg@10"]
        row["mean R@10"] = sum(m["values"]["recall@10"] for m in metrics.values()) / len(metrics)
        row["mean N@10"] = sum(m["values"]["ndcg@10"] for m in metrics.values()) / len(metrics)
        row.update({"rounds": rounds, "MB up / silo": round(up / 1e6, 2), "MB down / silo": round(down / 1e6, 2),
                    "silo compute s": round(compute_s, 1), "wall s": round(wall_s, 1)})
        self.rows.append(row)
        self.write(done=False)

    @staticmethod
    def per_silo(bytes_: dict, key: str) -> float:
        return sum(b[key] for b in bytes_.values()) / max(len(bytes_), 1)

    def write(self, done: bool) -> str:
        cols = list(dict.fromkeys(k for r in self.rows for k in r))
        text = f"# Peers: MergeRec, FedAvg, FedProx, the hybrid\n\nCommand: `{self.command}`\n\n"
        for scale in dict.fromkeys(r["silos"] for r in self.rows):
            part = [r for r in self.rows if r["silos"] == scale]
            text += f"## {scale} silos\n\n" + markdown_table(part, [c for c in cols if any(c in r for r in part)]) + "\n\n"
        text += "## stages\n\n" + markdown_table(self.stage.rows, ["stage", "seconds", "peak_rss_mb"]) + "\n"
        write_results(self.args.out, {"command": self.command, "rows": self.rows, "stages": self.stage.rows,
                                      "seen_items": self.config().train.seen_items, "complete": done}, text)
        return text

    # ------------------------------------------------------------------ the runs
    def mergerec(self, scale: str, paths: dict[str, Path], work: Path):
        domains = sorted(paths)
        run_dir = work / "mergerec"
        with self.stage(f"{scale}: MergeRec pipeline"):
            t0 = time.perf_counter()
            p = silo_pipeline(self.config(), paths, domains, run_dir, self.args.cache)
            report = p.run()
            wall = time.perf_counter() - t0
        st = report["timings"]
        up, down = self.per_silo(report["bytes"], "received_from_silo"), self.per_silo(report["bytes"], "sent_to_silo")
        compute = sum(f.get("seconds") or 0.0 for f in report["finetune"].values())
        own = {d: report["metrics"][d][f"finetuned-{d}"] for d in domains}
        self.add(scale, "own model (each domain's, on its own domain)", own, rounds=0, up=up, down=down,
                 compute_s=compute / len(domains), wall_s=st.get("finetune", 0.0) / len(domains))
        shipped = report["selection"]["chosen"]
        for name in dict.fromkeys([shipped, *(f"mergerec-{g}" for g in p.cfg.granularities)]):
            label = f"{name} (shipped)" if name == shipped else name
            self.add(scale, f"MergeRec one-shot: {label}", {d: report["metrics"][d][name] for d in domains},
                     rounds=1, up=up, down=down, compute_s=compute, wall_s=wall)
        return p, report

    def fedavg(self, scale: str, paths: dict[str, Path], work: Path, label: str, rounds: list[int], **extra):
        domains = sorted(paths)
        with self.stage(f"{scale}: {label}, {max(rounds)} round(s)"):
            t0 = time.perf_counter()
            p = silo_pipeline(self.config(strategy="fedavg", **{"fedavg-rounds": max(rounds)}, **extra), paths,
                              domains, work / label, self.args.cache)
            p.run()
            wall = time.perf_counter() - t0
        self.rounds_rows(scale, p, label, rounds, wall)

    def rounds_rows(self, scale: str, p, label: str, rounds: list[int], wall: float, extra_up: float = 0.0,
                    extra_down: float = 0.0, extra_compute: float = 0.0) -> None:
        """One row per R in `rounds`: the stored global model after R rounds, evaluated at the silos; bytes and
        compute of the rounds up to R (plus what came before them, for the hybrid)."""
        fed = p.state.fedavg
        n = len(fed.rounds[-1].val) or 1
        total = max(x.round for x in fed.rounds)
        for r in rounds:
            got = p.merges.evaluate_at({f"{label}@{r}": p.fed.round_model(r)}, p.active())
            upto = [x for x in fed.rounds if 1 <= x.round <= r]
            self.add(scale, f"{label} after {r} round(s)", {d: m[f"{label}@{r}"] for d, m in got.items()}, rounds=r,
                     up=extra_up + sum(sum(x.up.values()) for x in upto) / n,
                     down=extra_down + sum(sum(x.down.values()) for x in upto) / n,
                     compute_s=extra_compute + sum(sum(x.seconds.values()) for x in upto),
                     wall_s=wall * r / max(total, 1))

    def hybrid(self, scale: str, paths: dict[str, Path], work: Path, merged_report: dict, rounds: list[int]):
        domains = sorted(paths)
        run_dir = work / "hybrid"
        if not run_dir.exists():  # the MergeRec stages are reused: the copy resumes after them
            shutil.copytree(work / "mergerec", run_dir, ignore=shutil.ignore_patterns(".lock"))
        with self.stage(f"{scale}: hybrid, {max(rounds)} round(s)"):
            t0 = time.perf_counter()
            p = silo_pipeline(self.config(strategy="fedavg", **{"fedavg-init": "merged",
                                                                 "fedavg-rounds": max(rounds)}),
                              paths, domains, run_dir, self.args.cache)
            p.run()
            wall = time.perf_counter() - t0
        b = merged_report["bytes"]
        self.rounds_rows(scale, p, "hybrid", rounds, wall,
                         extra_up=self.per_silo(b, "received_from_silo"), extra_down=self.per_silo(b, "sent_to_silo"),
                         extra_compute=sum(f.get("seconds") or 0.0 for f in merged_report["finetune"].values()))

    def joint(self, scale: str, paths: dict[str, Path], p, epochs: int) -> None:
        """Joint training on the pooled train + validation items (non-private reference)."""
        with self.stage(f"{scale}: joint training, {epochs} epochs"):
            t0 = time.perf_counter()
            silos = [load_silo(paths[d], d) for d in sorted(paths)]
            model = copy.deepcopy(p.base.model)
            refit(model, silos, [p.base.model.domain_inputs(s.catalog) for s in silos], p.cfg.train, epochs)
            wall = time.perf_counter() - t0
        got = p.merges.evaluate_at({"joint": shared_state(model)}, sorted(paths))
        self.add(scale, "joint training, pooled data (non-private reference)", {d: m["joint"] for d, m in got.items()},
                 rounds=0, up=0.0, down=0.0, compute_s=wall, wall_s=wall)

    def scale(self, paths: dict[str, Path]) -> None:
        a = self.args
        scale = str(len(paths))
        work = a.work / f"{scale}-silos"
        p, report = self.mergerec(scale, paths, work)
        self.fedavg(scale, paths, work, "fedavg", _ints(a.rounds))
        if a.prox_mu > 0:
            self.fedavg(scale, paths, work, f"fedprox (mu {a.prox_mu:g})", [max(_ints(a.rounds))],
                        **{"fedprox-mu": a.prox_mu})
        self.hybrid(scale, paths, work, report, _ints(a.hybrid_rounds))
        if a.joint_epochs:
            self.joint(scale, paths, p, a.joint_epochs)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "amazon")
    ap.add_argument("--domains", default="Beauty,Sports,Toys")
    ap.add_argument("--extra-root", type=Path, default=ROOT.parent / "shared" / "data" / "public")
    ap.add_argument("--extra-domains", default="", help="more silos for a second table (e.g. Scientific,Office,Games)")
    ap.add_argument("--rounds", default="1,3,10", help="FedAvg rows after these many rounds")
    ap.add_argument("--prox-mu", type=float, default=0.01, help="FedProx's mu (0 = no FedProx row)")
    ap.add_argument("--hybrid-rounds", default="1,3", help="hybrid rows after these many rounds")
    ap.add_argument("--joint-epochs", type=int, default=8, help="pooled joint training (0 = no row)")
    ap.add_argument("--run-config", default="", help='"key=value ..." over pyproject\'s table, as for `flwr run`')
    ap.add_argument("--cache", type=Path, default=Path(".cache"), help="item-embedding cache")
    ap.add_argument("--work", type=Path, default=Path(".cache/bench-peers"), help="run directories (resumable)")
    ap.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    args = ap.parse_args(argv)
    for flag, value in (("--rounds", args.rounds), ("--hybrid-rounds", args.hybrid_rounds)):
        if not _ints(value) or min(_ints(value)) < 1:
            ap.error(f"{flag}: give positive round counts, e.g. 1,3")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    command = "python -m benchmarks.peers " + " ".join(argv if argv is not None else sys.argv[1:])
    bench = Peers(args, command)
    silos = {d: args.data_root / d for d in args.domains.split(",") if d}
    bench.scale(silos)
    extra = {d: args.extra_root / d for d in args.extra_domains.split(",") if d}
    if extra:
        bench.scale({**silos, **extra})
    print(bench.write(done=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
