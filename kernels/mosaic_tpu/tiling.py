"""Tile sizes of the Mosaic TPU kernels and the padded layout they work in.

A logical block of the core primitive (``block_q`` query rows against ``block_k`` keys,
any sizes) is cut into tiles that respect the TPU's (8, 128) vector tiling. Every tile
is a multiple of 128 rows: keys lie along lanes in the logits of the forward and dq
kernels, query rows lie along lanes in the transposed dk/dv kernels and in the stored
log-sum-exp. A block is padded at its end to a whole number of tiles; padded keys carry
position -1 and never count, padded query rows are cut off afterwards.

Per-position vectors (positions, lse, the backward's ``delta``) travel as rows
``[..., 8, n]``: the value repeated on the 8 sublanes of a vreg, so each tile of them is
one dense (8, 128k) block; a kernel reads row 0, or turns it into a column.
"""

import dataclasses
from typing import NamedTuple

import jax

from hyperattention_jax.config import check_int
from hyperattention_jax.util import cdiv

NUM_LANES = 128
NUM_SUBLANES = 8

_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Largest tiles of the Mosaic TPU kernels, and how the extra keys are fetched.

  A logical block is split into as few tiles as these bounds allow, of equal size
  (rounded up to 128), so a 600-row block becomes two 384-row tiles with ``block_q=512``.

  Attributes:
    block_q: query rows per tile of the forward and dq kernels.
    block_k: diagonal keys per tile of the forward and dq kernels.
    block_q_dkv: query rows per step of the dk/dv kernels.
    block_k_dkv: keys per tile of the dk/dv kernels (their accumulators stay in VMEM).
    block_extra: extra keys per matmul, and per tile of the extra dk/dv kernel.
    resident_extra_bytes: an extra key set (keys and values) up to this size is fetched
      to VMEM whole; its block index then depends on the (batch, head) only (and on the
      block when each block has its own set), so the pipeline fetches it once per
      (batch, kv head) instead of once per query tile. Larger sets stream in tiles.
    rows_per_step: query rows one grid step may hold over the query heads of a GQA
      group: the heads that read the same keys share each key tile, which makes the
      steps fewer and larger (the per-step cost is fixed).
    vmem_limit_bytes: scoped VMEM limit passed to Mosaic; None keeps the default.
  """

  block_q: int = 512
  block_k: int = 512
  block_q_dkv: int = 512
  block_k_dkv: int = 512
  block_extra: int = 512
  resident_extra_bytes: int = 4 * _MIB
  rows_per_step: int = 2048
  vmem_limit_bytes: int | None = None

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_extra"):
      value = getattr(self, name)
      check_int(name, value, NUM_LANES)
      if value % NUM_LANES:
        raise ValueError(f"{name}={value} must be a multiple of {NUM_LANES}.")
    check_int("resident_extra_bytes", self.resident_extra_bytes, 0)
    check_int("rows_per_step", self.rows_per_step, 1)
    if self.vmem_limit_bytes is not None:
      check_int("vmem_limit_bytes", self.vmem_limit_bytes, 1)


# Starting points per TPU generation (WORKSPACE.md gives the reasoning). v5e and v5p have
# 128x128 MXUs: 512 x 512 tiles are whole multiples of them and, with double buffering at
# head_dim 256, stay well inside a 32 MiB scoped VMEM limit. v6e has 256x256 MXUs and
# about 4.7x the matmul rate of v5e, so a 512 x 512 step would be dominated by the fixed
# per-step cost: longer query tiles, with a larger limit (it has 128 MiB of VMEM).
_CHIP_BLOCK_SIZES = {
    "v5e": BlockSizes(vmem_limit_bytes=32 * _MIB),
    "v5p": BlockSizes(vmem_limit_bytes=32 * _MIB),
    "v6e": BlockSizes(block_q=1024, block_k=512, block_q_dkv=1024, block_k_dkv=512,
                      block_extra=512, resident_extra_bytes=8 * _MIB, rows_per_step=4096,
                      vmem_limit_bytes=64 * _MIB),
}


def default_block_sizes(chip: str | None = None) -> BlockSizes:
  """Block sizes for a TPU generation ("v5e", "v5p", "v6e"); detected when None.

  Unknown chips, and hosts without a TPU (interpret mode), get ``BlockSizes()``.
  """
  if chip is None and jax.default_backend() == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
    try:
      chip = str(pltpu.get_tpu_info().chip_version)
    except (ValueError, RuntimeError, KeyError):
      chip = None
  return _CHIP_BLOCK_SIZES.get(chip, BlockSizes())


def _round_up(x: int, multiple: int) -> int:
  return cdiv(x, multiple) * multiple


def _even_tiles(length: int, max_tile: int):
  """``(tile, count)``: fewest tiles of at most ``max_tile`` (multiples of 128) covering ``length``."""
  count = cdiv(_round_up(length, NUM_LANES), max_tile)
  return _round_up(cdiv(length, count), NUM_LANES), count


def _largest_divisor_tile(length: int, max_tile: int) -> int:
  """The largest multiple of 128 that divides ``length`` (a multiple of 128) and is ``<= max_tile``."""
  for tile in range(min(max_tile, length), 0, -NUM_LANES):
    if length % tile == 0:
      return tile
  raise AssertionError(f"{length=} is not a multiple of {NUM_LANES}")


class TilePlan(NamedTuple):
  """How one call is tiled. Sizes are in rows; ``*_tiles`` count tiles per logical block.

  Attributes:
    num_blocks: logical blocks.
    block_q, block_k: logical block sizes (unpadded).
    q_tile, q_tiles: query tiling of the forward and dq kernels.
    k_tile, k_tiles: diagonal key tiling of the forward and dq kernels.
    q_tile_dkv, k_tile_dkv: tiles of the dk/dv kernels (they divide the padded blocks).
    heads_per_step, heads_per_step_dkv: query heads of a GQA group handled together in
      one step of the forward and dq kernels, and of the dk/dv kernels.
    num_extra: extra keys per set (unpadded), 0 when there are none.
    num_extra_sets: 1 (shared) or ``num_blocks``.
    extra_padded: extra keys per set after padding.
    extra_chunk: extra keys per matmul; also the tile of the extra dk/dv kernel.
    extra_resident: whether the forward and dq kernels fetch a whole set at once.
  """

  num_blocks: int
  block_q: int
  block_k: int
  q_tile: int
  q_tiles: int
  k_tile: int
  k_tiles: int
  q_tile_dkv: int
  k_tile_dkv: int
  heads_per_step: int
  heads_per_step_dkv: int
  num_extra: int
  num_extra_sets: int
  extra_padded: int
  extra_chunk: int
  extra_resident: bool

  @property
  def padded_q(self) -> int:
    return self.q_tile * self.q_tiles

  @property
  def padded_k(self) -> int:
    return self.k_tile * self.k_tiles

  @property
  def has_extra(self) -> bool:
    return self.num_extra > 0

  @property
  def extra_block(self) -> int:
    """Extra keys per DMA block of the forward and dq kernels."""
    return self.extra_padded if self.extra_resident else self.extra_chunk

  @property
  def extra_steps(self) -> int:
    """Grid steps the forward and dq kernels spend on extra keys after the diagonal ones.

    A resident set is consumed during the last diagonal step, so it adds none.
    """
    if not self.has_extra or self.extra_resident:
      return 0
    return self.extra_padded // self.extra_chunk


def _heads_per_step(groups: int, tile: int, rows_per_step: int) -> int:
  """The largest divisor of ``groups`` whose tiles stay within ``rows_per_step`` rows (>= 1)."""
  return max(h for h in range(1, groups + 1) if groups % h == 0 and
             (h == 1 or h * tile <= rows_per_step))


def plan_tiles(*, num_blocks: int, block_q: int, block_k: int, groups: int, num_extra: int,
               num_extra_sets: int, head_dims: tuple[int, int], itemsize: int,
               block_sizes: BlockSizes) -> TilePlan:
  """Chooses the tiles of one call (see ``TilePlan``); ``groups`` query heads per key head."""
  q_tile, q_tiles = _even_tiles(block_q, block_sizes.block_q)
  k_tile, k_tiles = _even_tiles(block_k, block_sizes.block_k)
  q_tile_dkv = _largest_divisor_tile(q_tile * q_tiles, block_sizes.block_q_dkv)
  k_tile_dkv = _largest_divisor_tile(k_tile * k_tiles, block_sizes.block_k_dkv)
  extra_chunk, extra_chunks = _even_tiles(max(num_extra, 1), block_sizes.block_extra)
  extra_padded = extra_chunk * extra_chunks if num_extra else 0
  set_bytes = extra_padded * sum(head_dims) * itemsize
  return TilePlan(num_blocks=num_blocks, block_q=block_q, block_k=block_k, q_tile=q_tile,
                  q_tiles=q_tiles, k_tile=k_tile, k_tiles=k_tiles, q_tile_dkv=q_tile_dkv,
                  k_tile_dkv=k_tile_dkv,
                  heads_per_step=_heads_per_step(groups, q_tile, block_sizes.rows_per_step),
                  heads_per_step_dkv=_heads_per_step(groups, q_tile_dkv,
                                                     block_sizes.rows_per_step),
                  num_extra=num_extra, num_extra_sets=num_extra_sets,
                  extra_padded=extra_padded, extra_chunk=extra_chunk,
                  extra_resident=set_bytes <= block_sizes.resident_extra_bytes)
