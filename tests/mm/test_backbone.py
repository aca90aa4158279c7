"""The ViM2 OpenMMLab backbone: outputs, frozen stages, norm_eval, with_cp and checkpoint loading."""
from __future__ import annotations

import functools
import http.server
import threading

import pytest
import torch
import torch.nn as nn

from mm_helpers import TINY_ARCH, skip_without_mm

skip_without_mm()

import timm  # noqa: E402

import vim2.mm  # noqa: E402
from vim2.mm import ViM2Backbone  # noqa: E402
from vim2.models.vim2 import ViM2  # noqa: E402
from vim2.weights import export_model  # noqa: E402

pytestmark = pytest.mark.mm


def tiny_backbone(**kwargs) -> ViM2Backbone:
    kwargs.setdefault("arch", dict(TINY_ARCH))
    return ViM2Backbone(**kwargs)


def images(batch=2, size=32, seed=0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 3), (0, 2), (-1,)])
def test_returns_tuple_of_nchw_maps_for_out_indices(out_indices):
    torch.manual_seed(0)
    backbone = tiny_backbone(out_indices=out_indices)
    outputs = backbone(images(size=64))
    widths, strides = TINY_ARCH["embed_dims"], (4, 8, 16, 32)
    stages = [i % 4 for i in out_indices]
    assert isinstance(outputs, tuple) and len(outputs) == len(stages)
    for output, stage in zip(outputs, stages):
        assert output.shape == (2, widths[stage], 64 // strides[stage], 64 // strides[stage])
        assert output.is_contiguous() and torch.isfinite(output).all()
    assert backbone.out_channels == [widths[s] for s in stages]
    assert backbone.out_strides == [strides[s] for s in stages]
    # Unused parts are not built: stages after the last output, the final norm, the classifier.
    assert len(backbone.vim2.stages) == max(stages) + 1
    assert isinstance(backbone.vim2.norm, nn.Identity)
    assert not any(name.startswith(("vim2.head", "vim2.norm")) for name, _ in backbone.named_parameters())
    assert len(backbone.out_norms) == len(stages)


def test_wraps_the_timm_model_class_and_its_features():
    """Same model code as timm: the outputs are ViM2's stage outputs through one LayerNorm each."""
    torch.manual_seed(0)
    backbone = tiny_backbone().eval()
    assert type(backbone.vim2) is ViM2
    x = images(size=64)
    with torch.no_grad():
        raw = backbone.vim2.forward_intermediates(x, intermediates_only=True, output_fmt="NHWC")
        expected = [norm(f).permute(0, 3, 1, 2) for norm, f in zip(backbone.out_norms, raw)]
        for got, want in zip(backbone(x), expected):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="huge"), "arch must be one of"),
    (dict(arch=dict(embed_dim=(8, 16))), r"unknown ViM2 arguments \['embed_dim'\]"),
    (dict(arch=3), "arch must be a str or a dict"),
    (dict(out_indices=(0, 4)), "out_indices entries must be ints"),
    (dict(out_indices=(2, 1)), "increasing without repeats"),
    (dict(out_indices=()), "non-empty"),
    (dict(frozen_stages=5), r"frozen_stages must be an int in \[-1, 4\]"),
    (dict(drop_path_rate=1.5), "drop_path_rate must be a float"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_backbone(**kwargs)


def test_named_archs_are_the_model_families_settings():
    backbone = ViM2Backbone(arch="test", drop_path_rate=0.1)
    reference = timm.create_model("test_vim2")
    assert backbone.vim2.embed_dims == reference.embed_dims
    assert backbone.vim2.depths == reference.depths
    # drop_path_rate reaches the model's stochastic depth
    rates = [m.drop_prob for m in backbone.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)


# ---------------------------------------------------------------------- frozen stages / norm_eval
def frozen_and_trainable(backbone: ViM2Backbone, frozen_stages: int):
    frozen = [backbone.vim2.stem] + [backbone.vim2.stages[i] for i in range(frozen_stages)]
    frozen += [backbone.out_norms[i] for i in range(frozen_stages)]  # out_indices = 0..3
    trainable = [backbone.vim2.stages[i] for i in range(frozen_stages, 4)]
    trainable += [backbone.out_norms[i] for i in range(frozen_stages, 4)]
    return frozen, trainable


@pytest.mark.parametrize("frozen_stages", [0, 2])
def test_frozen_stages_get_no_gradients_and_stay_in_eval(frozen_stages):
    torch.manual_seed(0)
    backbone = tiny_backbone(frozen_stages=frozen_stages)
    backbone.train()  # what the runner does at the start of training
    frozen, trainable = frozen_and_trainable(backbone, frozen_stages)
    assert all(not m.training for f in frozen for m in f.modules())
    assert all(m.training for t in trainable for m in t.modules())
    assert all(not p.requires_grad for f in frozen for p in f.parameters())

    sum(o.square().mean() for o in backbone(images(size=64))).backward()
    assert all(p.grad is None for f in frozen for p in f.parameters())
    trainable_grads = [p.grad for t in trainable for p in t.parameters()]
    assert all(g is not None for g in trainable_grads)
    assert sum(g.abs().sum() for g in trainable_grads) > 0

    backbone.eval()
    backbone.train()  # freezing survives train() calls
    assert all(not m.training for f in frozen for m in f.modules())
    assert all(not p.requires_grad for f in frozen for p in f.parameters())


def test_frozen_stem_only_and_no_freezing():
    backbone = tiny_backbone(frozen_stages=0).train()
    assert not any(p.requires_grad for p in backbone.vim2.stem.parameters())
    assert all(p.requires_grad for p in backbone.vim2.stages.parameters())
    backbone = tiny_backbone(frozen_stages=-1).train()
    assert all(p.requires_grad for p in backbone.parameters())
    assert all(m.training for m in backbone.modules())


def test_norm_eval_puts_every_norm_in_eval_mode_during_training():
    backbone = tiny_backbone(norm_eval=True).train()
    norms = [m for m in backbone.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) > 4
    assert all(not m.training for m in norms)
    assert all(m.training for m in backbone.modules() if isinstance(m, nn.Linear))
    backbone = tiny_backbone(norm_eval=False).train()
    assert all(m.training for m in backbone.modules() if isinstance(m, nn.LayerNorm))


@pytest.mark.parametrize("norm_eval", [True, False])
def test_norm_eval_keeps_batch_norm_statistics(norm_eval):
    """With BN output norms, norm_eval decides whether training forwards update running stats."""
    torch.manual_seed(0)
    backbone = tiny_backbone(norm_cfg=dict(type="BN"), norm_eval=norm_eval).train()
    before = [n.running_mean.clone() for n in backbone.out_norms]
    backbone(images(size=64))
    changed = [not torch.equal(b, n.running_mean) for b, n in zip(before, backbone.out_norms)]
    assert all(changed) != norm_eval and any(changed) != norm_eval


# ------------------------------------------------------------------------------------ with_cp
def test_with_cp_gives_same_outputs_and_gradients_and_recomputes():
    torch.manual_seed(0)
    plain = tiny_backbone(with_cp=False).train()
    checkpointed = tiny_backbone(with_cp=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    assert all(stage.grad_checkpointing for stage in checkpointed.vim2.stages)

    calls = {"plain": 0, "checkpointed": 0}
    plain.vim2.stages[0].blocks[0].register_forward_pre_hook(lambda *a: calls.__setitem__("plain", calls["plain"] + 1))
    checkpointed.vim2.stages[0].blocks[0].register_forward_pre_hook(
        lambda *a: calls.__setitem__("checkpointed", calls["checkpointed"] + 1))

    x = images(size=64)
    outputs = []
    for model in (plain, checkpointed):
        feats = model(x)
        sum((f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum() for f in feats).backward()
        outputs.append(feats)
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b)
    grads_plain = dict((n, p.grad) for n, p in plain.named_parameters())
    for name, parameter in checkpointed.named_parameters():
        torch.testing.assert_close(parameter.grad, grads_plain[name], msg=name)
    # The checkpointed block started its forward again during backward (recomputation; it may stop
    # early, so a pre-hook counts it); the plain one ran once.
    assert calls == {"plain": 1, "checkpointed": 2}


# ------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def timm_model():
    torch.manual_seed(1)
    model = timm.create_model("test_vim2")
    with torch.no_grad():  # make the norm parameters distinguishable from their init
        for name, parameter in model.named_parameters():
            if name.endswith(("norm.weight", "norm.bias")):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def exported_dir(timm_model, tmp_path_factory):
    return export_model(timm_model, tmp_path_factory.mktemp("export") / "vim2_test")


def assert_matches_timm(backbone: ViM2Backbone, model) -> None:
    reference = model.state_dict()
    for name, value in backbone.vim2.state_dict().items():
        assert torch.equal(value, reference[name]), name
    # the classifier's final norm initialised the last output norm
    assert torch.equal(backbone.out_norms[-1].weight, model.norm.weight)
    assert torch.equal(backbone.out_norms[-1].bias, model.norm.bias)
    # values match end to end: the last output is timm's normalised final feature map
    x = images(size=64)
    with torch.no_grad():
        final_timm = model.forward_features(x).permute(0, 3, 1, 2)
        torch.testing.assert_close(backbone.eval()(x)[-1], final_timm)


@pytest.mark.parametrize("which", ["safetensors", "directory"])
def test_init_cfg_loads_the_timm_export(timm_model, exported_dir, which):
    path = exported_dir / "model.safetensors" if which == "safetensors" else exported_dir
    torch.manual_seed(5)
    backbone = ViM2Backbone(arch="test", init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    assert not torch.equal(backbone.vim2.stem.conv.weight, timm_model.stem.conv.weight)
    backbone.init_weights()
    assert_matches_timm(backbone, timm_model)


def test_init_cfg_loads_timm_training_checkpoint_pth(timm_model, tmp_path):
    path = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in timm_model.state_dict().items()}}, path)
    backbone = ViM2Backbone(arch="test", init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    backbone.init_weights()
    assert_matches_timm(backbone, timm_model)


def test_init_cfg_loads_from_url(timm_model, exported_dir, tmp_path, monkeypatch):
    """http(s) checkpoints: .safetensors through torch.hub's cache, .pth through mmengine."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.save(timm_model.state_dict(), exported_dir / "plain.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(exported_dir))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for name in ("model.safetensors", "plain.pth"):
            url = f"http://127.0.0.1:{server.server_address[1]}/{name}"
            backbone = ViM2Backbone(arch="test", init_cfg=dict(type="Pretrained", checkpoint=url))
            backbone.init_weights()
            assert_matches_timm(backbone, timm_model)
    finally:
        server.shutdown()
        server.server_close()


def test_init_cfg_loads_mm_format_backbone_checkpoint(tmp_path):
    torch.manual_seed(2)
    source = tiny_backbone()
    with torch.no_grad():
        for norm in source.out_norms:
            norm.weight.uniform_(0.5, 1.5)
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    state["neck.lateral_convs.0.conv.weight"] = torch.zeros(4, 4, 1, 1)  # rest of a detector
    path = tmp_path / "detector.pth"
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, path)

    torch.manual_seed(3)
    target = tiny_backbone(init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    target.init_weights()
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    x = images(size=64)
    for a, b in zip(source.eval()(x), target.eval()(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("feature_cls", ["getter", None])
def test_init_cfg_loads_timm_backbone_checkpoint(tmp_path, feature_cls):
    """Keys of an mmdet/mmseg model whose backbone was mmpretrain.TIMMBackbone(features_only=True)."""
    torch.manual_seed(4)
    kwargs = dict(feature_cls=feature_cls) if feature_cls else {}
    features = timm.create_model("test_vim2", features_only=True, **kwargs)
    state = {f"backbone.timm_model.{k}": v for k, v in features.state_dict().items()}
    path = tmp_path / "timm_backbone_detector.pth"
    torch.save({"state_dict": state}, path)
    backbone = ViM2Backbone(arch="test", init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    backbone.init_weights()
    reference = list(features.state_dict().values())
    assert len(reference) == len(backbone.vim2.state_dict())
    for (name, value), expected in zip(backbone.vim2.state_dict().items(), reference):
        assert torch.equal(value, expected), name


def test_prefix_selects_the_sub_state_dict(timm_model, tmp_path):
    path = tmp_path / "ema.pth"
    torch.save({f"ema_model.{k}": v for k, v in timm_model.state_dict().items()}, path)
    backbone = ViM2Backbone(arch="test", init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="ema_model."))
    backbone.init_weights()
    assert_matches_timm(backbone, timm_model)


def test_wrong_arch_checkpoint_is_a_clear_error(exported_dir):
    # same widths but d_state 4 vs 2 -> shape mismatches of the scan parameters
    backbone = ViM2Backbone(arch=dict(embed_dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), d_state=2),
                            init_cfg=dict(type="Pretrained", checkpoint=str(exported_dir)))
    with pytest.raises(ValueError, match=r"does not match this ViM2 backbone(.|\n)*shape mismatches"):
        backbone.init_weights()


def test_shallower_backbone_refuses_deeper_checkpoint(exported_dir):
    """Extra blocks in a kept stage would be silently dropped by strict=False loading."""
    backbone = ViM2Backbone(arch=dict(TINY_ARCH, depths=(2, 2, 1, 2)),
                            init_cfg=dict(type="Pretrained", checkpoint=str(exported_dir)))
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): stages\.2\.blocks\.1"):
        backbone.init_weights()


def test_checkpoints_of_other_models_and_missing_files_are_clear_errors(tmp_path):
    resnet = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}}, resnet)
    backbone = tiny_backbone(init_cfg=dict(type="Pretrained", checkpoint=str(resnet)))
    with pytest.raises(ValueError, match=r"missing keys"):
        backbone.init_weights()
    backbone = tiny_backbone(init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "none.safetensors")))
    with pytest.raises(FileNotFoundError, match="vim2-export"):
        backbone.init_weights()
    backbone = tiny_backbone(init_cfg=dict(type="Pretrained", checkpoint=None))
    with pytest.raises(ValueError, match="has no checkpoint"):
        backbone.init_weights()
    backbone = tiny_backbone(init_cfg=dict(type="Pretrained", checkpoint=str(resnet), strict=True))
    with pytest.raises(ValueError, match=r"unknown keys \['strict'\]"):
        backbone.init_weights()


def test_failed_load_leaves_weights_untouched(exported_dir):
    torch.manual_seed(0)
    backbone = ViM2Backbone(arch=dict(embed_dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), d_state=2),
                            init_cfg=dict(type="Pretrained", checkpoint=str(exported_dir)))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(ValueError):
        backbone.init_weights()
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_other_init_cfg_entries_still_apply():
    torch.manual_seed(0)
    backbone = tiny_backbone(init_cfg=dict(type="Constant", layer="LayerNorm", val=0.5, bias=0.25))
    backbone.init_weights()
    assert all(torch.all(m.weight == 0.5) and torch.all(m.bias == 0.25)
               for m in backbone.modules() if isinstance(m, nn.LayerNorm))


def test_registered_name_builds_the_adapter():
    from mmdet.registry import MODELS

    backbone = MODELS.build(dict(type="ViM2", arch=dict(TINY_ARCH), out_indices=(1, 2)))
    assert isinstance(backbone, vim2.mm.ViM2Backbone) and backbone.out_channels == [32, 64]
