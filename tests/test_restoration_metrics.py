"""PSNR / SSIM as scikit-image computes them (RGB and Y, crop border, explicit data range), per image then
averaged; restoration losses (L1, Charbonnier, the perceptual term only with cached VGG weights)."""

import logging
import math

import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vision_moe import tasks as T
from vision_moe.metrics import RestorationMetric, psnr, restoration_summary, ssim


@pytest.fixture(scope="module")
def pair():
    from skimage import data

    ref = data.astronaut()[:48, :64].astype(np.float64) / 255.0
    noisy = np.clip(ref + np.random.default_rng(0).normal(0, 0.05, ref.shape), 0, 1)
    return noisy, ref


@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_ssim_equal_scikit_image(pair, crop):
    img, ref = pair
    c = (slice(crop, -crop), slice(crop, -crop)) if crop else (slice(None), slice(None))
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    rgb_p = peak_signal_noise_ratio(ref[c], img[c], data_range=1.0)
    rgb_s = structural_similarity(ref[c], img[c], data_range=1.0, channel_axis=-1, **kw)
    y_img, y_ref = rgb2ycbcr(img)[..., 0][c], rgb2ycbcr(ref)[..., 0][c]
    y_p = peak_signal_noise_ratio(y_ref, y_img, data_range=255.0)
    y_s = structural_similarity(y_ref, y_img, data_range=255.0, **kw)
    assert psnr(img, ref, crop) == pytest.approx(rgb_p, abs=1e-9)
    assert ssim(img, ref, crop) == pytest.approx(rgb_s, abs=1e-9)
    assert psnr(img, ref, crop, y_channel=True) == pytest.approx(y_p, abs=1e-9)
    assert ssim(img, ref, crop, y_channel=True) == pytest.approx(y_s, abs=1e-9)
    # the definition, independently of scikit-image: 10 log10(range^2 / MSE)
    assert psnr(img, ref, crop) == pytest.approx(10 * math.log10(1.0 / np.mean((img[c] - ref[c]) ** 2)), abs=1e-9)
    # tensors are channels-first, as the model gives them
    t = lambda a: torch.from_numpy(a.transpose(2, 0, 1)).float()  # noqa: E731
    assert psnr(t(img), t(ref), crop) == pytest.approx(rgb_p, abs=1e-3)


def test_metric_averages_per_image_not_pooled(pair):
    img, ref = pair
    worse = np.clip(ref + 0.2, 0, 1)
    to_t = lambda a: torch.from_numpy(a.transpose(2, 0, 1)).float()  # noqa: E731
    m = RestorationMetric()
    m.update(torch.stack([to_t(img), to_t(worse)]), torch.stack([to_t(ref)] * 2), torch.stack([to_t(worse)] * 2))
    r = m.compute()
    per_image = [psnr(to_t(img), to_t(ref)), psnr(to_t(worse), to_t(ref))]
    assert r["psnr"] == pytest.approx(np.mean(per_image))
    pooled = 10 * math.log10(1.0 / np.mean([np.mean((img - ref) ** 2), np.mean((worse - ref) ** 2)]))
    assert abs(r["psnr"] - pooled) > 1.0  # averaging per image differs from a batch-pooled MSE
    assert r["images"] == 2 and r["psnr_gain"] == pytest.approx(r["psnr"] - r["input_psnr"])
    assert {"ssim", "psnr_y", "ssim_y", "input_ssim", "input_psnr_y"} <= set(r)
    assert psnr(ref, ref) == 100.0  # identical images: capped, finite


def test_summary_weights_tasks_by_images():
    s = restoration_summary(
        {
            "derain": {"psnr": 30.0, "input_psnr": 20.0, "ssim": 0.9, "input_ssim": 0.5, "images": 3.0},
            "denoise": {"psnr": 20.0, "input_psnr": 25.0, "ssim": 0.5, "input_ssim": 0.6, "images": 1.0},
        }
    )
    assert s["psnr"] == pytest.approx(27.5) and s["input_psnr"] == pytest.approx(21.25)
    assert s["psnr_gain"] == pytest.approx(6.25) and s["tasks_not_worse"] == 1 and s["tasks"] == 2


def test_restoration_losses():
    out = torch.full((2, 3, 8, 8), 0.5, requires_grad=True)
    targets = [{"gt": torch.full((3, 8, 8), 0.25)} for _ in range(2)]
    assert T.RestorationLoss()(out, targets)["l1"].item() == pytest.approx(0.25)
    ch = T.RestorationLoss("charbonnier")(out, targets)["charbonnier"]
    assert ch.item() == pytest.approx(math.sqrt(0.25**2 + 1e-6))
    assert T.task_loss("derain", None, out, targets, (8, 8))["l1"].item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="'l2'"):
        T.RestorationLoss("l2")
    with pytest.raises(ValueError, match="no head"):
        T.build_head("derain", 32, 3, 8)


def test_perceptual_term_only_with_cached_weights(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache: nothing is downloaded
    with caplog.at_level(logging.WARNING):
        loss = T.RestorationLoss("l1", perceptual_weight=0.04)
    assert not loss.perceptual_active and "perceptual loss left out" in caplog.text
    out = torch.rand(1, 3, 16, 16)
    assert set(loss(out, [{"gt": torch.rand(3, 16, 16)}])) == {"l1"}

    features = torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 1) if i % 2 == 0 else torch.nn.ReLU() for i in range(16)])
    monkeypatch.setattr(T, "_vgg16_features", lambda: features)  # stands in for the cached VGG16
    loss = T.RestorationLoss("l1", perceptual_weight=0.04)
    terms = loss(out, [{"gt": torch.rand(3, 16, 16)}])
    assert loss.perceptual_active and terms["perceptual"] > 0
    assert not list(loss.state_dict())  # the VGG weights are not part of the model's checkpoint
