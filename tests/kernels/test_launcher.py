"""kernels/launcher.py: `launch(kernel, grid, ...)` equals `kernel[grid](...)`, bit for bit.

On the CPU (Triton's interpreter) every launch takes Triton's own path; what is checked there is
that fallback, the specialization key (it must split wherever Triton compiles a different kernel:
ints 1 / multiples of 16 / others and their 32/64-bit range, pointer alignment, dtypes, constexpr
values and types, launch options), the binding of arguments, the version gate and the
`cached_launch` switch (off: every call is `kernel[grid]`). The `gpu`
tests run the cached path against plain launches of a test kernel and of the RMSNorm and SwiGLU
forward kernels, over changing sizes, an unaligned view, a side stream and a CUDA graph, and count
how many launches went through Triton (one per specialization).
"""

import logging

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from tuneforge import switches
from tuneforge.kernels import launcher
from tuneforge.kernels.launcher import argument_token, launch, triton_version_verified

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _affine(X, Y, n, scale, shift, BLOCK: tl.constexpr, ADD: tl.constexpr = True):
    # y = x * scale (+ shift): an int, a float, two pointers, a constexpr with a default.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) * scale
    if ADD:
        y = y + shift
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


_affine_kernel = triton.jit(_affine)


def _affine_args(x, y, block=128):
    n = x.numel()
    return (triton.cdiv(n, block),), (x, y, n, 0.5, 1.25), {"BLOCK": block}


@pytest.fixture
def fresh_plans():
    """Each test starts with no cached kernels, so that it can count Triton's own launches."""
    saved = dict(launcher._PLANS)
    launcher._PLANS.clear()
    yield
    launcher._PLANS.clear()
    launcher._PLANS.update(saved)


# ---------------------------------------------------------------- CPU: fallback, key, binding, gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 100, 1000])
def test_launch_equals_plain_launch(n, dtype, fresh_plans):
    x = torch.randn(n, device=DEVICE).to(dtype)
    grid, args, kw = _affine_args(x, torch.empty_like(x))
    expected = torch.empty_like(x)
    _affine_kernel[grid](x, expected, *args[2:], **kw)
    launch(_affine_kernel, grid, *args, **kw)
    launch(_affine_kernel, grid, *args, **kw)  # on CUDA: the cached path
    assert torch.equal(args[1], expected)


def test_fallback_logs_one_line_per_kernel(caplog, fresh_plans):
    if launcher._BLOCKER is None:
        pytest.skip("the cached path is open on this machine")
    x = torch.randn(64)
    grid, args, kw = _affine_args(x, torch.empty_like(x))
    with caplog.at_level(logging.INFO, logger=launcher.__name__):
        for _ in range(3):
            launch(_affine_kernel, grid, *args, **kw)
    lines = [r.getMessage() for r in caplog.records if r.name == launcher.__name__]
    assert len(lines) == 1 and "_affine" in lines[0] and launcher._BLOCKER in lines[0]


def test_int_tokens_split_where_triton_specializes():
    # 1 becomes a constexpr; other ints split on 16 | n and on i32 / i64 / u64.
    tokens = [argument_token(v) for v in (1, 16, 17, 32, 0, -16, 2**31, 2**31 + 1, 2**63, 2**63 + 1)]
    assert tokens[0] != tokens[1] != tokens[2] and tokens[0] != tokens[2]
    assert tokens[1] == tokens[3] == tokens[4] == tokens[5]  # all multiples of 16 in i32
    assert len({tokens[1], tokens[2], tokens[6], tokens[7], tokens[8], tokens[9]}) == 6
    assert argument_token(17) == argument_token(2**31 - 1)
    with pytest.raises(launcher._Unsupported):
        argument_token(2**64)


def test_tensor_tokens_split_on_alignment_and_dtype():
    buf = torch.zeros(64, dtype=torch.float16)
    assert buf.data_ptr() % 16 == 0
    assert argument_token(buf) == argument_token(buf[8:])  # 16 bytes in: still aligned
    assert argument_token(buf) != argument_token(buf[1:])  # 2 bytes in
    assert argument_token(buf) != argument_token(buf.view(torch.bfloat16))
    assert argument_token(buf) != argument_token(torch.zeros(32, dtype=torch.float32))


def test_scalar_tokens_and_unsupported_types():
    assert argument_token(True) == argument_token(False) != argument_token(1)
    assert argument_token(0.5) == argument_token(3.0) != argument_token(3)
    assert argument_token(None) is None
    for value in [(1, 2), "text", torch.float32]:
        with pytest.raises(launcher._Unsupported):
            argument_token(value)


def test_binder_orders_arguments_like_the_signature(fresh_plans):
    plan = launcher._plan(JITFunction(_affine))
    x, y = torch.zeros(4), torch.zeros(4)
    assert plan.names == ("X", "Y", "n", "scale", "shift", "BLOCK", "ADD")
    full, _, options = plan.binder(x, y, 4, 0.5, 1.0, BLOCK=64, num_warps=2)
    assert full == (x, y, 4, 0.5, 1.0, 64, True) and options == {"num_warps": 2}  # ADD's default
    full, _, options = plan.binder(x, y, shift=1.0, ADD=False, scale=0.5, n=4, BLOCK=64)
    assert full == (x, y, 4, 0.5, 1.0, 64, False) and options == {}
    for args, kw in [((x, y, 4, 0.5, 1.0), {}), ((x, y, 4, 0.5, 1.0, 64), {"n": 4}),
                     ((x, y, 4, 0.5, 1.0, 64, True, 0), {})]:
        with pytest.raises(TypeError):  # missing BLOCK, n twice, one too many: Triton refuses them too
            plan.binder(*args, **kw)


def test_key_covers_constexpr_values_and_their_types(fresh_plans):
    plan = launcher._plan(JITFunction(_affine))
    x = torch.zeros(16)
    key = lambda n, block, add=True: plan.binder(x, x, n, 0.5, 1.0, block, add)[1]  # noqa: E731
    assert key(16, 128) == key(32, 128)  # same specialization: one kernel
    assert key(16, 128) != key(17, 128) and key(16, 128) != key(16, 256)
    assert key(16, 128, True) != key(16, 128, 1)  # equal in Python, compiled apart
    # Everything but the constexprs goes through argument_token.
    assert key(16, 128) == (argument_token(x),) * 2 + (argument_token(16), "fp32", "fp32", int, 128, bool, True)


def test_only_verified_triton_versions_take_the_cached_path(monkeypatch):
    assert triton_version_verified("3.6.0") and triton_version_verified("3.9.0")
    assert triton_version_verified("3.9.1+git0abc") and triton_version_verified("3.6.0rc1")
    assert triton_version_verified("3.6rc1") and not triton_version_verified("3.61.0")
    for version in ("3.5.1", "3.7.0", "3.8.0", "3.10.0", "4.0.0", "", "dev"):
        assert not triton_version_verified(version)
    monkeypatch.setattr(launcher, "TRITON_INTERPRETER", False)
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    assert "3.7.0" in launcher._fast_path_blocker()


def _faked_cached_path(monkeypatch):
    """A kernel whose Triton launch is faked (it records (grid, args, options) in `launched` and
    returns a fake CompiledKernel whose launcher records its call in `ran`), with the cached path
    open as on a CUDA machine: device 0, stream 1234. Returns (kernel, compiled, launched, ran)."""
    launched, ran = [], []
    compiled = object.__new__(launcher._CompiledKernel)
    compiled.module, compiled.function, compiled.packed_metadata = None, 0xF00, (4, 1, 0)
    compiled._run = lambda *call: ran.append(call)
    kernel = JITFunction(_affine)
    monkeypatch.setattr(kernel, "run", lambda *a, grid, warmup, **kw: launched.append((grid, a, kw)) or compiled)
    monkeypatch.setattr(launcher, "_BLOCKER", None)
    monkeypatch.setattr(launcher.torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(launcher, "_raw_stream", lambda device: 1234)
    return kernel, compiled, launched, ran


def test_cached_call_is_tritons_launcher_call(monkeypatch, fresh_plans):
    """The cached path with Triton's compiled kernel faked: the first launch goes through
    `kernel[grid]`; the next calls `compiled.run(grid0, grid1, grid2, stream, function,
    packed_metadata, launch_metadata=None, enter_hook=None, exit_hook=None, *every_argument)`,
    the constexprs and defaults included, as JITFunction.run does in Triton 3.6 and 3.9."""
    kernel, compiled, launched, ran = _faked_cached_path(monkeypatch)
    x, y = torch.zeros(64), torch.zeros(64)
    assert launch(kernel, (3,), x, y, 64, 0.5, 1.0, BLOCK=32, num_warps=4) is compiled
    assert launched == [((3,), (x, y, 64, 0.5, 1.0), {"BLOCK": 32, "num_warps": 4})] and ran == []
    assert launch(kernel, (5, 2), x, y, 48, 0.5, 2.0, BLOCK=32, num_warps=4) is compiled
    assert len(launched) == 1
    assert ran == [(5, 2, 1, 1234, 0xF00, (4, 1, 0), None, None, None, x, y, 48, 0.5, 2.0, 32, True)]
    launch(kernel, lambda meta: (meta["n"] // meta["BLOCK"],), x, y, 64, 0.5, 1.0, BLOCK=32, num_warps=4)
    assert ran[-1][:3] == (2, 1, 1)
    # A new specialization goes through Triton first: n no longer a multiple of 16, other
    # launch options, another device.
    launch(kernel, (3,), x, y, 65, 0.5, 1.0, BLOCK=32, num_warps=4)
    launch(kernel, (3,), x, y, 64, 0.5, 1.0, BLOCK=32, num_warps=8)
    monkeypatch.setattr(launcher.torch.cuda, "current_device", lambda: 1)
    launch(kernel, (3,), x, y, 64, 0.5, 1.0, BLOCK=32, num_warps=4)
    assert len(launched) == 4 and len(ran) == 2
    # A launch hook (a profiler's) sends every call through Triton, which calls it.
    hook = lambda metadata: None  # noqa: E731
    launcher._knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch(kernel, (3,), x, y, 64, 0.5, 1.0, BLOCK=32, num_warps=4)
    finally:
        launcher._knobs.runtime.launch_enter_hook.remove(hook)
    assert len(launched) == 5 and len(ran) == 2
    launch(kernel, (3,), x, y, 64, 0.5, 1.0, BLOCK=32, num_warps=4)
    assert len(launched) == 5 and len(ran) == 3


def test_switch_off_takes_tritons_launch(monkeypatch, fresh_plans):
    """TUNEFORGE_CACHED_LAUNCH=0: every call is `kernel[grid](...)` (no plan made), also for a
    specialization already cached; `switches.resolve()` with the variable set back is honoured from
    the next launch."""
    kernel, compiled, launched, ran = _faked_cached_path(monkeypatch)
    monkeypatch.setattr(switches, "_current", [])  # resolve() below fills this one; restored after
    x, y = torch.zeros(64), torch.zeros(64)
    args, kw = (x, y, 64, 0.5, 1.0), {"BLOCK": 32, "num_warps": 4}
    monkeypatch.setenv("TUNEFORGE_CACHED_LAUNCH", "1")
    assert switches.resolve().cached_launch
    launch(kernel, (3,), *args, **kw)
    launch(kernel, (3,), *args, **kw)
    assert len(launched) == 1 and len(ran) == 1  # filled, then cached
    monkeypatch.setenv("TUNEFORGE_CACHED_LAUNCH", "0")
    assert not switches.resolve().cached_launch
    for _ in range(3):
        assert launch(kernel, (3,), *args, **kw) is compiled
    assert launched == [((3,), args, kw)] * 4 and len(ran) == 1
    fresh = JITFunction(_affine)
    monkeypatch.setattr(fresh, "run", lambda *a, grid, warmup, **kw: launched.append((grid, a, kw)) or compiled)
    launch(fresh, (3,), *args, **kw)
    assert id(fresh) not in launcher._PLANS and len(launched) == 5
    monkeypatch.setenv("TUNEFORGE_CACHED_LAUNCH", "1")
    switches.resolve()
    launch(kernel, (3,), *args, **kw)
    assert len(launched) == 5 and len(ran) == 2


# ---------------------------------------------------------------- GPU: the cached path


def _count_triton_launches(monkeypatch, kernel):
    """A list that grows by one on every launch that goes through `kernel[grid]`."""
    calls = []
    run = kernel.run

    def counting(*args, **kwargs):
        calls.append(1)
        return run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", counting)
    return calls


def _cached_equals_plain(kernel, grid, args, kw, outputs):
    """Runs `kernel` plainly, then twice through `launch` (fill, cached), on the same inputs;
    asserts the outputs (indices into args) are bit-equal each time."""
    kernel[grid](*args, **kw)
    expected = [args[i].clone() for i in outputs]
    for _ in range(2):
        for i in outputs:
            args[i].fill_(float("nan"))
        launch(kernel, grid, *args, **kw)
        for i, want in zip(outputs, expected):
            assert torch.equal(args[i], want), kernel


@pytest.mark.gpu
def test_gpu_one_triton_launch_per_specialization(monkeypatch, fresh_plans):
    assert launcher._BLOCKER is None, launcher._BLOCKER
    calls = _count_triton_launches(monkeypatch, _affine_kernel)
    # Each size / dtype / alignment / constexpr differs from the ones before in what Triton
    # specializes: n == 1, 16 | n, n odd, a bf16 pointer, an unaligned pointer, ADD=False.
    cases = [(torch.float32, 1, 0, {}), (torch.float32, 4096, 0, {}), (torch.float32, 1001, 0, {}),
             (torch.bfloat16, 1001, 0, {}), (torch.float32, 1001, 1, {}), (torch.float32, 1001, 0, {"ADD": False})]
    for dtype, n, offset, extra in cases:
        before = len(calls)
        x = torch.randn(n + offset, device="cuda").to(dtype)[offset:]
        grid, args, kw = _affine_args(x, torch.empty_like(x))
        _cached_equals_plain(_affine_kernel, grid, args, kw | extra, outputs=[1])
        assert len(calls) == before + 2  # the plain launch and launch's first; the second was cached
    # New data, same specialization as the second case: cached, and reads the new tensors.
    x = torch.randn(4096, device="cuda")
    grid, args, kw = _affine_args(x, torch.empty_like(x))
    before = len(calls)
    launch(_affine_kernel, grid, *args, **kw)
    assert len(calls) == before
    assert torch.equal(args[1], x * 0.5 + 1.25)


@pytest.mark.gpu
def test_gpu_hooks_take_triton_launch(monkeypatch, fresh_plans):
    from triton import knobs

    x = torch.randn(256, device="cuda")
    grid, args, kw = _affine_args(x, torch.empty_like(x))
    launch(_affine_kernel, grid, *args, **kw)  # cached from here on
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        launch(_affine_kernel, grid, *args, **kw)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert len(seen) == 1


@pytest.mark.gpu
def test_gpu_side_stream_and_cuda_graph(fresh_plans):
    x = torch.randn(4096, device="cuda")
    y = torch.empty_like(x)
    grid, args, kw = _affine_args(x, y)
    launch(_affine_kernel, grid, *args, **kw)  # compiled and cached
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y.zero_()
        launch(_affine_kernel, grid, *args, **kw)  # must run on `stream`, after its zero_()
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(y, x * 0.5 + 1.25)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(_affine_kernel, grid, *args, **kw)
    x.copy_(torch.randn(4096, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, x * 0.5 + 1.25)


# (rows, hidden, offset): the Llama-1B width, an odd width with a partial tile, an unaligned view.
RMS_CASES = [(64, 2048, 0), (7, 1000, 0), (33, 576, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_rms_norm_forward_kernel(dtype, monkeypatch, fresh_plans):
    from tuneforge.kernels._utils import row_tile_launch
    from tuneforge.kernels.rms_norm import _rms_norm_fwd_kernel

    calls = _count_triton_launches(monkeypatch, _rms_norm_fwd_kernel)
    for n_rows, hidden, offset in RMS_CASES:
        # The arguments RMSNormFunction.forward passes (Llama: offset 0, cast before the weight).
        x = torch.randn(n_rows * hidden + offset, device="cuda").to(dtype)[offset:].view(n_rows, hidden)
        weight = torch.randn(hidden, device="cuda").to(dtype)
        y = torch.empty_like(x)
        rstd = torch.empty(n_rows, dtype=torch.float32, device="cuda")
        block, rows, num_warps = row_tile_launch(hidden)
        args = (x, weight, y, rstd, x.stride(0), y.stride(0), n_rows, hidden, 1e-6, 0.0)
        kw = dict(BLOCK=block, ROWS=rows, CAST_BEFORE_WEIGHT=True, EVEN=block == hidden and n_rows % rows == 0,
                  num_warps=num_warps)
        before = len(calls)
        _cached_equals_plain(_rms_norm_fwd_kernel, (triton.cdiv(n_rows, rows),), args, kw, outputs=[2, 3])
        assert len(calls) == before + 2


SWIGLU_CASES = [(1 << 20, 0), (5000, 0), (4097, 1)]  # (elements, offset): 4096-blocks, 1024-blocks, unaligned


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_swiglu_forward_kernel(dtype, monkeypatch, fresh_plans):
    from tuneforge.kernels._utils import elementwise_launch
    from tuneforge.kernels.swiglu import _swiglu_fwd_kernel

    calls = _count_triton_launches(monkeypatch, _swiglu_fwd_kernel)
    for n, offset in SWIGLU_CASES:
        # The arguments gated_forward passes.
        gate = torch.randn(n + offset, device="cuda").to(dtype)[offset:]
        up = torch.randn(n, device="cuda").to(dtype)
        out = torch.empty_like(up)
        block, num_warps = elementwise_launch(n)
        before = len(calls)
        _cached_equals_plain(_swiglu_fwd_kernel, (triton.cdiv(n, block),), (gate, up, out, n),
                             dict(BLOCK=block, num_warps=num_warps), outputs=[2])
        assert len(calls) == before + 2
