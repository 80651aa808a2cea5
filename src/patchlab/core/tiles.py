"""Overlapping square tiles for high-resolution images, and patch grids stitched from them.

Each tile is embedded as an image of its own, so a 12-pixel defect keeps its pixels however
large the part; the tiles' patch-score grids are averaged where they overlap. Tile positions
are multiples of 32 pixels (the coarsest backbone stride), so every tile's grid lands on whole
cells of the stitched grid.
"""

from collections.abc import Callable, Iterator

import torch

from patchlab.errors import SettingError

ALIGN = 32


class Tiling:
    """Square tiles of `size` pixels overlapping by `overlap`, the last one flush with the edge.

    Args:
        size: Tile side in pixels, a multiple of 32.
        overlap: Pixels shared by neighbouring tiles, a multiple of 32 below `size`.
    """

    def __init__(self, size: int, overlap: int = 32) -> None:
        self.size, self.overlap = size, overlap  # checked by PatchCore.LIMITS

    def starts(self, length: int) -> list[int]:
        """Where tiles start along a side of `length` pixels."""
        if length < self.size or length % ALIGN:
            raise SettingError(
                f"With {{tile_size}}={self.size} the model input must be at least that large "
                f"and a multiple of {ALIGN} on each side, got {length}: set data.geometry.size"
            )
        last = length - self.size
        return [*range(0, last, self.size - self.overlap), last]

    def positions(self, height: int, width: int) -> list[tuple[int, int]]:
        """(top, left) of every tile of an input of `height` x `width`, row by row."""
        return [(y, x) for y in self.starts(height) for x in self.starts(width)]

    def crops(
        self, images: torch.Tensor, valid: torch.Tensor | None
    ) -> Iterator[tuple[tuple[int, int], torch.Tensor, torch.Tensor | None]]:
        """Each tile of a (B, C, H, W) batch (a view, never a copy), with its (B, t, t) `valid`."""
        for y, x in self.positions(*images.shape[-2:]):
            rows, cols = slice(y, y + self.size), slice(x, x + self.size)
            yield (y, x), images[..., rows, cols], None if valid is None else valid[:, rows, cols]

    def score(
        self,
        images: torch.Tensor,
        valid: torch.Tensor | None,
        score: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`score` (tile, valid -> image scores, patch grid) over every tile, one at a time:
        the highest tile's image score and the stitched grid of the whole input."""
        stitched, best = Stitched(self.size, *images.shape[-2:]), None
        for position, tile, tile_valid in self.crops(images, valid):
            image_score, grid = score(tile, tile_valid)
            best = image_score if best is None else torch.maximum(best, image_score)
            stitched.add(position, grid)
        return best, stitched.grid()


class Stitched:
    """Averages tiles' (B, h, w) patch-score grids into the whole input's grid."""

    def __init__(self, tile_size: int, height: int, width: int) -> None:
        self.tile_size, self.height, self.width = tile_size, height, width
        self.total: torch.Tensor | None = None
        self.count: torch.Tensor | None = None
        self.cell = 1

    def add(self, position: tuple[int, int], grid: torch.Tensor) -> None:
        if self.total is None:
            self.cell = self.tile_size // grid.shape[-1]
            shape = (len(grid), self.height // self.cell, self.width // self.cell)
            self.total = grid.new_zeros(shape)
            self.count = grid.new_zeros(shape)
        top, left = position[0] // self.cell, position[1] // self.cell
        cells = (slice(None), slice(top, top + grid.shape[-2]), slice(left, left + grid.shape[-1]))
        scored = ~torch.isnan(grid)
        self.total[cells] += grid.nan_to_num(0.0)
        self.count[cells] += scored

    def grid(self) -> torch.Tensor:
        """The average of every tile that scored a cell; NaN where none did."""
        return torch.where(self.count > 0, self.total / self.count.clamp(min=1), float("nan"))
