"""Property-based checks of the numeric kernels (hypothesis)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from collabopt.clustering import _lloyd, init_centroids, quantization_error
from collabopt.pruning import m_by_n_mask, magnitude_mask

finite = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=finite),
       st.floats(0.0, 0.95))
def test_magnitude_mask_prunes_the_smallest(w, sparsity):
    mask = np.asarray(magnitude_mask(w, np.float32(sparsity)))
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert np.sum(mask == 0) >= int(np.floor(np.float32(sparsity) * w.size))
    kept, pruned = np.abs(w[mask == 1]), np.abs(w[mask == 0])
    if kept.size and pruned.size:
        assert kept.min() > pruned.max() or np.isclose(kept.min(), pruned.max())


@settings(max_examples=30, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 9), st.integers(1, 6)), elements=finite),
       st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4)]))
def test_m_by_n_keeps_m_of_every_n(w, mn):
    m, n = mn
    mask = np.asarray(m_by_n_mask(w, m, n, (0,)))
    full = (w.shape[0] // n) * n
    groups = mask[:full].reshape(-1, n, w.shape[1])
    assert np.all(groups.sum(axis=1) == m)
    assert np.all(mask[full:].sum(axis=0) == min(m, w.shape[0] - full))


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, st.integers(20, 300), elements=finite),
       st.integers(2, 6))
def test_kmeans1d_never_worse_than_lloyd(v, k):
    if np.unique(v).size < k:
        return
    exact = quantization_error(v, init_centroids(v, k, "kmeans1d"))
    for init in ("linear", "density", "kmeans++"):
        local = quantization_error(v, _lloyd(v, init_centroids(v, k, init)))
        assert exact <= local * (1 + 1e-9) + 1e-9
