"""Shared offline fixtures: a tiny byte-level BPE tokenizer and tiny random HF models.

Everything is built in a temp dir from configs (no hub). Session-scoped: built once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs the torch decode path (and never starts a background build); tests/test_native_decode.py
# turns the native step on where it compares the two.
os.environ.setdefault("KILN_NO_NATIVE", "1")
# Triton kernels run in its interpreter on CPU tensors; the choice is made when triton is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "SELECT name, count(*) FROM users WHERE id > 100 GROUP BY name ORDER BY 2 DESC;",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "Numbers: 3.14159, 2718, 1000000 and emoji 🙂🚀 are fine.",
    "In the beginning God created the heaven and the earth. And the earth was without form.",
]
EOS = "<|endoftext|>"


def build_hf_tokenizer(out_dir: Path, vocab_size: int = 384, bos: bool = False) -> Path:
    """Train a GPT-2-style byte-level BPE on SAMPLE_TEXT; save tokenizer.json + vocab.json/merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SAMPLE_TEXT * 4, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    fast.save_pretrained(str(out_dir))
    tok.model.save(str(out_dir))  # vocab.json + merges.txt
    return out_dir


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """Hand cached GPU memory back after each test: parallel workers (pytest -n) share one GPU."""
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread is faster, and immune to other processes on a shared 2-core box.
    Use per module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_hf_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())


def hf_vocab_size(tokenizer_dir: Path) -> int:
    from transformers import PreTrainedTokenizerFast

    return len(PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json")))


def _sharpen(model: torch.nn.Module, factor: float) -> None:
    """Random init leaves logits nearly flat; widen them so greedy comparisons are not coin flips."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(factor)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random GPT-2 (odd width, tied embeddings) saved with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab = hf_vocab_size(tokenizer_dir)
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=48, n_layer=2, n_head=3,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    _sharpen(model, 5.0)
    out = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(str(out))
    _copy_tokenizer(tokenizer_dir, out)
    return out


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Llama with GQA (6 heads over 2 kv heads) and an odd MLP width."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = hf_vocab_size(tokenizer_dir)
    config = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    _sharpen(model, 3.0)
    out = tmp_path_factory.mktemp("llama")
    model.save_pretrained(str(out))
    _copy_tokenizer(tokenizer_dir, out)
    return out


@pytest.fixture(params=["gpt2", "llama"])
def hf_dir(request, gpt2_dir, llama_dir) -> Path:
    return {"gpt2": gpt2_dir, "llama": llama_dir}[request.param]
