"""Triton ``frame_write``: one program per (layer, batch row, frame, head) reads the frame's page id on the device,
copies the frame's ``F`` tokens of that head (k and v) into the page in ``BLOCK_T × D`` tiles and stores the float32
mean of the keys into ``k_mean``. A frame whose page id lies outside ``[0, P)`` runs no tile: nothing is read or
written for it. Any strides; offsets in int64 (a pool may exceed 2³¹ elements)."""
from __future__ import annotations

import triton
import triton.language as tl


# Not specialisation keys: the frame count of a call and its page list (scalar loads).
@triton.jit(do_not_specialize=["PAGES", "n", "sgb", "sgn"])
def _frame_write_kernel(PK, PV, KM, KN, VN, PAGES, B, n, P, F, H, D, inv_f,
                        spl, spb, spp, spt, sph, spd, sql, sqb, sqp, sqt, sqh, sqd, sml, smb, smp, smh, smd,
                        skl, skb, skt, skh, skd, svl, svb, svt, svh, svd, sgb, sgn,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # every element offset in int64: strides arrive as i32
    h = tl.program_id(1).to(tl.int64)
    i = pid % n
    b = (pid // n) % B
    layer = (pid // (n * B)).to(tl.int64)
    page = tl.load(PAGES + b * sgb + i * sgn)
    ok = (page >= 0) & (page < P)
    page = tl.where(ok, page, 0).to(tl.int64)
    b = b.to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = offs_d < D
    dst_k = PK + layer * spl + b * spb + page * spp + h * sph + offs_d[None, :] * spd
    dst_v = PV + layer * sql + b * sqb + page * sqp + h * sqh + offs_d[None, :] * sqd
    first = i.to(tl.int64) * F
    src_k = KN + layer * skl + b * skb + h * skh + offs_d[None, :] * skd
    src_v = VN + layer * svl + b * svb + h * svh + offs_d[None, :] * svd
    total = tl.zeros([BLOCK_D], tl.float32)
    for tile in range(0, tl.where(ok, tl.cdiv(F, BLOCK_T), 0)):
        t = tile * BLOCK_T + offs_t
        mask = (t < F)[:, None] & d_ok[None, :]
        kt = tl.load(src_k + (first + t)[:, None] * skt, mask=mask, other=0.0)
        vt = tl.load(src_v + (first + t)[:, None] * svt, mask=mask, other=0.0)
        tl.store(dst_k + t[:, None] * spt, kt, mask=mask)
        tl.store(dst_v + t[:, None] * sqt, vt, mask=mask)
        total += tl.sum(kt.to(tl.float32), 0)
    tl.store(KM + layer * sml + b * smb + page * smp + h * smh + offs_d * smd, total * inv_f,
             mask=offs_d < tl.where(ok, D, 0))


def frame_write(pool_k, pool_v, k_mean, k_new, v_new, pages) -> None:
    """Host launcher: one launch for every layer, frame and head, k and v (none when there is nothing to write);
    ``pages`` is ``[B, n]`` (any strides, a broadcast list has stride 0)."""
    NL, B, P, F, H, D = pool_k.shape
    n = pages.shape[1]
    if NL * B * n * H == 0:
        return
    block_d = triton.next_power_of_2(D)
    block_t = max(1, min(triton.next_power_of_2(F), 4096 // block_d))
    _frame_write_kernel[(NL * B * n, H)](
        pool_k, pool_v, k_mean, k_new, v_new, pages, B, n, P, F, H, D, 1.0 / F,
        *pool_k.stride(), *pool_v.stride(), *k_mean.stride(), *k_new.stride(), *v_new.stride(), *pages.stride(),
        BLOCK_T=block_t, BLOCK_D=block_d)
