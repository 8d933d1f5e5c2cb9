"""Ahead-of-time compilation of the package's Triton launches for real GPUs, without a GPU.

:func:`compile_launch` compiles one :class:`~.launches.Launch` (the description the
launchers run) for an NVIDIA compute capability with ``triton.compile`` (ptxas ships inside
triton), and reads the result back: registers, stack, local memory (spills) and shared
memory from ``cuobjdump -res-usage``, and the 128-bit global loads and stores in the PTX.
:func:`problems` says what is wrong with a result. The signature handed to the compiler
follows Triton's own launch-time specialisation (:func:`signature_of`): integers equal to 1
become constants, integers and tensor addresses divisible by 16 carry that divisibility, so
what compiles here is what the JIT would compile for the same arguments on a GPU.

Compiling needs a process where triton was imported without ``TRITON_INTERPRET=1``:
Triton's own ``@triton.jit`` helpers (the combine functions of ``tl.sum``, ...) are
interpreted objects otherwise, and the compiler fails on them. The test suite interprets,
so it runs this module's command line in a subprocess. Compiled kernels land in Triton's
cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), so a second run costs little.

Command line: ``python -m fastbyol_kernels.aot [--cc 80 90 100] [--set full|quick]
[--json FILE] [--only TEXT] [--replace MODULE=FILE]`` compiles the chosen specialisations
and prints one row per kernel and capability; exit status 1 if anything is wrong.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .launches import (EMA_BLOCK, Launch, _tl_dtype, ema_launch, lars_norms_launches, lars_update_launch, loss_bwd_launch,
                       loss_fwd_launch, photometric_launches)

CAPABILITIES = (80, 90, 100)  # A100, H100/H200, B200
MAX_REGISTERS = 128  # per thread: 8 warps x 128 = half of an SM's register file, >= 2 blocks resident
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8"}
_HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- signature

def arg_specialisation(value, specialise: bool = True) -> Tuple[str, bool]:
    """``(type, divisible_by_16)`` of one runtime argument as Triton's launcher specialises it
    (``("constexpr", False)`` for the integer 1, which Triton turns into a constant), or, for
    a parameter in the kernel's ``do_not_specialize``, only its type."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _TYPES:
            raise ValueError(f"no Triton pointer type for {value.dtype}")
        return "*" + _TYPES[value.dtype], specialise and value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        raise ValueError("a bool runtime argument: pass it as a constexpr")
    if isinstance(value, int):
        if value == 1 and specialise:
            return "constexpr", False
        ty = "i32" if -2 ** 31 <= value < 2 ** 31 else ("i64" if -2 ** 63 <= value < 2 ** 63 else "u64")
        return ty, specialise and value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise ValueError(f"unsupported runtime argument {type(value).__name__}")


def _unspecialised(fn) -> set:
    """Names of the kernel's ``do_not_specialize`` parameters."""
    return {p.name for p in getattr(fn, "params", []) if getattr(p, "do_not_specialize", False)}


def signature_of(launch: Launch, arg_names: Sequence[str], unspecialised: Iterable[str] = ()):
    """``(signature, constexprs, attrs)`` for ``ASTSource``, checking that the launch names
    exactly the kernel's parameters (``arg_names``), in order."""
    unspecialised = set(unspecialised)
    given = list(launch.args) + list(launch.constexprs)
    if sorted(given) != sorted(arg_names) or list(launch.args) != [n for n in arg_names if n in launch.args]:
        raise ValueError(f"{launch.kernel}: the launch passes {given}, the kernel takes {list(arg_names)}")
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for i, name in enumerate(arg_names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            continue
        ty, div16 = arg_specialisation(launch.args[name], name not in unspecialised)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = launch.args[name]
        elif div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


# ----------------------------------------------------------------------------- compiling

@contextlib.contextmanager
def _interpret(on: bool):
    """``TRITON_INTERPRET`` set for the block (``@triton.jit`` reads it when it decorates)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


@functools.lru_cache(maxsize=None)
def load_module(module: str, source: Optional[str] = None, interpret: bool = False):
    """The kernels' module, loaded afresh in compiled mode (JITFunctions even under
    TRITON_INTERPRET=1), or interpreted; ``source``: replacement text of that module (tests
    of this check run altered kernels through it)."""
    path = os.path.join(_HERE, module + ".py")
    if source is not None:
        tmp = tempfile.mkdtemp(prefix="fastbyol_aot_")
        path = os.path.join(tmp, module + ".py")
        with open(path, "w") as fh:
            fh.write(source)
    digest = hashlib.sha1((source or path).encode()).hexdigest()[:12]
    with _interpret(interpret):
        spec = importlib.util.spec_from_file_location(f"_fastbyol_aot_{module}_{digest}_{int(interpret)}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else (shutil.which(name) or name)


@dataclass
class Compiled:
    """What one compiled specialisation uses (per thread: registers; per block: the rest, bytes)."""

    label: str
    cc: int
    registers: int
    stack: int
    local: int  # local memory: register spills and local arrays
    shared: int
    ptx: str

    @property
    def vector_loads(self) -> int:
        return len(re.findall(r"ld\.global(?:\.\w+)*\.(?:v4\.|v2\.[bfu]64)", self.ptx))  # fp64: 2 x 64 bits

    @property
    def vector_stores(self) -> int:
        return len(re.findall(r"st\.global(?:\.\w+)*\.(?:v4\.|v2\.[bfu]64)", self.ptx))


def compile_launch(launch: Launch, cc: int, source: Optional[str] = None) -> Compiled:
    """Compile ``launch`` for compute capability ``cc`` (e.g. 90) and read its resource use.

    Raises whatever Triton raises when the kernel does not compile (``CompilationError``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.language import standard
    from triton.runtime.jit import JITFunction

    if not isinstance(standard.cdiv, JITFunction):
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1: compile in a fresh process without it "
                           "(python -m fastbyol_kernels.aot)")
    fn = getattr(load_module(launch.module, source), launch.kernel)
    signature, constexprs, attrs = signature_of(launch, fn.arg_names, _unspecialised(fn))
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                            options={"num_warps": launch.num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", fh.name], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    if "REG" not in fields:
        raise RuntimeError(f"cuobjdump -res-usage gave no register count for {launch.label()}:\n{usage}")
    return Compiled(launch.label(), cc, int(fields["REG"]), int(fields.get("STACK", 0)), int(fields.get("LOCAL", 0)),
                    int(fields.get("SHARED", 0)), kernel.asm["ptx"])


def expects_vectors(launch: Launch) -> Tuple[bool, bool]:
    """Whether the data must move in 128-bit (loads, stores): the EMA when its tensors are
    16-byte aligned; the loss when its inputs are aligned, their rows contiguous and D a
    multiple of 16 (then it reads in v4, and its backward writes in v4)."""
    if launch.kernel in ("ema_kernel", "lars_update_kernel"):
        aligned = bool(launch.constexprs["ALIGNED"])
        return aligned, aligned
    if launch.kernel == "photometric_kernel":  # uint8 gathers (flip), strided stores: nothing vectorised
        return False, False
    if launch.kernel == "lars_norms_kernel":  # stores nothing but two scalars a block
        return bool(launch.constexprs["ALIGNED"]), False
    if launch.kernel == "lars_norms_finish_kernel":  # interleaved pairs, a few KB
        return False, False
    a = launch.args
    rows = all(a[k] == 1 for k in ("sp1", "sz1", "sq1", "sy1")) and a["D"] % 16 == 0
    aligned = all(a[k].data_ptr() % 16 == 0 for k in ("p_ptr", "z_ptr", "q_ptr", "y_ptr"))
    return rows and aligned, rows and aligned and launch.kernel == "loss_bwd"


def problems(c: Compiled, vectors: Tuple[bool, bool], max_registers: int = MAX_REGISTERS) -> List[str]:
    """What is wrong with a compiled kernel (empty when nothing)."""
    out = []
    if c.local or c.stack:
        out.append(f"{c.label} sm_{c.cc}: {c.local} bytes local memory, {c.stack} bytes stack (register spills)")
    if c.registers > max_registers:
        out.append(f"{c.label} sm_{c.cc}: {c.registers} registers per thread > {max_registers}")
    if (vectors[0] and not c.vector_loads) or (vectors[1] and not c.vector_stores):
        out.append(f"{c.label} sm_{c.cc}: expected 128-bit global {'loads and stores' if vectors[1] else 'loads'}, "
                   f"the PTX has {c.vector_loads} ld.global.v4 and {c.vector_stores} st.global.v4")
    return out


def check(launch: Launch, cc: int, source: Optional[str] = None) -> List[str]:
    """Compile and check one launch; a compile failure is a problem too (its first line)."""
    try:
        compiled = compile_launch(launch, cc, source)
    except Exception as e:  # noqa: BLE001 - any compiler failure is what this reports
        first = (str(e).strip().splitlines() or [""])[0]
        return [f"{launch.label()} sm_{cc}: does not compile: {type(e).__name__}: {first}"]
    return problems(compiled, expects_vectors(launch))


# ----------------------------------------------------------------------------- what the package launches

EMA_DTYPE_PAIRS = ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                   (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.float32))
LOSS_SHAPES = ((32, 128), (4096, 128), (256, 256), (4096, 256), (1000, 256), (32, 4096), (4096, 4096))
LOSS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def ema_launches_for(targets, onlines, momentum, stochastic_rounding: bool = False) -> List[Launch]:
    """The launches :func:`~.ema.ema_update_` makes for these lists (e.g. ``meta`` tensors)."""
    from .ema import _build_plans

    plans = _build_plans(list(targets), list(onlines), EMA_BLOCK, strict=True, use_kernel=True).kernel
    return [ema_launch(p, momentum, stochastic_rounding, seed=12345) for p in plans]


EMA_MOMENTA = (0.99, torch.float32, torch.float64)  # a float, or a 0-d tensor of either dtype


def ema_specialisations() -> List[Launch]:
    """Every EMA specialisation: each dtype pair x float or tensor (fp32, fp64) momentum x
    aligned or not, and stochastic rounding for bf16 targets."""
    out = []
    for t_dtype, o_dtype in EMA_DTYPE_PAIRS:
        for m in EMA_MOMENTA:
            momentum = m if isinstance(m, float) else torch.zeros((), dtype=m, device="meta")
            for offset in (0, 1):  # a tensor starting one element in is not 16-byte aligned
                def pair(dtype):
                    base = torch.empty(EMA_BLOCK + 3, dtype=dtype)  # real memory: data_ptr % 16 is real
                    return base[offset:offset + EMA_BLOCK + 1]
                for stochastic in ((False, True) if t_dtype == torch.bfloat16 else (False,)):
                    out += ema_launches_for([pair(t_dtype)], [pair(o_dtype)], momentum, stochastic)
    return out


def loss_launches_for(B: int, D: int, dtype: torch.dtype, device="meta") -> List[Launch]:
    """The forward and backward launches of :func:`~.loss.byol_loss` (gradients for the
    predictions, as BYOL; for both sides, as without stop-gradient; for the targets only) and of
    :func:`~.loss.normalized_l2_loss` (one pair), for ``[B, D]`` inputs."""
    x = [torch.empty(B, D, dtype=dtype, device=device) for _ in range(4)]
    out = []
    for two_pairs in (True, False):
        fwd = loss_fwd_launch(*x, two_pairs)
        stats = fwd.args["stats_ptr"]
        grad = torch.empty((), device=device) if two_pairs else torch.empty(B, device=device)
        out.append(fwd)
        for need_p, need_z in ((True, False), (True, True), (False, True)):
            out.append(loss_bwd_launch(*x, stats, grad, need_p, need_z, two_pairs))
    return out


def loss_specialisations(shapes: Iterable[Tuple[int, int]] = LOSS_SHAPES,
                         dtypes: Iterable[torch.dtype] = LOSS_DTYPES) -> List[Launch]:
    return [launch for B, D in shapes for dtype in dtypes for launch in loss_launches_for(B, D, dtype)]


AUGMENT_SIZES = ((256, 224), (512, 32), (256, 96))  # (batch, image size): ImageNet, CIFAR, STL-10
AUGMENT_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def augment_launches_for(B: int, S: int, out_dtype: torch.dtype, in_dtype: torch.dtype = torch.uint8,
                         channels_last: bool = False, device="meta") -> List[Launch]:
    """The three passes of :func:`~.augment.photometric` for ``B`` views of ``S``² pixels: uint8
    crops as the loader's (``crops[:, k]`` of ``[B, 2, 3, S, S]``) or float images, a tenth blurred."""
    if in_dtype == torch.uint8:
        x = torch.empty(B, 2, 3, S, S, dtype=in_dtype, device=device)[:, 0]
    else:
        x = torch.empty(B, 3, S, S, dtype=in_dtype, device=device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(B, 3, S, S, dtype=out_dtype, device=device, memory_format=fmt)
    n_blur = max(1, B // 10)
    params = torch.empty(B, 12, device=device)
    return photometric_launches(x, params, out, torch.empty(B, dtype=torch.int32, device=device),
                                torch.empty(n_blur, dtype=torch.int32, device=device),
                                torch.empty(n_blur, device=device), (0.5,) * 3, (0.25,) * 3, blur_kernel_size(S))


def blur_kernel_size(size: int) -> int:
    """BYOL's blur taps for ``size``-pixel views (fastbyol's ``AugmentConfig.blur_kernel_size``):
    a tenth of the size, at least 3, odd (23 at 224)."""
    return max(3, round(size * 0.1)) | 1


def augment_specialisations(sizes: Iterable[Tuple[int, int]] = AUGMENT_SIZES) -> List[Launch]:
    """The photometric passes for uint8 crops (the loader) in each output dtype, both memory
    formats, and float images (``TwoViews``)."""
    out = []
    for B, S in sizes:
        for dtype in AUGMENT_OUT_DTYPES:
            for channels_last in (False, True):
                out += augment_launches_for(B, S, dtype, channels_last=channels_last)
        out += augment_launches_for(B, S, torch.float32, torch.float32)
    return out


LARS_DTYPES = (torch.float32, torch.float64)


def lars_launches_for(params, grads, bufs, adapt: bool = True) -> List[Launch]:
    """The launches :func:`~.lars.lars_step_` makes for one group of these (CPU) tensors."""
    from .lars import LarsPlan, LARS_BLOCKS

    plan = LarsPlan(params, bufs, LARS_BLOCKS[params[0].dtype])
    g_ptrs = plan.grad_pointers(grads)
    aligned = plan.aligned and plan.g_aligned
    out, sq = lars_norms_launches(plan, g_ptrs, 1.5e-6, aligned) if adapt else ([], plan.numels)
    return out + [lars_update_launch(plan, g_ptrs, sq, 0.1, 0.9, 1.5e-6, 1e-3, adapt, aligned)]


def lars_specialisations() -> List[Launch]:
    """Every LARS specialisation: fp32, fp64 x adapted (norms, their sums, update) or excluded (update)
    x aligned or not."""
    out = []
    for dtype in LARS_DTYPES:
        for offset in (0, 1):
            def tensors():
                return [torch.empty(5003, dtype=dtype)[offset:offset + 5000], torch.empty(7, dtype=dtype)]
            for adapt in (True, False):
                out += lars_launches_for(tensors(), tensors(), tensors(), adapt)
    return out


def specialisations() -> List[Launch]:
    """Everything the package launches in training: every EMA and LARS specialisation, the loss at
    B 32...4096 x D 128/256/4096 (and a B that is not a multiple of 16) in fp32, bf16, fp16,
    and the photometric augmentation at 224, 32 and 96 pixels."""
    return ema_specialisations() + lars_specialisations() + loss_specialisations() + augment_specialisations()


def compile_key(launch: Launch) -> str:
    """What decides the compiled binary: two launches with one key run the same kernel."""
    fn = getattr(load_module(launch.module, None), launch.kernel)
    signature, constexprs, attrs = signature_of(launch, fn.arg_names, _unspecialised(fn))
    return repr((launch.module, launch.kernel, sorted(signature.items()), sorted((k, str(v)) for k, v in constexprs.items()),
                 sorted(attrs), launch.num_warps))


def unique(launches: Iterable[Launch]) -> List[Launch]:
    """One launch per compiled binary."""
    seen: Dict[str, Launch] = {}
    for launch in launches:
        seen.setdefault(compile_key(launch), launch)
    return list(seen.values())


def selection(name: str, capabilities: Sequence[int] = CAPABILITIES) -> List[Tuple[Launch, int]]:
    """``(launch, cc)`` pairs to compile. ``full``: every specialisation for every capability.
    ``quick`` (the default test suite): every kernel x dtype x flag for the first capability
    (sm_90 by default: the lent H200), one variant of each kernel for the others."""
    if name == "full":
        return [(launch, cc) for launch in unique(specialisations()) for cc in capabilities]
    if name != "quick":
        raise ValueError(f"unknown selection {name!r}: full or quick")
    ema = unique(ema_specialisations())
    loss = loss_specialisations([(4096, 256)], [torch.float32, torch.bfloat16]) + \
        loss_specialisations([(1000, 256)], [torch.float16])
    lars = unique(lars_specialisations())
    variants = [ema[0], next(x for x in ema if x.args["m_ptr"].dtype == torch.float64)] + loss_launches_for(4096, 256, torch.float32)[:2]
    fp32 = str(_tl_dtype(torch.float32))
    variants += [x for x in lars if x.constexprs.get("ALIGNED") and str(x.constexprs["DTYPE"]) == fp32][:2]
    augment = unique(augment_launches_for(256, 224, torch.bfloat16))  # the three passes, as ImageNet trains
    first, rest = capabilities[0], capabilities[1:]
    return [(x, first) for x in ema + lars + loss + augment] + [(x, cc) for x in variants + augment[1:2] for cc in rest]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastbyol_kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", type=int, nargs="+", default=list(CAPABILITIES), help="compute capabilities")
    ap.add_argument("--set", default="full", choices=("full", "quick"), help="which specialisations")
    ap.add_argument("--only", default="", help="only launches whose label contains this text")
    ap.add_argument("--replace", default=None, metavar="MODULE=FILE",
                    help="compile MODULE (e.g. _triton_ema) from FILE instead (to test this check)")
    ap.add_argument("--json", default=None, help="write {label@cc: {registers, ..., problems}} here")
    args = ap.parse_args(argv)
    replaced = {}
    if args.replace:
        module, path = args.replace.split("=", 1)
        with open(path) as fh:
            replaced[module] = fh.read()
    results, bad = {}, []
    print(f"{'kernel':<72} {'sm':>4} {'regs':>5} {'local':>6} {'smem':>6} {'v4 ld/st':>9}", flush=True)
    for launch, cc in selection(args.set, args.cc):
        if args.only not in launch.label():
            continue
        key = f"{launch.label()}@{cc}"
        try:
            c = compile_launch(launch, cc, replaced.get(launch.module))
        except Exception as e:  # noqa: BLE001 - any compiler failure is a finding
            first = (str(e).strip().splitlines() or [""])[0]
            found = [f"{launch.label()} sm_{cc}: does not compile: {type(e).__name__}: {first}"]
            results[key] = {"problems": found}
        else:
            found = problems(c, expects_vectors(launch))
            print(f"{c.label:<72} {cc:>4} {c.registers:>5} {c.local:>6} {c.shared:>6} "
                  f"{c.vector_loads:>4}/{c.vector_stores:<4}", flush=True)
            results[key] = {"registers": c.registers, "local": c.local, "stack": c.stack, "shared": c.shared,
                            "vector_loads": c.vector_loads, "vector_stores": c.vector_stores, "problems": found}
        bad += found
    for line in bad:
        print("PROBLEM", line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print(f"{len(results)} compiled, {len(bad)} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
