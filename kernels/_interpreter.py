"""Compiled-code semantics for Triton's interpreter (``TRITON_INTERPRET=1``), for the CPU tests.

Two differences between the interpreter (triton 3.6 and 3.7) and compiled kernels would make
CPU tests pass or fail for reasons that do not exist on a GPU:

* **fp32 → bf16 casts truncate.** ``x.to(tl.bfloat16)`` lowers to ``arith.truncf``, which
  compiled code runs as ``cvt.rn.bf16.f32`` (round to nearest, ties to even); the interpreter's
  ``InterpreterBuilder.cast_impl`` drops the low 16 bits instead, and its explicit ``"rtne"``
  mode (``create_fp_to_fp``) rounds ties up and can carry into the exponent wrongly. A kernel
  whose bf16 output is off by one bf16 step would pass a test with a tolerance and fail
  against ``torch``'s rounding on a GPU. (fp32 → fp16 goes through numpy's ``astype``, which
  already rounds to nearest even.) bf16 ↔ other dtypes than fp32 are routed through fp32.
* **triton 3.6 calls ``int()`` on a one-element numpy array** when a scalar tensor is used as
  an index (``tensor.__index__``, e.g. a ``range`` bound loaded from memory); numpy ≥ 2.4
  refuses that (``only 0-dimensional arrays can be converted``). 3.7 squeezes first.
* **``tl.fma`` is not fused**: the interpreter computes ``x * y + z`` with two roundings. For
  fp32 (and fp16/bf16) operands the patched one forms the exact product in fp64 and rounds
  the sum once to fp64, then to the operands' dtype (a double rounding: it can differ from
  the fused result only when the fp64 sum lands exactly on an fp32 tie, ~2^-29 of cases).

:func:`use_compiled_semantics` patches these on the interpreter's classes, once per process.
The package applies only the index fix itself (:func:`fix_scalar_index`, a crash, not a
rounding); ``tests/conftest.py`` and ``fastbyol_kernels.check`` apply all three, so the CPU tests
check the rounding a GPU does, bit for bit.
"""
from __future__ import annotations

import numpy as np

_applied = False


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of fp32 values, rounded to nearest even, as ``cvt.rn.bf16.f32``
    (and ``torch``'s ``.to(torch.bfloat16)``): NaN stays a quiet NaN of the same sign."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """fp32 values of bf16 bit patterns (exact)."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def use_compiled_semantics() -> bool:
    """Make the interpreter round fp32 → bf16 to nearest even, fuse ``tl.fma`` and index with
    one-element arrays under numpy ≥ 2.4, as compiled code does; idempotent. Returns False where triton's
    interpreter has not the expected shape (a newer triton: nothing is patched, and the tests
    that check rounding bit for bit say so)."""
    global _applied
    if _applied:
        return True
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    handle = getattr(interp, "TensorHandle", None)
    if builder is None or handle is None or not hasattr(builder, "cast_impl"):
        return False
    original_cast, original_fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def to_f32(src):
        return bf16_bits_to_f32(src.data) if src.dtype.scalar == tl.bfloat16 else src.data.astype(np.float32)

    def cast_impl(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if d == tl.bfloat16 and s.is_floating() and s != tl.bfloat16:
            return handle(f32_to_bf16_bits(to_f32(src)).reshape(src.data.shape), d)
        if s == tl.bfloat16 and d != tl.bfloat16:
            return original_cast(self, handle(bf16_bits_to_f32(src.data), tl.float32), dst_type)
        return original_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        from triton._C.libtriton import ir

        if dst_type.scalar == tl.bfloat16 and rounding_mode == ir.ROUNDING_MODE.RTNE:
            return cast_impl(self, src, dst_type)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    original_fma = builder.create_fma

    def create_fma(self, x, y, z):
        if z.data.dtype == np.float64:  # no exact fp64 fma in numpy: leave it unfused
            return original_fma(self, x, y, z)
        xs, ys, zs = (to_f32(a).astype(np.float64) for a in (x, y, z))
        with np.errstate(invalid="ignore", over="ignore"):  # inf − inf is NaN, as on the GPU
            fused = (xs * ys + zs).astype(np.float32)
        return cast_impl(self, handle(fused, tl.float32), z.dtype.scalar)

    builder.cast_impl = cast_impl  # create_fp_trunc, create_fp_ext, ... call it
    builder.create_fp_to_fp = create_fp_to_fp
    builder.create_fma = create_fma
    fix_scalar_index()
    _applied = True
    return True


_index_fixed = False


def fix_scalar_index() -> None:
    """triton < 3.7's interpreter calls ``int()`` on a scalar's one-element numpy array (a
    ``range`` bound loaded from memory); numpy >= 2.4 refuses that. Squeeze first, as 3.7 does.
    Only the interpreter runs this code, so :mod:`._backend` applies it whenever triton loads
    (the GPU machine's triton 3.6 + numpy 2.4 run ``gpu-check --tiny`` interpreted); idempotent."""
    global _index_fixed
    if _index_fixed:
        return
    from triton.runtime import interpreter as interp

    patch_tensor = getattr(interp, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        # Recorded in the same scope, after the interpreter's own: restored first, in order.
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(())))

    interp._patch_lang_tensor = patch_lang_tensor
    _index_fixed = True
