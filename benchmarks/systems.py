"""Issue 16: the systems around merging (LoRA, weaving, X-Cross-style dynamic integration), on real data.

    python -m benchmarks.systems [--data DIR] [--domains Beauty Sports Toys] [--variants full lora weave]
        [--weave-rounds 1] [--unseen Beauty Sports Toys] [--held-out Toys] [--fractions 0.1 0.25 0.5 1.0]
        [--run-config "epochs=10 ..."] [--run-root DIR] [--out benchmarks/results/systems.json]

A driver over the federation's own code, never a second implementation. Per system variant (`full`: dense
fine-tuning, `lora`: finetune = lora, `weave`: finetune = lora + weave-rounds = R) it runs the pipeline
(server/pipeline.py over in-process silos, configured like `flwr run`: pyproject + `--run-config` + the
variant's keys + integration = xcross), whose report gives the in-domain rows: each domain's own fine-tuned
model on its domain, task arithmetic, TIES, MergeRec task- and layer-wise, xcross. Unseen (leave-one-domain-
out, for each domain in `--unseen`): the run's stored vectors, pseudo-users and teachers of the other domains
go through `Merges.merged_states`, `Merges.learn` and `Integration.train` (xcross's shared weights:
MergeRec of the first granularity over the same domains); the held-out silo evaluates (`evaluate_at`).

New domain (`--held-out` H, the `--fraction-variant` run): for each fraction f of H's training users,
(i) xcross over the other domains with its gates tuned at H's silo on f (`Integration.tune_gates_at`,
a `train.gates` message; before/after test aggregates back) and (ii) LoRA fine-tuned from the base at H's silo
on the same seeded users (TrainConfig.max_users = `fraction_users(f, n)`, a pipeline of H alone running its own
finetune stage), evaluated by H's silo. H is a new silo there: its own state folder, not the run's.

Per row: test metrics with the evaluated users, `upload_bytes_per_silo` (mean over the silos whose uploads the
row needs, counted on the encoded messages: task vector or LoRA factors, weave hops, teacher top-k for MergeRec
and xcross; new domain: H's own uploads), `finetune_s` (the variant's fine-tuning + weaving stages; own model:
that silo's seconds; new domain: H's training seconds) and `build_s` (server time building the model from the
stored vectors; in-domain: the pipeline's stage times). Results are written after each step.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from hashlib import sha256
from pathlib import Path

from benchmarks.core import DEFAULT_DATA, RESULTS
from benchmarks.driver import Stages, silo_pipeline
from benchmarks.merge import METRICS
from common.data.format import load_silo
from common.core.files import atomic_write
from common.merging.task_vectors import add_vector
from common.protocol.messages import FINETUNE, TEACHER, TUNE_GATES, WEAVE, fraction_users
from common.core.report import markdown_table, write_results
from server import checkpoint, integration_stage  # noqa: F401
from server.config import app_defaults, parse_overrides, pipeline_config
from server.pipeline import Pipeline
from server.transport import record_bytes

log = logging.getLogger("benchmarks.systems")
VARIANTS = ("full", "lora", "weave")
FREE = ["task_arithmetic", "ties"]
GRANS = ["task", "layer"]
OWN = "own fine-tuned"


def variant_overrides(variant: str, weave_rounds: int) -> dict:
    """The run-config keys a variant sets over pyproject + --run-config."""
    over = {"integration": "xcross", "baselines": ",".join(FREE), "granularities": ",".join(GRANS)}
    if variant != "full":
        over["finetune"] = "lora"
    over["weave-rounds"] = weave_rounds if variant == "weave" else 0
    return over


class Traffic:
    """Bytes each silo sent up / got down per message type, counted on the encoded messages (the transport's
    observer) and kept in `path`. A message type this process saw replaces what an earlier process stored for
    that silo (a redone stage is not counted twice); one it did not see (a stage done before a resume) is read
    back. A stage interrupted midway and resumed is undercounted (only its second part is seen)."""

    def __init__(self, path: Path):
        self.path = path
        self.old = json.loads(path.read_text()) if path.exists() else {"up": {}, "down": {}}
        self.cur: dict = {"up": {}, "down": {}}

    def __call__(self, direction: str, silo: str, message_type: str, content) -> None:
        if direction in ("up", "down"):
            per = self.cur[direction].setdefault(silo, {})
            per[message_type] = per.get(message_type, 0) + record_bytes(content)
            atomic_write(self.path, json.dumps(self.n))

    @property
    def n(self) -> dict:
        return {k: {s: {**self.old[k].get(s, {}), **self.cur[k].get(s, {})}
                    for s in {*self.old[k], *self.cur[k]}} for k in ("up", "down")}

    def _get(self, direction: str, silo: str, t: str) -> int:
        cur = self.cur[direction].get(silo, {})
        return cur[t] if t in cur else self.old[direction].get(silo, {}).get(t, 0)

    def up(self, silo: str, *types: str) -> int:
        return sum(self._get("up", silo, t) for t in types)

    def down(self, silo: str, *types: str) -> int:
        return sum(self._get("down", silo, t) for t in types)


class Systems:
    """Every row measured so far (`rows`), per variant its pipeline (`pipes`) and traffic counters."""

    def __init__(self, args, command: str):
        self.args, self.command = args, command
        self.rows: list[dict] = []
        self.stage = Stages()
        self.pipes: dict[str, Pipeline] = {}
        self.traffic: dict[str, Traffic] = {}
        self.reports: dict[str, dict] = {}
        self.run_dirs: dict[str, Path] = {}
        self.xcross: dict[tuple[str, str], tuple] = {}  # (variant, held-out) -> (spec, params), build seconds

    def config(self, variant: str, **extra):
        over = parse_overrides(self.args.run_config) | variant_overrides(variant, self.args.weave_rounds)
        over.setdefault("cache-dir", str(self.args.cache))
        cfg, _, _ = pipeline_config(app_defaults() | over | extra)
        return cfg

    def add(self, variant: str, scenario: str, method: str, domain: str, m: dict, **extra) -> None:
        """m: one AggregateMetrics dict (values + users)."""
        self.rows.append({"variant": variant, "scenario": scenario, "method": method, "domain": domain,
                          **{k: m["values"][k] for k in METRICS}, "users": m["users"], **extra})

    def upload(self, variant: str, domains: list[str], teacher: bool) -> float:
        """Mean upload per silo a merged row needs: task vector / factors, weave hops (+ teacher top-k)."""
        t = self.traffic[variant]
        types = (FINETUNE, WEAVE, TEACHER) if teacher else (FINETUNE, WEAVE)
        return sum(t.up(d, *types) for d in domains) / len(domains)

    def run_variant(self, variant: str) -> None:
        """The pipeline run of `variant` (resumes its run directory) and its in-domain rows."""
        cfg = self.config(variant)
        key = json.dumps([checkpoint.stage_fingerprints(cfg)["finetune"], str(self.args.data.resolve()),
                          self.args.domains])  # a later stage's change resumes after fine-tuning (checkpoint)
        run_dir = self.run_dirs[variant] = self.args.run_root / f"{variant}-{sha256(key.encode()).hexdigest()[:12]}"
        self.traffic[variant] = Traffic(run_dir / "systems-traffic.json")
        with self.stage(f"{variant}: pipeline"):
            p = silo_pipeline(cfg, self.args.data, self.args.domains, run_dir, self.args.cache, self.traffic[variant])
            report = p.run()
        self.pipes[variant], self.reports[variant] = p, report
        tm, ft = report["timings"], self.rows_finetune_s(variant)
        teach = tm.get("pseudo_users", 0.0) + tm.get("teacher", 0.0)
        build = {**{m: tm.get("merge_init", 0.0) for m in FREE},
                 **{f"mergerec-{g}": teach + tm.get("coefficients", 0.0) for g in GRANS},
                 "xcross": teach + tm.get("coefficients", 0.0) + tm.get("integration", 0.0)}
        domains = sorted(p.active())
        for d in domains:
            per = report["metrics"][d]
            self.add(variant, "in-domain", OWN, d, per[f"finetuned-{d}"], finetune_s=p.state.finetune[d].seconds,
                     upload_bytes_per_silo=self.upload(variant, [d], False), build_s=0.0)
            self.add(variant, "in-domain", "pretrained", d, per["pretrained"])
            for m in [*FREE, *(f"mergerec-{g}" for g in GRANS), "xcross"]:
                self.add(variant, "in-domain", m, d, per[m], finetune_s=ft, build_s=round(build[m], 1),
                         upload_bytes_per_silo=self.upload(variant, domains, m not in FREE))

    def others_xcross(self, variant: str, held_out: str, shared) -> tuple:
        """xcross over every domain but `held_out` (gates trained on their pseudo-users), cached per variant."""
        key = (variant, held_out)
        if key not in self.xcross:
            p = self.pipes[variant]
            others = [d for d in sorted(p.active()) if d != held_out]
            t0 = time.perf_counter()
            if shared is None:
                shared = p.merges.learn(others, p.cfg.coefficients.model_copy(update={"granularity": GRANS[0]}))[1]
            model, _ = p.xcross.train(others, shared)
            self.xcross[key] = (integration_stage.parameters(model), time.perf_counter() - t0)
        return self.xcross[key]

    def unseen(self, variant: str, held_out: str) -> None:
        """Merge / integrate the other domains' vectors; `held_out`'s silo evaluates."""
        p = self.pipes[variant]
        others = [d for d in sorted(p.active()) if d != held_out]
        scenario, ft = f"unseen-{held_out}", self.rows_finetune_s(variant)
        with self.stage(f"{variant}: {scenario}"):
            t0 = time.perf_counter()
            models = p.merges.merged_states(others, methods=FREE)
            build = {m: (time.perf_counter() - t0) / len(FREE) for m in FREE}
            for g in GRANS:
                t0 = time.perf_counter()
                models[f"mergerec-{g}"] = p.merges.learn(others, p.cfg.coefficients.model_copy(update={"granularity": g}))[1]
                build[f"mergerec-{g}"] = time.perf_counter() - t0
            integrated, build["xcross"] = self.others_xcross(variant, held_out, models[f"mergerec-{GRANS[0]}"])
            build["xcross"] += build[f"mergerec-{GRANS[0]}"]  # its shared weights
            got = p.merges.evaluate_at(models, [held_out], integrated={"xcross": integrated})[held_out]
        self.add(variant, scenario, "pretrained", held_out, self.reports[variant]["metrics"][held_out]["pretrained"])
        for m in [*FREE, *(f"mergerec-{g}" for g in GRANS), "xcross"]:
            self.add(variant, scenario, m, held_out, got[m], finetune_s=ft, build_s=round(build[m], 1),
                     upload_bytes_per_silo=self.upload(variant, others, m not in FREE))

    def rows_finetune_s(self, variant: str) -> float:
        tm = self.reports[variant]["timings"]
        return round(tm.get("finetune", 0.0) + tm.get("weave", 0.0), 1)

    def new_domain(self, variant: str, held_out: str) -> None:
        """The data-fraction experiment at `held_out` (a new silo): gate tuning of xcross over the others vs
        LoRA from the base, on the same seeded fraction of its training users."""
        a = self.args
        integrated, build_s = self.others_xcross(variant, held_out, None)
        root = self.run_dirs[variant] / f"new-domain-{held_out}"
        cfg = self.config(variant, **{"min-silos": 1, "integration": "none", "weave-rounds": 0})
        traffic = Traffic(root / "gates" / "systems-traffic.json")
        gates = silo_pipeline(cfg, a.data, [held_out], root / "gates", a.cache, traffic)
        gates.handshake()
        scenario = f"new-domain-{held_out}"
        gate_train = self.config(variant, **parse_overrides(a.gate_run_config)).train  # the silo sets freeze, users
        n_users = load_silo(a.data / held_out, held_out).num_users  # the harness sizes max-users
        for f in a.fractions:
            pct = f"{round(100 * f)}%"
            with self.stage(f"{variant}: {scenario} xcross gates @ {pct}"):
                up0, down0 = traffic.up(held_out, TUNE_GATES), traffic.down(held_out, TUNE_GATES)
                t0 = time.perf_counter()
                reply = gates.xcross.tune_gates_at(held_out, integrated, f, gate_train)
                wall = time.perf_counter() - t0
            if f == a.fractions[0]:
                self.add(variant, scenario, "xcross (others), gates untuned", held_out, reply.before.model_dump(),
                         build_s=round(build_s, 1))
            self.add(variant, scenario, "xcross (others) + gates tuned", held_out, reply.after.model_dump(),
                     fraction=f, train_users=fraction_users(f, n_users), epochs=reply.epochs,
                     finetune_s=round(reply.seconds, 1),
                     build_s=round(build_s, 1), wall_s=round(wall, 1),
                     upload_bytes_per_silo=traffic.up(held_out, TUNE_GATES) - up0,
                     download_bytes=traffic.down(held_out, TUNE_GATES) - down0)
            with self.stage(f"{variant}: {scenario} LoRA from the base @ {pct}"):
                self.lora_fraction(variant, held_out, f, n_users, root / f"lora-{pct[:-1]}")
            self.write(False)

    def lora_fraction(self, variant: str, held_out: str, f: float, n_users: int, run_dir: Path) -> None:
        """LoRA fine-tuning at the new silo on `fraction_users(f, n)` seeded users, through a pipeline of that
        silo alone (its finetune stage; resumes), evaluated by the silo."""
        users = fraction_users(f, n_users)
        cfg = self.config(variant, **{"min-silos": 1, "integration": "none", "weave-rounds": 0,
                                      "finetune": "lora", "max-users": users})
        traffic = Traffic(run_dir / "systems-traffic.json")
        p = silo_pipeline(cfg, self.args.data, [held_out], run_dir, self.args.cache, traffic)
        t0 = time.perf_counter()
        p.handshake()
        if "finetune" not in p.state.completed:
            p.finetune()
        name = f"lora@{round(100 * f)}%"
        got = p.merges.evaluate_at({name: add_vector(p.base.state, p.vectors.load([held_out])[held_out])}, [held_out])
        self.add(variant, f"new-domain-{held_out}", "LoRA from the base", held_out, got[held_out][name], fraction=f,
                 train_users=users, epochs=p.state.finetune[held_out].epochs,
                 finetune_s=p.state.finetune[held_out].seconds,
                 wall_s=round(time.perf_counter() - t0, 1), upload_bytes_per_silo=traffic.up(held_out, FINETUNE),
                 download_bytes=traffic.down(held_out, FINETUNE))

    def write(self, done: bool) -> str:
        """systems.json (every row, stages, run configs, bytes) and systems.md; returns the markdown."""
        doc = {"command": self.command, "complete": done, "rows": self.rows, "stages": self.stage.rows,
               "run_root": str(self.args.run_root),
               "run_configs": {v: p.cfg.model_dump(mode="json") for v, p in self.pipes.items()},
               "timings": {v: r["timings"] for v, r in self.reports.items()},
               "bytes_per_silo": {v: r["bytes"] for v, r in self.reports.items()},
               "traffic": {v: t.n for v, t in self.traffic.items()}}
        text = markdown_report(self.command, self.rows, self.stage.rows)
        write_results(self.args.out, doc, text)
        return text


def markdown_report(command: str, rows: list[dict], stages: list[dict]) -> str:
    """Per variant and scenario, one row per method: per-domain R@10 / N@10, average, bytes and seconds;
    new-domain rows one per (method, fraction)."""
    md = [f"Command: `{command}`"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for scenario in dict.fromkeys(r["scenario"] for r in rows if r["variant"] == variant):
            part = [r for r in rows if r["variant"] == variant and r["scenario"] == scenario]
            if scenario.startswith("new-domain"):
                cols = ["method", "fraction", "train_users", "epochs", "recall@10", "ndcg@10", "users", "upload_bytes_per_silo",
                        "download_bytes", "finetune_s", "build_s", "wall_s"]
                md.append(f"### {variant}: {scenario}\n\n" + markdown_table(part, cols))
                continue
            table = []
            for method in dict.fromkeys(r["method"] for r in part):
                rs = [r for r in part if r["method"] == method]
                row = {"method": method, **{f"{r['domain']} {k}": r[k.lower().replace('r@', 'recall@')
                                                                     .replace('n@', 'ndcg@')]
                                             for r in rs for k in ("R@10", "N@10")}}
                row["avg R@10"] = sum(r["recall@10"] for r in rs) / len(rs)
                for k in ("upload_bytes_per_silo", "finetune_s", "build_s"):
                    row[k] = rs[0].get(k, "") if method != OWN else sum(r.get(k, 0) for r in rs) / len(rs)
                table.append(row)
            md.append(f"### {variant}: {scenario}\n\n" + markdown_table(table, list(dict.fromkeys(
                k for r in table for k in r))))
    md.append("### stages\n\n" + markdown_table(stages, ["stage", "seconds", "peak_rss_mb"]))
    return "\n\n".join(md) + "\n"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.systems", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with one sub-folder per domain")
    ap.add_argument("--domains", nargs="+", default=["Beauty", "Sports", "Toys"])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--weave-rounds", type=int, default=1, help="R of the weave variant")
    ap.add_argument("--unseen", nargs="*", default=None, metavar="DOMAIN",
                    help="held-out domains of the unseen scenario (default every domain; none: skip)")
    ap.add_argument("--held-out", nargs="*", default=None, metavar="DOMAIN",
                    help="new domain(s) of the data-fraction experiment (default the last domain; none: skip)")
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--fraction-variant", choices=VARIANTS, default="lora",
                    help="whose run's modules the new-domain xcross integrates (must be in --variants)")
    ap.add_argument("--gate-run-config", default="", help='train keys over the variant\'s for gate tuning at '
                    "the new domain (e.g. 'lr=0.01'); the LoRA rows use the variant's own")
    ap.add_argument("--run-config", default="", help='"key=value ..." over pyproject\'s [tool.flwr.app.config] '
                    "(as for `flwr run`); each variant adds its keys and integration = xcross")
    ap.add_argument("--cache", type=Path, default=Path(".cache"), help="item-embedding cache")
    ap.add_argument("--run-root", type=Path, default=None,
                    help="one pipeline run directory per variant below it (default .cache/systems-runs; resumes)")
    ap.add_argument("--out", type=Path, default=RESULTS / "systems.json")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        ap.error(f"data folder not found: {args.data}")
    args.unseen = list(args.domains) if args.unseen is None else args.unseen
    args.held_out = args.domains[-1:] if args.held_out is None else args.held_out
    bad = sorted(set(args.unseen + args.held_out) - set(args.domains))
    if bad:
        ap.error(f"--unseen / --held-out name domains not in --domains: {bad}")
    if args.held_out and args.fraction_variant not in args.variants:
        ap.error(f"--fraction-variant {args.fraction_variant} is not among --variants")
    if not all(0 < f <= 1 for f in args.fractions):
        ap.error("--fractions must be in (0, 1]")
    if args.weave_rounds < 1 and "weave" in args.variants:
        ap.error("--weave-rounds must be at least 1 for the weave variant")
    args.run_root = args.run_root or args.cache / "systems-runs"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    command = "python -m benchmarks.systems " + " ".join(argv if argv is not None else sys.argv[1:])
    s = Systems(args, command)
    for variant in args.variants:
        s.run_variant(variant)
        s.write(False)
        for held_out in args.unseen:
            s.unseen(variant, held_out)
            s.write(False)
        if variant == args.fraction_variant:
            for held_out in args.held_out:
                s.new_domain(variant, held_out)
    print(s.write(True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
