"""``SpeculativeVAR`` (seed 003, SDVAR): speculative next-scale decoding with a draft and a target VAR.

A tiny random next-scale transformer over VAR's layout (10 scales, 680 tokens; scale s is a ``pn_s × pn_s`` token
map): the input of scale 0 is the class embedding, the input of scale s > 0 the embedded token map of scale s − 1
upsampled (bilinear) to ``pn_s × pn_s``, plus position and level embeddings; attention is VAR's block-causal mask
(``scale_allow(NS, "var")``: a token sees the scales up to its own). Classifier-free guidance doubles the batch
(null class) and mixes ``l = (1 + t_s)·cond − t_s·uncond`` with ``t_s = cfg · s / (NS − 1)``. The draft is the
target's first ``draft_depth`` blocks with the target's head (an early-exit draft).

Speculative loop (SDVAR's ``while`` + γ batching): draft γ scales one by one, verify them in ONE target pass over
the whole prefix, keep the accepted scales and the first rejected one (corrected), continue after it. With a
batch, the round keeps the scales every row got (``min_b accepted + 1``), which stays lossless.

* ``eager=True`` (``backend="torch"``): the seed's way — dense additive ``-inf`` bias with eager softmax attention,
  SDVAR's greedy check one scale at a time with ``.item()`` (``sdvar_greedy_check``), and in sample mode the same
  scale-by-scale loop for the lossless test.
* ``eager=False``: ``block_masked_attention`` and one ``verify_scales`` per round; :meth:`SpeculativeVAR.round`
  keeps the accepted scales with device-side masks and returns their count on the device, read once per round by
  ``generate`` (the loop's position depends on it): a round at a given scale is a step a ``StepGraph`` replays.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.reference.block_masked_attention import seed_attention, seed_bias
from ..ops.reference.verify_scales import inverse_cdf, sdvar_greedy_check
from ..ops.block_masked_attention import block_masked_attention, scale_allow, scale_layout
from ..capture import host_read
from ..ops.verify_scales import verify_scales
from .runtime import PipelineRun, nbytes, part, timed_step
from .tiny import Block, seeded

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


class TinyVAR(nn.Module):
    """Random-weight next-scale transformer; ``forward(tokens, labels, upto, attend, depth)`` gives the logits
    ``[2B, L_upto, V]`` (conditional rows, then unconditional) of the first ``upto`` scales."""

    def __init__(self, patch_nums=VAR_PATCH_NUMS, vocab=64, depth=4, heads=2, head_dim=32, num_classes=10,
                 seed=0):
        super().__init__()
        c = heads * head_dim
        self.patch_nums, self.vocab, self.num_classes = tuple(patch_nums), vocab, num_classes
        sizes = [pn * pn for pn in self.patch_nums]
        self.end = [sum(sizes[:i + 1]) for i in range(len(sizes))]
        self.begin = [0] + self.end[:-1]
        self.register_buffer("scale_ids", torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)))
        with seeded(seed):
            self.tok, self.cls = nn.Embedding(vocab, c), nn.Embedding(num_classes + 1, c)
            self.lvl = nn.Embedding(len(sizes), c)
            self.pos = nn.Parameter(torch.randn(1, self.end[-1], c) * 0.3)
            self.blocks = nn.ModuleList(Block(heads, head_dim) for _ in range(depth))
            self.norm, self.head = nn.LayerNorm(c), nn.Linear(c, vocab)
            self.head.weight.data *= 4.0    # peaked enough that a shallow draft often agrees with the target

    def _inputs(self, tokens, labels, upto):
        B = labels.shape[0]
        cls = self.cls(torch.cat([labels, torch.full_like(labels, self.num_classes)]))
        parts = [cls[:, None]]
        for s in range(1, upto):
            pn0, pn1 = self.patch_nums[s - 1], self.patch_nums[s]
            emb = self.tok(tokens[:, self.begin[s - 1]:self.end[s - 1]]).transpose(1, 2)
            emb = emb.reshape(B, -1, pn0, pn0)
            up = F.interpolate(emb, size=(pn1, pn1), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
            parts.append(up.repeat(2, 1, 1))
        x = torch.cat(parts, dim=1)
        L = self.end[upto - 1]
        return x + self.pos[:, :L] + self.lvl(self.scale_ids[:L])

    def forward(self, tokens, labels, upto, attend, depth=None):
        x = self._inputs(tokens, labels, upto)
        ids = self.scale_ids[:x.shape[1]]
        for block in self.blocks[:depth]:
            x, _, _ = block(x, lambda q, k, v: attend(q, k, v, ids))
        return self.head(self.norm(x))


def guided(logits, begin, end, cfg_t):
    """CFG mix of ``logits [2B, T, V]`` for scale rows ``[begin, end)``: ``(1 + t)·cond − t·uncond``."""
    B = logits.shape[0] // 2
    x = logits[:, begin:end].float()
    return (1 + cfg_t) * x[:B] - cfg_t * x[B:]


class SpeculativeVAR:
    """Draft/target VAR pair; ``run`` decodes images speculatively, ``plain`` with the target alone."""

    def __init__(self, *, backend: str = "torch", eager: bool | None = None, mode: str = "greedy", gamma: int = 2,
                 threshold: float = 0.5, cfg: float = 1.5, temperature: float = 1.0, patch_nums=VAR_PATCH_NUMS,
                 vocab: int = 64, depth: int = 4, draft_depth: int = 2, batch: int = 1, device="cpu",
                 seed: int = 0):
        self.backend = backend
        self.eager = backend == "torch" if eager is None else eager
        self.mode, self.gamma, self.threshold, self.temperature = mode, gamma, threshold, temperature
        self.device, self.batch, self.seed, self.draft_depth = torch.device(device), batch, seed, draft_depth
        self.model = TinyVAR(patch_nums, vocab, depth, seed=seed).to(self.device)
        ns = len(patch_nums)
        self.cfg_t = [cfg * s / max(1, ns - 1) for s in range(ns)]
        self.allow = scale_allow(ns, "var", device=self.device) if not self.eager else None
        if not self.eager:
            self.layout = scale_layout(patch_nums)

    # --- attention ----------------------------------------------------------------------------------------------

    def _attend(self):
        """The attention both models use for one forward: the seed's dense bias, or ``block_masked_attention``."""
        scale = 1.0 / math.sqrt(self.model.blocks[0].head_dim)
        if self.eager:
            cache = {}

            def attend(q, k, v, ids):
                if "bias" not in cache:
                    allow = torch.ones(len(self.model.patch_nums), len(self.model.patch_nums),
                                       dtype=torch.bool, device=q.device).tril()
                    cache["bias"] = seed_bias(ids, ids, allow)
                with part("masked attention", self.device) as moved:
                    out = seed_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cache["bias"],
                                         scale)
                    # the [B, H, L, L] scores: written, read + written by the bias add and by softmax, read by @ v
                    moved(nbytes(q, k, v, out, cache["bias"]) + 6 * q.shape[0] * q.shape[2] * q.shape[1] *
                          k.shape[1] * q.element_size())
                return out.transpose(1, 2)
            return attend

        def attend(q, k, v, ids):
            with part("masked attention", self.device) as moved:
                out = block_masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ids, ids,
                                             self.allow, sm_scale=scale, backend=self.backend)
                moved(nbytes(q, k, v, out))
            return out.transpose(1, 2)
        return attend

    # --- sampling -----------------------------------------------------------------------------------------------

    def _pick(self, logits_mixed, gen):
        """Tokens and probabilities of one scale: argmax (greedy) or inverse-CDF draw (sample)."""
        if self.mode == "greedy":
            return logits_mixed.argmax(-1), None
        p = torch.softmax(logits_mixed / self.temperature, dim=-1)
        u = torch.rand(p.shape[:2], generator=gen, device=p.device)
        return inverse_cdf(p, u), p

    def _scale(self, tokens, labels, s, gen, depth=None):
        logits = self.model(tokens, labels, s + 1, self._attend(), depth)
        return self._pick(guided(logits, self.model.begin[s], self.model.end[s], self.cfg_t[s]), gen)

    def plain(self, labels, gen, depth=None):
        """Plain decoding, one call per scale: ``tokens [B, L]`` (the target; the draft with ``depth``)."""
        tokens = torch.full((labels.shape[0], self.model.end[-1]), -1, dtype=torch.int64, device=self.device)
        for s in range(len(self.model.patch_nums)):
            tokens[:, self.model.begin[s]:self.model.end[s]] = self._scale(tokens, labels, s, gen, depth)[0]
        return tokens

    # --- verification -------------------------------------------------------------------------------------------

    def _verify_eager(self, logits, draft, probs, u, first, g):
        """SDVAR's check, scale by scale with ``.item()``, per batch row: ``(accepted per row, tokens [B, T])``."""
        B = draft.shape[0]
        off = [self.model.begin[first + i] - self.model.begin[first] for i in range(g)] + [draft.shape[1]]
        cfg = self.cfg_t[first:first + g]
        accepted, tokens = [], torch.full_like(draft, -1)
        for b in range(B):
            rows = logits[[b, B + b]]
            if self.mode == "greedy":
                n, toks = sdvar_greedy_check(rows, draft[b:b + 1], off, cfg, self.threshold)
                accepted.append(n)
                tokens[b] = toks[0]
                continue
            n = 0
            for si in range(g):
                a, c = off[si], off[si + 1]
                p = torch.softmax(guided(rows, a, c, cfg[si])[0] / self.temperature, dim=-1)
                q, x = probs[b, a:c].float(), draft[b, a:c]
                px, qx = p.gather(-1, x[:, None])[:, 0], q.gather(-1, x[:, None])[:, 0]
                ok = (qx > 0) & (u[b, a:c, 0] * qx < px)
                if ok.all().item():
                    tokens[b, a:c] = x
                    n += 1
                    continue
                r = (p - q).clamp_min(0)
                r = r if r.sum().item() > 0 else p
                tokens[b, a:c] = torch.where(ok, x, inverse_cdf(r, u[b, a:c, 1]))
                break
            accepted.append(n)
        return min(accepted), tokens

    def _verify_ops(self, logits, draft, probs, u, first, g):
        res = verify_scales(logits, draft, self.layout, first, g, mode=self.mode, threshold=self.threshold,
                                  draft_probs=probs, uniforms=u, cfg=self.cfg_t[first:first + g],
                                  temperature=self.temperature, backend=self.backend)
        return res.accepted.min(), res.tokens

    def round(self, tokens, labels, gen, pos, stats):
        """One speculative round from scale ``pos``: draft ``g = min(gamma, NS - pos)`` scales into ``tokens
        [B, L]``, score them in one target pass, verify, and keep ``min(accepted + 1, g)`` scales (the tokens of
        the later ones, and everything after the window, become −1). Returns that count: a Python int on the
        eager path (the seed reads it while verifying), else a 0-d int64 device tensor; the ops path reads nothing
        on the host and launches the same work for every call at one ``pos`` (a step a ``StepGraph`` can replay)."""
        m = self.model
        g = min(self.gamma, len(m.patch_nums) - pos)
        probs = []
        for s in range(pos, pos + g):
            tokens[:, m.begin[s]:m.end[s]], p = self._scale(tokens, labels, s, gen, self.draft_depth)
            probs.append(p)
        window = slice(m.begin[pos], m.end[pos + g - 1])
        logits = m(tokens, labels, pos + g, self._attend())[:, window]
        stats["draft_calls"] += g
        stats["target_calls"] += 1
        draft = tokens[:, window].clone()
        probs = torch.cat(probs, dim=1) if self.mode == "sample" else None
        u = torch.rand((labels.shape[0], draft.shape[1], 2), generator=gen, device=self.device)
        verify = self._verify_eager if self.eager else self._verify_ops
        with part("verification", self.device) as moved:
            accepted, verified = verify(logits, draft, probs, u, pos, g)
            # eager: the guided logits are materialised, then read by argmax (+ written/read by softmax when
            # sampling); the fused op reads the logits once
            passes = 1 if not self.eager else (2 if self.mode == "greedy" else 3)
            moved(passes * nbytes(logits) + nbytes(draft, probs, u, verified))
        keep = min(accepted + 1, g) if self.eager else (accepted + 1).clamp_max(g)
        kept = m.scale_ids[window] - pos < keep           # [T]: the token's scale is one of the kept ones
        tokens[:, window] = torch.where(kept, verified, -1)
        tokens[:, window.stop:] = -1
        return keep

    def generate(self, labels, gen, stats):
        """Speculative decoding of one batch of images: ``tokens [B, L]``; ``stats`` counts calls and rounds.
        The ops path reads each round's kept count once (the next round's ``pos`` depends on it)."""
        tokens = torch.full((labels.shape[0], self.model.end[-1]), -1, dtype=torch.int64, device=self.device)
        pos = 0
        while pos < len(self.model.patch_nums):
            keep = self.round(tokens, labels, gen, pos, stats)
            pos += keep if self.eager else host_read(keep)
        return tokens

    @torch.no_grad()
    def run(self, images: int = 2, forbid_syncs: bool = False, progress=None) -> PipelineRun:
        """Decode ``images`` batches (one step each; labels ``i mod num_classes``). Outputs ``tokens [images, B, L]``;
        ``info`` has target calls per image for speculative and plain decoding."""
        gen = torch.Generator(self.device).manual_seed(self.seed)    # on the device: no host-to-device copies
        stats = {"draft_calls": 0, "target_calls": 0}
        record = PipelineRun("SpeculativeVAR", "torch (eager)" if self.eager else self.backend, {})
        out = []
        for i in range(images):
            labels = torch.full((self.batch,), i % self.model.num_classes, dtype=torch.int64, device=self.device)
            timed_step(record, self.device, lambda labels=labels: out.append(self.generate(labels, gen, stats)),
                       forbid=forbid_syncs)
            if progress is not None:
                progress()
        record.outputs = {"tokens": torch.stack(out)}
        record.info = {"target_calls_per_image": stats["target_calls"] / images,
                       "draft_calls_per_image": stats["draft_calls"] / images,
                       "plain_target_calls_per_image": len(self.model.patch_nums)}
        return record


class RoundInputs:
    """Static inputs for :meth:`SpeculativeVAR.round` at scale ``pos`` in a captured step: one ``(tokens [B, L]
    int64, labels [B] int64)`` pair per decoder of ``pipes`` (``.pairs``). :meth:`refill` writes one fresh prefix
    (the tokens of the scales before ``pos``) and fresh labels, drawn on the CPU from ``seed``, into every pair, in
    place, and sets the other tokens to −1: what a round reads."""

    def __init__(self, pipes: list[SpeculativeVAR], pos: int, seed: int = 2):
        self.model, self.batch, self.pos = pipes[0].model, pipes[0].batch, pos
        self.host = torch.Generator().manual_seed(seed)
        self.pairs = [(torch.full((self.batch, self.model.end[-1]), -1, dtype=torch.int64, device=p.device),
                       torch.zeros(self.batch, dtype=torch.int64, device=p.device)) for p in pipes]

    def refill(self) -> None:
        m, B, begin = self.model, self.batch, self.model.begin[self.pos]
        prefix = torch.randint(0, m.vocab, (B, begin), generator=self.host)
        labels = torch.randint(0, m.num_classes, (B,), generator=self.host)
        for tokens, lab in self.pairs:
            tokens.fill_(-1)
            tokens[:, :begin] = prefix
            lab.copy_(labels)
