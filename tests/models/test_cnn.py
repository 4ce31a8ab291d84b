"""The CNN family: reference parameter counts (full ImageNet configs, built on the meta device), output
shapes of small configs in train and eval mode, the residual wiring, LeNet-5 on the digits and U-Net on
the synthetic shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdl.data.images import mean_iou, shapes_segmentation
from fastdl.models import (
    AlexNet,
    AlexNetConfig,
    DenseNet,
    DenseNetConfig,
    GoogLeNet,
    GoogLeNetConfig,
    LeNet5,
    LeNetConfig,
    UNet,
    UNetConfig,
    VGGConfig,
    densenet121,
    googlenet,
    resnet18,
    resnet50,
    vgg11,
    vgg16,
)
from fastdl.models.resnet import BasicBlock, Bottleneck
from fastdl.nn import ConvBNAct
from fastdl.train import run_recipe

# torchvision's 1000-class ImageNet configurations (and the classic LeNet-5), as listed in issue 6.
REFERENCE_COUNTS = {
    "lenet5": (LeNet5, 61_706),
    "alexnet": (AlexNet, 61_100_840),
    "vgg11": (vgg11, 132_863_336),
    "vgg16": (vgg16, 138_357_544),
    "vgg16_bn": (lambda: vgg16(batch_norm=True), 138_365_992),
    "resnet18": (resnet18, 11_689_512),
    "resnet50": (resnet50, 25_557_032),
    "densenet121": (densenet121, 7_978_856),
    "googlenet": (googlenet, 6_624_904),
    "googlenet_aux": (lambda: googlenet(aux_logits=True), 13_004_888),
    "unet": (lambda: UNet(UNetConfig(in_channels=3, num_classes=1)), 31_037_633),  # the 64 -> 1024 layout
}


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", REFERENCE_COUNTS)
def test_parameter_counts_match_the_reference_configurations(name):
    build, expected = REFERENCE_COUNTS[name]
    with torch.device("meta"):  # shapes only: VGG-16's 138M parameters are never allocated
        model = build()
    assert all(p.is_meta for p in model.parameters())
    assert count(model) == expected


# (model, input shape, output shape): small configs of every architecture, odd sizes where they are allowed.
SMALL = {
    "lenet5": (lambda: LeNet5(), (3, 1, 32, 32), (3, 10)),
    "lenet5_28_rgb": (lambda: LeNet5(LeNetConfig(num_classes=7, in_channels=3, image_size=28, width=0.5,
                                                  activation="relu", pool="max", dropout=0.1)), (2, 3, 28, 28), (2, 7)),
    "alexnet": (lambda: AlexNet(AlexNetConfig(num_classes=5, in_channels=1, width=0.125, hidden=32)),
                (2, 1, 67, 64), (2, 5)),
    "vgg11": (lambda: vgg11(num_classes=5, width=1 / 16, hidden=16), (2, 3, 32, 35), (2, 5)),
    "vgg16_bn": (lambda: vgg16(num_classes=5, in_channels=2, width=1 / 16, hidden=16, batch_norm=True),
                 (2, 2, 32, 32), (2, 5)),
    "resnet18": (lambda: resnet18(num_classes=5, width=8), (2, 3, 45, 64), (2, 5)),
    "resnet18_small_stem": (lambda: resnet18(num_classes=3, in_channels=1, width=4, stem="small"),
                            (2, 1, 17, 23), (2, 3)),
    "resnet50": (lambda: resnet50(num_classes=5, width=4, layers=(1, 2, 1, 1), zero_init_residual=True),
                 (2, 3, 64, 64), (2, 5)),
    "densenet": (lambda: DenseNet(DenseNetConfig(num_classes=5, growth_rate=4, block_config=(2, 3, 2),
                                                 num_init_features=8, drop_rate=0.1)), (2, 3, 37, 32), (2, 5)),
    "googlenet": (lambda: googlenet(num_classes=5, width=1 / 16), (2, 3, 64, 61), (2, 5)),
    "googlenet_paper_5x5": (lambda: GoogLeNet(GoogLeNetConfig(num_classes=4, width=1 / 16, branch3_kernel=5,
                                                              in_channels=1)), (2, 1, 32, 32), (2, 4)),
    "unet": (lambda: UNet(UNetConfig(in_channels=3, num_classes=4, width=4, depth=3)), (2, 3, 37, 45), (2, 4, 37, 45)),
    "unet_bilinear": (lambda: UNet(UNetConfig(in_channels=1, num_classes=2, width=4, depth=2, bilinear=True)),
                      (2, 1, 16, 19), (2, 2, 16, 19)),
}


@pytest.mark.parametrize("name", SMALL)
def test_small_configs_give_the_right_shapes_and_train(name):
    build, in_shape, out_shape = SMALL[name]
    model = build()
    x = torch.rand(in_shape)
    out = model(x)  # train mode: batch statistics
    assert out.shape == out_shape and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    model.eval()  # eval: BN folded into the fused conv kernels
    with torch.no_grad():
        out = model(x)
    assert out.shape == out_shape and torch.isfinite(out).all()
    with torch.no_grad():
        assert torch.allclose(model(x[:1]), out[:1], atol=1e-4, rtol=1e-4)  # eval: samples are independent


def test_googlenet_auxiliary_heads_in_training_only():
    model = googlenet(num_classes=6, width=1 / 16, aux_logits=True)
    out = model(torch.rand(2, 3, 64, 64))
    assert out.logits.shape == out.aux_logits1.shape == out.aux_logits2.shape == (2, 6)
    model.eval()
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 6)
    assert googlenet(num_classes=6, width=1 / 16).train()(torch.rand(2, 3, 32, 32)).shape == (2, 6)


def convbnact_ref(m: ConvBNAct, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Eval-mode conv -> BN (-> + residual) -> ReLU / identity in plain torch ops, from the module's weights."""
    c, bn = m.conv, m.bn
    y = F.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    if residual is not None:
        y = y + residual
    return y if m.activation is None else F.relu(y)


def randomize_bn(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
            m.running_mean = torch.randn(m.running_mean.shape, generator=g) * 0.1
            m.running_var = torch.rand(m.running_var.shape, generator=g) + 0.5


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("stride", [1, 2])
def test_residual_blocks_are_torchvisions_blocks(block, stride):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)) (and the bottleneck's three convs, v1.5: the
    stride on the 3x3), in plain torch ops with the same weights."""
    cls = BasicBlock if block == "basic" else Bottleneck
    m = cls(8, 4 if block == "bottleneck" else 8, stride).eval()
    randomize_bn(m)
    x = torch.randn(2, 8, 9, 11)
    shortcut = x if m.downsample is None else convbnact_ref(m.downsample, x)
    assert (m.downsample is None) == (stride == 1 and block == "basic")
    if block == "basic":
        expected = convbnact_ref(m.conv2, convbnact_ref(m.conv1, x), shortcut)
    else:
        assert m.conv2.conv.stride == (stride, stride) and m.conv1.conv.stride == (1, 1)
        expected = convbnact_ref(m.conv3, convbnact_ref(m.conv2, convbnact_ref(m.conv1, x)), shortcut)
    with torch.no_grad():
        assert torch.allclose(m(x), expected, atol=1e-5, rtol=1e-4)


def test_zero_init_residual_starts_blocks_as_identity():
    model = resnet18(width=4, num_classes=3, zero_init_residual=True).eval()
    block = model.stages[0][0]  # identity shortcut
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(block(x), F.relu(x))


@pytest.mark.parametrize(("build", "message"), [
    (lambda: LeNetConfig(image_size=12), "image_size must be at least 16"),
    (lambda: LeNetConfig(activation="swish"), "activation must be one of tanh, relu"),
    (lambda: VGGConfig(layout="vgg15"), "layout must be one of vgg11, vgg13, vgg16, vgg19"),
    (lambda: resnet18(block="wide"), "block must be one of basic, bottleneck"),
    (lambda: resnet18(stem="cifar"), 'stem must be "imagenet" or "small"'),
    (lambda: DenseNetConfig(block_config=()), "block_config, growth_rate and bn_size must be positive"),
    (lambda: GoogLeNetConfig(branch3_kernel=7), "branch3_kernel 3 or 5"),
    (lambda: UNetConfig(depth=0), "depth, width, in_channels and num_classes must be positive"),
])
def test_bad_configs_are_explained(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_lenet_names_the_input_it_expects():
    with pytest.raises(ValueError, match=r"expected input \(B, 1, 32, 32\), got \(2, 1, 28, 28\)"):
        LeNet5()(torch.rand(2, 1, 28, 28))


def test_lenet5_reaches_95_percent_on_the_builtin_digits(tmp_path):
    """The lenet-digits recipe's default run: 360 SGD steps on the 1,438 training digits (32x32)."""
    result, settings, final_metric = run_recipe("lenet-digits", {"progress": False}, out_dir=tmp_path)
    assert final_metric == "eval_accuracy" and settings.train.steps == 360
    assert result.metrics["eval_accuracy"] >= 0.95, result.metrics


def test_unet_loss_falls_on_synthetic_shapes():
    images, masks = shapes_segmentation(96, size=32, seed=0).tensors
    val_images, val_masks = shapes_segmentation(32, size=32, seed=1).tensors
    model = UNet(UNetConfig(in_channels=1, num_classes=4, width=8, depth=2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(40):
        batch = torch.arange(step * 16, step * 16 + 16) % len(images)
        loss = F.cross_entropy(model(images[batch]), masks[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.4 * losses[0], losses
    model.eval()
    with torch.no_grad():
        pred = model(val_images).argmax(1)
    background = (val_masks == 0).float().mean().item()  # the all-background guess's pixel accuracy
    assert (pred == val_masks).float().mean().item() > background + 0.05
    assert mean_iou(pred, val_masks, 4) > 0.3
