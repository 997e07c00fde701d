"""`kiln export` (training/export.py): checkpoint -> Kiln and Hugging Face model directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_model
from model.config import ModelConfig
from model.tokenizer import load_tokenizer
from test_training_data import prepared_data
from training.config import ModelShape, TrainConfig
from training.export import ExportError, export, hf_family, load_trained_model, main
from training.train import train

SHAPES = {
    "llama": ModelShape(family="llama", n_layer=2, n_head=6, n_kv_head=2, d_model=48, d_ff=100),  # GQA, untied
    "gpt2": ModelShape(family="gpt2", n_layer=2, n_head=3, d_model=48),  # tied, biases, learned positions
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """One 2-step training run per family (trained weights, not the init)."""
    root = tmp_path_factory.mktemp("export")
    data = prepared_data(root, tokenizer_dir, n_docs=40)
    out = {}
    for family, shape in SHAPES.items():
        config = TrainConfig(model=shape, data_dir=str(data), out_dir=str(root / family), seq_len=32,
                             micro_batch_size=4, max_steps=2, lr=1e-2, warmup_steps=1, eval_interval=0,
                             eval_batches=1, checkpoint_interval=0)
        train(config, progress=False)
        out[family] = root / family
    return out


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-4) -> None:
    diff = (a.float() - b.float()).abs()
    assert diff.max().item() <= atol, f"max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}"


def tokens_for(model) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kiln_export_loads_with_identical_logits(runs, tmp_path, family):
    trained, state, _ = load_trained_model(runs[family])
    export(runs[family], tmp_path / "model")
    loaded = load_model(tmp_path / "model")
    x = tokens_for(trained)
    assert torch.equal(loaded(x), trained(x))
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "kiln"
    tokenizer = load_tokenizer(tmp_path / "model")
    assert tokenizer.encode("the quick brown fox") == load_tokenizer(runs[family] / "tokenizer").encode(
        "the quick brown fox")
    assert tokenizer.n_vocab <= loaded.config.vocab_size and loaded.config.eos_token_id == tokenizer.eos_id


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_export_loads_in_transformers_with_identical_logits(runs, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trained, _, _ = load_trained_model(runs[family])
    out = tmp_path / "hf"
    shards = ["--max-shard-mb", "0.05"] if family == "llama" else []  # 50 kB shards + an index
    main([str(runs[family]), "--out", str(out), "--format", "hf", *shards])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    x = tokens_for(trained)
    close(hf(x).logits, trained(x))
    close(load_model(out)(x), trained(x))  # Kiln's own HF loader reads it back too
    if family == "llama":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    else:
        assert (out / "model.safetensors").is_file()
    # readable by a server run as another user, as the config and tokenizer files are
    mode = (out / "config.json").stat().st_mode & 0o777
    assert {p.stat().st_mode & 0o777 for p in out.glob("*.safetensors")} == {mode}
    text = "the lazy dog 123"
    assert AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == load_tokenizer(out).encode(text)


@torch.no_grad()
def test_the_shipped_model_converts_to_hugging_face(tmp_path):
    """`kiln export model/default --format hf`: what `lm_eval --model hf` and transformers load, with the
    logits and token ids Kiln gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.cli import default_model_dir

    source = default_model_dir()
    out = tmp_path / "kiln-default-hf"
    assert main([str(source), "--out", str(out), "--format", "hf"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    kiln = load_model(source)
    text = "To be, or not to be, that is the question: 床前明月光"
    ids = load_tokenizer(source).encode(text)
    assert AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == ids
    x = torch.tensor([ids])
    close(hf(x).logits, kiln(x))
    # and back: the Hugging Face directory converts to Kiln's layout
    assert main([str(out), "--out", str(tmp_path / "kiln"), "--dtype", "bf16"]) == 0
    close(load_model(tmp_path / "kiln")(x), kiln(x))  # (the shipped weights are bf16 numbers: exact)


def test_bf16_export_and_run_dir_vs_checkpoint_file(runs, tmp_path):
    checkpoint = export(runs["llama"], tmp_path / "a", dtype="bf16")
    assert checkpoint.name == "checkpoint-0000002.pt"
    model = load_model(tmp_path / "a", dtype="bf16")
    trained, _, _ = load_trained_model(checkpoint)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, trained.state_dict()[name].to(torch.bfloat16)), name
    size = (tmp_path / "a" / "model.safetensors").stat().st_size
    export(checkpoint, tmp_path / "b")  # fp32 from the file itself: twice the bytes
    assert abs((tmp_path / "b" / "model.safetensors").stat().st_size - 2 * size) < 4096


def test_shapes_outside_the_hf_families_are_refused():
    base = dict(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, d_model=16, d_ff=32, max_seq_len=16)
    assert hf_family(ModelConfig(**base)) == "llama"
    assert hf_family(ModelConfig(**base, norm="layernorm", positions="learned", mlp="gelu", bias=True)) == "gpt2"
    with pytest.raises(ExportError, match=r"llama: has_attention_bias=True \(llama needs False\)"):
        hf_family(ModelConfig(**base, attention_bias=True))
    with pytest.raises(ExportError, match=r"gpt2: norm='rmsnorm' \(gpt2 needs 'layernorm'\)"):
        hf_family(ModelConfig(**base, positions="learned", mlp="gelu", bias=True))


def test_cli_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nowhere" in err and "does not exist" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "m")])
    assert exc.value.code == 2 and "no checkpoint-*.pt files" in capsys.readouterr().err


def test_out_that_holds_files_is_refused_unless_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    (out / "config.json").write_text('{"mine": true}\n')
    with pytest.raises(SystemExit) as exc:
        main([str(runs["llama"]), "--out", str(out)])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"kiln export: error: --out {str(out)!r} already exists and is not empty; "
                                       "pick another directory, or pass --overwrite to replace the model files in "
                                       "it\n")
    assert (out / "config.json").read_text() == '{"mine": true}\n' and sorted(p.name for p in out.iterdir()) == [
        "config.json", "notes.txt"]
    # --overwrite: sharded, then re-exported whole; the earlier shards and index go, other files stay
    assert main([str(runs["llama"]), "--out", str(out), "--overwrite", "--max-shard-mb", "0.05"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 2
    assert main([str(runs["llama"]), "--out", str(out), "--overwrite"]) == 0
    assert not list(out.glob("model-*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "my notes\n"
    trained, _, _ = load_trained_model(runs["llama"])
    x = tokens_for(trained)
    with torch.no_grad():
        assert torch.equal(load_model(out)(x), trained(x))
    empty = tmp_path / "empty"
    empty.mkdir()
    export(runs["llama"], empty)  # an empty directory is as good as a new one


@pytest.mark.parametrize("content", [b"the quick brown fox\n", b"notes here\n", b"c__builtin__\neval\n", b""])
def test_a_file_that_is_not_a_checkpoint_is_one_short_line(tmp_path, capsys, content):
    (tmp_path / "notes.txt").write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "notes.txt"), "--out", str(tmp_path / "m")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # torch.load's own message is paragraphs of weights_only advice
    assert err.startswith(f"kiln export: error: {tmp_path / 'notes.txt'} is not a readable Kiln training "
                          "checkpoint (torch.load: ")
    assert err.count("\n") == 1 and len(err) < 250 and "weights_only" not in err, err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_max_shard_mb_must_be_finite_and_positive(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:  # nan was a ValueError traceback, inf an OverflowError
        main([str(tmp_path), "--out", str(tmp_path / "m"), f"--max-shard-mb={value}"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"kiln export: error: --max-shard-mb must be a finite number > 0 "
                                       f"(MB, 1 MB = 10^6 bytes), got {float(value)}\n")


def test_paths_of_the_wrong_kind_say_what_they_are(runs, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        main([str(runs["llama"]), "--out", str(tmp_path / "file")])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"kiln export: error: --out {str(tmp_path / 'file')!r} is a file, not a "
                                       "directory; pick a directory path\n")
