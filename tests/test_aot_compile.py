"""Every Triton kernel compiled ahead of time for real GPUs (sm_80, sm_90, sm_100), on CPU.

The launches compiled are the launchers' own descriptions (``fastbyol_kernels.launches``),
signatures specialised as Triton's JIT would at launch. Checked: it compiles, no local
memory (spills), registers <= ``aot.MAX_REGISTERS``, 128-bit loads/stores where the data is
aligned. The default suite compiles every kernel x dtype x flag for sm_90 (the lent H200)
and one variant per kernel for sm_80 and sm_100; ``-m slow`` compiles the whole grid
(R18/R50 EMA, loss B 32...4096 x D 128/256/4096) for all three. Compiled kernels are cached
in Triton's cache dir, so a second run costs a few seconds.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from fastbyol_kernels import aot, byol_loss, ema_update_, normalized_l2_loss
from fastbyol_kernels import launches as launches_mod
from fastbyol_kernels.augment import PARAM_COLUMNS, photometric

CAPS = list(aot.CAPABILITIES[1:2]) + [c for c in aot.CAPABILITIES if c != aot.CAPABILITIES[1]]  # sm_90 first
DEFAULT_CC = CAPS[0]
_EMA = aot.ema_specialisations()
_LOSS = aot.loss_specialisations([(4096, 256)], aot.LOSS_DTYPES)
_QUICK = [f"{launch.label()}@{cc}" for launch, cc in aot.selection("quick", CAPS)]


def _compile(*args, timeout=900):
    """``python -m fastbyol_kernels.aot ARGS --json`` in a process that does not interpret
    (compiling needs triton imported without TRITON_INTERPRET); returns (exit code, results)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "aot.json")
        res = subprocess.run([sys.executable, "-m", "fastbyol_kernels.aot", *args, "--json", out], env=env,
                             capture_output=True, text=True, timeout=timeout)
        assert os.path.exists(out), res.stdout[-3000:] + res.stderr[-3000:]
        with open(out) as fh:
            return res.returncode, json.load(fh)


@pytest.fixture(scope="module")
def quick():
    return _compile("--set", "quick", "--cc", *map(str, CAPS))[1]


@pytest.mark.parametrize("key", _QUICK)
def test_compiles_without_spills_in_bounds_and_vectorised(quick, key):
    assert key in quick, "the selection differs between this process and the compiler's"
    assert quick[key]["problems"] == []


def test_quick_selection_covers_every_kernel_dtype_flag():
    labels = {k.split("@")[0] for k in _QUICK if k.endswith(f"@{DEFAULT_CC}")}
    assert {x.label() for x in _EMA} <= labels  # every EMA dtype pair x momentum x alignment
    assert {x.label() for x in aot.lars_specialisations()} <= labels  # LARS: dtype x adapt x alignment
    flags = {_shape_free(x) for x in _LOSS}
    assert flags <= {_shape_free(x) for x, cc in aot.selection("quick", CAPS) if cc == DEFAULT_CC}
    assert {k.split("@")[1] for k in _QUICK} == {str(c) for c in aot.CAPABILITIES}


# Found by the whole grid (triton 3.7.1, 2026-12-02): with Triton's ptxas flags
# (--regAllocOptLevel=2) the one-pair backward (normalized_l2_loss; BYOL's symmetric loss
# is not affected) in bf16 at a B that is not a multiple of 16 spills 4 bytes on sm_100
# (ptxas -v: "8 bytes stack frame, 4 bytes spill stores") at 40 registers.
KNOWN = ("loss_bwd[B=1000,D=256,TWO_PAIRS=False,NEED_P=True,NEED_Z=False,BLOCK_B=8,BLOCK_D=256|bfloat16/float32|w4]@100",
         "loss_bwd[B=1000,D=256,TWO_PAIRS=False,NEED_P=False,NEED_Z=True,BLOCK_B=8,BLOCK_D=256|bfloat16/float32|w4]@100")


@pytest.mark.slow
def test_whole_grid_compiles_for_every_generation():
    _, results = _compile("--set", "full", timeout=3600)
    assert len(results) > 400
    bad = {k: r["problems"] for k, r in results.items() if r["problems"] and k not in KNOWN}
    assert bad == {}
    for k in KNOWN:  # still there? (if fixed, drop it from KNOWN)
        assert "stack" in " ".join(results[k]["problems"]), k


def _model_launches(backbone):
    """The EMA launches of a BYOL target update (fp32 weights; and bf16/fp16 onlines)."""
    from fastbyol.model import BYOL

    with torch.device("meta"):
        model = BYOL(backbone, cifar_stem=False)
    # Uninitialised CPU memory of the parameters' shapes: real, distinct addresses, built fast.
    pairs = [(torch.empty_like(t, device="cpu"), torch.empty_like(o, device="cpu"))
             for t, o in zip(model.target.parameters(), model.online.parameters())]
    targets, onlines = [t for t, _ in pairs], [o for _, o in pairs]
    out = aot.ema_launches_for(targets, onlines, 0.99)
    for tau in (torch.zeros(()), torch.zeros((), dtype=torch.float64)):
        out += aot.ema_launches_for(targets, onlines, tau)
        for dtype in (torch.bfloat16, torch.float16):
            out += aot.ema_launches_for(targets, [o.to(dtype) for o in onlines], tau)
    return out


def test_resnet_target_updates_are_aligned_and_covered():
    # What R18/R50 launch is among the specialisations compiled above: one aligned fp32 group.
    keys = {aot.compile_key(x) for x in _EMA}
    for backbone in ("resnet18",):  # resnet50: the same groups (slow to build even on meta)
        launches = _model_launches(backbone)
        assert all(x.constexprs["ALIGNED"] for x in launches)
        assert {aot.compile_key(x) for x in launches} <= keys


def test_signature_follows_tritons_own_specialisation():
    # Our rules for what the JIT specialises (1 -> constant, % 16 -> divisibility) against
    # Triton's own implementation, where this Triton exposes it.
    native = pytest.importorskip("triton._C.libtriton").__dict__.get("native_specialize_impl")
    if native is None:
        pytest.skip("this triton has no native_specialize_impl")
    from triton.backends.compiler import BaseBackend

    values = {}
    for launch in _EMA[:4] + _LOSS[:6] + aot.loss_launches_for(33, 100, torch.bfloat16):
        values.update({f"{launch.kernel}.{k}": v for k, v in launch.args.items()})
    values["unaligned"] = torch.empty(9)[1:]
    values.update({"one": 1, "big": 2 ** 40, "float": 0.5})
    for name, v in values.items():
        for specialise in (True, False):
            ty, div16 = aot.arg_specialisation(v, specialise)
            want_ty, want_attr = native(BaseBackend, v, False, specialise, True)
            assert ty == want_ty, name
            if ty != "constexpr":
                assert div16 == (want_attr == "D"), name


def _record_launches(monkeypatch):
    seen = []
    real = launches_mod.Launch.run

    def run(self, fn=None):
        seen.append(self)
        return real(self, fn)

    monkeypatch.setattr(launches_mod.Launch, "run", run)
    return seen


def _shape_free(launch):
    """What a launch specialises on besides its sizes: kernel, flags, dtypes, alignment."""
    flags = {k: str(v) for k, v in launch.constexprs.items() if not k.startswith("BLOCK")}
    args = {k: (str(v.dtype), v.data_ptr() % 16 == 0) for k, v in launch.args.items() if isinstance(v, torch.Tensor)}
    return launch.kernel, tuple(sorted(flags.items())), tuple(sorted(args.items())), launch.num_warps


def test_what_the_api_launches_is_what_is_compiled(monkeypatch):
    # Drive the public entry points through every flag (tiny sizes, interpreter) and record
    # the launches they make: each must match a specialisation the compile tests cover.
    seen = _record_launches(monkeypatch)
    for dtype in aot.LOSS_DTYPES:
        for grads in ((True, False), (True, True), (False, True)):  # which of predictions, targets
            p1, p2, z1, z2 = (torch.randn(4, 32, dtype=dtype, requires_grad=grads[i // 2]) for i in range(4))
            byol_loss(p1, p2, z1, z2, backend="triton").backward()
            normalized_l2_loss(p1, z1, backend="triton").sum().backward()
    n_ema = 0
    for t_dtype, o_dtype in aot.EMA_DTYPE_PAIRS:
        for momentum in (0.9, torch.tensor(0.9), torch.tensor(0.9, dtype=torch.float64)):
            for offset in (0, 1):
                for stochastic in (False, True):
                    t, o = torch.randn(70, dtype=t_dtype)[offset:], torch.randn(70, dtype=o_dtype)[offset:]
                    ema_update_([t], [o], momentum, backend="triton", stochastic_rounding=stochastic, seed=3)
                    n_ema += 1
    assert len(seen) == 3 * 3 * 4 + n_ema
    n_aug = len(seen)
    crops = torch.randint(0, 256, (5, 2, 3, 8, 8), dtype=torch.uint8)
    params = torch.zeros(5, len(PARAM_COLUMNS))
    for out_dtype in aot.AUGMENT_OUT_DTYPES:
        for channels_last in (False, True):
            for blurred in (None, np.array([1])):
                photometric(crops[:, 1], params, (0.5,) * 3, (0.25,) * 3, out_dtype=out_dtype, blurred=blurred,
                            sigma=None if blurred is None else [1.0], kernel_size=3, channels_last=channels_last,
                            backend="triton")
    photometric(torch.rand(5, 3, 8, 8), params, (0.5,) * 3, (0.25,) * 3, blurred=np.array([0, 3]),
                sigma=[1.0, 2.0], kernel_size=3, backend="triton")
    assert len(seen) - n_aug == 6 * (2 + 3) + 3  # passes 0 and 1, and pass 2 where a sample is blurred
    covered = {_shape_free(x) for x in _EMA + _LOSS + aot.augment_specialisations()}
    missing = {_shape_free(x) for x in seen} - covered
    assert not missing, missing


# ----------------------------------------------------------------------------- the check itself

EMA_SOURCE = open(aot.os.path.join(aot._HERE, "_triton_ema.py")).read()


def _mutant(old, new, count=1):
    src = re.sub(old, new, EMA_SOURCE)
    assert len(re.findall(old, EMA_SOURCE)) == count, "the kernel changed: update this test's edit"
    return src


def _run_interpreted(source):
    """The altered kernel under the interpreter on a tensor of several blocks: right or not?"""
    fn = aot.load_module("_triton_ema", source, interpret=True).ema_kernel
    t, o = torch.randn(2 * launches_mod.EMA_BLOCK + 5), torch.randn(2 * launches_mod.EMA_BLOCK + 5)
    expected = 0.75 * t.double() + 0.25 * o.double()
    for launch in aot.ema_launches_for([t], [o], 0.75):
        launch.run(fn)
    torch.testing.assert_close(t.double(), expected)


def _compile_altered(source, only):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "_triton_ema.py")
        with open(path, "w") as fh:
            fh.write(source)
        return _compile("--set", "quick", "--cc", str(DEFAULT_CC), "--only", only, "--replace", f"_triton_ema={path}")


_FP32_ALIGNED = "T_DTYPE=f32,O_DTYPE=f32,M_IS_TENSOR=True,ALIGNED=True,STOCHASTIC=False,BLOCK=4096|float32/"


def test_a_kernel_only_the_interpreter_accepts_fails_the_check():
    # A helper without @triton.jit (an easy slip): the interpreter calls it as Python, the
    # compiler refuses it.
    broken = _mutant(r"    pid = tl\.program_id\(0\)\n", "    pid = _program(0)\n") + (
        "\n\ndef _program(axis):\n    return tl.program_id(axis)\n")
    _run_interpreted(broken)  # the interpreter runs it, and the result is right
    code, results = _compile_altered(broken, _FP32_ALIGNED)
    (only,) = results.values()
    assert code == 1 and "does not compile" in only["problems"][0]


def test_a_kernel_that_loses_vectorisation_fails_the_check():
    # Without the alignment hint the addresses read from the table are of unknown alignment.
    unhinted = _mutant(r"tl\.multiple_of\((\w+), 16\)", r"\1", count=2)
    _run_interpreted(unhinted)
    code, results = _compile_altered(unhinted, _FP32_ALIGNED)
    (only,) = results.values()
    assert code == 1 and len(only["problems"]) == 1 and "128-bit" in only["problems"][0]
    assert only["vector_loads"] == 0


def test_a_spilling_or_register_hungry_kernel_fails_the_check(quick):
    r = quick[f"{next(x for x in _EMA if _FP32_ALIGNED in x.label()).label()}@{DEFAULT_CC}"]
    c = aot.Compiled("ema", DEFAULT_CC, r["registers"], 0, 0, 0, "ld.global.v4.b32 st.global.v4.b32")
    assert aot.problems(c, (True, True)) == [] and r["vector_loads"] >= 4 and r["vector_stores"] >= 2
    assert "registers per thread" in aot.problems(c, (True, True), max_registers=c.registers - 1)[0]
    spilled = aot.Compiled("ema", DEFAULT_CC, c.registers, 0, 64, 0, c.ptx)
    assert "local memory" in aot.problems(spilled, (True, True))[0]
    assert "128-bit" in aot.problems(aot.Compiled("ema", DEFAULT_CC, 40, 0, 0, 0, "ld.global.b32"), (True, True))[0]


def test_what_lars_launches_is_what_is_compiled(monkeypatch):
    # fastbyol's LARS through fp32/fp64, weights and excluded, aligned or not (interpreter, tiny).
    from fastbyol_kernels.lars import lars_step_

    seen = _record_launches(monkeypatch)
    for dtype in aot.LARS_DTYPES:
        for offset in (0, 1):
            for adapt in (True, False):
                w, g, b = (torch.randn(70, dtype=dtype)[offset:] for _ in range(3))
                lars_step_([w], [g], [b], lr=0.1, momentum=0.9, weight_decay=1e-4, trust_coefficient=1e-3,
                           adapt=adapt, backend="triton")
    assert len(seen) == 2 * 2 * 4  # adapted: norms, their sums, update; excluded: update
    missing = {_shape_free(x) for x in seen} - {_shape_free(x) for x in aot.lars_specialisations()}
    assert not missing, missing
