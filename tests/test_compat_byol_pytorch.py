"""fastbyol.compat.byol_pytorch against byol-pytorch 0.9.1 itself and against its README.

byol-pytorch, einops and kornia are test-only dependencies (``.ci/run`` installs them with
``--no-deps``); byol-pytorch's learner module is loaded alone (its package ``__init__`` needs
accelerate), as ``fastbyol bench`` does.
"""
import copy
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastbyol.augment import crop_resize_batch
from fastbyol.batch_views import TwoViews
from fastbyol.compat.byol_pytorch import BYOL, BYOLTrainer, MockDataset
from fastbyol.config import AugmentConfig

README = os.path.join(os.path.dirname(__file__), "reference", "byol_pytorch_README.md")


def byol_pytorch():
    from fastbyol.bench.common import load_byol_pytorch_learner

    try:
        return load_byol_pytorch_learner()
    except ImportError as e:
        pytest.skip(str(e))


def tiny_net(width=8):
    """Conv-BN-ReLU (no conv bias: its gradient through BN is exactly zero, all rounding)."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


KW = dict(image_size=16, hidden_layer=-2, projection_size=16, projection_hidden_size=32)


def pair(bp, augment_fn=None, augment_fn2=None, views_in_one_batch=True, **kw):
    """byol-pytorch's learner and ours on the same network with the same initial weights."""
    torch.manual_seed(1)
    net = tiny_net()
    args = dict(KW, augment_fn=augment_fn, augment_fn2=augment_fn2, **kw)
    ref = bp.BYOL(net, use_simplicial_embeddings=False, **args)
    mine = BYOL(copy.deepcopy(net), views_in_one_batch=views_in_one_batch, **args)
    mine.load_byol_pytorch_state_dict(ref.state_dict())
    return ref, mine


def assert_grads_close(ref_params, mine_params):
    """Equal up to fp32 rounding of different reduction orders, relative to the group's largest
    gradient (a Linear bias feeding BatchNorm has a true gradient of 0: there it is all rounding)."""
    ref_params, mine_params = list(ref_params), list(mine_params)
    assert len(ref_params) == len(mine_params)
    scale = max(a.grad.abs().max().item() for a in ref_params if a.grad is not None)
    for a, b in zip(ref_params, mine_params):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-4 * scale)


def ref_groups(ref):
    return [ref.online_encoder.net.parameters(), ref.online_encoder.projector.parameters(),
            ref.online_predictor.parameters()]


def mine_groups(mine):
    o = mine.model.online
    return [o.encoder.parameters(), o.projector.parameters(), o.predictor.parameters()]


def assert_same_loss_and_grads(ref, mine, x):
    """One forward and backward of both learners on ``x``: the same loss and gradients."""
    loss_ref, loss_mine = ref(x), mine(x)
    torch.testing.assert_close(loss_mine, loss_ref, rtol=1e-5, atol=1e-6)
    loss_ref.backward()
    loss_mine.backward()
    for a, b in zip(ref_groups(ref), mine_groups(mine)):
        assert_grads_close(a, b)


# ----------------------------------------------------------------------------- against byol-pytorch

@pytest.mark.parametrize("views_in_one_batch", [True, False])
def test_loss_grads_and_target_match_byol_pytorch(views_in_one_batch):
    bp = byol_pytorch()
    ident = nn.Identity()
    ref, mine = pair(bp, augment_fn=ident, views_in_one_batch=views_in_one_batch)
    assert_same_loss_and_grads(ref, mine, torch.rand(6, 3, 16, 16))
    for learner in (ref, mine):
        torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.5).step()
        learner.update_moving_average()
    t_ref = list(ref.target_encoder.parameters())
    t_mine = list(mine.model.target.parameters())
    assert len(t_ref) == len(t_mine)
    for a, b in zip(t_ref, t_mine):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # The EMA moved the target: it is neither the old target nor the online network.
    online = list(mine.model.online.encoder.parameters()) + list(mine.model.online.projector.parameters())
    assert any(not torch.allclose(t, o) for t, o in zip(t_mine, online))


def test_distinct_views_match_only_in_one_batch_mode():
    """byol-pytorch normalises both views as one 2B batch: with different views only
    ``views_in_one_batch=True`` (the compat default) reproduces its loss."""
    bp = byol_pytorch()
    flip = lambda x: x.flip(3)  # noqa: E731 (deterministic, so both learners see the same views)
    ref, joint = pair(bp, augment_fn=nn.Identity(), augment_fn2=flip)
    _, per_view = pair(bp, augment_fn=nn.Identity(), augment_fn2=flip, views_in_one_batch=False)
    x = torch.rand(6, 3, 16, 16)
    loss_ref = ref(x)
    torch.testing.assert_close(joint(x), loss_ref, rtol=1e-5, atol=1e-6)
    assert (per_view(x) - loss_ref).abs().item() > 1e-4


def test_use_momentum_false_matches_byol_pytorch():
    bp = byol_pytorch()
    ref, mine = pair(bp, augment_fn=nn.Identity(), use_momentum=False)
    assert mine.model.target is None
    assert [type(m) for m in mine.model.online.projector] == [type(m) for m in ref.online_encoder.projector]
    assert_same_loss_and_grads(ref, mine, torch.rand(6, 3, 16, 16))
    with pytest.raises(AssertionError):
        ref.update_moving_average()
    with pytest.raises(ValueError, match="use_momentum=False"):
        mine.update_moving_average()


def test_target_encoder_none_resets_as_in_byol_pytorch():
    """`learner.target_encoder = None` (byol-pytorch's reset) rebuilds the target from the online
    network as it is at the next forward, after any optimizer step in between."""
    bp = byol_pytorch()
    ref, mine = pair(bp, augment_fn=nn.Identity())
    x = torch.rand(6, 3, 16, 16)
    opts = [torch.optim.SGD([p for p in lrn.parameters() if p.requires_grad], lr=0.5) for lrn in (ref, mine)]
    for learner, opt in zip((ref, mine), opts):
        learner(x).backward()
        opt.step()
        learner.update_moving_average()
        learner(x).backward()
        learner.target_encoder = None
        assert learner.target_encoder is None
        opt.step()  # the rebuilt target is this online network, not the one at the reset
    assert_same_loss_and_grads(ref, mine, x)
    online = list(mine.model.online.encoder.parameters()) + list(mine.model.online.projector.parameters())
    for a, b, o in zip(ref.target_encoder.parameters(), mine.target_encoder.parameters(), online):
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(b, o)


def test_target_encoder_none_is_not_ignored():
    torch.manual_seed(0)
    learner = BYOL(tiny_net(), augment_fn=nn.Identity(), **KW)
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        learner(torch.rand(6, 3, 16, 16)).backward()
        opt.step()
        opt.zero_grad()
        learner.update_moving_average()
    target, online = learner.model.target.encoder.net[0].weight, learner.net[0].weight
    assert not torch.allclose(target, online)
    learner.target_encoder = None
    assert "target_encoder" not in learner.__dict__ and "target_encoder" not in learner._modules
    torch.testing.assert_close(target, online)
    learner(torch.rand(6, 3, 16, 16))
    assert learner.target_encoder is learner.model.target
    with pytest.raises(ValueError, match="only be set to None"):
        learner.target_encoder = nn.Linear(2, 2)


def test_return_embedding_matches_byol_pytorch():
    bp = byol_pytorch()
    ref, mine = pair(bp)
    x = torch.rand(3, 3, 16, 16)
    (p_ref, e_ref), (p_mine, e_mine) = ref(x, return_embedding=True), mine(x, return_embedding=True)
    torch.testing.assert_close(e_mine, e_ref)
    torch.testing.assert_close(p_mine, p_ref, rtol=1e-5, atol=1e-6)
    assert e_mine.shape == (3, 8) and p_mine.shape == (3, 16)
    torch.testing.assert_close(mine(x, return_embedding=True, return_projection=False), e_ref)


def test_hidden_layer_by_name_and_minus_one():
    bp = byol_pytorch()
    for layer in ("7", -1, 6):
        torch.manual_seed(0)
        net = tiny_net()
        args = dict(KW, hidden_layer=layer, augment_fn=nn.Identity())
        ref = bp.BYOL(net, use_simplicial_embeddings=False, **args)
        mine = BYOL(copy.deepcopy(net), **args)
        mine.load_byol_pytorch_state_dict(ref.state_dict())
        x = torch.rand(4, 3, 16, 16)
        torch.testing.assert_close(mine(x, return_embedding=True)[1], ref(x, return_embedding=True)[1])
        torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- behaviour

def test_network_trained_in_place_and_saved_weights_improve(tmp_path):
    net = tiny_net()
    before = copy.deepcopy(net.state_dict())
    learner = BYOL(net, **KW)
    assert learner.net is net
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    target_before = copy.deepcopy(learner.model.target.state_dict())
    for _ in range(2):
        loss = learner(torch.rand(8, 3, 20, 20))
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_moving_average()
    assert loss.dim() == 0
    torch.save(net.state_dict(), tmp_path / "net.pt")
    saved = torch.load(tmp_path / "net.pt")
    assert not torch.equal(saved["0.weight"], before["0.weight"])
    key = "encoder.net.0.weight"
    assert not torch.equal(learner.model.target.state_dict()[key], target_before[key])
    learner.reset_moving_average()
    torch.testing.assert_close(learner.model.target.encoder.net[0].weight, net[0].weight)


def test_construction_leaves_the_network_batchnorm_statistics_alone():
    net = tiny_net()
    stats = net[1].running_mean.clone()
    BYOL(net, **KW)
    assert torch.equal(net[1].running_mean, stats)


def test_bad_input_one_clear_error():
    with pytest.raises(ValueError, match=r"hidden layer \('fc'\) not found"):
        BYOL(tiny_net(), image_size=16, hidden_layer="fc")
    with pytest.raises(ValueError, match=r"hidden layer \(12\) not found"):
        BYOL(tiny_net(), image_size=16, hidden_layer=12)
    with pytest.raises(ValueError, match="simplicial"):
        BYOL(tiny_net(), image_size=16, use_simplicial_embeddings=True)
    learner = BYOL(tiny_net(), **KW)
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        learner(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="3 channels"):
        learner(torch.rand(4, 1, 16, 16))
    with pytest.raises(ValueError, match="floating point"):
        learner(torch.zeros(4, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="batch of one"):
        learner(torch.rand(1, 3, 16, 16))
    learner.eval()
    assert learner(torch.rand(1, 3, 16, 16), return_embedding=True)[1].shape == (1, 8)
    # A network whose features depend on the input size, fed another size.
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 10))
    learner = BYOL(flat, image_size=16, hidden_layer=-2, projection_hidden_size=32, augment_fn=nn.Identity())
    with pytest.raises(ValueError, match="cannot take 24x24 inputs.*image_size 16"):
        learner(torch.rand(4, 3, 24, 24))
    # ... and one whose hidden layer is its output: the projector notices.
    learner = BYOL(flat[:4], image_size=16, hidden_layer=-1, projection_hidden_size=32, augment_fn=nn.Identity())
    with pytest.raises(ValueError, match=r"gives \(144,\) features .* the projector was built for 64"):
        learner(torch.rand(4, 3, 24, 24))


def test_default_views_batched_on_device_per_image_and_reproducible():
    learner = BYOL(tiny_net(), **KW)
    x = torch.rand(6, 3, 24, 20)
    torch.manual_seed(3)
    v1, v2 = learner.views(x)
    torch.manual_seed(3)
    w1, w2 = learner.views(x)
    assert v1.shape == v2.shape == (6, 3, 16, 16)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    assert not torch.allclose(v1, v2)
    # Same image six times: per-image draws give six different views (byol-pytorch's
    # torchvision pipeline draws once per batch).
    same = learner.views(x[:1].expand(6, -1, -1, -1).contiguous())[0]
    assert len({tuple(v.flatten()[:32].tolist()) for v in same}) == 6


def test_augment_fn2_defaults_to_augment_fn():
    calls = []

    def fn(x):
        calls.append(1)
        return x

    learner = BYOL(tiny_net(), augment_fn=fn, **KW)
    learner(torch.rand(4, 3, 16, 16))
    assert len(calls) == 2


def test_augment_fn2_alone_pairs_with_fastbyols_first_view():
    learner = BYOL(tiny_net(), augment_fn2=lambda x: x[:, :, :16, :16], **KW)
    x = torch.rand(4, 3, 20, 20)
    torch.manual_seed(5)
    v1, v2 = learner.views(x)
    torch.manual_seed(5)
    assert torch.equal(v1, learner.default_views(x)[0])  # the default's view 1, same draws
    assert torch.equal(v2, x[:, :, :16, :16])


@pytest.mark.parametrize("h,w,size", [(13, 17, 7), (20, 20, 20), (9, 31, 12)])
def test_crop_resize_batch_matches_interpolate(h, w, size):
    g = torch.Generator().manual_seed(h * w)
    x = torch.rand(3, 2, h, w, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[0, 0, h, w], [1, 2, h - 3, w - 5], [h // 3, w // 4, h // 2, w // 2]])
    out = crop_resize_batch(x, boxes, size)
    for i, (t, l, bh, bw) in enumerate(boxes.tolist()):
        ref = F.interpolate(x[i:i + 1, :, t:t + bh, l:l + bw], size=(size, size), mode="bilinear",
                            align_corners=False)
        # bilinear sampling of the crop == sampling the image at the crop's pixel centres,
        # except where interpolate clamps at the crop's own border (the outer half pixel)
        inner = slice(1, size - 1)
        torch.testing.assert_close(out[i:i + 1, :, inner, inner], ref[:, :, inner, inner], rtol=0, atol=1e-9)
    torch.testing.assert_close(out[0], F.interpolate(x[:1], size=(size, size), mode="bilinear",
                                                     align_corners=False)[0], rtol=0, atol=1e-9)


def test_crop_resize_batch_identity_box():
    x = torch.rand(2, 3, 11, 11)
    assert torch.allclose(crop_resize_batch(x, torch.tensor([[0, 0, 11, 11]] * 2), 11), x, atol=1e-6)


def test_two_views_one_view_only():
    v = TwoViews(AugmentConfig(image_size=8), which=(1,))(torch.rand(2, 3, 10, 10))
    assert v.shape == (2, 3, 8, 8)


# ----------------------------------------------------------------------------- trainer

def trainer(folder, steps, **kw):
    torch.manual_seed(0)
    net = tiny_net()
    args = dict(image_size=16, hidden_layer=-2, learning_rate=1e-3, dataset=MockDataset(16, 40),
                num_train_steps=steps, batch_size=8, checkpoint_every=3, checkpoint_folder=str(folder),
                byol_kwargs=dict(projection_size=16, projection_hidden_size=32), log_every=100)
    args.update(kw)
    return BYOLTrainer(net, **args), net


def test_trainer_checkpoints_and_resumes_exactly(tmp_path, capsys):
    t_full, net_full = trainer(tmp_path / "full", 7)
    summary = t_full()
    assert summary["steps"] == 7
    names = sorted(os.listdir(tmp_path / "full"))
    assert {"checkpoint.1.pt", "checkpoint.2.pt", "checkpoint.last.pt", "checkpoint.pt"} <= set(names)
    saved = torch.load(tmp_path / "full" / "checkpoint.last.pt")
    torch.testing.assert_close(saved["0.weight"], net_full[0].weight)
    t_a, _ = trainer(tmp_path / "part", 4)
    t_a()
    t_b, net_b = trainer(tmp_path / "part", 7, resume=True)
    assert t_b.trainer.step == 4
    t_b()
    for (k, a), b in zip(net_full.state_dict().items(), net_b.state_dict().values()):
        assert torch.equal(a, b), k
    assert "step 7/7 " in capsys.readouterr().out


class PILPairs(torch.utils.data.Dataset):
    """(PIL image, label) items, as a torchvision dataset without a transform gives them."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        from PIL import Image

        g = torch.Generator().manual_seed(i)
        return Image.fromarray(torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()), i % 2


def test_trainer_takes_pil_tuples_and_use_momentum_false(tmp_path):
    t, net = trainer(tmp_path, 2, dataset=PILPairs(), byol_kwargs=dict(projection_size=16, projection_hidden_size=32,
                                                                       use_momentum=False))
    before = net[0].weight.detach().clone()
    assert t()["steps"] == 2
    assert t.byol.model.target is None and not torch.equal(before, net[0].weight)


def test_trainer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_train_steps"):
        trainer(tmp_path, 0)
    with pytest.raises(ValueError, match="larger than the data set"):
        trainer(tmp_path, 2, batch_size=64)
    with pytest.raises(ValueError, match="no fastbyol equivalent"):
        trainer(tmp_path, 2, accelerator_kwargs=dict(cpu=True))
    with pytest.raises(ValueError, match=r"hidden layer \('nope'\) not found"):
        trainer(tmp_path, 2, hidden_layer="nope")


# ----------------------------------------------------------------------------- the README, block by block

# Sizes only: the README's runs are ImageNet-sized (ResNet-50, 256 px, 100 steps / 100k steps);
# pretrained weights are off (nothing can be downloaded here).
SHRINK = [
    ("from byol_pytorch import", "from fastbyol.compat.byol_pytorch import"),  # the one real change
    ("pretrained=True", "weights=None"), ("pretrained = True", "weights = None"),
    ("models.resnet50", "models.resnet18"), ("image_size = 256", "image_size = 32"),
    ("torch.randn(20, 3, 256, 256)", "torch.randn(4, 3, 32, 32)"),
    ("torch.randn(2, 3, 256, 256)", "torch.randn(2, 3, 32, 32)"),
    ("range(100)", "range(2)"), ("projection_hidden_size = 4096", "projection_hidden_size = 64"),
    ("MockDataset(256, 10000)", "MockDataset(32, 16)"), ("num_train_steps = 100_000", "num_train_steps = 2"),
    ("batch_size = 16", "batch_size = 8"), ("checkpoint_every = 1000", "checkpoint_every = 1"),
]


def readme_python_blocks():
    text = open(README, encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_blocks_we_run():
    blocks = readme_python_blocks()
    assert len(blocks) == 7
    assert sum("from byol_pytorch import" in b for b in blocks) == 4


def test_readme_code_blocks_run_with_only_the_import_changed(tmp_path, monkeypatch):
    pytest.importorskip("kornia", reason="the README's augment_fn blocks use kornia (pip install --no-deps "
                                         "kornia==0.9.0 kornia-rs==0.2.0)")
    monkeypatch.chdir(tmp_path)
    # The README's networks are ResNets: under the Triton interpreter one fused EMA of a
    # ResNet-18 takes ~11 s, so these run the kernels' PyTorch references (the fused kernels
    # are held to byol-pytorch above, on a tiny network).
    monkeypatch.setattr(BYOL, "default_kernels", "torch")
    import kornia

    namespace = {"nn": nn, "kornia": kornia}  # the README's blocks 4-5 assume both are imported
    for i, block in enumerate(readme_python_blocks()):
        code = block
        for old, new in SHRINK:
            code = code.replace(old, new)
        assert "byol_pytorch import" not in code.replace("fastbyol.compat.byol_pytorch import", "")
        exec(compile(code, f"README block {i}", "exec"), namespace)
    assert os.path.isfile(tmp_path / "improved-net.pt")
    assert os.path.isfile(tmp_path / "checkpoints" / "checkpoint.1.pt")
    projection, embedding = namespace["projection"], namespace["embedding"]
    assert projection.shape == (2, 256) and embedding.shape == (2, 512)


def test_trainer_under_torchrun_runs_on_deepspeed_with_identical_replicas(tmp_path):
    pytest.importorskip("deepspeed")
    from test_deepspeed import _launch, torchrun

    _launch(torchrun(os.path.join(os.path.dirname(__file__), "compat_train_worker.py"), str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in r0:
        if k.endswith(("weight", "bias")):  # BN statistics are per rank on CPU (no SyncBN)
            assert torch.equal(r0[k], r1[k]), k
    names = set(os.listdir(tmp_path))
    assert {"checkpoint.pt", "checkpoint.1.pt", "checkpoint.last.pt"} <= names
    assert "deepspeed" in names
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["optimizer_class"] == "deepspeed:Adam"
