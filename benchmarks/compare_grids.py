"""Real slices beside generated ones, for the README: the first k tiles of two or more grids side by side, 2x zoom,
and with --detail a box of each grid's first two tiles enlarged 4× below it.

    python benchmarks/compare_grids.py runs/bench_quality/grids/heldout.png runs/bench_quality/grids/edm@60.png \
        --out docs/images/kaggle_samples.png

Reads grids written by `images.save_grid` (square tiles, 2-pixel padding), so a picture in the
README is cut from the exact images a benchmark scored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from brainfusion.images import make_grid, save_png


def tiles(grid_png: Path, tile: int, pad: int = 2) -> np.ndarray:
    """The (N, tile, tile) images of a `make_grid` picture, row by row."""
    grid = np.asarray(Image.open(grid_png).convert("L"))
    rows, cols = ((s - pad) // (tile + pad) for s in grid.shape)
    return np.stack([grid[pad + r * (tile + pad): pad + r * (tile + pad) + tile, pad + c * (tile + pad): pad + c * (tile + pad) + tile]
                     for r in range(rows) for c in range(cols)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("grids", type=Path, nargs="+", help="grid PNGs, left to right (the real one first)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tile", type=int, default=64, help="tile size in the grids, pixels")
    p.add_argument("--k", type=int, default=16, help="tiles from each grid (a square number)")
    p.add_argument("--zoom", type=int, default=2)
    p.add_argument("--detail", help="y,x,size: below each panel, this box of its first two tiles enlarged 4× (e.g. the cortex)")
    args = p.parse_args(argv)
    panels = [make_grid(tiles(path, args.tile)[: args.k]).repeat(args.zoom, 0).repeat(args.zoom, 1) for path in args.grids]
    if args.detail:
        y, x, size = (int(v) for v in args.detail.split(","))
        for i, path in enumerate(args.grids):
            crops = make_grid(tiles(path, args.tile)[:2, y : y + size, x : x + size], nrow=2)
            detail = crops.repeat(4, 0).repeat(4, 1)
            detail = np.pad(detail, ((8, 0), (0, panels[i].shape[1] - detail.shape[1])), constant_values=255)
            panels[i] = np.concatenate([panels[i], detail], axis=0)
    gap = np.full((panels[0].shape[0], 16), 255, np.uint8)
    save_png(np.concatenate([part for panel in panels for part in (gap, panel)][1:], axis=1), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
