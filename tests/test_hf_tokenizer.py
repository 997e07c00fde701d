"""SentencePiece-style Hugging Face tokenizers (Llama 2, TinyLlama, Mistral) through the tokenizers
library (model/hf_tokenizer.py): transformers' ids, decoding, streamed text, and a served model.

The fixture is built here with `tokenizers` the way Hugging Face converts Llama 2's tokenizer: BPE with
byte fallback (`<0x00>`..`<0xFF>` vocabulary tokens for characters it lacks), a normalizer that
prepends "▁" and turns spaces into "▁", a BOS template, and the Replace / ByteFallback / Fuse / Strip
decoder. Nothing is downloaded.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from model.hf_tokenizer import LibraryTokenizer
from model.tokenizer import IncrementalDetokenizer, load_tokenizer

from test_tokenizer import TEXTS, corpus, random_texts

BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def build_spiece(out: Path, vocab_size: int = 700, metaspace: bool = False) -> Path:
    """Llama 2's layout (normalizer Prepend + Replace), or Mistral's newer one (`metaspace`: a Metaspace
    pre-tokenizer prepending "▁" to the first word, no normalizer)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *BYTE_TOKENS],
                                  show_progress=False, limit_alphabet=60)  # rare characters: byte fallback
    tok.train_from_iterator([t for t in corpus(seed=3, n_docs=150)], trainer=trainer)
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    out.mkdir(parents=True, exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            add_bos_token=True).save_pretrained(str(out))
    # as in Llama 2's file, the byte tokens are ordinary vocabulary entries, not added (special) tokens
    data = json.loads((out / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in BYTE_TOKENS]
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config.get("added_tokens_decoder", {}).items()
                                      if v["content"] not in BYTE_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return out


@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def spiece_dir(request, tmp_path_factory) -> Path:
    return build_spiece(tmp_path_factory.mktemp(f"spiece_{request.param}"), metaspace=request.param == "metaspace")


def spiece_texts() -> dict[str, str]:
    texts = {k: v.replace("<|endoftext|>", "</s>") for k, v in {**TEXTS, **random_texts(11, 150)}.items()}
    texts.update({"leading space": " starts with a space", "two spaces": "  two", "rare": "Ωmega ✓ 龘 🙂 x",
                  "only space": " ", "newlines": "a\n\nb\r\n", "bos text": "<s>hello</s> world"})
    return texts


def test_ids_and_decoding_equal_transformers(spiece_dir):
    from transformers import AutoTokenizer

    tok = load_tokenizer(spiece_dir)
    auto = AutoTokenizer.from_pretrained(str(spiece_dir))
    assert isinstance(tok, LibraryTokenizer) and tok.kind == "sentencepiece" and tok.adds_leading_space
    assert (tok.bos_token, tok.eos_token, tok.bos_id, tok.eos_id) == ("<s>", "</s>", auto.bos_token_id,
                                                                       auto.eos_token_id)
    assert tok.add_bos and tok.n_vocab == len(auto)
    byte_fallbacks = 0
    for name, text in spiece_texts().items():
        ids = tok.encode(text)
        assert ids == auto.encode(text, add_special_tokens=False), name
        assert tok.encode_prompt(text) == auto.encode(text), name
        assert tok.decode(ids) == auto.decode(ids), name
        assert tok.decode(tok.encode_prompt(text)) == auto.decode(auto.encode(text)), name
        byte_fallbacks += sum(auto.convert_ids_to_tokens(i) in BYTE_TOKENS for i in ids)
    assert byte_fallbacks > 20  # the texts do reach the byte tokens
    assert tok.encode("<s>x", allow_special=False) != tok.encode("<s>x")  # special text as plain text
    assert tok.id_to_token_text(tok.token_to_id(" the")) == " the"
    assert tok.id_to_token_text(auto.convert_tokens_to_ids("<0xE9>")) == "bytes:\\xe9"


def test_streamed_text_continues_the_prompt_as_transformers_decodes(spiece_dir):
    """What the server streams after a prompt = decode(prompt + output) minus decode(prompt), with
    characters split over byte tokens held back until whole."""
    from transformers import AutoTokenizer

    tok = load_tokenizer(spiece_dir)
    auto = AutoTokenizer.from_pretrained(str(spiece_dir))
    rng = random.Random(0)
    texts = list(spiece_texts().values())
    compared = 0
    for _ in range(200):
        prompt = auto.encode(rng.choice(texts))[: rng.randint(1, 12)]
        output = auto.encode(rng.choice(texts), add_special_tokens=False)[: rng.randint(1, 20)]
        detok = IncrementalDetokenizer(tok)
        detok.prime(prompt[-4:])
        streamed = "".join(detok.push(i) for i in output) + detok.flush()
        whole, head = auto.decode(prompt + output), auto.decode(prompt)
        if "\ufffd" in whole:  # a byte sequence cut off mid-character: replacement counts are the decoders' own
            continue
        assert streamed == whole[len(head):], (prompt, output)
        compared += 1
    assert compared > 40  # (most random cuts fall inside a character spelled in byte tokens)


@torch.no_grad()
def test_a_llama_with_a_sentencepiece_tokenizer_serves(spiece_dir, tmp_path):
    """kiln serve on a Llama 2-style directory: echo shows the prompt as written (no BOS text, no added
    space), the completion is transformers' decoding of the generated ids, and greedy ids are HF's."""
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from model.cli import load_engine
    from server.app import create_app
    from server.settings import ServerSettings

    auto = AutoTokenizer.from_pretrained(str(spiece_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(auto), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=auto.bos_token_id, eos_token_id=auto.eos_token_id)
    hf = LlamaForCausalLM(config).eval()
    for p in hf.parameters():
        p.mul_(3.0)
    hf.save_pretrained(str(tmp_path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (spiece_dir / name).is_file():
            (tmp_path / name).write_bytes((spiece_dir / name).read_bytes())
    prompt = "The quick brown fox"
    # byte tokens are banned so the output is whole characters (random weights emit any byte)
    bias = {str(auto.convert_tokens_to_ids(t)): -100 for t in BYTE_TOKENS}
    engine = load_engine(str(tmp_path), "cpu", None, max_batch_size=2)
    with TestClient(create_app(engine, ServerSettings(served_model_name="spiece"))) as client:
        r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "echo": True,
                                                 "logprobs": 0, "logit_bias": bias, "ignore_eos": True})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        ids = auto.encode(prompt)
        masked = torch.full((len(auto),), 0.0)
        masked[[int(k) for k in bias]] = -100.0
        logits_processor = [lambda _, scores: scores + masked]
        want = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, logits_processor=logits_processor,
                           pad_token_id=auto.eos_token_id, eos_token_id=None)[0, len(ids):].tolist()
        tok = engine.tokenizer
        assert choice["logprobs"]["tokens"] == [tok.id_to_token_text(i) for i in ids + want]  # greedy ids are HF's
        assert choice["text"] == auto.decode(ids + want, skip_special_tokens=True)
        assert choice["text"].startswith(prompt)
        detok = client.post("/detokenize", json={"tokens": ids}).json()["prompt"]
        assert detok == auto.decode(ids)
        assert client.post("/tokenize", json={"prompt": prompt}).json()["tokens"] == ids


def test_hf_export_makes_transformers_read_the_tokenizer_as_kiln_does(spiece_dir, tmp_path):
    """A Llama 2 directory names LlamaTokenizer, which transformers 5 rebuilds with its own normalization
    (other ids at a leading space), and a bare tokenizer.json names no EOS: `kiln export --format hf`
    writes a tokenizer_config.json that gives Kiln's ids and tokens."""
    from transformers import AutoTokenizer

    from training.export import write_tokenizer

    files = {name: (spiece_dir / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    config = json.loads(files["tokenizer_config.json"])
    config["tokenizer_class"] = "LlamaTokenizer"
    for key in ("eos_token", "bos_token"):
        config.pop(key, None)
    files["tokenizer_config.json"] = json.dumps(config).encode()
    write_tokenizer(files, tmp_path, need_hf_json=True)
    tok, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    for text in (" leading space", "  two", "a </s> b", *spiece_texts().values()):
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text), repr(text)
    assert (auto.eos_token, auto.eos_token_id) == (tok.eos_token, tok.eos_id) == ("</s>", tok.eos_id)
