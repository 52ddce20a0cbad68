"""Optimal 1-D k-means by exact dynamic programming (as Ckmeans.1d.dp).

On sorted values the optimal clusters are contiguous runs, so
``D[q][i] = min_j D[q-1][j-1] + SSE(j..i)``. The cost is concave Monge, hence the optimal ``j``
is monotone in ``i`` and each DP row is solved by divide and conquer in O(n log n); compiled
with numba. (An O(n)-per-row SMAWK version was measured slower here: its constant factor
loses to the divide and conquer's tight inner loop.)

The halves of a divide-and-conquer step are independent, so each row runs on every core:
the first split's long scan in chunks, the next levels breadth first, then one subtree per
task. The last row needs only ``D[k-1][n-1]``: one scan. Timings are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import numpy as np

_TOP_LEVELS = 8  # 2**8 subtrees per row: enough to balance any core count seen here
_CHUNKS = 64
MAX_BACK_POINTER_BYTES = 4 << 30  # k x n int32: 10 M weights x 16 clusters is 0.6 GiB


def _build():
    import numba
    from numba import prange

    @numba.njit(cache=True, inline="always")
    def sse(s1, s2, j, i):
        n = i - j + 1
        a = s1[i + 1] - s1[j]
        return (s2[i + 1] - s2[j]) - a * a / n

    @numba.njit(cache=True, inline="always")
    def scan(s1, s2, prev, i, jlo, jhi):
        """min over j in [jlo, jhi] of D[q-1][j-1] + SSE(j..i): (cost, first argmin)."""
        best = np.inf
        arg = jlo
        for j in range(jlo, jhi + 1):
            c = prev[j - 1] + sse(s1, s2, j, i)
            if c < best:
                best = c
                arg = j
        return best, arg

    @numba.njit(cache=True, parallel=True)
    def parallel_scan(s1, s2, prev, i, jlo, jhi):
        bests = np.full(_CHUNKS, np.inf)
        args = np.full(_CHUNKS, jlo)
        size = (jhi - jlo + _CHUNKS) // _CHUNKS
        for c in prange(_CHUNKS):
            lo = jlo + c * size
            if lo <= jhi:
                bests[c], args[c] = scan(s1, s2, prev, i, lo, min(jhi, lo + size - 1))
        first = np.argmin(bests)  # the first chunk holding the minimum: first argmin overall
        return bests[first], args[first]

    @numba.njit(cache=True)
    def subtree(s1, s2, prev, cur, back, lo, hi, jlo, jhi):
        """Rows lo..hi, whose optimal splits lie in jlo..jhi, depth first."""
        stack = np.empty((128, 4), dtype=np.int64)
        stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = lo, hi, jlo, jhi
        top = 1
        while top > 0:
            top -= 1
            lo, hi, jlo, jhi = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
            if lo > hi:
                continue
            mid = (lo + hi) // 2
            cur[mid], back[mid] = scan(s1, s2, prev, mid, jlo, min(jhi, mid))
            arg = back[mid]
            stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = lo, mid - 1, jlo, arg
            stack[top + 1, 0], stack[top + 1, 1] = mid + 1, hi
            stack[top + 1, 2], stack[top + 1, 3] = arg, jhi
            top += 2

    @numba.njit(cache=True, parallel=True)
    def solve(x, shift, k):
        n = x.shape[0]
        s1 = np.zeros(n + 1)
        s2 = np.zeros(n + 1)
        for i in range(n):
            v = np.float64(x[i]) - shift
            s1[i + 1] = s1[i] + v
            s2[i + 1] = s2[i] + v * v
        prev = np.empty(n)
        cur = np.empty(n)
        back = np.empty((k, n), dtype=np.int32)  # every entry read back is written first
        for i in prange(n):
            prev[i] = sse(s1, s2, 0, i)
        width = 1 << _TOP_LEVELS
        tasks = np.empty((width, 4), dtype=np.int64)
        children = np.empty((width, 4), dtype=np.int64)
        for q in range(1, k):
            for i in range(q):
                cur[i] = np.inf
            mid = n - 1 if q == k - 1 else (q + n - 1) // 2  # the last row: D[k-1][n-1] only
            cur[mid], back[q, mid] = parallel_scan(s1, s2, prev, mid, q, mid)
            if q == k - 1:
                break
            arg = back[q, mid]
            tasks[0, 0], tasks[0, 1], tasks[0, 2], tasks[0, 3] = q, mid - 1, q, arg
            tasks[1, 0], tasks[1, 1], tasks[1, 2], tasks[1, 3] = mid + 1, n - 1, arg, n - 1
            m = 2
            for _ in range(1, _TOP_LEVELS):  # breadth first until there is work for all
                for t in prange(m):
                    lo, hi, jlo, jhi = tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3]
                    a = 2 * t
                    if lo > hi:  # empty: so are its children
                        children[a, 0], children[a, 1] = 1, 0
                        children[a + 1, 0], children[a + 1, 1] = 1, 0
                        continue
                    half = (lo + hi) // 2
                    cur[half], back[q, half] = scan(s1, s2, prev, half, jlo, min(jhi, half))
                    split = back[q, half]
                    children[a, 0], children[a, 1] = lo, half - 1
                    children[a, 2], children[a, 3] = jlo, split
                    children[a + 1, 0], children[a + 1, 1] = half + 1, hi
                    children[a + 1, 2], children[a + 1, 3] = split, jhi
                tasks, children = children, tasks
                m *= 2
            row = back[q]
            for t in prange(m):
                subtree(s1, s2, prev, cur, row, tasks[t, 0], tasks[t, 1], tasks[t, 2],
                        tasks[t, 3])
            prev, cur = cur, prev
        centroids = np.empty(k)
        i = n - 1
        for q in range(k - 1, -1, -1):
            j = back[q, i] if q > 0 else 0
            centroids[q] = (s1[i + 1] - s1[j]) / (i - j + 1) + shift
            i = j - 1
        return centroids

    return solve


_solve = None


def kmeans1d(values: np.ndarray, k: int) -> np.ndarray:
    """The k centroids (ascending) minimising the sum of squared distances, exactly."""
    global _solve
    n = int(np.size(values))
    if 4 * n * int(k) > MAX_BACK_POINTER_BYTES:
        raise ValueError(
            f"exact kmeans1d on {n:,} weights with {k} clusters needs "
            f"{4 * n * k / 2**30:.1f} GiB of back-pointers (limit "
            f"{MAX_BACK_POINTER_BYTES / 2**30:.0f} GiB): use init='kmeans++' (within a few "
            "percent of the optimum, docs/BENCHMARKS.md) or cluster per channel")
    x = np.sort(np.asarray(values, dtype=np.float32).ravel())
    distinct = int(np.count_nonzero(np.diff(x))) + 1 if x.size else 0
    if distinct < k:
        raise ValueError(f"{distinct} distinct values cannot form {k} clusters")
    if _solve is None:
        _solve = _build()
    # centred, so the prefix sums of squares do not swamp the differences taken from them
    return np.sort(_solve(x, float(x.mean(dtype=np.float64)), int(k)))
