"""Held-out evaluation of a model directory: loss, perplexity and bits per byte per source.

    python -m training.evaluate --model DIR --corpus data/corpus [--split val] [--json]
                                [--heldout FILE.jsonl --write-eval]

Reads the `kiln corpus build` layout (`SPLIT/SOURCE.jsonl`, one {"text": ...} per line) and
scores every document with the engine (sliding windows past the context, each token
scored once). Bits per byte = total NLL in bits / UTF-8 bytes of the text, which compares
models with different tokenizers; it is what the default model's card reports.

`--heldout FILE.jsonl` also scores a small committed sample of held-out documents (the
default model's is `tests/data/default_heldout.jsonl`), and `--write-eval` records both results
in DIR/eval.json, which `tests/test_default_model.py` holds the shipped weights to.
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
    parser.add_argument("--heldout", type=Path, default=None, help="also score this JSONL sample ({\"text\"} lines)")
    parser.add_argument("--write-eval", action="store_true", help="write the results to the model's eval.json")
    args = parser.parse_args(argv)
    if args.write_eval and args.heldout is None:
        parser.error("--write-eval needs --heldout (eval.json records the held-out sample's loss)")
    from model.cli import load_engine

    try:
        sources = read_split(Path(args.corpus), args.split)
        heldout = None
        if args.heldout is not None:
            heldout = [json.loads(line)["text"] for line in args.heldout.read_text(encoding="utf-8").splitlines()
                       if line.strip()]
        engine = load_engine(args.model, "auto")
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    overall = EvalTotals()
    report = {}
    for name, texts in sources.items():
        totals = evaluate_texts(engine, texts, args.stride)
        report[name] = totals.as_dict()
        overall.add(totals.nll, totals.tokens, totals.bytes, totals.documents)
    report["all"] = overall.as_dict()
    if heldout is not None:
        report["heldout_sample"] = evaluate_texts(engine, heldout, args.stride).as_dict()
    if args.write_eval:
        from model.cli import default_model_dir

        model_dir = Path(args.model) if args.model else default_model_dir()
        record = {
            "heldout_sample": str(args.heldout), "heldout_sample_loss": round(report["heldout_sample"]["loss"], 4),
            "heldout_sample_bits_per_byte": round(report["heldout_sample"]["bits_per_byte"], 4),
            f"{args.split}_loss": round(overall.as_dict()["loss"], 4),
            f"{args.split}_bits_per_byte": round(overall.as_dict()["bits_per_byte"], 4),
            f"{args.split}_tokens": overall.tokens,
            "note": "losses in nats per token; measured with `python -m training.evaluate` (documents prefixed "
                    f"with EOS, sliding windows of {engine.max_seq_len} with stride "
                    f"{args.stride or engine.max_seq_len // 2})",
        }
        (model_dir / "eval.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
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
