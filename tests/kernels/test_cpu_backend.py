"""Compiled CPU selective-scan backend (C kernels via ctypes) against the float64 plain-loop reference.

Same cases as the torch backend's sweep (``test_torch_backend.make_case``): every length and state size
of the issue, every option combination, groups whose channels do and do not fill whole tiles
(the broadcast and the per-lane B/C paths), strided layouts, half precision, stress inputs. Small chunk
sizes make the backward recompute cross many chunk boundaries on short sequences. Plus the build
machinery: cache, missing or broken compiler, and the dispatch fallback.
"""
import itertools
import platform
import warnings

import pytest
import torch

from vim2_kernels.selective_scan import cpu_backend as cb
from vim2_kernels.selective_scan import dispatch
from scan_oracle import GRAD_NAMES, assert_matches_reference, check_empty_batch, check_tiny_delta_long_sequence
from test_torch_backend import ALL, OPTION_NAMES, SWEEP, TOLERANCE, backend_inputs, make_case

pytestmark = pytest.mark.skipif(
    cb.unavailable_reason(torch.device("cpu")) is not None,
    reason=f"cpu backend not built here: {cb.unavailable_reason(torch.device('cpu'))}",
)
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@pytest.fixture
def chunk(monkeypatch):
    def apply(size):
        monkeypatch.setattr(cb, "CHUNK_SIZE", size)
    return apply


def run_backend(cfg, x, dout, dlast):
    out, last, saved = cb.scan_forward(*(x[k] for k in ARGS), cfg["softplus"], cfg["reverse"])
    L = x["u"][0, 0].numel()
    assert saved.dtype == torch.float32 and tuple(saved.shape) == cb.saved_shape(cfg["batch"], cfg["dim"], L, cfg["N"])
    grads = cb.scan_backward(dout, dlast, *(x[k] for k in ARGS), saved, cfg["softplus"], cfg["reverse"])
    return out, last, dict(zip(GRAD_NAMES, grads))


def check_case(seed=0, **overrides):
    cfg, inputs, dout, dlast = make_case(seed, **overrides)
    x = backend_inputs(cfg, inputs)
    originals = {k: v.clone() for k, v in x.items() if v is not None}
    out, last, grads = run_backend(cfg, x, dout, dlast)
    assert_matches_reference(cfg, inputs, x, out, last, grads, dout, dlast, TOLERANCE)
    for name, value in originals.items():
        assert torch.equal(x[name], value), f"{name} was modified"
    return out, last, grads


@pytest.mark.parametrize("case", list(SWEEP), ids=list(SWEEP))
def test_lengths_and_states_match_reference(chunk, case):
    opts = dict(SWEEP[case])
    chunk(8 if opts.get("block") else cb.CHUNK_SIZE)  # a third of the cases with many short chunks
    check_case(**opts)


@pytest.mark.parametrize("mask", range(2 ** len(OPTION_NAMES)), ids=lambda m: f"opts{m:02d}")
def test_every_option_combination(chunk, mask):
    chunk(6)
    opts = {name: bool(mask >> i & 1) for i, name in enumerate(OPTION_NAMES)}
    check_case(seed=mask, Ls=(20,), N=3, dlast=bool(mask & 1), **opts)


LANES = cb.LANES  # rows per tile of the C kernels


@pytest.mark.parametrize("groups,dim,batch", [
    (1, LANES, 2),           # one full tile per batch item: B/C broadcast over the lanes
    (1, LANES + 8, 3),       # tiles that straddle batch items (per-lane B/C) and a partial last tile
    (2, 4 * LANES, 2),       # whole tiles inside each group
    (2, 12, 3),              # 6 channels per group: every tile mixes groups and batch items
    (8, 8, 2),               # one channel per group
])
def test_groups_and_tiles(chunk, groups, dim, batch):
    chunk(7)
    check_case(groups=groups, dim=dim, batch=batch, Ls=(20,), N=3, reverse=groups % 2 == 0, **ALL)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("layout,Ls", [("token_major", (33,)), ("col_major_2d", (5, 7)), ("contiguous", (6, 5))])
def test_strided_layouts(chunk, layout, Ls, reverse):
    chunk(8)
    out, _, grads = check_case(layout=layout, Ls=Ls, groups=2, dim=2 * LANES, reverse=reverse, **ALL)
    # outputs and input gradients keep the input's layout (no hidden transposes)
    cfg, inputs, _, _ = make_case(0, layout=layout, Ls=Ls, groups=2, dim=2 * LANES, reverse=reverse, **ALL)
    u = backend_inputs(cfg, inputs)["u"]
    assert out.stride() == u.stride() and grads["u"].stride() == u.stride()


@pytest.mark.parametrize("dtype,bc_dtype", [(torch.float16, None), (torch.bfloat16, None),
                                            (torch.bfloat16, torch.float32)])
def test_half_precision_inputs(chunk, dtype, bc_dtype):
    chunk(16)
    check_case(dtype=dtype, bc_dtype=bc_dtype, Ls=(65,), groups=2, dim=20, reverse=True, **ALL)


def test_stress_large_softplus_arguments_and_very_negative_A():
    out, last, grads = check_case(Ls=(65,), dim=20, delta_shift=22.0, delta_scale=3.0, A_scale=1e3, **ALL)
    for t in (out, last, *(g for g in grads.values() if g is not None)):
        assert torch.isfinite(t).all()


def test_stress_tiny_delta_over_long_sequence():
    check_tiny_delta_long_sequence(cb)


@pytest.mark.parametrize("reverse", [False, True])
def test_channel_mixer_shape(chunk, reverse):
    chunk(16)
    check_case(batch=300, dim=1, N=16, Ls=(48,), reverse=reverse, **ALL)


@pytest.mark.parametrize("threads", [1, 3])
def test_results_do_not_depend_on_thread_count(threads):
    cfg, inputs, dout, dlast = make_case(3, batch=2, dim=80, groups=2, Ls=(50,), N=4, **ALL)
    x = backend_inputs(cfg, inputs)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out, last, grads = run_backend(cfg, x, dout, dlast)
    finally:
        torch.set_num_threads(before)
    assert_matches_reference(cfg, inputs, x, out, last, grads, dout, dlast, TOLERANCE)


def test_empty_inputs():
    check_empty_batch(cb)


def test_float64_goes_to_torch_backend_without_warning(monkeypatch):
    dispatch._resolve.cache_clear()
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve_backend(None, torch.device("cpu"), torch.float64) == "torch"
        assert dispatch.resolve_backend(None, torch.device("cpu"), torch.float32) == "cpu"
    with pytest.raises(dispatch.BackendUnavailableError, match="supports float32, float16, bfloat16"):
        dispatch.resolve_backend("cpu", torch.device("cpu"), torch.float64)
    dispatch._resolve.cache_clear()


def test_state_size_limit_falls_back_or_names_the_limit(monkeypatch):
    from vim2_kernels import selective_scan_fn
    dispatch._warned.clear()
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    N = cb.MAX_D_STATE + 1
    u = torch.randn(1, 2, 5)
    args = (u, u.abs(), -torch.ones(2, N), torch.randn(1, N, 5), torch.randn(1, N, 5))
    with pytest.warns(RuntimeWarning, match=f"supports d_state .N. <= {cb.MAX_D_STATE}.*torch backend"):
        out = selective_scan_fn(*args)
    torch.testing.assert_close(out, selective_scan_fn(*args, backend="torch"))
    with pytest.raises(dispatch.BackendUnavailableError, match=f"N={N}"):
        selective_scan_fn(*args, backend="cpu")
    dispatch._warned.clear()


# ------------------------------------------------------------------------------------------- building

@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and a forgotten library, restored afterwards."""
    monkeypatch.setenv(cb.CACHE_ENV_VAR, str(tmp_path))
    cb._load.cache_clear()
    yield tmp_path
    cb._load.cache_clear()


def test_library_is_cached_per_machine(fresh_build):
    library, reason = cb._load()
    assert reason is None and library.path.parent == fresh_build
    built = library.path.stat().st_mtime_ns
    cb._load.cache_clear()
    again, _ = cb._load()
    assert again.path == library.path and again.path.stat().st_mtime_ns == built  # no second compile
    assert str(fresh_build) in cb.library_info()


def test_missing_compiler_is_explained(fresh_build, monkeypatch):
    monkeypatch.setattr(cb, "_find_compiler", lambda: None)
    reason = cb.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "no C compiler found" in reason and "$CC" in reason


def test_broken_compiler_reports_its_error(fresh_build, monkeypatch, tmp_path_factory):
    fake = tmp_path_factory.mktemp("bin") / "cc"
    fake.write_text("#!/bin/sh\necho 'fatal: simulated compiler failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    reason = cb.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "simulated compiler failure" in reason


def test_auto_falls_back_to_torch_with_one_warning_when_unbuildable(fresh_build, monkeypatch):
    from vim2_kernels import selective_scan_fn
    monkeypatch.setattr(cb, "_find_compiler", lambda: None)
    dispatch._resolve.cache_clear()
    dispatch._warned.clear()
    monkeypatch.delenv(dispatch.BACKEND_ENV_VAR, raising=False)
    u = torch.randn(1, 2, 5)
    args = (u, u.abs(), -torch.ones(2, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selective_scan_fn(*args)
        selective_scan_fn(*args)
    messages = [str(w.message) for w in caught if "vim2_kernels" in str(w.message)]
    assert len(messages) == 1 and "no C compiler found" in messages[0] and "torch backend" in messages[0]
    dispatch._resolve.cache_clear()
    dispatch._warned.clear()


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 instruction-set flag")
@pytest.mark.parametrize("disable", ["-mno-avx512f", "-mno-avx512dq"])
def test_portable_build_without_avx512_matches_the_reference(fresh_build, monkeypatch, disable):
    """Machines without AVX-512 compile the generic code paths (2^x by the float shifter, per-row lane
    sums), AVX-512 machines without DQ a rounding reduction instead of vreduceps: built here with
    -mno-avx512f / -mno-avx512dq, the scan (both B/C paths, several chunks), the low-rank cross-scan and
    the fused channel mixer still match their float64 references."""
    from test_channel_mixer import assert_matches_oracle, make_inputs
    from test_cross_scan_lowrank import lowrank_inputs, oracle, run_lowrank
    import vim2_kernels

    monkeypatch.setattr(cb, "_FLAG_SETS", (["-march=native", disable, "-fopenmp"],))
    cb._load.cache_clear()  # (importing the helpers above loaded the default build)
    library, reason = cb._load()
    assert reason is None and disable in library.description
    monkeypatch.setattr(cb, "CHUNK_SIZE", 8)
    for seed, (L, dim, groups) in enumerate(itertools.product((5, 37), (LANES - 2, 2 * LANES), (1, 2))):
        check_case(seed=seed, batch=2, dim=dim, groups=groups, Ls=(L,), N=4, **ALL)
    x = lowrank_inputs(batch=2, height=5, width=4, dim=40, d_state=4, rank=3)
    with torch.no_grad():
        got = run_lowrank(x, vim2_kernels.ROUTES, backend="cpu")
    torch.testing.assert_close(got.double(), oracle(x, vim2_kernels.ROUTES), rtol=1e-4, atol=1e-4)
    assert_matches_oracle(make_inputs(37, 19, 4))


def test_cuda_tensors_are_refused_with_reason():
    assert "CPU tensors only" in cb.unavailable_reason(torch.device("cuda"))


def test_chunk_and_lane_boundaries_exhaustively(chunk):
    # lengths around the chunk size, rows around the tile size
    chunk(4)
    for L, rows in itertools.product((3, 4, 5, 9), (LANES - 1, LANES, LANES + 1)):
        check_case(seed=L * rows, batch=1, dim=rows, Ls=(L,), N=2, reverse=L % 2 == 1, **ALL)


def test_cache_dir_falls_back_to_temp_when_home_cache_is_unusable(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.delenv(cb.CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))  # cannot be created: its parent is a file
    fallback = cb.cache_dir()
    assert fallback.name.startswith("vim2_kernels-") and blocker not in fallback.parents
    monkeypatch.setenv(cb.CACHE_ENV_VAR, str(tmp_path / "explicit"))
    assert cb.cache_dir() == tmp_path / "explicit"


def test_gradients_are_bitwise_reproducible_with_several_threads():
    # per-thread dB/dC partials: a fixed tile -> thread mapping makes reruns identical (gradient
    # checkpointing compares a recomputed backward with the original one)
    cfg, inputs, dout, dlast = make_case(4, batch=3, dim=3 * LANES + 5, groups=1, Ls=(40,), N=4, **ALL)
    x = backend_inputs(cfg, inputs)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = run_backend(cfg, x, dout, dlast)
        second = run_backend(cfg, x, dout, dlast)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(first[0], second[0])
    for name, grad in first[2].items():
        if grad is not None:
            assert torch.equal(grad, second[2][name]), name


@pytest.mark.parametrize("name", ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"])
def test_nan_inputs_reach_the_output_like_the_torch_backend(name):
    # the kernels clamp exp arguments (and are built with -ffinite-math-only): a NaN must still show
    cfg, inputs, _, _ = make_case(6, batch=2, dim=LANES + 3, Ls=(30,), N=4, softplus=True, **{
        k: v for k, v in ALL.items() if k != "softplus"})
    x = {k: (None if v is None else v.float()) for k, v in inputs.items()}
    x[name].view(-1)[5] = float("nan")
    args = [x[k] for k in ARGS]
    from vim2_kernels.selective_scan import torch_backend
    got = cb.scan_forward(*args, True, False)[0]
    want = torch_backend.scan_forward(*args, True, False)[0]
    assert want.isnan().any(), "test bug: the NaN does not reach the reference output"
    assert torch.equal(got.isnan(), want.isnan())


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("groups,dim,batch,layout,Ls,reverse", [
    (1, LANES, 2, "token_major", (33,), False),      # broadcast B/C, whole tiles
    (2, LANES + 8, 3, "col_major_2d", (5, 7), True),  # per-lane B/C, tiles straddling batch items
    (1, 12, 2, "contiguous", (6, 5), False),          # one partial tile per batch item
])
def test_backward_into_given_buffers(chunk, threads, groups, dim, batch, layout, Ls, reverse):
    """BACKWARD_INTO: du added into a given tensor (any strides), dΔ written over Δ itself: bitwise the
    gradients of a plain call (the cross-scan's backward relies on both)."""
    chunk(7)
    cfg, inputs, dout, dlast = make_case(5, groups=groups, dim=dim, batch=batch, layout=layout, Ls=Ls,
                                         reverse=reverse, **ALL)
    x = backend_inputs(cfg, inputs)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        _, _, saved = cb.scan_forward(*(x[k] for k in ARGS), cfg["softplus"], cfg["reverse"])
        plain = cb.scan_backward(dout, dlast, *(x[k] for k in ARGS), saved, cfg["softplus"], cfg["reverse"])
        earlier = torch.randn(x["u"].shape).permute(*range(x["u"].dim() - 1, -1, -1)).contiguous() \
            .permute(*range(x["u"].dim() - 1, -1, -1))  # a du of other routes, in another layout than u
        du_out, delta = earlier.clone(), x["delta"].clone()
        args = dict(x, delta=delta)
        into = cb.scan_backward(dout, dlast, *(args[k] for k in ARGS), saved, cfg["softplus"], cfg["reverse"],
                                du_out=du_out, accumulate_du=True, ddelta_out=delta)
    finally:
        torch.set_num_threads(before)
    assert into[0] is du_out and into[1] is delta
    torch.testing.assert_close(du_out, earlier + plain[0], rtol=0, atol=0)
    assert torch.equal(delta, plain[1])  # Δ overwritten by dΔ, read before written
    for a, b in zip(into[2:], plain[2:]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_backward_into_rejects_mismatched_buffers():
    cfg, inputs, dout, dlast = make_case(0, Ls=(9,), dim=4, **ALL)
    x = backend_inputs(cfg, inputs)
    _, _, saved = cb.scan_forward(*(x[k] for k in ARGS), cfg["softplus"], cfg["reverse"])
    call = lambda **kw: cb.scan_backward(dout, dlast, *(x[k] for k in ARGS), saved, cfg["softplus"],
                                         cfg["reverse"], **kw)
    with pytest.raises(ValueError, match="du_out must be a float32 tensor of shape"):
        call(du_out=torch.zeros(x["u"].shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="ddelta_out must be a float32 tensor of shape"):
        call(ddelta_out=torch.zeros(3))
    with pytest.raises(ValueError, match="accumulate_du needs du_out"):
        call(accumulate_du=True)
