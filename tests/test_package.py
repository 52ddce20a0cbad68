import subprocess
import sys

import collabopt


def test_import_is_light():
    """`import collabopt` must not pull in TensorFlow or Keras."""
    code = ("import sys, collabopt; "
            "print(any(m.split('.')[0] in ('tensorflow', 'keras') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_api_resolves():
    for name in collabopt.__all__:
        assert callable(getattr(collabopt, name)), name


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError):
        collabopt.not_an_api  # noqa: B018


def test_submodules_reachable_from_the_package():
    assert callable(collabopt.models.mnist_cnn) and callable(collabopt.datasets.digits)
    assert callable(collabopt.vela.available)
