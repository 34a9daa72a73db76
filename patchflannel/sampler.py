"""Batched patch sampling: K centres drawn inside each lung mask, K crops per image.

Everything here works on whole batches at once and on the tensors' own device:
one call draws all B×K centres, one indexing operation gathers all B×K crops.
There is no Python loop over patches (nor over images).

Leaf module: imports only torch and the standard library.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["extract_patches", "image_generators", "sample_centres", "sample_patches"]

logger = logging.getLogger(__name__)

# Pixels per block in the two-level search of `sample_centres`. A block is
# summed as BLOCK/8 int64 words whose byte lanes each hold at most BLOCK/8 ≤ 255
# ones, so no lane can carry into its neighbour. 256 keeps both levels small:
# 4096 block counts per 1024² image, and a 256-long cumsum per drawn centre.
_BLOCK = 256
_WORD_BYTES = 8


def _check_masks(masks: Tensor, name: str = "masks") -> None:
    if not isinstance(masks, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(masks).__name__}")
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B,1,H,W), got {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise ValueError(
            f"{name} must be a bool tensor, got {masks.dtype}; threshold it first, e.g. `{name} > 0.5`"
        )
    if masks.shape[2] < 1 or masks.shape[3] < 1:
        raise ValueError(f"{name} must have H, W >= 1, got {tuple(masks.shape)}")


def _check_positive_int(value: object, name: str) -> int:
    # bool is an int subclass; `k=True` is almost certainly a bug.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _block_counts(flat: Tensor) -> Tensor:
    """Number of True pixels per block of `_BLOCK` pixels.

    flat: (B, nblk*_BLOCK) bool, contiguous, storage offset divisible by 8
    → (B, nblk) int64.
    """
    batch = flat.shape[0]
    # A bool reduction reads one byte per op and is ~100× slower on CPU than
    # summing the same bytes as int64 words (SWAR): every byte is 0/1 and a
    # block has only _BLOCK/8 = 32 words, so each byte lane of the word sum is
    # ≤ 32 and the lanes never carry. Summing the 8 lanes gives the count.
    words = flat.view(torch.int64).view(batch, -1, _BLOCK // _WORD_BYTES)
    lanes = words.sum(dim=2).view(torch.uint8).view(batch, -1, _WORD_BYTES)
    return lanes.sum(dim=2, dtype=torch.int64)


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per image, seeded with that image's seed."""
    return [torch.Generator().manual_seed(int(s) & 0x7FFFFFFFFFFFFFFF) for s in seeds]


def sample_centres(masks: Tensor, k: int, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
    """Draw K patch centres per image, uniformly over each image's mask pixels.

    Args:
        masks: (B,1,H,W) bool, True inside the lungs. Bool values must be 0/1
            bytes (as every torch/numpy bool is).
        k: number of centres per image, >= 1. Drawn with replacement.
        generator: seeds the draw: one generator for the whole batch, or a
            sequence of B generators, one per image — then each image's
            centres depend only on its own generator and mask, never on the
            other images in the batch or their order. The uniforms are drawn
            on the generator's device and then moved to the masks' device, so
            a CPU generator gives identical centres for CPU and CUDA masks.
            ``None`` uses the global RNG of the masks' device.

    Returns:
        centres: (B,K,2) int64 (row, col) on the masks' device. Each centre is
        one flat pixel index drawn jointly (never row and column independently,
        which lands outside non-convex lungs).

    An image whose mask is empty falls back to centres uniform over the whole
    image, with a warning naming the batch indices; the result never contains
    NaN or out-of-image centres.
    """
    _check_masks(masks)
    k = _check_positive_int(k, "k")
    batch, _, height, width = masks.shape
    device = masks.device
    if batch == 0:
        return torch.empty((0, k, 2), dtype=torch.int64, device=device)

    n_pixels = height * width
    n_blocks = -(-n_pixels // _BLOCK)
    flat = masks.reshape(batch, n_pixels)
    if n_pixels != n_blocks * _BLOCK:
        # Pad with False so every block is full; padded pixels are never drawn.
        flat = F.pad(flat, (0, n_blocks * _BLOCK - n_pixels), value=False)
    elif flat.storage_offset() % _WORD_BYTES:
        # The int64 view needs 8-byte-aligned storage (reshape already made it
        # contiguous); only exotic views of a larger buffer get here.
        flat = flat.clone()

    cum = torch.cumsum(_block_counts(flat), dim=1)  # (B, nblk)
    counts = cum[:, -1]  # (B,)

    empty = counts == 0
    if bool(empty.any()):
        idx = empty.nonzero().flatten().tolist()
        warnings.warn(
            f"sample_centres: empty mask for batch indices {idx}; "
            "their centres are drawn uniformly over the whole image instead",
            RuntimeWarning,
            stacklevel=2,
        )
    # Empty images draw a rank over all pixels; their index is used directly.
    population = torch.where(empty, n_pixels, counts)

    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images; pass one per image")
        uniforms = torch.cat([torch.rand((1, k), generator=g, dtype=torch.float64, device=g.device).to(device)
                              for g in generator])
    else:
        gen_device = generator.device if generator is not None else device
        uniforms = torch.rand((batch, k), generator=generator, dtype=torch.float64, device=gen_device)
        uniforms = uniforms.to(device)
    # Rank of the drawn pixel among the mask's pixels: 0 .. count-1. float64 has
    # 53 random bits, so the bias of floor(u·n) is negligible for any image size;
    # the clamp guards against u·n rounding up to n.
    rank = (uniforms * population[:, None]).floor_().to(torch.int64)
    rank = torch.minimum(rank, population[:, None] - 1)

    # Level 1: which block holds the (rank+1)-th True pixel.
    block = torch.searchsorted(cum, rank, right=True).clamp_max_(n_blocks - 1)  # (B,K)
    before = torch.where(block > 0, cum.gather(1, (block - 1).clamp_min(0)), 0)
    rank_in_block = (rank - before).to(torch.int32)
    # Level 2: which pixel within the block, from a cumsum of just that block.
    pixels = flat.view(batch, n_blocks, _BLOCK)
    rows_of_blocks = pixels[torch.arange(batch, device=device)[:, None], block]  # (B,K,BLOCK)
    cum_in_block = torch.cumsum(rows_of_blocks, dim=2, dtype=torch.int32)
    offset = torch.searchsorted(cum_in_block, rank_in_block.unsqueeze(2), right=True).squeeze(2)
    index = block * _BLOCK + offset.to(torch.int64)
    index = torch.where(empty[:, None], rank, index)

    return torch.stack((index // width, index % width), dim=2)


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B,C,H,W), got {tuple(images.shape)}")
    if images.dtype == torch.bool or images.is_complex():
        raise ValueError(f"images must be a real float or integer tensor, got {images.dtype}")


def _check_fill(fill: float, dtype: torch.dtype) -> None:
    if dtype.is_floating_point:
        return
    info = torch.iinfo(dtype)
    if float(fill) != int(fill) or not info.min <= fill <= info.max:
        raise ValueError(f"fill={fill!r} is not representable in images of dtype {dtype}")


def extract_patches(
    images: Tensor,
    centres: Tensor,
    size: int = 224,
    masks: Tensor | None = None,
    fill: float = 0.0,
) -> Tensor:
    """Gather a size×size crop around every centre, in one indexing operation.

    Args:
        images: (B,C,H,W), any float dtype or an integer dtype such as uint8.
        centres: (B,K,2) integer (row, col), each inside [0,H)×[0,W).
        size: crop side P. Crop rows are r - P//2 … r - P//2 + P - 1 (same for
            columns), so for even P the centre is the lower-right middle pixel.
        masks: optional (B,1,H,W) or (B,C,H,W) bool; pixels outside the mask
            become `fill` (the reference method masks the image outside the lungs).
        fill: value of pixels outside the image (and outside the mask).

    Returns:
        crops: (B,K,C,P,P), same dtype and device as images. Every crop is full
        size: parts beyond the image border are `fill`, never cut off.

    Memory: the result holds B·K·C·P² elements (160 MB for B=8, K=100, C=1,
    P=224 in float32) plus one padded copy of the images; chunk over images
    (or pass uint8 images) to bound it.
    """
    _check_images(images)
    size = _check_positive_int(size, "size")
    _check_fill(fill, images.dtype)
    batch, chans, height, width = images.shape
    if not isinstance(centres, Tensor) or centres.ndim != 3 or centres.shape[2] != 2:
        shape = tuple(centres.shape) if isinstance(centres, Tensor) else type(centres).__name__
        raise ValueError(f"centres must have shape (B,K,2), got {shape}")
    if centres.dtype.is_floating_point or centres.dtype == torch.bool or centres.is_complex():
        raise ValueError(f"centres must be an integer tensor, got {centres.dtype}")
    if centres.shape[0] != batch:
        raise ValueError(f"centres batch size {centres.shape[0]} != images batch size {batch}")
    if masks is not None:
        if not isinstance(masks, Tensor) or masks.dtype != torch.bool:
            raise ValueError("masks must be a bool tensor of shape (B,1,H,W) or (B,C,H,W)")
        if masks.ndim != 4 or masks.shape[0] != batch or masks.shape[1] not in (1, chans):
            raise ValueError(
                f"masks shape {tuple(masks.shape)} does not fit images {tuple(images.shape)}; "
                "expected (B,1,H,W) or (B,C,H,W)"
            )
        if masks.shape[2:] != images.shape[2:]:
            raise ValueError(f"masks H×W {tuple(masks.shape[2:])} != images H×W {(height, width)}")
    n_centres = centres.shape[1]
    if batch * n_centres * chans == 0:
        return images.new_empty((batch, n_centres, chans, size, size))
    centres = centres.to(device=images.device, dtype=torch.int64)
    # Out-of-range centres would index past the padding (a device-side assert
    # on CUDA), so reject them here with a readable message.
    rows, cols = centres[..., 0], centres[..., 1]
    if bool(((rows < 0) | (rows >= height) | (cols < 0) | (cols >= width)).any()):
        raise ValueError(f"centres must lie inside the image [0,{height})×[0,{width})")

    # Pad once so that every crop is a plain window of the padded image: crop
    # row i of centre r is padded row r + i.
    before = size // 2
    after = size - 1 - before  # one less than `before` for even sizes
    padded_h, padded_w = height + before + after, width + before + after
    # Fill only the border strips so each padded element is written once.
    padded = images.new_empty((batch, chans, padded_h, padded_w))
    padded[:, :, :before].fill_(fill)
    padded[:, :, before + height :].fill_(fill)
    padded[:, :, before : before + height, :before].fill_(fill)
    padded[:, :, before : before + height, before + width :].fill_(fill)
    interior = padded[:, :, before : before + height, before : before + width]
    if masks is None:
        interior.copy_(images)
    else:
        # Mask while padding (one pass), not per crop afterwards.
        torch.where(masks, images, padded.new_tensor(fill), out=interior)

    # View the padded storage as "a P×P window starting at every flat offset"
    # (overlapping, no copy) and pick B·K·C windows with index_select, which
    # copies contiguous row segments — about as fast as writing the output.
    n_windows = padded.numel() - (size - 1) * padded_w - (size - 1)
    windows = padded.as_strided((n_windows, size, size), (1, padded_w, 1))
    b = torch.arange(batch, device=images.device).view(batch, 1, 1)
    c = torch.arange(chans, device=images.device).view(1, 1, chans)
    offsets = ((b * chans + c) * padded_h + centres[..., 0:1]) * padded_w + centres[..., 1:2]
    crops = windows.index_select(0, offsets.reshape(-1))
    return crops.view(batch, n_centres, chans, size, size)


def sample_patches(
    images: Tensor,
    masks: Tensor,
    k: int,
    size: int = 224,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    mask_outside: bool = False,
    fill: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Draw K in-mask centres per image and crop around them.

    images: (B,C,H,W) float or uint8; masks: (B,1,H,W) bool →
    (crops (B,K,C,P,P) like images, centres (B,K,2) int64).
    With ``mask_outside`` the pixels outside the mask are set to `fill`.
    """
    _check_images(images)
    _check_masks(masks)
    if masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[2:]:
        raise ValueError(
            f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}: "
            "need the same B, H and W"
        )
    centres = sample_centres(masks, k, generator=generator)
    crops = extract_patches(images, centres, size=size, masks=masks if mask_outside else None, fill=fill)
    return crops, centres
