import numpy as np

from collabopt.core.structure import detect


def test_detects_per_tensor_per_channel_and_plain():
    rng = np.random.default_rng(0)
    codebook = rng.standard_normal(16)
    w = codebook[rng.integers(0, 16, (3, 3, 1, 16))]
    w[rng.random(w.shape) < 0.5] = 0
    st = detect(w, (-1,))
    assert st.sparse and st.clustered_per_tensor and not st.clustered_per_channel
    per_channel = rng.standard_normal((16, 16))
    w2 = np.stack([per_channel[c][rng.integers(0, 16, (3, 3, 8))] for c in range(16)], -1)
    st2 = detect(w2, (-1,))
    assert st2.clustered_per_channel and not st2.clustered_per_tensor and not st2.sparse
    st3 = detect(rng.standard_normal((3, 3, 8, 16)), (-1,))
    assert not st3.clustered and not st3.sparse
    pruned = rng.standard_normal((64, 32))
    pruned[rng.random(pruned.shape) < 0.5] = 0
    st4 = detect(pruned, (-1,))
    assert st4.sparse and not st4.clustered  # zeros alone are not a codebook
