"""Property tests for patchflannel.sampler: centres in masks, crops equal slices."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from patchflannel.sampler import extract_patches, image_generators, sample_centres, sample_patches

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


pytestmark = pytest.mark.usefixtures("single_thread")


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _inside(masks: Tensor, centres: Tensor) -> Tensor:
    """(B,K) bool: is each centre a True pixel of its own mask."""
    b = torch.arange(masks.shape[0], device=masks.device)[:, None]
    return masks[b, 0, centres[..., 0], centres[..., 1]]


def _thin_line_masks() -> list[Tensor]:
    """Hand-made awkward masks: 1-pixel lines, single pixels, corners."""
    out = []
    m = torch.zeros(3, 1, 40, 23, dtype=torch.bool)
    m[0, 0, :, 11] = True  # vertical 1-px line
    m[1, 0, 17, :] = True  # horizontal 1-px line
    idx = torch.arange(23)
    m[2, 0, idx, idx] = True  # diagonal
    out.append(m)
    m = torch.zeros(4, 1, 31, 57, dtype=torch.bool)
    m[0, 0, 0, 0] = True
    m[1, 0, 30, 56] = True
    m[2, 0, 0, 56] = True
    m[3, 0, 15, 28] = True
    out.append(m)
    out.append(torch.ones(1, 1, 1, 1, dtype=torch.bool))  # 1×1 image
    m = torch.zeros(2, 1, 1, 700, dtype=torch.bool)  # 1-row image, > one block
    m[0, 0, 0, 699] = True
    m[1, 0, 0, 255:257] = True  # straddles a block boundary
    out.append(m)
    m = torch.zeros(1, 1, 600, 1, dtype=torch.bool)  # 1-column image
    m[0, 0, 300:302, 0] = True
    out.append(m)
    return out


def _random_masks(seed: int) -> Tensor:
    """Random shapes (square/non-square, tiny/large, H·W multiple of 256 or not)
    and densities from one pixel to full."""
    g = _gen(seed)
    h = int(torch.randint(1, 90, (1,), generator=g))
    w = int(torch.randint(1, 90, (1,), generator=g))
    if seed % 5 == 0:
        h, w = 32, 64  # H·W a multiple of the block size: no internal padding
    b = int(torch.randint(1, 5, (1,), generator=g))
    density = torch.rand(b, 1, 1, 1, generator=g) ** 3  # many very sparse masks
    masks = torch.rand(b, 1, h, w, generator=g) < density
    # Guarantee at least one pixel per image so no fallback warning fires here.
    masks.view(b, -1)[:, int(torch.randint(0, h * w, (1,), generator=g))] = True
    return masks


@pytest.mark.parametrize("device", DEVICES)
def test_centres_inside_masks_many_seeds_and_shapes(device: str) -> None:
    cases = _thin_line_masks() + [_random_masks(s) for s in range(40)]
    for case, masks in enumerate(cases):
        masks = masks.to(device)
        for seed in range(8):
            k = 1 + (seed * 37) % 150
            centres = sample_centres(masks, k, generator=_gen(seed, device))
            assert centres.shape == (masks.shape[0], k, 2)
            assert centres.dtype == torch.int64
            assert centres.device == masks.device
            assert bool(_inside(masks, centres).all()), f"case {case}, seed {seed}"


def test_centres_inside_lung_shaped_mask_at_full_resolution() -> None:
    # Two ellipses with a gap between them: non-convex, where drawing row and
    # column independently puts many centres outside.
    yy, xx = torch.meshgrid(torch.arange(1024), torch.arange(1024), indexing="ij")
    left = ((yy - 500) / 350) ** 2 + ((xx - 300) / 150) ** 2 < 1
    right = ((yy - 520) / 330) ** 2 + ((xx - 720) / 140) ** 2 < 1
    masks = torch.stack([left | right, left, right])[:, None]
    centres = sample_centres(masks, 500, generator=_gen(0))
    assert bool(_inside(masks, centres).all())


def test_centres_inside_misaligned_view() -> None:
    # A view starting at an odd byte offset cannot be read as int64 words
    # in place; the sampler must notice and still be correct.
    storage = torch.zeros(1 + 2 * 16 * 16, dtype=torch.bool)
    masks = storage[1:].view(2, 1, 16, 16)
    masks[0, 0, 3, 5] = True
    masks[1, 0, 15, 15] = True
    centres = sample_centres(masks, 20, generator=_gen(1))
    assert bool(_inside(masks, centres).all())


def test_same_seed_same_centres_different_seed_different() -> None:
    masks = torch.ones(4, 1, 50, 70, dtype=torch.bool)
    masks[:, :, 10:20, 30:60] = False
    a = sample_centres(masks, 100, generator=_gen(42))
    b = sample_centres(masks, 100, generator=_gen(42))
    c = sample_centres(masks, 100, generator=_gen(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------- one generator per image


def _lung_like_batch(b: int = 4, seed: int = 0) -> Tensor:
    """Masks that differ per image (size and density), so a shared draw would differ per image too."""
    g = _gen(seed)
    masks = torch.zeros(b, 1, 48, 40, dtype=torch.bool)
    for i in range(b):
        masks[i, 0, 4 + i : 44 - 2 * i, 3:18] = torch.rand(40 - 3 * i, 15, generator=g) < 0.3 + 0.15 * i
        masks[i, 0, 6:40, 22 + i : 37] = True
    return masks


def test_per_image_generators_independent_of_batch_and_order() -> None:
    masks = _lung_like_batch()
    seeds = [101, 202, 303, 404]
    together = sample_centres(masks, 30, generator=image_generators(seeds))
    assert bool(_inside(masks, together).all())
    # each image alone, with its own seed, draws exactly its rows of the batch draw
    for i, s in enumerate(seeds):
        alone = sample_centres(masks[i : i + 1], 30, generator=image_generators([s]))
        assert torch.equal(alone[0], together[i])
    # reversed batch order: every image keeps its centres
    rev = list(reversed(range(4)))
    reordered = sample_centres(masks[rev], 30, generator=image_generators([seeds[i] for i in rev]))
    assert torch.equal(reordered, together[rev])
    # another image in the batch (with another mask and seed) does not change the others
    other = masks.clone()
    other[0] = torch.ones_like(other[0])
    changed = sample_centres(other, 30, generator=image_generators([999, *seeds[1:]]))
    assert torch.equal(changed[1:], together[1:]) and not torch.equal(changed[0], together[0])
    # a single generator for the whole batch does not have this property
    shared = sample_centres(masks, 30, generator=_gen(101))
    assert torch.equal(shared[0], together[0]) and not torch.equal(shared[1], together[1])


def test_chunked_draws_equal_one_draw() -> None:
    masks = _lung_like_batch(seed=1)
    seeds = [7, 8, 9, 10]
    once = sample_centres(masks, 50, generator=image_generators(seeds))
    # K in chunks: the generators continue their streams (sequential voting)
    gens = image_generators(seeds)
    parts = [sample_centres(masks, k, generator=gens) for k in (1, 19, 30)]
    assert torch.equal(torch.cat(parts, dim=1), once)
    # images in chunks: each chunk with its images' generators
    by_images = [sample_centres(masks[a:b], 50, generator=image_generators(seeds[a:b])) for a, b in ((0, 1), (1, 4))]
    assert torch.equal(torch.cat(by_images), once)
    # sample_patches takes the same generators and crops at those centres
    images = torch.rand(4, 1, 48, 40, generator=_gen(2))
    crops, centres = sample_patches(images, masks, 50, size=5, generator=image_generators(seeds))
    assert torch.equal(centres, once) and torch.equal(crops, _reference_crops(images, once, 5))


def test_image_generators_seeding() -> None:
    a, b = image_generators([1, 1 << 63 | 5])
    assert a.initial_seed() == 1 and b.initial_seed() == 5  # folded into the non-negative range
    assert torch.equal(torch.rand(3, generator=a), torch.rand(3, generator=torch.Generator().manual_seed(1)))


def test_wrong_number_of_generators_is_an_error() -> None:
    masks = _lung_like_batch()
    with pytest.raises(ValueError, match="got 3 generators for 4 images"):
        sample_centres(masks, 2, generator=image_generators([1, 2, 3]))


def test_two_pixel_mask_each_pixel_half_the_time() -> None:
    masks = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    masks[0, 0, 3, 60] = True
    masks[0, 0, 61, 2] = True
    centres = sample_centres(masks, 20000, generator=_gen(7))
    frac = (centres[0, :, 0] == 3).double().mean().item()
    # Binomial s.d. is 0.0035; 0.02 is ~6 s.d.
    assert abs(frac - 0.5) < 0.02


def test_uniform_across_blocks_with_unequal_counts() -> None:
    # Pixels far apart in the flat order and in blocks with different counts
    # (1 vs 3): a two-level draw that weighted blocks equally would give the
    # lone pixel 1/2 instead of 1/4.
    masks = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    masks[0, 0, 0, 7] = True
    masks[0, 0, 40, 1:4] = True
    centres = sample_centres(masks, 40000, generator=_gen(11))
    flat = centres[0, :, 0] * 64 + centres[0, :, 1]
    counts = torch.bincount(flat, minlength=64 * 64)
    chosen = counts.nonzero().flatten().tolist()
    assert chosen == [7, 40 * 64 + 1, 40 * 64 + 2, 40 * 64 + 3]
    fracs = counts[chosen].double() / flat.numel()
    assert torch.allclose(fracs, torch.full_like(fracs, 0.25), atol=0.015)


def test_every_mask_pixel_can_be_drawn() -> None:
    masks = torch.zeros(1, 1, 20, 30, dtype=torch.bool)
    masks[0, 0, 5:7, 10:13] = True  # 6 pixels
    centres = sample_centres(masks, 3000, generator=_gen(5))
    assert len({(int(r), int(c)) for r, c in centres[0]}) == 6


def test_empty_mask_warns_and_stays_in_image() -> None:
    masks = torch.zeros(3, 1, 33, 21, dtype=torch.bool)
    masks[1, 0, 4, 4] = True
    with pytest.warns(RuntimeWarning, match=r"batch indices \[0, 2\]"):
        centres = sample_centres(masks, 400, generator=_gen(0))
    assert bool((centres[..., 0] >= 0).all() and (centres[..., 0] < 33).all())
    assert bool((centres[..., 1] >= 0).all() and (centres[..., 1] < 21).all())
    assert bool(_inside(masks[1:2], centres[1:2]).all())
    # The fallback really spreads over the image instead of piling up.
    assert len({(int(r), int(c)) for r, c in centres[0]}) > 300


def test_all_empty_masks_warn_and_give_valid_centres() -> None:
    masks = torch.zeros(2, 1, 1, 1, dtype=torch.bool)
    with pytest.warns(RuntimeWarning, match="empty mask"):
        centres = sample_centres(masks, 5)
    assert torch.equal(centres, torch.zeros(2, 5, 2, dtype=torch.int64))


def test_nonempty_masks_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample_centres(torch.ones(2, 1, 8, 8, dtype=torch.bool), 3)


def test_empty_batch() -> None:
    assert sample_centres(torch.ones(0, 1, 8, 8, dtype=torch.bool), 3).shape == (0, 3, 2)


@pytest.mark.parametrize(
    ("masks", "k", "match"),
    [
        (torch.ones(1, 8, 8, dtype=torch.bool), 3, r"\(B,1,H,W\)"),
        (torch.ones(1, 2, 8, 8, dtype=torch.bool), 3, r"\(B,1,H,W\)"),
        (torch.ones(1, 1, 8, 8), 3, "bool"),
        (torch.ones(1, 1, 0, 8, dtype=torch.bool), 3, "H, W >= 1"),
        (torch.ones(1, 1, 8, 8, dtype=torch.bool), 0, "k must be"),
        (torch.ones(1, 1, 8, 8, dtype=torch.bool), 2.0, "k must be"),
        (torch.ones(1, 1, 8, 8, dtype=torch.bool), True, "k must be"),
        ("not a tensor", 3, "torch.Tensor"),
    ],
)
def test_sample_centres_bad_inputs(masks: object, k: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample_centres(masks, k)  # type: ignore[arg-type]


# ----------------------------------------------------------------- crops


def _reference_crops(
    images: Tensor, centres: Tensor, size: int, masks: Tensor | None = None, fill: float = 0.0
) -> Tensor:
    """Slow, obvious per-patch loop: explicit bounds, slice, paste."""
    if masks is not None:
        images = torch.where(masks, images, images.new_tensor(fill))
    batch, chans, height, width = images.shape
    out = images.new_full((batch, centres.shape[1], chans, size, size), fill)
    for b in range(batch):
        for k in range(centres.shape[1]):
            r0 = int(centres[b, k, 0]) - size // 2
            c0 = int(centres[b, k, 1]) - size // 2
            top, left = max(r0, 0), max(c0, 0)
            bottom, right = min(r0 + size, height), min(c0 + size, width)
            if bottom > top and right > left:
                out[b, k, :, top - r0 : bottom - r0, left - c0 : right - c0] = images[b, :, top:bottom, left:right]
    return out


def _centres_with_borders(batch: int, height: int, width: int, k: int, seed: int) -> Tensor:
    g = _gen(seed)
    centres = torch.stack(
        [torch.randint(0, height, (batch, k), generator=g), torch.randint(0, width, (batch, k), generator=g)], 2
    )
    corners = torch.tensor([[0, 0], [height - 1, width - 1], [0, width - 1], [height - 1, 0]])
    centres[:, :4] = corners
    return centres


@pytest.mark.parametrize("size", [1, 4, 5, 16, 31])
@pytest.mark.parametrize(("height", "width"), [(13, 9), (1, 1), (20, 40)])
def test_crops_equal_reference_slices(size: int, height: int, width: int) -> None:
    images = torch.rand(2, 3, height, width, generator=_gen(size))
    centres = _centres_with_borders(2, height, width, 12, seed=size + height)
    crops = extract_patches(images, centres, size=size, fill=-1.0)
    assert crops.shape == (2, 12, 3, size, size)
    assert torch.equal(crops, _reference_crops(images, centres, size, fill=-1.0))


def test_border_crops_are_full_size_and_padded() -> None:
    images = torch.arange(1, 1 + 30 * 40, dtype=torch.float32).view(1, 1, 30, 40)
    centres = torch.tensor([[[0, 0], [29, 39]]])
    crops = extract_patches(images, centres, size=224)
    assert crops.shape == (1, 2, 1, 224, 224)
    # (0,0): the image occupies rows/cols 112.. of the crop, the rest is fill.
    assert torch.equal(crops[0, 0, 0, 112:142, 112:152], images[0, 0])
    assert crops[0, 0, 0, :112].abs().sum() == 0 and crops[0, 0, 0, :, :112].abs().sum() == 0
    # (H-1,W-1): the image ends at the crop's centre.
    assert torch.equal(crops[0, 1, 0, 83:113, 73:113], images[0, 0])
    assert crops[0, 1, 0, 113:].abs().sum() == 0


@pytest.mark.parametrize("mask_chans", [1, 3])
def test_masked_crops_equal_reference_masked_slices(mask_chans: int) -> None:
    g = _gen(9)
    images = torch.rand(3, 3, 25, 18, generator=g)
    masks = torch.rand(3, mask_chans, 25, 18, generator=g) < 0.4
    centres = _centres_with_borders(3, 25, 18, 10, seed=2)
    crops = extract_patches(images, centres, size=11, masks=masks, fill=0.25)
    assert torch.equal(crops, _reference_crops(images, centres, 11, masks=masks, fill=0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("device", DEVICES)
def test_crops_keep_dtype_and_device(dtype: torch.dtype, device: str) -> None:
    images = (torch.rand(2, 1, 30, 26, generator=_gen(0)) * 255).to(dtype).to(device)
    masks = (torch.rand(2, 1, 30, 26, generator=_gen(1)) < 0.5).to(device)
    centres = _centres_with_borders(2, 30, 26, 7, seed=3).to(device)
    for m in (None, masks):
        crops = extract_patches(images, centres, size=9, masks=m, fill=7)
        assert crops.dtype == dtype and crops.device == images.device
        expected = _reference_crops(images.cpu(), centres.cpu(), 9, None if m is None else m.cpu(), 7)
        assert torch.equal(crops.cpu(), expected)


def test_sample_patches_centre_pixel_and_mask_outside() -> None:
    g = _gen(4)
    images = torch.rand(2, 1, 64, 48, generator=g) + 1.0  # > 0 so fill=0 is visible
    masks = torch.rand(2, 1, 64, 48, generator=g) < 0.3
    crops, centres = sample_patches(images, masks, k=50, size=16, generator=_gen(8), mask_outside=True)
    assert crops.shape == (2, 50, 1, 16, 16)
    assert bool(_inside(masks, centres).all())
    b = torch.arange(2)[:, None]
    # The crop's middle pixel is the image pixel at the centre (inside the mask).
    assert torch.equal(crops[:, :, 0, 8, 8], images[b, 0, centres[..., 0], centres[..., 1]])
    assert torch.equal(crops, _reference_crops(images, centres, 16, masks=masks))
    again, _ = sample_patches(images, masks, k=50, size=16, generator=_gen(8), mask_outside=True)
    assert torch.equal(crops, again)


def test_empty_crop_batches() -> None:
    no_images = extract_patches(torch.zeros(0, 2, 10, 10), torch.zeros(0, 3, 2, dtype=torch.int64), 5)
    assert no_images.shape == (0, 3, 2, 5, 5)
    no_centres = extract_patches(torch.zeros(2, 1, 10, 10), torch.zeros(2, 0, 2, dtype=torch.int64), 5)
    assert no_centres.shape == (2, 0, 1, 5, 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"centres": torch.tensor([[[5, 30]]])}, "inside the image"),
        ({"centres": torch.tensor([[[-1, 0]]])}, "inside the image"),
        ({"centres": torch.zeros(1, 1, 2)}, "integer"),
        ({"centres": torch.zeros(1, 2, dtype=torch.int64)}, r"\(B,K,2\)"),
        ({"centres": torch.zeros(2, 1, 2, dtype=torch.int64)}, "batch size"),
        ({"size": 0}, "size must be"),
        ({"masks": torch.ones(1, 1, 10, 9, dtype=torch.bool)}, "H×W"),
        ({"masks": torch.ones(1, 2, 10, 10, dtype=torch.bool)}, "does not fit"),
        ({"masks": torch.ones(1, 1, 10, 10)}, "bool"),
        ({"images": torch.ones(1, 1, 10, 10, dtype=torch.uint8), "fill": 0.5}, "not representable"),
        ({"images": torch.ones(1, 1, 10, 10, dtype=torch.uint8), "fill": 256}, "not representable"),
        ({"images": torch.ones(1, 10, 10)}, r"\(B,C,H,W\)"),
        ({"images": torch.ones(1, 1, 10, 10, dtype=torch.bool)}, "real float or integer"),
    ],
)
def test_extract_patches_bad_inputs(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "images": torch.zeros(1, 1, 10, 10),
        "centres": torch.zeros(1, 3, 2, dtype=torch.int64),
        "size": 4,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        extract_patches(**args)  # type: ignore[arg-type]


def test_sample_patches_rejects_mismatched_masks() -> None:
    with pytest.raises(ValueError, match="same B, H and W"):
        sample_patches(torch.zeros(2, 1, 10, 10), torch.ones(2, 1, 10, 12, dtype=torch.bool), k=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_generator_gives_same_centres_and_crops_on_cuda() -> None:
    masks = _random_masks(12)
    images = torch.rand(masks.shape[0], 1, *masks.shape[2:])
    cpu = sample_patches(images, masks, 30, size=8, generator=_gen(3))
    gpu = sample_patches(images.cuda(), masks.cuda(), 30, size=8, generator=_gen(3))
    assert torch.equal(cpu[1], gpu[1].cpu()) and torch.equal(cpu[0], gpu[0].cpu())
