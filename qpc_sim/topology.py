"""Topologies: random geometric graphs, a line, two clusters joined by one bridge.

A graph is a node count and a sorted tuple of undirected edges (u < v). Random graphs are
drawn from a seeded `random.Random`, so a scenario is reproducible from its seed.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Graph:
    """`n` nodes 0..n-1 and undirected `edges` (u < v, sorted, no duplicates).

    `added` counts the edges added to connect the components of a random geometric graph
    (the nearest pair between a component and the rest), so a report can say how far the
    graph is from a pure RGG.
    """

    name: str
    n: int
    edges: tuple[tuple[int, int], ...]
    added: int = 0

    def adjacency(self) -> list[list[int]]:
        adj: list[list[int]] = [[] for _ in range(self.n)]
        for u, v in self.edges:
            adj[u].append(v)
            adj[v].append(u)
        return adj

    @property
    def mean_degree(self) -> float:
        return 2 * len(self.edges) / self.n if self.n else 0.0


def components(
    n: int, edges: list[tuple[int, int]] | tuple[tuple[int, int], ...]
) -> list[list[int]]:
    """Connected components (each a list of nodes), largest first."""
    adj: list[list[int]] = [[] for _ in range(n)]
    for u, v in edges:
        adj[u].append(v)
        adj[v].append(u)
    seen = [False] * n
    out: list[list[int]] = []
    for s in range(n):
        if seen[s]:
            continue
        seen[s] = True
        comp = [s]
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for v in adj[u]:
                if not seen[v]:
                    seen[v] = True
                    comp.append(v)
                    queue.append(v)
        out.append(comp)
    out.sort(key=len, reverse=True)
    return out


def _rgg_points(n: int, rng: random.Random) -> list[tuple[float, float]]:
    return [(rng.random(), rng.random()) for _ in range(n)]


def _rgg_edges(pts: list[tuple[float, float]], radius: float) -> list[tuple[int, int]]:
    """Pairs closer than `radius`, found through a grid of cells `radius` wide."""
    cells: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(pts):
        cells.setdefault((int(x / radius), int(y / radius)), []).append(i)
    r2 = radius * radius
    edges: list[tuple[int, int]] = []
    for (cx, cy), members in cells.items():
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                other = cells.get((cx + dx, cy + dy))
                if other is None:
                    continue
                for i in members:
                    xi, yi = pts[i]
                    for j in other:
                        if j <= i:
                            continue
                        xj, yj = pts[j]
                        if (xi - xj) ** 2 + (yi - yj) ** 2 <= r2:
                            edges.append((i, j))
    return edges


def random_geometric(n: int, mean_degree: float, rng: random.Random, name: str = "") -> Graph:
    """n points in the unit square, an edge between each pair closer than r, connected.

    r is searched (bisection on the drawn points) so the mean degree is `mean_degree`; a
    component left apart is joined to the rest by its nearest pair of points (the link
    an operator would add), and `Graph.added` counts those edges.
    """
    if n < 2:
        raise ValueError("a graph needs at least 2 nodes")
    pts = _rgg_points(n, rng)
    r = math.sqrt(mean_degree / (math.pi * n))
    lo, hi = 0.0, 2 * r  # boundary effects only lower the degree, so r <= the true radius
    for _ in range(30):
        edges = _rgg_edges(pts, r)
        deg = 2 * len(edges) / n
        if abs(deg - mean_degree) < 0.05:
            break
        if deg < mean_degree:
            lo = r
        else:
            hi = r
        r = (lo + hi) / 2
    added = 0
    comps = components(n, edges)
    while len(comps) > 1:
        main = set(comps[0])
        small = comps[-1]
        best: tuple[float, int, int] | None = None
        for i in small:
            xi, yi = pts[i]
            for j in main:
                d = (xi - pts[j][0]) ** 2 + (yi - pts[j][1]) ** 2
                if best is None or d < best[0]:
                    best = (d, i, j)
        assert best is not None
        _, i, j = best
        edges.append((min(i, j), max(i, j)))
        added += 1
        comps = components(n, edges)
    return Graph(name or f"rgg{n}", n, tuple(sorted(set(edges))), added)


def line(n: int) -> Graph:
    """0 - 1 - ... - n-1: the worst case for a broadcast tree (every edge is a bridge)."""
    return Graph(f"line{n}", n, tuple((i, i + 1) for i in range(n - 1)))


def two_clusters(
    n_each: int, mean_degree: float, rng: random.Random
) -> tuple[Graph, tuple[int, int]]:
    """Two random geometric clusters of `n_each` nodes joined by one bridge edge.

    Returns the graph and the bridge (u, v), so a scenario can cut exactly that link.
    """
    a = random_geometric(n_each, mean_degree, rng)
    b = random_geometric(n_each, mean_degree, rng)
    edges = list(a.edges) + [(u + n_each, v + n_each) for u, v in b.edges]
    bridge = (rng.randrange(n_each), n_each + rng.randrange(n_each))
    edges.append(bridge)
    graph = Graph(f"bridge{2 * n_each}", 2 * n_each, tuple(sorted(edges)), a.added + b.added)
    return graph, bridge


def bfs_distances(
    adj: list[list[int]], src: int, usable: set[tuple[int, int]] | None = None
) -> list[int]:
    """Hop distances from `src` (-1 = unreachable); `usable` restricts to those edges."""
    dist = [-1] * len(adj)
    dist[src] = 0
    queue = deque([src])
    while queue:
        u = queue.popleft()
        for v in adj[u]:
            if dist[v] >= 0:
                continue
            if usable is not None and (min(u, v), max(u, v)) not in usable:
                continue
            dist[v] = dist[u] + 1
            queue.append(v)
    return dist
