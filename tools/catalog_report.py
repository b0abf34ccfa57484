"""What catalog jobs give people: duplicate groups as CSV, JSON lines and a contact sheet; a map of the catalog as a
PNG. Client side: runs where the command runs, reading images by their payload uri.

May use: tools.sheet (and scikit-learn and matplotlib, the plot extra, loaded only by the functions that draw).
"""

from __future__ import annotations

import csv
import io
import json
import pathlib

import numpy as np

from tools.sheet import contact_sheet, read_uri

SHEET_GROUPS = 12
SHEET_MEMBERS = 8


def write_groups(groups, out_prefix: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes ``PREFIX.csv`` (group, size, id, distance: one row per member) and ``PREFIX.jsonl`` (one group per
    line: group, ids, distances). ``groups``: DedupGroup messages or dicts with group/ids/distances."""
    prefix = pathlib.Path(out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    csv_path, jsonl_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".jsonl")
    with open(csv_path, "w", newline="") as fc, open(jsonl_path, "w") as fj:
        w = csv.writer(fc)
        w.writerow(["group", "size", "id", "distance"])
        for g in groups:
            gid, ids, dist = (g["group"], g["ids"], g["distances"]) if isinstance(g, dict) else (
                g.group, list(g.ids), list(g.distances))
            for uid, d in zip(ids, dist):
                w.writerow([gid, len(ids), uid, f"{d:.6g}"])
            fj.write(json.dumps({"group": gid, "ids": list(ids), "distances": [float(x) for x in dist]}) + "\n")
    return csv_path, jsonl_path


def groups_sheet(groups, payloads_of, max_groups: int = SHEET_GROUPS, max_members: int = SHEET_MEMBERS) -> bytes:
    """A contact sheet PNG of the largest groups: one row per group, its members' images (by payload ``uri``) with
    ids and their distance to their nearest other member.

    Args:
        groups: (ids, distances) per group, largest first.
        payloads_of: ids -> payload dicts (aligned), e.g. from ``Client.get``.
    """
    heads, rows = [], []
    for ids, dist in list(groups)[:max_groups]:
        ids, dist = list(ids)[:max_members], list(dist)[:max_members]
        images = [read_uri(p.get("uri")) for p in payloads_of(ids)]
        heads.append(images[0])
        rows.append([(uid, float(d), im) for uid, d, im in zip(ids[1:], dist[1:], images[1:])])
    labels = [f"{ids[0]} ({len(ids)})" for ids, _ in list(groups)[:max_groups]]
    return contact_sheet(heads, rows, labels=labels)


def project(x: np.ndarray, method: str = "auto", seed: int = 0, tsne_max: int = 3000) -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of ``x``: t-SNE for samples up to ``tsne_max`` rows (``auto``), PCA otherwise.
    Returns (coords (n, 2), the method used)."""
    from sklearn.decomposition import PCA

    if method == "auto":
        method = "tsne" if len(x) <= tsne_max else "pca"
    if len(x) < 3:
        return np.zeros((len(x), 2), dtype=np.float32), "none"
    if method == "tsne":
        from sklearn.manifold import TSNE

        if x.shape[1] > 50:  # the usual practice: PCA to 50 first
            x = PCA(n_components=50, random_state=seed).fit_transform(x)
        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x), "tsne"
    return PCA(n_components=2, random_state=seed).fit_transform(x), "pca"


def draw_map(coords: np.ndarray, labels: list[str | None], out: str | pathlib.Path, width: int = 1200,
             height: int = 900, title: str = "", thumbs: list[bytes | None] | None = None,
             max_thumbs: int = 150) -> None:
    """Writes a PNG of exactly ``width`` x ``height`` pixels: the points coloured by label (a cluster number, or
    None), and when ``thumbs`` is given, up to ``max_thumbs`` of those images drawn at their points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, ax = plt.subplots(figsize=(width / dpi, height / dpi), dpi=dpi)
    known = sorted({lb for lb in labels if lb is not None}, key=lambda v: (len(v), v))
    if known:
        cmap = plt.get_cmap("tab20" if len(known) > 10 else "tab10")
        for n, lb in enumerate(known):
            m = np.array([v == lb for v in labels])
            ax.scatter(coords[m, 0], coords[m, 1], s=8, color=cmap(n % cmap.N), label=f"cluster {lb}", alpha=0.8)
        rest = np.array([v is None for v in labels])
        if rest.any():
            ax.scatter(coords[rest, 0], coords[rest, 1], s=6, color="0.6", label="no cluster", alpha=0.6)
        if len(known) <= 20:
            ax.legend(loc="best", fontsize=7, markerscale=2)
    else:
        ax.scatter(coords[:, 0], coords[:, 1], s=8, color="tab:blue", alpha=0.8)
    if thumbs:
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage
        from PIL import Image

        shown = 0
        for (px, py), data in zip(coords, thumbs):
            if data is None or shown >= max_thumbs:
                continue
            try:
                im = Image.open(io.BytesIO(data)).convert("RGB")
            except Exception:  # an unreadable image: the point stays a dot
                continue
            im.thumbnail((48, 48))
            ax.add_artist(AnnotationBbox(OffsetImage(np.asarray(im)), (px, py), frameon=False))
            shown += 1
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.95)
    fig.savefig(out, dpi=dpi, format="png")
    plt.close(fig)
