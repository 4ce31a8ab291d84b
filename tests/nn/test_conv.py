"""fastdl.nn.Conv2d as a drop-in for torch.nn.Conv2d, ConvBNAct against unfused torch modules (train
and eval, running stats included), and fastdl.fuse on a ResNet-18 built from torch.nn."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdl
from fastdl.nn import Conv2d, ConvBNAct, FusedConv2d


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("cfg", [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=(3, 5), stride=2, padding=(1, 2), dilation=(1, 2), groups=2, bias=False),
    dict(kernel_size=3, padding="same", dilation=2),
])
def test_conv2d_dropin(padding_mode, cfg):
    ref = nn.Conv2d(6, 8, padding_mode=padding_mode, **cfg)
    mod = Conv2d(6, 8, padding_mode=padding_mode, **cfg)
    assert list(mod.state_dict()) == list(ref.state_dict())
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 11, 14, requires_grad=True)
    out, ref_out = mod(x), ref(x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(out)
    g = torch.autograd.grad(out, [x, *mod.parameters()], dout)
    rg = torch.autograd.grad(ref_out, [x, *ref.parameters()], dout)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _torch_chain(m: ConvBNAct) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(m.conv.in_channels, m.conv.out_channels, m.conv.kernel_size, m.conv.stride, m.conv.padding,
                     m.conv.dilation, m.conv.groups, m.conv.bias is not None)
    conv.load_state_dict(m.conv.state_dict())
    bn = copy.deepcopy(m.bn)
    return conv, bn


@pytest.mark.parametrize("activation, residual, momentum", [
    ("relu", False, 0.1), ("relu", True, 0.1), ("silu", False, None), (("leaky_relu", 0.2), True, 0.3),
    (None, False, 0.1)])
def test_conv_bn_act_train_and_eval(activation, residual, momentum):
    m = ConvBNAct(5, 7, 3, stride=2, activation=activation, momentum=momentum)
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 1.5), m.bn.bias.normal_()
    conv, bn = _torch_chain(m)

    def act(y):
        return fastdl.ops.conv.apply_activation_ref(y, activation)

    def torch_forward(x, res):
        y = bn(conv(x))
        return act(y + res if res is not None else y)

    for _ in range(3):  # train: batch stats and the running-stat update, several steps
        x = torch.randn(4, 5, 13, 17, requires_grad=True)
        res = torch.randn(4, 7, 7, 9) if residual else None
        out, ref = m(x, res), torch_forward(x, res)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        dout = torch.randn_like(out)
        g = torch.autograd.grad(out, [x, m.conv.weight, m.bn.weight, m.bn.bias], dout)
        rg = torch.autograd.grad(ref, [x, conv.weight, bn.weight, bn.bias], dout)
        for a, b in zip(g, rg):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.bn.running_mean, bn.running_mean)
    torch.testing.assert_close(m.bn.running_var, bn.running_var)
    assert m.bn.num_batches_tracked == bn.num_batches_tracked == 3
    m.eval(), bn.eval()
    x = torch.randn(3, 5, 13, 17)
    res = torch.randn(3, 7, 7, 9) if residual else None
    with torch.no_grad():
        torch.testing.assert_close(m(x, res), torch_forward(x, res), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(x.to(memory_format=torch.channels_last), res), torch_forward(x, res),
                                   atol=1e-5, rtol=1e-5)


def test_conv_bn_act_state_dict_and_conv_bias():
    m = ConvBNAct(4, 6, 1, bias=True, activation="gelu")
    assert set(m.state_dict()) == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                   "bn.running_var", "bn.num_batches_tracked"}
    m.train()
    m(torch.randn(8, 4, 5, 5))  # move the running stats off their init
    m.eval()
    conv, bn = _torch_chain(m)
    bn.eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.gelu(bn(conv(x))), atol=1e-5, rtol=1e-5)


# ---- fuse() on a ResNet-18 built from torch.nn (torchvision's layout; torchvision may be absent) -------


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    def __init__(self, num_classes=1000, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)


def test_conv2d_inference_packs_weight_once_and_follows_changes():
    """Inference keeps the packed weight while the weight is unchanged; an in-place write, a new tensor or a
    loaded state_dict repacks; a forward that builds a graph through the weight packs per call."""
    torch.manual_seed(0)
    conv = Conv2d(32, 48, 3, padding=1)
    x = torch.randn(2, 32, 7, 7)

    def check():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=5e-5, rtol=5e-5)

    with torch.no_grad():
        check()
        first = conv._packed_weight_cache[1]
        check()
        assert conv._packed_weight_cache[1] is first  # reused, not repacked
        conv.weight.mul_(-2)  # in place: the version counter moves
        check()
        assert conv._packed_weight_cache[1] is not first
        conv.weight = nn.Parameter(torch.randn_like(conv.weight))
        check()
        conv.load_state_dict(Conv2d(32, 48, 3, padding=1).state_dict())
        check()
    with torch.inference_mode():
        check()
    assert "_packed_weight_cache" not in copy.deepcopy(conv).__dict__  # a cache, not state
    cached = conv._packed_weight_cache
    out = conv(x)  # grad mode, weight requires grad: no cached panels, and the weight gets its gradient
    assert conv._packed_weight_cache is cached
    out.square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_fuse_resnet18():
    model = ResNet18(num_classes=10, width=16)
    assert sum(p.numel() for p in ResNet18().parameters()) == 11_689_512  # torchvision's resnet18
    _randomize_bn(model)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    fused = fastdl.fuse(model)
    # Every conv and BN is gone into fused modules: 20 convs (17 + 3 downsample) -> 20 FusedConv2d.
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(FusedConv2d) == 20
    assert nn.BatchNorm2d not in kinds and nn.Conv2d not in kinds  # (FusedConv2d holds a fastdl Conv2d)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused(x.to(memory_format=torch.channels_last)), model(x), atol=1e-4, rtol=1e-4)
    # The original is untouched.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fuse_residual_and_activations_recognised():
    """Activation forms (module, F.*, Tensor method) and add forms each end up inside the fused module."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c3, self.b3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
            self.c4, self.b4 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
            self.act = nn.LeakyReLU(0.3)

        def forward(self, x):
            y = self.act(self.b1(self.c1(x)))
            z = F.silu(self.b2(self.c2(y)) + y)
            z = torch.add(self.b3(self.c3(z)), z).sigmoid()
            return F.gelu(self.b4(self.c4(z)))

    net = Net()
    _randomize_bn(net)
    net.eval()
    fused = fastdl.fuse(net)
    assert sum(isinstance(m, FusedConv2d) for m in fused.modules()) == 4
    acts = sorted(str(m.activation) for m in fused.modules() if isinstance(m, FusedConv2d))
    assert acts == sorted(["('leaky_relu', 0.3)", "silu", "sigmoid", "gelu"])
    code = fused.code
    assert all(op not in code for op in ("add", "sigmoid", "silu", "gelu", "leaky"))
    x = torch.randn(2, 3, 9, 10)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), net(x), atol=1e-5, rtol=1e-5)


def test_fuse_untraceable_and_inplace():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace this module, but it fuses its children
                return self.body(x)
            return -self.body(x)

    net = Gate()
    _randomize_bn(net)
    net.eval()
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        expected = net(x)
    fused = fastdl.fuse(net, inplace=True)
    assert fused is net and sum(isinstance(m, FusedConv2d) for m in net.modules()) == 1
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
