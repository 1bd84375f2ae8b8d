"""What a silo uploads, and what MergeRec loses, for each teacher encoding and top-k.

    python -m benchmarks.teacher_wire [--data-root DIR] [--domains a,b] [--run-config "k=v ..."]
                                      [--variants fp32:256,fp16:256,fp16:128,fp16:64]

Runs the federated pipeline in process (the same stages and messages as through Flower) once up to the end with
the first variant, then, for every other variant, again from a copy of that run directory with the teacher stage
and everything after it redone (fine-tuning and pseudo-users are shared, so only the teacher encoding and k
differ). A variant is `<values>:<k>`: fp32 = the former wire (int32 indices, float32 values), fp16 = the compact
wire (uint16/uint32 indices, float16 values; common.protocol.messages.teacher_wire_dtypes). Per variant and silo: the
task vector's bytes, the teacher arrays' bytes, and each domain's test Recall@10 / NDCG@10 of MergeRec (every
learned granularity) against the first variant. Writes benchmarks/results/teacher-wire-demo.json and .md by default
(the demo-data claim; a real-data run names its own `--out`, e.g. teacher-wire.json: docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.core import RESULTS
from benchmarks.overhead import in_process, parse_overrides
from common.core.report import results_page, write_results
from deployment.simulate import DEMO_ROOT


@contextlib.contextmanager
def wire(values: str):
    """fp16: the project's wire; fp32: the former int32/float32 wire, patched in on both sides."""
    import common.merging.teacher as teacher_mod
    import common.protocol.messages as messages_mod

    original = messages_mod.teacher_wire_dtypes
    if values == "fp32":
        old = lambda n: (np.dtype(np.int32), np.dtype(np.float32))  # noqa: E731
        messages_mod.teacher_wire_dtypes = teacher_mod.teacher_wire_dtypes = old
    elif values != "fp16":
        raise ValueError(f"unknown value encoding {values!r} (fp32 | fp16)")
    try:
        yield
    finally:
        messages_mod.teacher_wire_dtypes = teacher_mod.teacher_wire_dtypes = original


def redo_teacher(src: Path, dst: Path) -> None:
    """Copy a finished run directory and forget the teacher stage and everything after it."""
    from server.checkpoint import invalidate

    shutil.copytree(src, dst)
    ck = json.loads((dst / "checkpoint.json").read_text())
    invalidate(ck, dst, ["teacher", "coefficients", "evaluate", "artifacts"])
    (dst / "checkpoint.json").write_text(json.dumps(ck))


def silo_bytes(run_dir: Path, domains: list[str]) -> dict:
    out = {}
    for d in domains:
        with np.load(run_dir / "teacher" / f"{d}.npz") as z:
            teacher = sum(z[k].nbytes for k in z.files)
            dtypes = "/".join(str(z[k].dtype) for k in ("indices", "values"))
        tv = (run_dir / "task_vectors" / f"{d}.safetensors").stat().st_size
        out[d] = {"task_vector_bytes": tv, "teacher_bytes": int(teacher), "upload_bytes": int(tv + teacher),
                  "teacher_dtypes": dtypes}
    return out


def rows_for(name: str, report: dict, run_dir: Path, domains: list[str], ref: dict | None) -> list[dict]:
    rows, sizes = [], silo_bytes(run_dir, domains)
    for d in domains:
        for model, m in sorted(report["metrics"][d].items()):
            if not model.startswith("mergerec"):
                continue
            r10 = m["values"]["recall@10"]
            base = ref.get((d, model)) if ref else None
            rows.append({"variant": name, "domain": d, "model": model, "recall@10": round(r10, 5),
                         "ndcg@10": round(m["values"]["ndcg@10"], 5),
                         "recall@10_rel_change": None if not base else round((r10 - base) / base, 4), **sizes[d]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.teacher_wire", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=DEMO_ROOT)
    ap.add_argument("--domains", default="garden,kitchen,outdoor")
    ap.add_argument("--run-config", default="", help='overrides, e.g. "epochs=2 max-users=3000"')
    ap.add_argument("--variants", default="fp32:256,fp16:256,fp16:128,fp16:64")
    ap.add_argument("--out", type=Path, default=RESULTS / "teacher-wire-demo.json")
    args = ap.parse_args(argv)
    domains, rc = args.domains.split(","), parse_overrides(args.run_config)
    data_root = args.data_root.resolve()
    if data_root == DEMO_ROOT and not data_root.exists():
        from common.data.demo import make_demo

        make_demo(data_root)
    work = Path(tempfile.mkdtemp(prefix="teacher-wire-"))
    rows, ref, first, seconds = [], None, None, {}
    for variant in args.variants.split(","):
        values, k = variant.split(":")
        run_dir = work / variant.replace(":", "-")
        if first is not None:
            redo_teacher(first, run_dir)
        with wire(values):
            report, seconds[variant] = in_process(domains, data_root, run_dir, {**rc, "teacher-top-k": int(k)})
        rows += rows_for(variant, report, run_dir, domains, ref)
        if first is None:
            first = run_dir
            ref = {(r["domain"], r["model"]): r["recall@10"] for r in rows}
        print(f"{variant}: {seconds[variant]:.0f} s", file=sys.stderr)
    cmd = "python -m benchmarks.teacher_wire " + " ".join(argv if argv is not None else sys.argv[1:])
    cols = ["variant", "domain", "model", "recall@10", "ndcg@10", "recall@10_rel_change", "teacher_dtypes",
            "teacher_bytes", "task_vector_bytes", "upload_bytes"]
    page = results_page("Teacher wire encoding", cmd, rows, cols)
    write_results(args.out, {"command": cmd, "domains": domains, "run_config": rc, "rows": rows,
                             "seconds": seconds}, page)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
