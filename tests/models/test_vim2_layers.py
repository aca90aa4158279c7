"""ViM2 building blocks checked against explicit re-implementations.

* VMamba limiting case (paper): no channel mixers + weighted averaging frozen to the plain chain = a
  VMamba-style stage, written here with explicit permutations of the map and one
  ``selective_scan_fn`` per route (this also cross-checks ``cross_scan_2d``).
* Selective Channel Mixer = per-direction conv + S6 written with explicit flips of the channel axis.
* Weighted averaging: initial state is the residual chain; general weights give Eq. 19-20.
"""
import pytest
import torch
import torch.nn.functional as F

import vim2_kernels
from vim2_kernels import selective_scan_fn
from vim2.layers import SelectiveChannelMixer, SelectiveTokenMixer, WeightedInputAverage
from vim2.models import ViM2


def _randomize_(module: torch.nn.Module, seed: int = 0):
    """Give every parameter a non-trivial value (zeros/ones in the init would hide wiring mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith('input_average.weight'):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith('A_log'):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 2 + 0.5))
            elif name.endswith(('dt_proj_bias', 'delta_bias')):
                p.copy_(noise * 0.5 - 2.0)
            else:
                p.add_(noise * 0.1)


# --------------------------------------------------------------------------------------------------
# VMamba-style reference (explicit permutations, one selective_scan_fn per route)
# --------------------------------------------------------------------------------------------------

def _route_sequence(x_nchw: torch.Tensor, route: str) -> torch.Tensor:
    """(B, d, H, W) -> (B, d, L) in the route's scan order."""
    if route in ('row', 'row_rev'):
        seq = x_nchw.flatten(2)
    else:
        seq = x_nchw.transpose(2, 3).flatten(2)
    return seq.flip(-1) if route.endswith('_rev') else seq


def _route_unsequence(y: torch.Tensor, route: str, height: int, width: int) -> torch.Tensor:
    """(B, d, L) in route order -> (B, d, H, W)."""
    if route.endswith('_rev'):
        y = y.flip(-1)
    if route in ('row', 'row_rev'):
        return y.reshape(y.shape[0], y.shape[1], height, width)
    return y.reshape(y.shape[0], y.shape[1], width, height).transpose(2, 3)


def vmamba_ss2d_reference(mixer: SelectiveTokenMixer, x: torch.Tensor) -> torch.Tensor:
    """VMamba SS2D with the mixer's weights. x: (B, H, W, C) -> (B, H, W, C)."""
    batch, height, width, _ = x.shape
    xz = F.linear(x, mixer.in_proj.weight)
    xs, z = xz.chunk(2, dim=-1)
    xs = xs.permute(0, 3, 1, 2)  # NCHW
    xs = F.silu(F.conv2d(xs, mixer.conv.weight, mixer.conv.bias, padding=mixer.conv.padding,
                         groups=mixer.conv.groups))
    total = 0
    for k, route in enumerate(mixer.routes):
        seq = _route_sequence(xs, route)  # (B, d, L)
        x_dbl = torch.einsum('bdl,cd->bcl', seq, mixer.x_proj_weight[k])
        dts, Bs, Cs = torch.split(x_dbl, [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=1)
        dts = torch.einsum('brl,dr->bdl', dts, mixer.dt_proj_weight[k])
        y = selective_scan_fn(
            seq.contiguous(), dts.contiguous(), -torch.exp(mixer.A_log[k]), Bs.contiguous(), Cs.contiguous(),
            D=mixer.D[k], delta_bias=mixer.dt_proj_bias[k], delta_softplus=True,
        )
        total = total + _route_unsequence(y, route, height, width)
    y = total.permute(0, 2, 3, 1)
    y = F.layer_norm(y, (mixer.d_inner,), mixer.out_norm.weight, mixer.out_norm.bias, mixer.out_norm.eps)
    y = y * F.silu(z)
    return F.linear(y, mixer.out_proj.weight)


def vmamba_stage_reference(stage, x: torch.Tensor) -> torch.Tensor:
    """x = x + SS2D(LN(x)) for each block; the stage's own downsample first."""
    x = stage.downsample(x)
    for block in stage.blocks:
        assert block.kind == 'token'
        normed = F.layer_norm(x, block.norm.normalized_shape, block.norm.weight, block.norm.bias, block.norm.eps)
        x = x + vmamba_ss2d_reference(block.mixer, normed)
    return x


@pytest.mark.parametrize('stage_index', [0, 1])
def test_stage_without_channel_mixer_equals_vmamba_stage(stage_index):
    torch.manual_seed(0)
    model = ViM2(embed_dims=(8, 16), depths=(3, 2), channel_mixer=None, weighted_average=True, d_state=4,
                 num_classes=0)
    _randomize_(model)
    for name, p in model.named_parameters():
        if name.endswith('input_average.weight'):
            p.requires_grad_(False)  # frozen at the plain chain
    stage = model.stages[stage_index]
    assert all(block.kind == 'token' for block in stage.blocks)
    x = torch.randn(2, 6, 5, 8)  # both stages take the stem's 8 channels  # non-square, odd width (the merging pads)
    with torch.no_grad():
        ours = stage(x)
        ref = vmamba_stage_reference(stage, x)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_token_mixer_routes_subset_and_gradients():
    """Any subset/order of routes matches the explicit reference, in value and in gradient."""
    torch.manual_seed(1)
    mixer = SelectiveTokenMixer(6, d_state=3, routes=('col_rev', 'row'))
    _randomize_(mixer, seed=3)
    x = torch.randn(1, 4, 7, 6, requires_grad=True)
    ours = mixer(x)
    ref = vmamba_ss2d_reference(mixer, x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    grad_out = torch.randn_like(ours)
    g_ours = torch.autograd.grad(ours, [x, mixer.A_log, mixer.x_proj_weight], grad_out)
    g_ref = torch.autograd.grad(ref, [x, mixer.A_log, mixer.x_proj_weight], grad_out)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_token_mixer_rejects_unknown_route():
    with pytest.raises(ValueError, match='scan_routes'):
        SelectiveTokenMixer(8, routes=('row', 'diagonal'))


# --------------------------------------------------------------------------------------------------
# Selective Channel Mixer vs explicit flips
# --------------------------------------------------------------------------------------------------

def channel_mixer_reference(mixer: SelectiveChannelMixer, x: torch.Tensor) -> torch.Tensor:
    """Each direction: (flip) -> causal conv -> SiLU -> forward S6 -> (flip back). x: (B, H, W, C)."""
    batch, height, width, _ = x.shape
    E, k = mixer.hidden_dim, mixer.d_conv
    u = F.linear(x, mixer.in_proj.weight).reshape(-1, E)  # (T, E)
    z = F.linear(x, mixer.gate_proj.weight).reshape(-1, E)
    total = 0
    for d, flip in ((0, False), (1, True)):
        seq = u.flip(-1) if flip else u
        conv = F.conv1d(F.pad(seq.unsqueeze(1), (k - 1, 0)), mixer.conv_weight[d].view(1, 1, k),
                        mixer.conv_bias[d:d + 1]).squeeze(1)
        seq = F.silu(conv)  # (T, E) in this direction's scan order
        pos_delta = mixer.delta_bias[d].flip(-1) if flip else mixer.delta_bias[d]
        pos_B = mixer.B_bias[d].flip(-1) if flip else mixer.B_bias[d]  # (N, E)
        pos_C = mixer.C_bias[d].flip(-1) if flip else mixer.C_bias[d]
        delta = seq * mixer.delta_weight[d] + pos_delta
        Bs = seq.unsqueeze(1) * mixer.B_weight[d].view(1, -1, 1) + pos_B
        Cs = seq.unsqueeze(1) * mixer.C_weight[d].view(1, -1, 1) + pos_C
        y = selective_scan_fn(seq.unsqueeze(1), delta.unsqueeze(1), -torch.exp(mixer.A_log[d]).view(1, -1),
                              Bs, Cs, D=mixer.D[d:d + 1], delta_softplus=True)
        y = y.squeeze(1)
        total = total + (y.flip(-1) if flip else y)
    y = total * F.silu(z)
    return F.linear(y.reshape(batch, height, width, E), mixer.out_proj.weight)


def _usable(backend):
    reason = vim2_kernels.backend_status(torch.device('cpu'))[backend]
    return pytest.param(backend, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


# 'cpu': the fused channel-mixer kernel; 'torch': the unfused composition through bidirectional_scan
@pytest.mark.parametrize('backend', [_usable('cpu'), 'torch'])
@pytest.mark.parametrize('hidden_dim,d_conv', [(10, 4), (5, 1), (7, 3), (40, 4)])
def test_channel_mixer_matches_explicit_flips(hidden_dim, d_conv, backend):
    torch.manual_seed(2)
    mixer = SelectiveChannelMixer(6, hidden_dim, d_state=3, d_conv=d_conv, scan_backend=backend)
    _randomize_(mixer, seed=4)
    x = torch.randn(2, 3, 2, 6, requires_grad=True)
    ours = mixer(x)
    ref = channel_mixer_reference(mixer, x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    grad_out = torch.randn_like(ours)
    params = [x, mixer.conv_weight, mixer.B_bias, mixer.delta_weight, mixer.A_log]
    for a, b in zip(torch.autograd.grad(ours, params, grad_out), torch.autograd.grad(ref, params, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_channel_mixer_mixes_each_token_on_its_own():
    """Changing one token leaves every other token's output untouched (no mixing over tokens)."""
    torch.manual_seed(3)
    mixer = SelectiveChannelMixer(4, 8, d_state=2)
    _randomize_(mixer, seed=5)
    x = torch.randn(1, 3, 3, 4)
    x2 = x.clone()
    x2[0, 1, 1] += 1.0
    with torch.no_grad():
        y, y2 = mixer(x), mixer(x2)
    changed = (y - y2).abs().amax(-1) > 0
    assert changed[0, 1, 1]
    assert changed.sum() == 1


# --------------------------------------------------------------------------------------------------
# Weighted averaging (Eq. 19-20)
# --------------------------------------------------------------------------------------------------

def test_weighted_input_average_init_and_general_weights():
    outputs = [torch.randn(2, 3, 3, 4) for _ in range(3)]
    avg = WeightedInputAverage(3)
    assert torch.equal(avg(outputs), outputs[-1])  # plain chain
    with torch.no_grad():
        avg.weight.copy_(torch.tensor([0.5, -2.0, 0.25]))
    torch.testing.assert_close(avg(outputs), 0.5 * outputs[0] - 2.0 * outputs[1] + 0.25 * outputs[2])
    with pytest.raises(ValueError, match='expected 3 earlier outputs'):
        avg(outputs[:2])
    with pytest.raises(ValueError, match='num_inputs'):
        WeightedInputAverage(0)


def _sequential_stack(stage, x):
    x = stage.downsample(x)
    for block in stage.blocks:
        x = x + block.mixer(block.norm(x))
    return x


def test_weighted_averaging_starts_as_sequential_residual_stack():
    torch.manual_seed(4)
    model = ViM2(embed_dims=(8, 16), depths=(4, 2), d_state=2, num_classes=0)
    _randomize_(model)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        feats = model.stem(x)
        for stage in model.stages:
            ours = stage(feats)
            torch.testing.assert_close(ours, _sequential_stack(stage, feats), rtol=0, atol=0)
            feats = ours

    # The pairing of Table 8: a channel mixer after every second token mixer, one scalar per pair.
    kinds = [block.kind for block in model.stages[0].blocks]
    assert kinds == ['token', 'token', 'channel', 'token', 'token', 'channel']
    sizes = [block.input_average.weight.numel() for block in model.stages[0].blocks]
    assert sizes == [1, 2, 3, 4, 5, 6]

    # Moving weight off the chain changes the output exactly as Eq. 19-20 say.
    stage = model.stages[0]
    with torch.no_grad():
        stage.blocks[3].input_average.weight.copy_(torch.tensor([0.3, 0.0, -0.7, 0.5]))
        feats = model.stem(x)
        outs = [feats]
        for j, block in enumerate(stage.blocks):
            w = block.input_average.weight
            inp = sum(w[i] * outs[i] for i in range(len(outs)))
            outs.append(inp + block.mixer(block.norm(inp)))
        torch.testing.assert_close(stage(feats), outs[-1], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(stage(feats), _sequential_stack(stage, feats))


@pytest.mark.parametrize('every,expected', [
    (1, ['token', 'channel', 'token', 'channel', 'token', 'channel']),
    (3, ['token', 'token', 'token', 'channel']),
])
def test_channel_mixer_pairing_argument(every, expected):
    model = ViM2(embed_dims=(8,), depths=(3,), d_state=2, channel_mixer_every=every, num_classes=0)
    assert [block.kind for block in model.stages[0].blocks] == expected


# ------------------------------------------------------------------------------ inference memory path

def test_map_token_chunks_equals_one_call():
    from vim2.layers.inplace import map_token_chunks
    x, y = torch.randn(23, 5), torch.randn(23, 2)

    def fn(a, b):
        return torch.cat([a.sum(-1, keepdim=True), b * 2], dim=-1)

    for chunk in (1, 4, 7, 23, 100):
        torch.testing.assert_close(map_token_chunks(fn, x, y, chunk=chunk), fn(x, y))


@pytest.mark.parametrize('name', ['test_vim2', 'vim2_mlp'])
def test_inference_path_matches_autograd_path(name, monkeypatch):
    """Without autograd the mixers overwrite intermediates, chunk their per-token parts (TOKEN_CHUNK
    forced to a ragged 37 here) and the cpu scan fuses the Δ projection and the route sum: same outputs
    as the autograd path, and that path is still differentiable."""
    import timm
    import vim2.layers.inplace as inplace

    monkeypatch.setattr(inplace, 'TOKEN_CHUNK', 37)
    kwargs = dict(embed_dims=(16, 32, 32, 32), depths=(2, 2, 1, 1)) if name == 'vim2_mlp' else {}
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    with torch.no_grad():  # non-trivial weighted averaging, so every earlier output matters
        for module in model.modules():
            if isinstance(module, WeightedInputAverage):
                module.weight.uniform_(0.2, 1.0)
    x = torch.randn(2, 3, 70, 45)
    with_graph = model(x)
    with torch.inference_mode():
        without_graph = model(x)
    torch.testing.assert_close(without_graph, with_graph.detach(), rtol=1e-4, atol=1e-4)
    with_graph.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # inputs are not modified in place by the inference path
    y = torch.randn(1, 8, 9, 16)
    mixer = SelectiveTokenMixer(16, d_state=4)
    before = y.clone()
    with torch.no_grad():
        mixer(y)
    assert torch.equal(y, before)


def test_mixer_block_inference_residual_keeps_the_autograd_dtype():
    """Under bf16 autocast a block's mixer returns bf16 while a float32 input stays float32: the in-place
    residual add of the inference path must not change the result's dtype (x + y promotes)."""
    from vim2.models.vim2 import MixerBlock
    block = MixerBlock(16, SelectiveTokenMixer(16, d_state=4), 'token').eval()
    x = torch.randn(1, 5, 6, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        with_graph = block(x)
        with torch.no_grad():
            without_graph = block(x)
    assert with_graph.dtype == without_graph.dtype == torch.float32
    torch.testing.assert_close(without_graph, with_graph.detach())


def test_weighted_average_add_to_is_a_residual_add():
    average = WeightedInputAverage(3)
    with torch.no_grad():
        average.weight.copy_(torch.tensor([0.5, -1.0, 2.0]))
    outputs = [torch.randn(2, 4, 5, 8) for _ in range(3)]
    y = torch.randn(2, 4, 5, 8)
    expected = y + average(outputs)
    with torch.no_grad():
        got = average.add_to_(y, outputs)
    assert got is y  # in place
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match='expected 3 earlier outputs'):
        average.add_to_(y, outputs[:2])


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensor storages that autograd keeps for the backward of ``fn()``'s graph
    (every tensor packed by a saved-tensor hook; a non-reentrant checkpoint keeps only its inputs)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize('autocast', [False, True])
def test_selective_recompute_same_results_fewer_saved_activations(autocast):
    """The token mixer's scan-branch projection/conv/SiLU and gate branch, recomputed in the backward: the
    same outputs and gradients as when they are stored (float32 and bf16 autocast), a smaller saved graph."""
    import contextlib
    import copy

    torch.manual_seed(2)
    stored = SelectiveTokenMixer(12, d_state=4, selective_recompute=False)
    _randomize_(stored, seed=5)
    recomputed = copy.deepcopy(stored)
    recomputed.selective_recompute = True
    x = torch.randn(2, 9, 7, 12)
    grad_out = torch.randn(2, 9, 7, 12)
    results = {}
    for name, mixer in (('stored', stored), ('recomputed', recomputed)):
        x_ = x.clone().requires_grad_(True)
        context = torch.autocast('cpu', dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            out, saved = _saved_bytes(lambda: mixer(x_))
        grads = torch.autograd.grad(out, [x_, *mixer.parameters()], grad_out.to(out.dtype))
        results[name] = out, grads, saved
    (out_s, grads_s, saved_s), (out_r, grads_r, saved_r) = results['stored'], results['recomputed']
    assert out_r.dtype == out_s.dtype
    torch.testing.assert_close(out_r, out_s, rtol=0, atol=0)
    for a, b in zip(grads_r, grads_s):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # stored: the in-projection's and the conv's outputs, out-norm output, z, SiLU(z), the gated product
    # (d_inner = 24 channels each) besides what both keep; recomputed keeps the scan output and inputs only
    map_bytes = x[..., :1].numel() * 24 * (2 if autocast else 4)
    # (measured 6.3 maps in float32, 5.7 under autocast, where the norm's float32 output and a bf16 copy
    # of the product change the count; without the in-projection recomputed it was 5.3 and 4.1)
    assert saved_s - saved_r >= (5 if autocast else 5.5) * map_bytes, (saved_s / map_bytes, saved_r / map_bytes)


def test_selective_recompute_is_a_model_argument():
    import timm

    mixers = (SelectiveTokenMixer, SelectiveChannelMixer)
    default = [m for m in timm.create_model('test_vim2').modules() if isinstance(m, mixers)]
    assert {type(m) for m in default} == set(mixers) and all(m.selective_recompute for m in default)
    model = timm.create_model('test_vim2', selective_recompute=False)
    assert not any(m.selective_recompute for m in model.modules() if isinstance(m, mixers))


@pytest.mark.parametrize('autocast', [False, True])
@pytest.mark.parametrize('kind', ['token', 'channel'])
def test_block_norm_is_recomputed_inside_the_mixer(kind, autocast):
    """With the selective recomputation a block's LayerNorm runs inside its mixer's recomputed regions: the
    same output and gradients as when the block applies it and the mixer keeps its input, and the
    normalised input, a (B, H, W, C) map, is not stored."""
    import contextlib

    from vim2.models.vim2 import MixerBlock

    dim = 12
    mixer = SelectiveTokenMixer(dim, d_state=4) if kind == 'token' else SelectiveChannelMixer(dim, 20, d_state=4)
    block = MixerBlock(dim, mixer, kind, num_inputs=3)
    _randomize_(block, seed=7)
    with torch.no_grad():
        block.input_average.weight.copy_(torch.tensor([0.3, -0.7, 1.1]))
    gen = torch.Generator().manual_seed(4)
    inputs = [torch.randn(2, 9, 7, dim, generator=gen).requires_grad_(True) for _ in range(3)]
    grad_out = torch.randn(2, 9, 7, dim, generator=gen)

    def block_keeps_its_input():  # the block's norm outside the mixer (what a plain mixer call does)
        x = block.input_average(inputs)
        return x + block.mixer(block.norm(x))

    results = {}
    for name, fn in (('kept', block_keeps_its_input), ('recomputed', lambda: block(*inputs))):
        with torch.autocast('cpu', dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            out, saved = _saved_bytes(fn)
        grads = torch.autograd.grad(out, [*inputs, *block.parameters()], grad_out.to(out.dtype))
        results[name] = out, grads, saved
    (out_k, grads_k, saved_k), (out_r, grads_r, saved_r) = results['kept'], results['recomputed']
    torch.testing.assert_close(out_r, out_k, rtol=0, atol=0)
    for a, b in zip(grads_r, grads_k):  # (sums over all tokens, e.g. the weights' grads: another order)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    map_bytes = inputs[0].numel() * 4  # the norm's output stays float32 under autocast
    assert saved_k - saved_r >= 0.95 * map_bytes, ((saved_k - saved_r) / map_bytes)


def test_selective_recompute_whole_model_same_results():
    """test_vim2 (token and channel mixers, weighted averaging) with and without the selective
    recomputation: bitwise the same output, the same gradients to float32 rounding."""
    import timm

    torch.manual_seed(0)
    recomputing = timm.create_model('test_vim2', num_classes=4, drop_path_rate=0.0)
    _randomize_(recomputing, seed=3)
    with torch.no_grad():
        for module in recomputing.modules():
            if isinstance(module, WeightedInputAverage):
                module.weight.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(1))
    storing = timm.create_model('test_vim2', num_classes=4, drop_path_rate=0.0, selective_recompute=False)
    storing.load_state_dict(recomputing.state_dict())
    assert not any(getattr(m, 'selective_recompute', False) for m in storing.modules())
    x = torch.randn(2, 3, 64, 64)
    outs = [model(x) for model in (recomputing, storing)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for out in outs:
        out.square().sum().backward()
    for (name, a), b in zip(recomputing.named_parameters(), storing.parameters()):
        # float32 sums in another order: differences up to 3e-5 of a gradient's largest entry (measured)
        scale = b.grad.abs().max().item()
        assert (a.grad - b.grad).abs().max().item() <= 2e-4 * scale, name


@pytest.mark.parametrize('kind', ['token', 'channel'])
def test_forward_normed_with_a_frozen_mixer_still_trains_the_norm(kind):
    """A frozen mixer (e.g. an mm backbone's frozen stage) under a trainable norm: forward_normed skips
    the recomputed regions but still records the norm's graph; same output as mixer(norm(x))."""
    mixer = SelectiveTokenMixer(8, d_state=4) if kind == 'token' else SelectiveChannelMixer(8, 12, d_state=4)
    mixer.requires_grad_(False)
    norm = torch.nn.LayerNorm(8)
    x = torch.randn(1, 5, 6, 8)
    out = mixer.forward_normed(norm, x)
    out.square().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out, mixer(norm(x)), rtol=0, atol=0)
