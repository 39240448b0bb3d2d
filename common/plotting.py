"""Plots of the section scripts: matplotlib on its file-only Agg backend (no display needed), saved as PNG.

plt = pyplot()
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(steps, losses)
save_figure(fig, os.path.join(args.out, "loss.png"))
"""

from __future__ import annotations

import os


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, imported on first use (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Lay out ``fig``, write it to ``path`` (creating its folder), close it; returns ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
