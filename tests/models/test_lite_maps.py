"""The small-set networks' feature maps: computed a few images at a time on a CPU (for
speed), with the numbers of one whole-batch pass, and resized for ONNX export by a
fixed matrix that equals the antialiased resize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ichscan.models.small_set import CPU_CHUNK, NET_SIZE, LiteMaps, ResizeMatrix, chunked_maps


def test_chunked_maps_equal_one_pass_and_keep_each_pass_small() -> None:
    torch.manual_seed(0)
    extractor = LiteMaps("efficientnet_lite0", pretrained="none")
    grey = torch.rand(2 * CPU_CHUNK + 1, 1, 64, 64)
    seen: list[int] = []
    extractor.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    whole = extractor(grey)
    seen.clear()
    fine, deep = chunked_maps(extractor, grey)
    assert seen == [CPU_CHUNK, CPU_CHUNK, 1]
    # Equal up to float32 rounding: a convolution may sum in another order per batch size.
    torch.testing.assert_close(fine, whole[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(deep, whole[1], rtol=1e-4, atol=1e-6)


def test_resize_matrix_is_the_antialiased_resize() -> None:
    grey = torch.rand(3, 1, 320, 320)
    want = F.interpolate(grey, size=(NET_SIZE, NET_SIZE), mode="bilinear", antialias=True)
    assert torch.allclose(ResizeMatrix(320)(grey), want, atol=1e-5)


@pytest.mark.gpu
def test_the_ensemble_on_a_gpu_scores_as_on_the_cpu() -> None:
    """Readers on all three planes, the density features and the centre zoom (NumPy, moved
    to the input's device) and the forest run on CUDA and give the CPU's logits; cuDNN's
    TF32 convolutions round a little differently, hence the tolerance."""
    from ichscan.models.small_set import Reader, SmallSetModel

    torch.manual_seed(0)
    readers = [Reader("efficientnet_lite0", crop) for crop in ("brain", "head", "centre")]
    model = SmallSetModel(2, 0, (4, 3), pretrained="none", readers=readers).eval()
    x = torch.randint(0, 255, (CPU_CHUNK + 2, 3, 320, 320), dtype=torch.uint8)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.to("cuda")(x.to("cuda")).cpu()
    assert gpu.shape == cpu.shape
    torch.testing.assert_close(gpu, cpu, rtol=1e-2, atol=1e-2)
