"""Item-text encoding levers against float32: bfloat16 autocast (the default where the CPU multiplies bfloat16
natively), batch size, and int8 dynamic quantisation (rejected).

    python -m benchmarks.encoder_precision [--data-root ../shared/data/amazon] [--domain Toys] [--items 800]

Encodes a seeded sample of the catalog's item texts exactly as a silo's handshake does (common.data.text.catalog_texts,
common.model.encoder.encode_texts, one thread, as one simulated silo has), with each setting, and reports items per
second and the cosine of each embedding to the float32 one at batch 32. A setting is worth taking only if every
cosine is >= 0.999 (issue 15). Writes benchmarks/results/encoder-precision.json and .md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

from benchmarks.core import RESULTS
from common.core.report import write_table_results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.encoder_precision", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data/amazon"))
    ap.add_argument("--domain", default="Toys")
    ap.add_argument("--items", type=int, default=800, help="seeded sample of the catalog's items")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--out", type=Path, default=RESULTS / "encoder-precision.json")
    args = ap.parse_args(argv)

    import torch

    from common.data.format import load_catalog
    from common.model.encoder import encode_texts, load_encoder, load_tokenizer
    from common.data.text import catalog_texts

    torch.set_num_threads(1)
    catalog = load_catalog(args.data_root / args.domain, args.domain)
    tok = load_tokenizer(args.encoder)
    texts = catalog_texts(catalog, tok, 32)
    sample = [texts[i] for i in random.Random(0).sample(range(len(texts)), min(args.items, len(texts)))]
    fp32 = load_encoder(args.encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks the eager quantisation API deprecated
        int8 = torch.ao.quantization.quantize_dynamic(load_encoder(args.encoder), {torch.nn.Linear}, dtype=torch.qint8)
    from common.model.encoder import resolve_precision

    if resolve_precision("auto") != "bfloat16":
        print("note: this CPU has no native bfloat16 dot products; the bfloat16 row runs emulated",
              file=sys.stderr)
    settings = (("float32, batch 32", fp32, 32, "float32"), ("float32, batch 128", fp32, 128, "float32"),
                ("bfloat16 autocast, batch 32", fp32, 32, "bfloat16"),
                ("bfloat16 autocast, batch 128", fp32, 128, "bfloat16"), ("int8 dynamic, batch 32", int8, 32, "float32"))
    rows, ref = [], None
    for name, enc, batch, precision in settings:
        t0 = time.perf_counter()
        emb = encode_texts(enc, tok, sample, max_length=128, batch_size=batch, precision=precision)
        seconds = time.perf_counter() - t0
        ref = emb if ref is None else ref
        cos = (emb * ref).sum(1)
        rows.append({"encoder": name, "items": len(sample), "seconds": round(seconds, 2),
                     "items_per_s": round(len(sample) / seconds, 1), "cos_to_fp32_min": round(float(cos.min()), 6),
                     "cos_to_fp32_mean": round(float(cos.mean()), 6)})
        print(rows[-1], file=sys.stderr, flush=True)
    cmd = "python -m benchmarks.encoder_precision " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_table_results(args.out, {"command": cmd, "domain": args.domain, "rows": rows},
                              "Item-text encoder: precision and batch size"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
