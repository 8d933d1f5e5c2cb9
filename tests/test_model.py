"""BYOL model: shapes for named and custom backbones, loss vs float64, target isolation."""
import pytest
import torch
from torch import nn

from fastbyol.model import BYOL, MLPHead


def _loss64(p, z):
    p, z = p.double(), z.double()
    return 2 - 2 * (p / p.norm(dim=1, keepdim=True)).mul(z / z.norm(dim=1, keepdim=True)).sum(1)


@pytest.mark.parametrize("name,size,dim", [("resnet18", 32, 512), ("resnet50", 32, 2048), ("convnet4", 16, 256)])
def test_named_backbone_shapes(name, size, dim):
    model = BYOL(name, cifar_stem=True, projector_hidden=64, predictor_hidden=64, projection_dim=16,
                 loss_fn=None)
    assert model.feature_dim == dim
    x = torch.randn(2, 3, size, size)
    p, z = model.online(x)
    assert p.shape == z.shape == (2, 16)
    assert model.target(x).shape == (2, 16)
    assert model.online.encoder(x).shape == (2, dim)


def test_cifar_stem_is_3x3_stride1_without_maxpool():
    enc = BYOL("resnet18", cifar_stem=True).online.encoder
    assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1) and isinstance(enc.maxpool, nn.Identity)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.body(x).flatten(1))


def test_custom_module_with_detected_and_named_layer():
    detected = BYOL(TinyNet(), image_size=16, projector_hidden=32, predictor_hidden=32, projection_dim=8)
    assert detected.feature_dim == 32  # the classifier's input
    named = BYOL(TinyNet(), hidden_layer="body.1", image_size=16, projector_hidden=32, predictor_hidden=32,
                 projection_dim=8)
    assert named.feature_dim == 8 * 14 * 14
    out = named(torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16))
    assert out.loss.shape == () and out.z.shape == (3, 8)


def test_mlp_head_layout():
    head = MLPHead(10, 4096, 256)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head[0].in_features == 10 and head[3].out_features == 256


def test_loss_equals_float64_reference_and_target_gets_no_grad():
    torch.manual_seed(0)
    model = BYOL("convnet4", projector_hidden=32, predictor_hidden=32, projection_dim=8)
    v1, v2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    target_before = [t.clone() for t in model.target.state_dict().values()]
    out = model(v1, v2)
    # Recompute with the same BN batch statistics (train mode) but in float64.
    m64 = BYOL("convnet4", projector_hidden=32, predictor_hidden=32, projection_dim=8).double()
    m64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model.state_dict().items()})
    p1, _ = m64.online(v1.double())
    p2, _ = m64.online(v2.double())
    with torch.no_grad():
        t1, t2 = m64.target(v1.double()), m64.target(v2.double())
    ref = (_loss64(p1, t2) + _loss64(p2, t1)).mean()
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert all(not p.requires_grad for p in model.target.parameters())
    assert all(p.grad is not None for p in model.online.parameters())
    # Parameters are unchanged by the forward pass (BN running stats are the target's own).
    for (name, t), before in zip(model.target.state_dict().items(), target_before):
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(t, before)


def test_target_changes_only_through_the_ema():
    torch.manual_seed(0)
    model = BYOL("convnet4", projector_hidden=32, predictor_hidden=32, projection_dim=8)
    opt = torch.optim.SGD(model.online.parameters(), lr=0.5)
    before = {k: v.clone() for k, v in model.target.named_parameters()}
    model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)).loss.backward()
    opt.step()
    for k, v in model.target.named_parameters():
        assert torch.equal(v, before[k])  # the optimizer never touches the target
    tau = 0.9
    online = dict(model.online.named_parameters())
    model.update_target(tau)
    for k, v in model.target.named_parameters():
        torch.testing.assert_close(v, tau * before[k] + (1 - tau) * online[k].detach())


def test_simsiam_variant_has_no_target_and_stops_gradient():
    model = BYOL("convnet4", projector_hidden=32, predictor_hidden=32, projection_dim=8, use_momentum=False)
    assert model.target is None
    out = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    out.loss.backward()
    model.update_target(0.99)  # a no-op
    assert model.online.predictor[0].weight.grad is not None


@pytest.mark.parametrize("preset_name,device,choice,expected", [
    ("imagenet-resnet50", "cuda", "auto", True),      # tensor cores
    ("imagenet-resnet50", "cpu", "auto", True),       # 224 px: 56x56 first maps
    ("cifar10-resnet18", "cpu", "auto", True),        # CIFAR stem: 32x32 first maps
    ("default", "cpu", "auto", True),                 # ConvNet4 keeps 32x32
    ("imagenet-resnet50", "cpu", "off", False),
    ("default", "cpu", "on", True),
])
def test_memory_format_choice(preset_name, device, choice, expected):
    from fastbyol.backbones import memory_format
    from fastbyol.config import preset

    cfg = preset(preset_name)
    cfg.train.channels_last = choice
    assert (memory_format(cfg, torch.device(device)) == torch.channels_last) == expected


def test_imagenet_stem_at_32px_stays_contiguous_on_cpu_and_knn_inputs_follow():
    from fastbyol.backbones import memory_format, memory_format_of
    from fastbyol.config import preset
    from fastbyol.parts import build_model

    cfg = preset("cifar10-resnet18")
    cfg.model.cifar_stem = False  # first maps 8x8 at 32 px
    assert memory_format(cfg, torch.device("cpu")) == torch.contiguous_format
    assert memory_format(cfg, torch.device("cuda")) == torch.channels_last
    cfg.model.backbone, cfg.model.projector_hidden, cfg.model.predictor_hidden = "convnet4", 16, 16
    cfg.train.channels_last = "on"
    assert memory_format_of(build_model(cfg, torch.device("cpu")).online.encoder) == torch.channels_last
    cfg.train.channels_last = "off"
    assert memory_format_of(build_model(cfg, torch.device("cpu")).online.encoder) == torch.contiguous_format


def test_compile_target_routes_target_forwards_and_keeps_state_dict(monkeypatch):
    """--train.compile: the target's forwards go through torch.compile, its state dict and the
    EMA pairing are unchanged (the compiled wrapper is not a submodule)."""
    from fastbyol.model import BYOL

    calls = []

    def fake_compile(module):
        def run(x):
            calls.append(x.shape)
            return module(x)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = BYOL("convnet4", projector_hidden=16, predictor_hidden=16, projection_dim=8, loss_fn=lambda *a: a[0].sum())
    keys = list(model.state_dict())
    model.compile_target()
    x = torch.randn(4, 3, 16, 16)
    model(x, x)
    assert len(calls) == 2 and list(model.state_dict()) == keys
    model.update_target(0.5, backend="torch")
