"""Triton kernel of the fused photometric augmentation (imported only when the fused path runs;
see augment.py for the contract and the reference, launches.py for every launch).

One kernel, three passes (``PASS``, run in the order 0, 1, 2):

* ``PASS == 0``: contrast's per-image mean, one program a tile of ``BLOCK`` pixels (all three
  channels) of one sample. The grey mean contrast blends towards is the mean of the image as
  the ops *before* contrast in the sample's order left it, so this pass runs those ops and
  writes the tile's sum of grey (``partial[b, tile]``; left 0 where contrast does not run,
  and then not read). Reads the input once more (1 byte a value for uint8 crops).
* ``PASS == 1``: the samples not blurred, one program a tile of ``BLOCK`` pixels: flip, the
  four colour-jitter ops in the sample's order, grayscale, solarisation, normalisation and
  the cast to the output dtype. Programs of a blurred sample return at once.
* ``PASS == 2``: the blurred samples, one program a block of ``BLUR_TILE - 2·(BLUR_K // 2)``
  rows by ``BLUR_COLS`` columns of output. It reads and colours (the same ops as pass 1) the
  block and its halo, ``BLUR_ROWS`` x ``BLUR_ROWS`` pixels at a time, blurs it, then
  solarises, normalises and casts: the halo is read and coloured again by the neighbouring
  programs instead of the whole image going through memory in fp32 between the colour ops
  and the blur. Each half of the separable blur is a matrix product, ``x @ Gw`` along rows
  then ``Ghᵀ @ ·`` along columns, where ``G[i, o]`` is the weight source pixel ``i`` has in
  output pixel ``o`` (the reflect padding folded in): Triton has no indexed access to values
  held in registers, and a banded matrix product is how a tile's values reach their
  neighbours without a round trip through memory. The products are IEEE fp32
  (``input_precision="ieee"``, on the CUDA cores): tf32 would round the pixels to 10 bits,
  coarser than a bf16 output's rounding, and the interpreter (numpy) would not see it.

The blur is ``fastbyol.augment.gaussian_blur``'s: ``BLUR_K`` taps (odd) of weights
``exp(-d² / 2σ²)`` normalised to sum 1, reflect padding (no edge repeat), and on an image
smaller than the kernel the taps cut to ``min(K // 2, size - 1)`` each side and renormalised.

Every division is IEEE (``div_rn``), as torch's, so the fp32 values match the torch path to
the rounding of fused multiply-adds (and, in the blur weights, of ``exp`` and of the order
of the sums).
"""
import triton
import triton.language as tl

# Columns of the per-sample parameter table (augment.PARAM_COLUMNS).
_FLIP, _JITTER, _FACTOR, _ORDER = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(6)
_GRAY, _SOLARIZE, _NCOL = tl.constexpr(10), tl.constexpr(11), tl.constexpr(12)
# The blur's matrix products: three tf32 products a product (fp32 to about 2^-21 of the value,
# on the tensor cores); see the module docstring.
_PRECISION = tl.constexpr("ieee")
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
def _finish(v, solarize, mean, std):
    # One channel: solarisation (x >= 0.5 -> 1 - x) where the sample draws it, then (x - mean) / std.
    if solarize:
        v = tl.where(v >= 0.5, 1.0 - v, v)
    return tl.math.div_rn(v - mean, std)


@triton.jit
def _load_rgb(x_ptr, b_id, hh, ww, mask, W, sxb, sxc, sxh, sxw, prm, IN_UINT8: tl.constexpr):
    # The sample's pixels at rows ``hh``, columns ``ww`` (any shape) after the flip, in [0, 1].
    flip = tl.load(prm + _FLIP) != 0
    src = x_ptr + b_id * sxb + hh * sxh + tl.where(flip, W - 1 - ww, ww) * sxw
    r = tl.load(src, mask=mask, other=0).to(tl.float32)
    g = tl.load(src + sxc, mask=mask, other=0).to(tl.float32)
    b = tl.load(src + 2 * sxc, mask=mask, other=0).to(tl.float32)
    if IN_UINT8:
        r, g, b = tl.math.div_rn(r, 255.0), tl.math.div_rn(g, 255.0), tl.math.div_rn(b, 255.0)
    return r, g, b


@triton.jit
def _contrast_mean(prm, partial_ptr, b_id, n_tiles, hw, BLOCK_TILES: tl.constexpr):
    # The grey mean contrast blends towards, from pass 0's per-tile sums (0 where contrast does not run).
    t = tl.arange(0, BLOCK_TILES)
    grey_sum = tl.sum(tl.load(partial_ptr + b_id * n_tiles + t, mask=t < n_tiles, other=0.0), axis=0)
    return tl.math.div_rn(grey_sum, hw.to(tl.float32))


@triton.jit
def _colour(r, g, b, prm, m):
    # The colour jitter in the sample's order (contrast towards the grey mean m), then grayscale.
    if tl.load(prm + _JITTER) != 0:
        for st in tl.static_range(4):
            r, g, b = _jitter_op(tl.load(prm + _ORDER + st), r, g, b, prm, m)
    if tl.load(prm + _GRAY) != 0:
        y = _gray(r, g, b)
        r, g, b = y, y, y
    return r, g, b


@triton.jit
def _blur_total(size, sigma, BLUR_K: tl.constexpr):
    # The sum of the taps' weights along an axis of ``size`` pixels: fewer taps (reach) on an
    # image smaller than the kernel, renormalised to 1 by this sum.
    half: tl.constexpr = BLUR_K // 2
    reach = tl.minimum(size - 1, half)
    total = sigma * 0.0
    for d in range(-half, half + 1):
        total += tl.where(d * d <= reach * reach, tl.exp(-(d * d * 1.0) / (2.0 * sigma * sigma)), 0.0)
    return total


@triton.jit
def _blur_weights(src, dst, size, sigma, total, BLUR_K: tl.constexpr):
    # The weight of source pixel ``src`` in output pixel ``dst`` along an axis of ``size`` pixels
    # (broadcast: one a row, the other a column). Tap d of output o reads o + d, reflected about
    # the edge pixels (-1 -> 1, size -> size - 2); src is hit by d = src - o directly, by
    # d = -src - o through the first edge and d = 2(size - 1) - src - o through the last.
    half: tl.constexpr = BLUR_K // 2
    reach = tl.minimum(size - 1, half)
    valid = (src >= 0) & (src < size)
    w = src * 0.0 + dst * 0.0
    for k in tl.static_range(3):
        if k == 0:
            d, hit = src - dst, valid
        elif k == 1:
            d, hit = -src - dst, valid & (src > 0)
        else:
            d, hit = 2 * (size - 1) - src - dst, valid & (src < size - 1)
        w += tl.where(hit & (d * d <= reach * reach), tl.exp(-(d * d).to(tl.float32) / (2.0 * sigma * sigma)), 0.0)
    return tl.math.div_rn(w, total)


@triton.jit
def _finish_store(v, dst, mask, solarize, mean, std):
    tl.store(dst, _finish(v, solarize, mean, std).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def photometric_kernel(x_ptr, params_ptr, partial_ptr, out_ptr, slot_ptr, rows_ptr, sigma_ptr,
                       H, W, n_tiles, sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                       mean0, mean1, mean2, std0, std1, std2,
                       PASS: tl.constexpr, IN_UINT8: tl.constexpr, BLOCK: tl.constexpr, BLOCK_TILES: tl.constexpr,
                       BLUR_K: tl.constexpr, BLUR_TILE: tl.constexpr, BLUR_COLS: tl.constexpr, BLUR_ROWS: tl.constexpr):
    hw = H * W
    if PASS == 2:
        row = tl.program_id(1)  # the blurred sample's index in rows / sigma
        b_id = tl.load(rows_ptr + row).to(tl.int64)
        prm = params_ptr + b_id * _NCOL
        sigma = tl.load(sigma_ptr + row)
        half: tl.constexpr = BLUR_K // 2
        OUT: tl.constexpr = BLUR_TILE - 2 * half  # output rows
        tiles_w = (W + BLUR_COLS - 1) // BLUR_COLS
        h0 = (tl.program_id(0) // tiles_w) * OUT
        w0 = (tl.program_id(0) % tiles_w) * BLUR_COLS
        k = tl.arange(0, BLUR_TILE)
        kc = tl.arange(0, BLUR_COLS)
        kr = tl.arange(0, BLUR_ROWS)
        m = _contrast_mean(prm, partial_ptr, b_id, n_tiles, hw, BLOCK_TILES)
        total_w = _blur_total(W, sigma, BLUR_K)
        total_h = _blur_total(H, sigma, BLUR_K)
        # Slabs of BLUR_ROWS input rows: each blurred along its rows (its column blocks summed into
        # ``row_*``), then added into every output row it reaches (``acc_*``).
        acc_r = tl.zeros((BLUR_TILE, BLUR_COLS), tl.float32)
        acc_g = acc_r
        acc_b = acc_r
        for c in range(0, BLUR_TILE, BLUR_ROWS):
            hh = h0 - half + c + kr
            row_r = tl.zeros((BLUR_ROWS, BLUR_COLS), tl.float32)
            row_g = row_r
            row_b = row_r
            for c2 in range(0, BLUR_COLS + 2 * half, BLUR_ROWS):
                wc = w0 - half + c2 + kr
                inside = (hh[:, None] >= 0) & (hh[:, None] < H) & (wc[None, :] >= 0) & (wc[None, :] < W)
                r, g, b = _load_rgb(x_ptr, b_id, hh[:, None], wc[None, :], inside, W, sxb, sxc, sxh, sxw, prm, IN_UINT8)
                r, g, b = _colour(r, g, b, prm, m)
                # outside the image: weight 0, and zeroed, so that no value there reaches a sum
                gw = _blur_weights(wc[:, None], (w0 + kc)[None, :], W, sigma, total_w, BLUR_K)  # [source col, output col]
                row_r = tl.dot(tl.where(inside, r, 0.0), gw, row_r, input_precision=_PRECISION)
                row_g = tl.dot(tl.where(inside, g, 0.0), gw, row_g, input_precision=_PRECISION)
                row_b = tl.dot(tl.where(inside, b, 0.0), gw, row_b, input_precision=_PRECISION)
            gh_t = _blur_weights(hh[None, :], (h0 + k)[:, None], H, sigma, total_h, BLUR_K)  # [output row, source row]
            acc_r = tl.dot(gh_t, row_r, acc_r, input_precision=_PRECISION)
            acc_g = tl.dot(gh_t, row_g, acc_g, input_precision=_PRECISION)
            acc_b = tl.dot(gh_t, row_b, acc_b, input_precision=_PRECISION)
        oh = (h0 + k)[:, None]
        ow = (w0 + kc)[None, :]
        omask = (k[:, None] < OUT) & (oh < H) & (ow < W)
        dst = out_ptr + b_id * sob + oh * soh + ow * sow
        solarize = tl.load(prm + _SOLARIZE) != 0
        _finish_store(acc_r, dst, omask, solarize, mean0, std0)
        _finish_store(acc_g, dst + soc, omask, solarize, mean1, std1)
        _finish_store(acc_b, dst + 2 * soc, omask, solarize, mean2, std2)
        return
    tile = tl.program_id(0)
    b_id = tl.program_id(1).to(tl.int64)
    prm = params_ptr + b_id * _NCOL
    if PASS == 0:
        c_stage = tl.full((), 4, tl.int32)  # the stage contrast runs at; 4: it does not run
        for st in tl.static_range(4):
            c_stage = tl.where((tl.load(prm + _JITTER) != 0) & (tl.load(prm + _ORDER + st) == 1), st, c_stage)
        if c_stage == 4:
            return  # its partial sums stay 0 (zeroed by the host) and are not used
    elif tl.load(slot_ptr + b_id) >= 0:
        return  # blurred: pass 2 makes this sample's view
    idx = tile * BLOCK + tl.arange(0, BLOCK)
    pm = idx < hw
    hh = idx // W
    ww = idx % W
    r, g, b = _load_rgb(x_ptr, b_id, hh, ww, pm, W, sxb, sxc, sxh, sxw, prm, IN_UINT8)
    if PASS == 0:
        for st in tl.static_range(3):
            if st < c_stage:
                r, g, b = _jitter_op(tl.load(prm + _ORDER + st), r, g, b, prm, 0.0)
        y = tl.where(pm, _gray(r, g, b), 0.0)
        tl.store(partial_ptr + b_id * n_tiles + tile, tl.sum(y, axis=0))
        return
    m = tl.zeros((), tl.float32)
    if tl.load(prm + _JITTER) != 0:  # only then are the grey sums used: not read otherwise
        m = _contrast_mean(prm, partial_ptr, b_id, n_tiles, hw, BLOCK_TILES)
    r, g, b = _colour(r, g, b, prm, m)
    solarize = tl.load(prm + _SOLARIZE) != 0
    dst = out_ptr + b_id * sob + hh * soh + ww * sow
    _finish_store(r, dst, pm, solarize, mean0, std0)
    _finish_store(g, dst + soc, pm, solarize, mean1, std1)
    _finish_store(b, dst + 2 * soc, pm, solarize, mean2, std2)
