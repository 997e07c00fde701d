"""Held-out evaluation of a model directory: loss, perplexity and bits per byte per source.

    python -m training.evaluate --model DIR --corpus data/corpus [--split val] [--json]

Reads the `kiln corpus build` layout (`SPLIT/SOURCE.jsonl`, one {"text": ...} per line) and
scores every document with the engine (sliding windows past the context, each token
scored once). Bits per byte = total NLL in bits / UTF-8 bytes of the text, which compares
models with different tokenizers; it is what the default model's card reports.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class EvalTotals:
    documents: int = 0
    tokens: int = 0
    nll: float = 0.0  # nats, summed over scored tokens
    bytes: int = 0

    def add(self, nll_sum: float, tokens: int, nbytes: int, documents: int = 1) -> None:
        self.documents += documents
        self.tokens += tokens
        self.nll += nll_sum
        self.bytes += nbytes

    def as_dict(self) -> dict:
        loss = self.nll / self.tokens if self.tokens else float("nan")
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "loss": loss,
                "perplexity": math.exp(loss) if self.tokens else float("nan"),
                "bits_per_byte": self.nll / math.log(2) / self.bytes if self.bytes else float("nan")}


def evaluate_texts(engine, texts: list[str], stride: int | None = None) -> EvalTotals:
    """Score each text as its own document (prefixed with EOS, as training saw documents start)."""
    totals = EvalTotals()
    eos = engine.tokenizer.eos_id
    for text in texts:
        ids = engine.encode_for_scoring(text)
        if not engine.tokenizer.prepends_bos and eos is not None:
            ids = [eos] + ids  # documents follow an EOS in the training stream: score every text token
        result = engine.score([ids], stride=stride)[0]
        totals.add(result.mean_nll * result.num_scored, result.num_scored, len(text.encode("utf-8")))
    return totals


def read_split(corpus: Path, split: str) -> dict[str, list[str]]:
    folder = corpus / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: expected the `kiln corpus build` layout")
    sources = {}
    for path in sorted(folder.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            sources[path.stem] = [json.loads(line)["text"] for line in f if line.strip()]
    return sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the shipped default model)")
    parser.add_argument("--corpus", required=True, help="a `kiln corpus build` output directory")
    parser.add_argument("--split", default="val")
    parser.add_argument("--stride", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from model.cli import load_engine

    try:
        sources = read_split(Path(args.corpus), args.split)
        engine = load_engine(args.model, "auto")
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    overall = EvalTotals()
    report = {}
    for name, texts in sources.items():
        totals = evaluate_texts(engine, texts, args.stride)
        report[name] = totals.as_dict()
        overall.add(totals.nll, totals.tokens, totals.bytes, totals.documents)
    report["all"] = overall.as_dict()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'source':<22}{'docs':>6}{'tokens':>10}{'loss':>8}{'ppl':>9}{'bits/byte':>11}")
        for name, r in report.items():
            print(f"{name:<22}{r['documents']:>6}{r['tokens']:>10}{r['loss']:>8.3f}{r['perplexity']:>9.2f}"
                  f"{r['bits_per_byte']:>11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
