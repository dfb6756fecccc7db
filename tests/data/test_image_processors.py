"""Image preprocessing equals each release's own processor, pixel for pixel, on PNGs of odd sizes:
CLIP (shortest side, centre crop), the original LLaVA's ``pad`` (expand to a square with the mean
colour, then CLIP's processor), BLIP / mPLUG-Owl's direct resize, SigLIP; transparent and palette
images as transformers converts them; and a checkpoint's ``preprocessor_config.json`` is read."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from modalign.checkpoints.hf import SIGLIP_MEAN_STD, image_settings
from modalign.config import VisionConfig
from modalign.data.images import ImageProcessor

transformers = pytest.importorskip("transformers")
SIZES = [(333, 127), (91, 200), (640, 481), (57, 57), (1001, 333), (17, 230)]


def _png(tmp_path, w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed + w * 7 + h)
    if mode == "RGBA":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")
    elif mode == "L":
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    path = tmp_path / f"{w}x{h}_{mode}.png"
    img.save(path)
    return path


def _ref(processor, image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))


def _expand2square(img: Image.Image, colour) -> Image.Image:
    """The original LLaVA's ``expand2square`` (llava/mm_utils.py), as it is written there."""
    w, h = img.size
    if w == h:
        return img
    s = max(w, h)
    out = Image.new(img.mode, (s, s), colour)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L"])
@pytest.mark.parametrize("w,h", SIZES)
def test_clip_crop_equals_clip_image_processor(tmp_path, w, h, mode):
    from transformers import CLIPImageProcessorPil

    path = _png(tmp_path, w, h, mode)
    ref = _ref(CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
               Image.open(path))  # fmt: skip
    assert torch.equal(ImageProcessor(VisionConfig(image_size=336, resize_mode="crop"))(path), ref)


@pytest.mark.parametrize("w,h", SIZES)
def test_llava_pad_equals_expand2square_then_clip_processor(tmp_path, w, h):
    from transformers import CLIPImageProcessorPil

    path = _png(tmp_path, w, h)
    p = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    img = _expand2square(Image.open(path).convert("RGB"), tuple(int(x * 255) for x in p.image_mean))
    ref = _ref(p, img)
    assert torch.equal(ImageProcessor(VisionConfig(image_size=336, resize_mode="pad"))(path), ref)


@pytest.mark.parametrize("w,h", SIZES)
def test_blip_and_mplug_owl_resize_equal_blip_image_processor(tmp_path, w, h):
    from transformers import BlipImageProcessorPil

    path = _png(tmp_path, w, h)
    ref = _ref(BlipImageProcessorPil(size={"height": 224, "width": 224}), Image.open(path))
    assert torch.equal(ImageProcessor(VisionConfig(image_size=224, resize_mode="squash"))(path), ref)


@pytest.mark.parametrize("w,h", SIZES[:3])
def test_siglip_equals_siglip_image_processor(tmp_path, w, h):
    from transformers import SiglipImageProcessorPil

    path = _png(tmp_path, w, h)
    ref = _ref(SiglipImageProcessorPil(size={"height": 224, "width": 224}), Image.open(path))
    v = VisionConfig(
        image_size=224, resize_mode="squash", image_mean=SIGLIP_MEAN_STD, image_std=SIGLIP_MEAN_STD
    )
    assert torch.equal(ImageProcessor(v)(path), ref)


def test_preprocessor_config_sets_normalisation_and_policy(tmp_path):
    """A checkpoint's processor file decides mean/std and crop-or-resize; the result is what
    transformers' processor built from that same file gives."""
    from transformers import CLIPImageProcessorPil

    doc = {"image_processor_type": "CLIPImageProcessor", "do_center_crop": False, "do_resize": True,
           "size": {"height": 64, "width": 64}, "image_mean": [0.2, 0.3, 0.4], "image_std": [0.5, 0.6, 0.7],
           "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}  # fmt: skip
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(doc))
    v = image_settings(tmp_path, VisionConfig(image_size=64, resize_mode="crop"))
    assert (v.resize_mode, v.image_mean, v.image_std) == ("squash", (0.2, 0.3, 0.4), (0.5, 0.6, 0.7))
    path = _png(tmp_path, 91, 40)
    ref = _ref(CLIPImageProcessorPil.from_pretrained(tmp_path), Image.open(path))
    assert torch.equal(ImageProcessor(v)(path), ref)
    (tmp_path / "preprocessor_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="preprocessor_config.json: invalid JSON"):
        image_settings(tmp_path, v)


@pytest.mark.parametrize("mean_std", [None, SIGLIP_MEAN_STD])
def test_normalise_matches_torch(mean_std):
    """The NumPy normalisation gives torch's ``(x.float() / 255 - mean) / std`` to the bit, for
    every channel and byte value, in a vectorised body and a tail, and keeps the input's layout."""
    vcfg = VisionConfig(image_size=16)
    if mean_std is not None:
        vcfg.image_mean = vcfg.image_std = list(mean_std)
    proc = ImageProcessor(vcfg)
    mean, std = torch.tensor(vcfg.image_mean)[:, None, None], torch.tensor(vcfg.image_std)[:, None, None]
    every = torch.arange(256, dtype=torch.uint8).repeat(3, 5, 1)[:, :, torch.randperm(256)]  # [3, 5, 256]
    hwc = torch.randint(0, 256, (37, 29, 3), dtype=torch.uint8).permute(2, 0, 1)  # as ``to_uint8`` makes it
    for u8 in (every, hwc, every[:, :1, :13]):
        want = (u8.float() / 255.0 - mean) / std
        got = proc._normalise(u8)
        assert got.dtype == torch.float32 and got.stride() == want.stride()
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
