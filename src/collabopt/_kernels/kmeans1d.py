"""Optimal 1-D k-means by exact dynamic programming (as Ckmeans.1d.dp).

On sorted values the optimal clusters are contiguous runs, so
``D[q][i] = min_j D[q-1][j-1] + SSE(j..i)``. The cost is concave Monge, hence the optimal ``j``
is monotone in ``i`` and each DP row is solved by divide and conquer in O(n log n); compiled
with numba. (An O(n)-per-row SMAWK version was measured slower here: its constant factor
loses to the divide and conquer's tight inner loop.) Timings are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import numpy as np


def _build():
    import numba

    @numba.njit(cache=True, inline="always")
    def sse(s1, s2, j, i):
        n = i - j + 1
        a = s1[i + 1] - s1[j]
        return (s2[i + 1] - s2[j]) - a * a / n

    @numba.njit(cache=True)
    def solve(x, k):
        n = x.shape[0]
        s1 = np.zeros(n + 1)
        s2 = np.zeros(n + 1)
        for i in range(n):
            s1[i + 1] = s1[i] + x[i]
            s2[i + 1] = s2[i] + x[i] * x[i]
        prev = np.empty(n)
        cur = np.empty(n)
        back = np.zeros((k, n), dtype=np.int32)
        for i in range(n):
            prev[i] = sse(s1, s2, 0, i)
        stack = np.empty((256, 4), dtype=np.int64)
        for q in range(1, k):
            for i in range(q):
                cur[i] = np.inf
            stack[0, 0] = q
            stack[0, 1] = n - 1
            stack[0, 2] = q
            stack[0, 3] = n - 1
            top = 1
            while top > 0:  # rows lo..hi have their optimal split in jlo..jhi
                top -= 1
                lo, hi, jlo, jhi = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
                if lo > hi:
                    continue
                mid = (lo + hi) // 2
                best = np.inf
                arg = jlo
                for j in range(jlo, min(jhi, mid) + 1):
                    c = prev[j - 1] + sse(s1, s2, j, mid)
                    if c < best:
                        best = c
                        arg = j
                cur[mid] = best
                back[q, mid] = arg
                stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = lo, mid - 1, jlo, arg
                stack[top + 1, 0], stack[top + 1, 1] = mid + 1, hi
                stack[top + 1, 2], stack[top + 1, 3] = arg, jhi
                top += 2
            prev, cur = cur, prev
        centroids = np.empty(k)
        i = n - 1
        for q in range(k - 1, -1, -1):
            j = back[q, i] if q > 0 else 0
            centroids[q] = (s1[i + 1] - s1[j]) / (i - j + 1)
            i = j - 1
        return centroids

    return solve


_solve = None


def kmeans1d(values: np.ndarray, k: int) -> np.ndarray:
    """The k centroids (ascending) minimising the sum of squared distances, exactly."""
    global _solve
    x = np.sort(np.asarray(values, dtype=np.float32).ravel()).astype(np.float64)
    distinct = int(np.count_nonzero(np.diff(x))) + 1 if x.size else 0
    if distinct < k:
        raise ValueError(f"{distinct} distinct values cannot form {k} clusters")
    if _solve is None:
        _solve = _build()
    shift = x.mean()
    return np.sort(_solve(x - shift, int(k)) + shift)
