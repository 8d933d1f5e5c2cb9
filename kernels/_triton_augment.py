"""Triton kernel of the fused photometric augmentation (imported only when the fused path runs;
see augment.py for the contract and the reference, launches.py for every launch).

One kernel, four passes (``PASS``, run in the order 0, 1, 3, 2), each program one tile of
``BLOCK`` pixels (all three channels) of one sample:

* ``PASS == 0``: contrast's per-image mean. The grey mean contrast blends towards is the mean
  of the image as the ops *before* contrast in the sample's order left it, so this pass runs
  those ops and writes the tile's sum of grey (``partial[b, tile]``; left 0 where contrast
  does not run, and then not read). Reads the input once more (1 byte a value for uint8 crops).
* ``PASS == 1``: flip, the four colour-jitter ops in the sample's order, grayscale; then,
  for a sample not blurred, solarisation, normalisation and the cast to the output dtype;
  for a blurred one (blur sits between grayscale and solarisation) fp32 into its slot of
  ``scratch``.
* ``PASS == 3`` (blurred samples): the horizontal half of the separable Gaussian blur,
  ``scratch`` -> ``scratch2`` (fp32).
* ``PASS == 2`` (blurred samples): the vertical half from ``scratch2``, then solarisation,
  normalisation and the cast.

The blur is ``fastbyol.augment.gaussian_blur``'s: ``BLUR_K`` taps (odd) of weights
``exp(-d² / 2σ²)`` normalised to sum 1, reflect padding (no edge repeat), and on an image
smaller than the kernel the taps cut to ``min(K // 2, size - 1)`` each side and renormalised.

Every division is IEEE (``div_rn``), as torch's, so the fp32 values match the torch path to
the rounding of fused multiply-adds (and, in the blur weights, of ``exp``).
"""
import triton
import triton.language as tl

# Columns of the per-sample parameter table (augment.PARAM_COLUMNS).
_FLIP, _JITTER, _FACTOR, _ORDER = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(6)
_GRAY, _SOLARIZE, _NCOL = tl.constexpr(10), tl.constexpr(11), tl.constexpr(12)
# ITU-R 601 luma, as torchvision's rgb_to_grayscale
_R, _G, _B = tl.constexpr(0.299), tl.constexpr(0.587), tl.constexpr(0.114)


@triton.jit
def _gray(r, g, b):
    return _R * r + _G * g + _B * b


@triton.jit
def _blend(f, x, other):
    return tl.minimum(tl.maximum(f * x + (1.0 - f) * other, 0.0), 1.0)


@triton.jit
def _frac(a):  # a mod 1 (torch.remainder(a, 1.0))
    return a - tl.floor(a)


@triton.jit
def _hue(r, g, b, shift):
    # torchvision's rgb -> hsv -> rgb round trip, as fastbyol.augment.adjust_hue.
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    delta = maxc - minc
    s = tl.where(maxc > 0, tl.math.div_rn(delta, tl.maximum(maxc, 1e-12)), 0.0)
    d = tl.where(delta > 0, delta, 1.0)
    rc = tl.math.div_rn(maxc - r, d)
    gc = tl.math.div_rn(maxc - g, d)
    bc = tl.math.div_rn(maxc - b, d)
    h = tl.where(maxc == r, bc - gc, tl.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = tl.where(delta > 0, _frac(tl.math.div_rn(h, 6.0)), 0.0)
    h = _frac(h + shift)
    v = maxc
    h6 = h * 6.0
    i6 = tl.floor(h6)
    f = h6 - i6
    i = i6.to(tl.int32) % 6
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    r2 = tl.where((i == 0) | (i == 5), v, tl.where(i == 1, q, tl.where(i == 4, t, p)))
    g2 = tl.where(i == 0, t, tl.where((i == 1) | (i == 2), v, tl.where(i == 3, q, p)))
    b2 = tl.where((i == 3) | (i == 4), v, tl.where(i == 2, t, tl.where(i == 5, q, p)))
    return r2, g2, b2


@triton.jit
def _jitter_op(op, r, g, b, prm, m):
    # One colour-jitter op (0 brightness, 1 contrast towards the grey mean m, 2 saturation,
    # 3 hue) with its factor from the sample's row ``prm``.
    if op == 0:
        f = tl.load(prm + _FACTOR)
        r = tl.minimum(tl.maximum(f * r, 0.0), 1.0)  # blend with black: (1 - f)·0 adds nothing
        g = tl.minimum(tl.maximum(f * g, 0.0), 1.0)
        b = tl.minimum(tl.maximum(f * b, 0.0), 1.0)
    elif op == 1:
        f = tl.load(prm + _FACTOR + 1)
        r, g, b = _blend(f, r, m), _blend(f, g, m), _blend(f, b, m)
    elif op == 2:
        f = tl.load(prm + _FACTOR + 2)
        y = _gray(r, g, b)
        r, g, b = _blend(f, r, y), _blend(f, g, y), _blend(f, b, y)
    else:
        shift = tl.load(prm + _FACTOR + 3)
        if shift != 0:  # a zero shift leaves the sample unchanged (torch: where(shift != 0))
            r, g, b = _hue(r, g, b, shift)
    return r, g, b


@triton.jit
def _finish(r, g, b, prm, mean0, mean1, mean2, std0, std1, std2):
    # Solarisation (x >= 0.5 -> 1 - x) for the samples that draw it, then (x - mean) / std.
    if tl.load(prm + _SOLARIZE) != 0:
        r = tl.where(r >= 0.5, 1.0 - r, r)
        g = tl.where(g >= 0.5, 1.0 - g, g)
        b = tl.where(b >= 0.5, 1.0 - b, b)
    return (tl.math.div_rn(r - mean0, std0), tl.math.div_rn(g - mean1, std1), tl.math.div_rn(b - mean2, std2))


@triton.jit
def _blur_1d(src, pos, size, step, plane, pm, sigma, BLUR_K: tl.constexpr):
    # One separable half of the Gaussian blur along an axis of ``size`` pixels, all three
    # planes (``plane`` apart): ``pos`` is each pixel's index on the axis, ``step`` the
    # distance between neighbours along it.
    half: tl.constexpr = BLUR_K // 2
    reach = tl.minimum(size - 1, half)  # taps each side: fewer on an image smaller than the kernel
    two_var = 2.0 * sigma * sigma
    total = sigma * 0.0
    for d in range(-half, half + 1):
        total += tl.where(d * d <= reach * reach, tl.exp(-(d * d * 1.0) / two_var), 0.0)
    r = pos.to(tl.float32) * 0.0
    g = r
    b = r
    # A loop, not unrolled: 3 x K loads in flight at once would take 140+ registers.
    for d in range(-half, half + 1):
        wt = tl.where(d * d <= reach * reach, tl.math.div_rn(tl.exp(-(d * d * 1.0) / two_var), total), 0.0)
        i = pos + d
        i = tl.where(i < 0, -i, i)  # reflect about the edge pixel: -1 -> 1
        i = tl.where(i > size - 1, 2 * (size - 1) - i, i)
        i = tl.minimum(tl.maximum(i, 0), size - 1)  # taps past ``reach`` (weight 0) stay in bounds
        at = src + (i - pos) * step
        r += wt * tl.load(at, mask=pm, other=0.0)
        g += wt * tl.load(at + plane, mask=pm, other=0.0)
        b += wt * tl.load(at + 2 * plane, mask=pm, other=0.0)
    return r, g, b


@triton.jit
def photometric_kernel(x_ptr, params_ptr, partial_ptr, out_ptr, scratch_ptr, slot_ptr, rows_ptr,
                       scratch2_ptr, sigma_ptr,
                       H, W, n_tiles, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                       mean0, mean1, mean2, std0, std1, std2,
                       PASS: tl.constexpr, IN_UINT8: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TILES: tl.constexpr,
                       BLUR_K: tl.constexpr):
    tile = tl.program_id(0)
    hw = H * W
    idx = tile * BLOCK + tl.arange(0, BLOCK)
    pm = idx < hw
    hh = idx // W
    ww = idx % W
    if PASS == 3:
        row = tl.program_id(1)  # slot in scratch
        sigma = tl.load(sigma_ptr + row)
        base = row.to(tl.int64) * 3 * hw + idx
        r, g, b = _blur_1d(scratch_ptr + base, ww, W, 1, hw, pm, sigma, BLUR_K)
        tl.store(scratch2_ptr + base, r, mask=pm)
        tl.store(scratch2_ptr + base + hw, g, mask=pm)
        tl.store(scratch2_ptr + base + 2 * hw, b, mask=pm)
        return
    if PASS == 2:
        row = tl.program_id(1)  # slot in scratch
        b_id = tl.load(rows_ptr + row).to(tl.int64)
        prm = params_ptr + b_id * _NCOL
        sigma = tl.load(sigma_ptr + row)
        r, g, b = _blur_1d(scratch2_ptr + row.to(tl.int64) * 3 * hw + idx, hh, H, W, hw, pm, sigma, BLUR_K)
        r, g, b = _finish(r, g, b, prm, mean0, mean1, mean2, std0, std1, std2)
        dst = out_ptr + b_id * sob + hh * soh + ww * sow
        tl.store(dst, r.to(out_ptr.dtype.element_ty), mask=pm)
        tl.store(dst + soc, g.to(out_ptr.dtype.element_ty), mask=pm)
        tl.store(dst + 2 * soc, b.to(out_ptr.dtype.element_ty), mask=pm)
        return
    b_id = tl.program_id(1).to(tl.int64)
    prm = params_ptr + b_id * _NCOL
    jitter = tl.load(prm + _JITTER) != 0
    if PASS == 0:
        c_stage = tl.full((), 4, tl.int32)  # the stage contrast runs at; 4: it does not run
        for st in tl.static_range(4):
            c_stage = tl.where(jitter & (tl.load(prm + _ORDER + st) == 1), st, c_stage)
        if c_stage == 4:
            return  # its partial sums stay 0 (zeroed by the host) and are not used
    flip = tl.load(prm + _FLIP) != 0
    src_w = tl.where(flip, W - 1 - ww, ww)
    src = x_ptr + b_id * sxb + hh * sxh + src_w * sxw
    r = tl.load(src, mask=pm, other=0).to(tl.float32)
    g = tl.load(src + sxc, mask=pm, other=0).to(tl.float32)
    b = tl.load(src + 2 * sxc, mask=pm, other=0).to(tl.float32)
    if IN_UINT8:
        r, g, b = tl.math.div_rn(r, 255.0), tl.math.div_rn(g, 255.0), tl.math.div_rn(b, 255.0)
    if PASS == 0:
        for st in tl.static_range(3):
            if st < c_stage:
                r, g, b = _jitter_op(tl.load(prm + _ORDER + st), r, g, b, prm, 0.0)
        y = tl.where(pm, _gray(r, g, b), 0.0)
        tl.store(partial_ptr + b_id * n_tiles + tile, tl.sum(y, axis=0))
        return
    if jitter:
        t = tl.arange(0, BLOCK_TILES)
        grey_sum = tl.sum(tl.load(partial_ptr + b_id * n_tiles + t, mask=t < n_tiles, other=0.0), axis=0)
        m = tl.math.div_rn(grey_sum, hw.to(tl.float32))  # contrast's grey mean (0 if contrast does not run)
        for st in tl.static_range(4):
            r, g, b = _jitter_op(tl.load(prm + _ORDER + st), r, g, b, prm, m)
    if tl.load(prm + _GRAY) != 0:
        y = _gray(r, g, b)
        r, g, b = y, y, y
    slot = tl.load(slot_ptr + b_id)
    if slot >= 0:  # blurred next (by the caller): fp32, then PASS 2 finishes it
        tmp = scratch_ptr + slot.to(tl.int64) * 3 * hw + idx
        tl.store(tmp, r, mask=pm)
        tl.store(tmp + hw, g, mask=pm)
        tl.store(tmp + 2 * hw, b, mask=pm)
    else:
        r, g, b = _finish(r, g, b, prm, mean0, mean1, mean2, std0, std1, std2)
        dst = out_ptr + b_id * sob + hh * soh + ww * sow
        tl.store(dst, r.to(out_ptr.dtype.element_ty), mask=pm)
        tl.store(dst + soc, g.to(out_ptr.dtype.element_ty), mask=pm)
        tl.store(dst + 2 * soc, b.to(out_ptr.dtype.element_ty), mask=pm)
