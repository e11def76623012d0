"""Tile classes of the block-masked attention kernels (no Triton needed to import): per (q tile, k tile) pair,
``TILE_SKIP`` when the mask allows no (query, key) pair of the tiles, ``TILE_FULL`` when it allows all, else
``TILE_PARTIAL`` (the element-wise mask is applied only there). ``kernels/block_masked_attention.py`` writes them in its
visit lists; ``streamkern.ops.block_masked_attention.tile_classes`` is the torch twin."""
TILE_SKIP, TILE_PARTIAL, TILE_FULL = 0, 1, 2
