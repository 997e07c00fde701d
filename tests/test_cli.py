"""`kiln generate` and `kiln ppl` as a user runs them, including the error paths."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from model.cli import load_engine


def kiln(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=120)


def test_generate_streams_the_greedy_completion(gpt2_dir):
    proc = kiln("generate", "--model", str(gpt2_dir), "--prompt", "The quick", "--max-tokens", "12",
                "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    engine = load_engine(str(gpt2_dir), "cpu")
    from model.engine import SamplingParams

    expected = "".join(o.text for o in engine.generate(engine.tokenizer.encode("The quick"),
                                                       SamplingParams(max_tokens=12, temperature=0.0)))
    assert proc.stdout == expected + "\n"
    off = kiln("generate", "--model", str(gpt2_dir), "--prompt", "The quick", "--max-tokens", "12",
               "--temperature", "0", "--speculative-tokens", "0")
    assert off.returncode == 0 and off.stdout == proc.stdout, off.stderr
    bad = kiln("generate", "--model", str(gpt2_dir), "--prompt", "x", "--speculative-tokens", "99")
    assert bad.returncode == 2 and "--speculative-tokens: must be in [0, 15], got 99" in bad.stderr
    bf16 = kiln("generate", "--model", str(gpt2_dir), "--prompt", "The quick", "--max-tokens", "12",
                "--temperature", "0", "--kv-cache-dtype", "bf16")
    engine = load_engine(str(gpt2_dir), "cpu", kv_cache_dtype="bf16")
    expected = "".join(o.text for o in engine.generate(engine.tokenizer.encode("The quick"),
                                                       SamplingParams(max_tokens=12, temperature=0.0)))
    assert bf16.returncode == 0 and bf16.stdout == expected + "\n", bf16.stderr
    bad = kiln("generate", "--model", str(gpt2_dir), "--prompt", "x", "--kv-cache-dtype", "fp16")
    assert bad.returncode == 2 and "--kv-cache-dtype: invalid choice: 'fp16'" in bad.stderr


def test_ppl_json_matches_the_engine(gpt2_dir, tmp_path):
    text = "To be, or not to be, that is the question. " * 3
    path = tmp_path / "text.txt"
    path.write_text(text)
    proc = kiln("ppl", "--model", str(gpt2_dir), "--json", str(path))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    engine = load_engine(str(gpt2_dir), "cpu")
    result = engine.score([engine.encode_for_scoring(text)])[0]
    assert got["num_tokens"] == result.num_scored
    assert math.isclose(got["perplexity"], result.perplexity, rel_tol=1e-6)
    assert math.isclose(got["mean_nll"], math.log(got["perplexity"]), rel_tol=1e-6)
    proc = kiln("ppl", "--model", str(gpt2_dir), "-", stdin=text)
    assert proc.returncode == 0 and proc.stdout.startswith("perplexity ")


def test_bad_input_is_one_line_and_exit_2(gpt2_dir, tmp_path):
    cases = [
        (("generate", "--model", str(tmp_path / "missing"), "--prompt", "x"), "does not exist"),
        (("generate", "--model", str(gpt2_dir), "--prompt", "x", "--temperature", "-1"),
         "--temperature must be a number in [0, 10000], got -1.0"),
        (("generate", "--model", str(gpt2_dir), "--prompt", "x", "--temperature", "inf"),
         "--temperature must be a number in [0, 10000], got inf"),
        (("generate", "--model", str(gpt2_dir), "--prompt", "x", "--temperature", "1e39"),
         "--temperature must be a number in [0, 10000], got 1e+39"),
        (("ppl", "--model", str(gpt2_dir), str(tmp_path / "nofile.txt")), "no such file"),
        (("ppl", "--model", str(gpt2_dir), str(tmp_path)), f"{tmp_path}: a directory (kiln ppl scores one UTF-8"),
    ]
    bad_type = tmp_path / "bert"
    bad_type.mkdir()
    (bad_type / "config.json").write_text('{"model_type": "bert"}')
    cases.append((("generate", "--model", str(bad_type), "--prompt", "x"), "unknown model_type 'bert'"))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    cases.append((("ppl", "--model", str(gpt2_dir), str(binary)), "is not UTF-8"))
    cases.append((("generate", "--model", str(gpt2_dir), "--prompt", "word " * 80), "this model's context is 64"))
    for args, message in cases:
        proc = kiln(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_out_of_range_flags_and_binary_stdin_exit_2(gpt2_dir):
    cases = [
        (("generate", "--model", str(gpt2_dir), "--prompt", "x", "--seed", str(2**64)),
         f"argument --seed: must be in [{-(2**63)}, {2**64 - 1}], got {2**64}"),
        (("ppl", "--model", str(gpt2_dir), "--stride", "0", "-"), "argument --stride: must be >= 1, got 0"),
    ]
    for args, message in cases:
        proc = kiln(*args, stdin="some text to score")
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.strip().splitlines()[-1].endswith(message) and "Traceback" not in proc.stderr, proc.stderr
    # stdin is read as bytes, as a file is: invalid UTF-8 is refused, not scored as surrogates
    proc = subprocess.run([sys.executable, "-m", "model.cli", "ppl", "--model", str(gpt2_dir), "-"],
                          capture_output=True, input=b"caf\xe9 au lait", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.decode() == "kiln: error: stdin is not UTF-8 text (invalid continuation byte at byte 3)\n"


def test_kiln_saved_model_dir_generates(gpt2_dir, tmp_path):
    """A Kiln-format directory (config + safetensors + tokenizer files) loads like the HF one."""
    from model.checkpoint import load_model, save_model
    from model.tokenizer import load_tokenizer

    model = load_model(gpt2_dir)
    save_model(model, tmp_path / "kiln")
    load_tokenizer(gpt2_dir).save(tmp_path / "kiln")
    proc = kiln("generate", "--model", str(tmp_path / "kiln"), "--prompt", "The quick", "--max-tokens", "12",
                "--temperature", "0")
    ref = kiln("generate", "--model", str(gpt2_dir), "--prompt", "The quick", "--max-tokens", "12",
               "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ref.stdout


def test_tokenizer_group_help_lists_its_commands():
    for flag in ("--help", "-h"):  # was "kiln: error: usage: ... (got --help after 'tokenizer')", exit 2
        proc = kiln("tokenizer", flag)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert proc.stdout.startswith("usage: kiln tokenizer [-h] {train} ...")
        assert "    train     train a byte-level BPE tokenizer\n" in proc.stdout
    proc = kiln("tokenizer", "train", "--help")  # the verb's own help still has its flags
    assert proc.returncode == 0 and "--vocab-size N" in proc.stdout and "--overwrite" in proc.stdout
    proc = kiln("tokenizer")
    assert proc.returncode == 2 and proc.stderr == "kiln: error: usage: kiln tokenizer train ... (got nothing after " \
                                                   "'tokenizer')\n"


def test_ctrl_c_while_a_command_starts_is_one_line(monkeypatch, capsys):
    """Ctrl-C during the seconds `kiln train` spends importing torch: exit 130, no traceback."""
    import importlib

    from model import cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib, "import_module", interrupted)
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--config", "x.toml"])
    assert exc.value.code == 130
    assert capsys.readouterr().err.strip() == "kiln train: interrupted"


def test_generate_chat_uses_the_models_template(gpt2_dir, tmp_path):
    import shutil

    from model.chat_template import ChatTemplate, template_tokens
    from model.engine import SamplingParams

    chat = tmp_path / "chat"
    shutil.copytree(gpt2_dir, chat)
    config = json.loads((chat / "tokenizer_config.json").read_text())
    (chat / "tokenizer_config.json").write_text(json.dumps(
        {**config, "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}assistant:{% endif %}"}))
    proc = kiln("generate", "--model", str(chat), "--prompt", "hi", "--system", "be brief", "--chat",
                "--max-tokens", "6", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    engine = load_engine(str(chat), "cpu")
    text = ChatTemplate(engine.tokenizer.chat_template).render(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], True,
        template_tokens(engine.tokenizer))
    assert text == "system: be brief\nuser: hi\nassistant:"
    expected = "".join(o.text for o in engine.generate(engine.tokenizer.encode(text),
                                                       SamplingParams(max_tokens=6, temperature=0.0)))
    assert proc.stdout == expected + "\n"
    for args, said in ((("--chat",), "no chat template"), (("--system", "x"), "--system needs --chat")):
        proc = kiln("generate", "--model", str(gpt2_dir), "--prompt", "hi", *args)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr


def test_generate_takes_sampling_defaults_from_generation_config(gpt2_dir, tmp_path):
    """As kiln serve (and vLLM): temperature / top_p / top_k left out come from the model's
    generation_config.json; flags given win; --generation-config none keeps kiln generate's own defaults."""
    import argparse
    import shutil

    from model.cli import generate_sampling

    path = tmp_path / "m"
    shutil.copytree(gpt2_dir, path)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_p": 0.9, "top_k": 7}))

    def args(**kw):
        flags = {"model": str(path), "temperature": None, "top_p": None, "top_k": None, "generation_config": "auto"}
        return argparse.Namespace(**{**flags, **kw})

    assert generate_sampling(args()) == {"temperature": 0.0, "top_p": 0.9, "top_k": 7}
    assert generate_sampling(args(temperature=0.5, top_k=0)) == {"temperature": 0.5, "top_p": 0.9, "top_k": 0}
    assert generate_sampling(args(generation_config="none")) == {"temperature": 0.8, "top_p": 1.0, "top_k": 0}
    assert generate_sampling(args(model=str(gpt2_dir))) == {"temperature": 0.8, "top_p": 1.0, "top_k": 0}  # no file
    # end to end: the file's temperature 0 makes the completion greedy
    proc = kiln("generate", "--model", str(path), "--prompt", "The quick", "--max-tokens", "12")
    greedy = kiln("generate", "--model", str(gpt2_dir), "--prompt", "The quick", "--max-tokens", "12",
                  "--temperature", "0")
    assert proc.returncode == 0 and greedy.returncode == 0 and proc.stdout == greedy.stdout, proc.stderr
