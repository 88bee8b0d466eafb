"""classifier.h5: round trip, tamper detection, and the encoder referenced by path and content hash."""

import os
import shutil

import h5py
import numpy as np
import pytest

from hpcllm.errors import HpcllmError
from hpcllm.train.checkpoint import EncoderRef, read_classifier, resolve_encoder, write_classifier
from hpcllm.train.fit import FitOptions, fit
from hpcllm.train.heads import predict_proba
from test_train_fixtures import one_torch_thread, warm_kernel_cache  # noqa: F401 (autouse)



def fake_encoder(path, content_hash="ab" * 32):
    """Just the root attributes hpcllm.checkpoint.hdf5.Checkpoint reads (the hash is all we use)."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "hpcllm-checkpoint", "format_version": 1, "architecture": "bert",
                        "config": "{}", "content_hash": content_hash, "dtype": "float32", "source": "test"})
    return str(path)


@pytest.fixture(params=["linear", "mlp"])
def trained(request, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6)).astype(np.float32) + 3
    y = (X[:, 0] + X[:, 1] > 6).astype(np.int64) + (X[:, 2] > 3.5)
    result = fit(X, y, 3, options=FitOptions(head=request.param, hidden=5, max_iter=50))
    encoder = EncoderRef.of(fake_encoder(tmp_path / "minilm.h5"), pooling="mean", normalize=True)
    os.mkdir(tmp_path / "clf")
    path = str(tmp_path / "clf" / "classifier.h5")
    provenance = {"data_hash": "0123-120", "options": {"head": request.param}, "world_size": 2, "seed": 0,
                  "validation": {"accuracy": np.float64(0.9)}}
    content_hash = write_classifier(path, result.head, ["négatif", "neutre", "positif"], ['"a"', '"b"', '"c"'],
                                    encoder, provenance)
    return X, result.head, path, content_hash


def test_round_trip(trained):
    X, head, path, content_hash = trained
    clf = read_classifier(path)
    assert clf.content_hash == content_hash and clf.class_names == ["négatif", "neutre", "positif"]
    assert clf.encoder.content_hash == "ab" * 32 and clf.encoder.pooling == "mean" and clf.encoder.normalize
    assert clf.provenance["validation"] == {"accuracy": 0.9} and clf.provenance["world_size"] == 2
    assert clf.head.config() == head.config()
    np.testing.assert_array_equal(predict_proba(clf.head, X), predict_proba(head, X))
    assert sorted(os.listdir(os.path.dirname(path))) == ["classifier.h5"]      # no temporary left behind


def test_a_modified_head_is_a_one_line_error(trained):
    _, _, path, _ = trained
    with h5py.File(path, "r+") as f:
        name = sorted(f["head"])[0]
        f["head"][name][...] = f["head"][name][()] + 1
    with pytest.raises(HpcllmError, match="content hash mismatch"):
        read_classifier(path)


def test_encoder_found_by_absolute_then_relative_path(trained, tmp_path):
    _, _, path, _ = trained
    assert resolve_encoder(read_classifier(path)) == str(tmp_path / "minilm.h5")
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("elsewhere"))
    os.unlink(tmp_path / "minilm.h5")                                  # the absolute path is gone
    clf = read_classifier(str(moved / "clf" / "classifier.h5"))
    assert os.path.samefile(resolve_encoder(clf), moved / "minilm.h5")


def test_missing_or_swapped_encoder_is_an_error(trained, tmp_path):
    _, _, path, _ = trained
    clf = read_classifier(path)
    other = fake_encoder(tmp_path / "other.h5", content_hash="cd" * 32)
    with pytest.raises(HpcllmError, match="is not the abababababab"):
        resolve_encoder(clf, other)
    os.unlink(tmp_path / "minilm.h5")
    with pytest.raises(HpcllmError, match="its encoder is not at"):
        resolve_encoder(clf)


def test_not_a_classifier(tmp_path):
    with pytest.raises(HpcllmError, match="not an hpcllm classifier"):
        read_classifier(fake_encoder(tmp_path / "enc.h5"))
    with pytest.raises(HpcllmError, match="not found"):
        read_classifier(str(tmp_path / "nope.h5"))
