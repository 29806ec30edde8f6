"""Vectorised numpy quantizers for llama.cpp's K-quant blocks (256 weights per super-block).

gguf's numpy package dequantizes Q4_K/Q5_K/Q6_K but cannot produce them. These follow llama.cpp's reference
quantizers (`quantize_row_q{4,5,6}_K_ref`): per sub-block scale/min by a weighted least-squares search over
a few candidate grids (`make_qkx2_quants` for Q4_K/Q5_K, `make_qx_quants` for Q6_K), then 6-bit (Q4_K/Q5_K) or
8-bit (Q6_K) sub-block scales relative to an fp16 super-block scale. Byte layouts match ggml's block structs:
  Q4_K (144 B): d f16, dmin f16, scales[12] (8 x 6-bit scale + 6-bit min), qs[128] (4-bit)
  Q5_K (176 B): d f16, dmin f16, scales[12], qh[32] (5th bits), qs[128]
  Q6_K (210 B): ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d f16
"""
from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_CHUNK = 8192  # super-blocks per vectorised step (bounds temporary memory)


def _fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """x ~ scale * q - minv, q in [0, nmax], minv >= 0, weighted least squares (llama.cpp make_qkx2_quants).
    x, w: [m, n] -> scale [m], minv [m]."""
    mn = np.minimum(x.min(-1), 0.0)
    rng = x.max(-1) - mn
    ok = rng > 0
    rng = np.where(ok, rng, 1.0)
    sum_w, sum_x = w.sum(-1), (w * x).sum(-1)
    xs = x - mn[:, None]
    scale, best_min = rng / nmax, mn
    q = np.clip(np.rint(xs * (nmax / rng)[:, None]), 0, nmax)
    best_err = (w * (scale[:, None] * q + mn[:, None] - x) ** 2).sum(-1)
    for k in range(nstep + 1):
        q = np.clip(np.rint(xs * ((rmin + rdelta * k + nmax) / rng)[:, None]), 0, nmax)
        sl, sl2, sxl = (w * q).sum(-1), (w * q * q).sum(-1), (w * q * x).sum(-1)
        det = sum_w * sl2 - sl * sl
        det_ok = det > 0
        det = np.where(det_ok, det, 1.0)
        s = (sum_w * sxl - sum_x * sl) / det
        m = (sl2 * sum_x - sl * sxl) / det
        pos = m > 0  # the offset must not add: refit the scale alone with min 0
        s = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1.0), s)
        m = np.where(pos, 0.0, m)
        err = (w * (s[:, None] * q + m[:, None] - x) ** 2).sum(-1)
        better = det_ok & (err < best_err)
        scale, best_min, best_err = (np.where(better, s, scale), np.where(better, m, best_min),
                                     np.where(better, err, best_err))
    return np.where(ok, scale, 0.0).astype(np.float32), (-np.where(ok, best_min, mn)).astype(np.float32)


def _fit_symmetric(x: np.ndarray, nmax: int) -> np.ndarray:
    """x ~ scale * q, q in [-nmax, nmax-1], weights x^2 (llama.cpp make_qx_quants, rmse_type 1). x: [m, n]."""
    idx = np.abs(x).argmax(-1)
    vmax = np.take_along_axis(x, idx[:, None], -1)[:, 0]
    ok = np.abs(vmax) > 1e-15
    vmax = np.where(ok, vmax, 1.0)
    w = x * x
    best_scale, best = np.zeros(len(x), np.float32), np.full(len(x), -np.inf, np.float32)
    for k in [0] + [k for k in range(-9, 10) if k]:
        q = np.clip(np.rint(x * (-(nmax + 0.1 * k) / vmax)[:, None]), -nmax, nmax - 1)
        sumlx, suml2 = (w * x * q).sum(-1), (w * q * q).sum(-1)
        valid = suml2 > 0
        s = sumlx / np.where(valid, suml2, 1.0)
        score = np.where(valid, s * sumlx, -np.inf)
        better = score > best
        best_scale, best = np.where(better, s, best_scale), np.where(better, score, best)
    return np.where(ok, best_scale, 0.0).astype(np.float32)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _pack_q45(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Shared Q4_K/Q5_K part: x [nb, 256] -> (d, dmin, scales[12] bytes, q [nb, 8, 32] in 0..nmax)."""
    nb = len(x)
    xb = x.reshape(nb, 8, 32)
    av_x = np.sqrt((x * x).mean(-1))
    w = av_x[:, None, None] + np.abs(xb)
    sc, mins = _fit_scale_min(xb.reshape(-1, 32), w.reshape(-1, 32), nmax, rmin, 0.1, nstep)
    sc, mins = sc.reshape(nb, 8), mins.reshape(nb, 8)
    max_sc, max_min = sc.max(-1), mins.max(-1)
    ls = np.minimum(63, np.rint(sc * np.where(max_sc > 0, 63 / np.where(max_sc > 0, max_sc, 1), 0)[:, None]))
    lm = np.minimum(63, np.rint(mins * np.where(max_min > 0, 63 / np.where(max_min > 0, max_min, 1), 0)[:, None]))
    d = (max_sc / 63).astype(np.float16)
    dmin = (max_min / 63).astype(np.float16)
    dl = d.astype(np.float32)[:, None] * ls
    ml = dmin.astype(np.float32)[:, None] * lm
    q = np.rint((xb + ml[..., None]) / np.where(dl > 0, dl, 1)[..., None])
    q = np.where(dl[..., None] > 0, np.clip(q, 0, nmax), 0).astype(np.uint8)
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    scales = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)], axis=1)
    return _f16_bytes(d), _f16_bytes(dmin), scales, q


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _pack_q45(x, 15, -1.0, 20)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(len(x), 128)
    return np.concatenate([d, dmin, scales, qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _pack_q45(x, 31, -0.5, 15)
    lo = q & 15
    qs = (lo[:, 0::2] | (lo[:, 1::2] << 4)).reshape(len(x), 128)
    qh = (((q >> 4) & 1) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8)
    return np.concatenate([d, dmin, scales, qh, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = len(x)
    xb = x.reshape(nb, 16, 16)
    sc = _fit_symmetric(xb.reshape(-1, 16), 32).reshape(nb, 16)
    idx = np.abs(sc).argmax(-1)
    max_sc = np.take_along_axis(sc, idx[:, None], -1)[:, 0]
    ok = np.abs(max_sc) > 1e-15
    iscale = np.where(ok, -128 / np.where(ok, max_sc, 1), 0)
    d = np.where(ok, 1 / np.where(ok, iscale, 1), 0).astype(np.float16)
    ls = np.minimum(127, np.rint(iscale[:, None] * sc)).astype(np.int8)
    dl = d.astype(np.float32)[:, None] * ls
    q = np.rint(xb / np.where(dl != 0, dl, 1)[..., None])
    q = (np.where(dl[..., None] != 0, np.clip(q, -32, 31), 0) + 32).astype(np.uint8)
    q = np.where(ok[:, None, None], q, 0).reshape(nb, 2, 4, 32)  # [half, chunk, lane]
    lo, hi = q & 15, (q >> 4) & 3
    ql = (lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)).reshape(nb, 128)
    qh = (hi << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2, dtype=np.uint8).reshape(nb, 64)
    return np.concatenate([ql, qh, ls.view(np.uint8), _f16_bytes(d)], axis=1)


_QUANTIZERS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize_k(data: np.ndarray, type_name: str) -> np.ndarray:
    """data [..., n] with n % 256 == 0 -> uint8 [..., n // 256 * block_bytes], like gguf.quants.quantize."""
    if data.shape[-1] % QK_K:
        raise ValueError(f"{type_name} needs rows of a multiple of {QK_K} values, got {data.shape[-1]}")
    fn = _QUANTIZERS[type_name]
    flat = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, QK_K)
    out = np.empty((len(flat), BLOCK_BYTES[type_name]), np.uint8)
    for i in range(0, len(flat), _CHUNK):
        out[i:i + _CHUNK] = fn(flat[i:i + _CHUNK])
    return out.reshape(*data.shape[:-1], data.shape[-1] // QK_K * BLOCK_BYTES[type_name])
