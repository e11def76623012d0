"""Head-parallel streaming memory on several GPUs: per-block time, all-to-all time and memory per rank (issue 22).

Each rank runs what ``StreamingGenerator(parallel=...)`` runs around its memory, at Wan2.1-14B's shapes: 40 layers,
40 heads × 128 (``bench_frame_attention.SHAPES["wan14b"]``: 1560-token latent frames, 3-frame chunks, MemFlow's
3 sink + 9 window + 3 bank frames, so the window ring holds 12 frames with the chunk), bf16, a 512-token text cache,
Self-Forcing's 4 denoising passes + the clean pass per chunk. Per chunk (a "block") and rank, in the steady state
(window and bank full, so every block evicts 3 frames and banks one):

* ``roll``: the eviction, the consensus scores all-reduced across ranks, the kept frame copied into the bank;
* per pass and layer: ``seq_to_heads`` (one all-to-all of this rank's ``q, k, v [1, 4680/world, 40, 128]``),
  ``StreamingKV.attend`` of its ``40/world`` heads over the whole chunk (the chunk's pages written, then SDPA over
  the contiguous range of pages on GPUs), ``heads_to_seq`` (the all-to-all back);
* ``append``: one all-to-all of the clean chunk's keys and values of every layer, then one ``frame_write``.

The projections and MLP of the model are not part of it (each rank runs them on its tokens, without communication).
Reported per rank: block time (median, 10th/90th percentile over the timed blocks), and per block the all-to-all
time (``a2a_ms``: the three kinds above summed), the memory attention time, roll and append; the bytes each rank
sends per block; peak memory (``torch.cuda.max_memory_allocated``; on CPUs the process's peak RSS) and the pool's
bytes. GPU times are CUDA events recorded on the stream (no host sync inside a block; one ``synchronize`` after it).

Run (one call, every world size that fits the machine's GPUs and divides 40 heads and the 4680-token chunk):
``python -m streamkern.bench.bench_distributed [--worlds 1 2 4 8] [--blocks 3] [--layers 40] [--out PATH]``.
``--dry-run``: 2 CPU ranks on gloo at tiny shapes (tests/test_distributed.py runs it in CI).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import resource
import statistics
import time

import torch

from streamkern.bench.bench_frame_attention import D, SHAPES
from streamkern.distributed import HeadParallel, run_local

WAN14B = dict(SHAPES["wan14b"], layers=40, head_dim=D, text_len=512, passes=5, dtype="bf16")
DRY = dict(heads=4, frame=4, chunk=3, sink=1, window=3, bank=2, layers=2, head_dim=8, text_len=8, passes=2,
           dtype="fp32")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class _Clock:
    """Named spans of a block: CUDA events on the current stream (read after one synchronize), else wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []

    @contextlib.contextmanager
    def span(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.append((name, start, end))
        else:
            start = time.perf_counter()
            yield
            self.spans.append((name, (time.perf_counter() - start) * 1e3, None))

    def totals(self) -> dict[str, float]:
        """Milliseconds per span name, summed; clears the spans."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, a, b in self.spans:
            out[name] = out.get(name, 0.0) + (a.elapsed_time(b) if self.cuda else a)
        self.spans = []
        return out


def _rank(rank: int, world: int, cfg: dict, blocks: int) -> dict:
    """One rank: stream ``cfg``'s chunks through this rank's memory until steady, then time ``blocks`` blocks."""
    hp = HeadParallel()
    dev, dtype = hp.device, DTYPES[cfg["dtype"]]
    NL, H, Dh, F = cfg["layers"], cfg["heads"], cfg["head_dim"], cfg["frame"]
    T = cfg["chunk"] * F
    Ts = T // world
    if T % world:
        raise ValueError(f"world: a chunk of {T} tokens does not split over {world} ranks")
    skv = hp.streaming_kv(NL, 1, F, H, Dh, sink_frames=cfg["sink"], window_frames=cfg["window"] + cfg["chunk"],
                          bank_frames=cfg["bank"], dtype=dtype, device=dev)
    g = torch.Generator(device=dev).manual_seed(1000 + rank)   # this rank's tokens

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=dtype)

    q, k, v = rnd(1, Ts, H, Dh), rnd(1, Ts, H, Dh), rnd(1, Ts, H, Dh)
    k_new, v_new = rnd(NL, 1, Ts, H, Dh), rnd(NL, 1, Ts, H, Dh)
    gt = torch.Generator(device=dev).manual_seed(7)             # the text cache is the same on every rank
    text_k = hp.heads_of(torch.randn(NL, 1, cfg["text_len"], H, Dh, generator=gt, device=dev, dtype=dtype), dim=3)
    weights = torch.ones(cfg["text_len"], device=dev)
    clock = _Clock(dev)
    out = None

    def block(i: int) -> None:
        nonlocal out
        with clock.span("block"):
            with clock.span("roll"):
                skv.roll(cfg["chunk"], text_k=text_k, entity_weights=weights, entities=(i % 8,))
            for _ in range(cfg["passes"]):
                for layer in range(NL):
                    with clock.span("a2a"):
                        qh, kh, vh = hp.seq_to_heads(q, k, v)
                    with clock.span("attention"):
                        o = skv.attend(layer, qh, kh, vh)
                    with clock.span("a2a"):
                        out = hp.heads_to_seq(o)
            with clock.span("append_a2a"):
                kn, vn = hp.seq_to_heads(k_new, v_new)
            with clock.span("append_write"):
                skv.append(kn, vn)

    fill = math.ceil((cfg["sink"] + cfg["window"]) / cfg["chunk"]) + cfg["bank"] + 1   # window, bank, one more
    for i in range(fill):
        block(i)
    clock.totals()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    per_block = []
    for i in range(fill, fill + blocks):
        block(i)
        per_block.append(clock.totals())
    elt = torch.empty((), dtype=dtype).element_size()
    sent = (cfg["passes"] * NL * 4 + NL * 2) * Ts * H * Dh * elt * (world - 1) // world

    def stat(name):
        xs = [b.get(name, 0.0) for b in per_block]
        s = sorted(xs)
        return {"median": statistics.median(xs), "p10": s[int(0.1 * (len(s) - 1))],
                "p90": s[math.ceil(0.9 * (len(s) - 1))], "raw": xs}

    pool = sum(t.numel() * t.element_size() for t in (skv.pool.k, skv.pool.v, skv.pool.k_mean))
    return {
        "rank": rank, "world": world, "device": str(dev), "backend": hp.backend, "heads_per_rank": H // world,
        "tokens_per_rank": Ts, "block_ms": stat("block"), "a2a_ms": stat("a2a"), "attention_ms": stat("attention"),
        "roll_ms": stat("roll"), "append_a2a_ms": stat("append_a2a"), "append_write_ms": stat("append_write"),
        "a2a_bytes_sent_per_block": sent, "pool_bytes": pool,
        "peak_bytes": (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "bank_frames": skv.bank_frame_ids.cpu().tolist(), "n_bank": skv.n_bank,
        "finite": bool(torch.isfinite(out).all()),
    }


def worlds_for(cfg: dict, gpus: int) -> list[int]:
    """World sizes 1, 2, 4, ... up to ``gpus`` that divide the heads and the chunk's tokens."""
    out, w = [], 1
    while w <= gpus:
        if cfg["heads"] % w == 0 and (cfg["chunk"] * cfg["frame"]) % w == 0:
            out.append(w)
        w *= 2
    return out


def run(worlds, cfg: dict, blocks: int, backend: str) -> dict:
    results = {"config": cfg, "blocks": blocks, "host": platform.node(), "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(0) if backend == "nccl" else None, "runs": []}
    for world in worlds:
        outcomes = run_local(_rank, world, (cfg, blocks), backend=backend, timeout_s=540, group_timeout_s=120)
        results["runs"].append([o.result for o in outcomes])
    return results


def table(results: dict) -> str:
    cfg = results["config"]
    lines = [f"{cfg['layers']} layers × {cfg['passes']} passes, {cfg['heads']} heads × {cfg['head_dim']}, "
             f"{cfg['frame']}-token frames, {cfg['chunk']}-frame chunks, memory {cfg['sink']} sink + {cfg['window']} "
             f"window (+ the chunk) + {cfg['bank']} bank frames, {cfg['dtype']}; ms per block (median [p10, p90])",
             "| world | rank | block ms | all-to-all ms | attention ms | roll ms | append ms (a2a + write) | "
             "a2a MB sent | pool GB | peak GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for ranks in results["runs"]:
        for r in ranks:
            b = r["block_ms"]
            lines.append(f"| {r['world']} | {r['rank']} | {b['median']:.1f} [{b['p10']:.1f}, {b['p90']:.1f}] | "
                         f"{r['a2a_ms']['median'] + r['append_a2a_ms']['median']:.1f} | "
                         f"{r['attention_ms']['median']:.1f} | {r['roll_ms']['median']:.2f} | "
                         f"{r['append_a2a_ms']['median']:.1f} + {r['append_write_ms']['median']:.1f} | "
                         f"{r['a2a_bytes_sent_per_block'] / 1e6:.1f} | {r['pool_bytes'] / 1e9:.2f} | "
                         f"{r['peak_bytes'] / 1e9:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="2 CPU ranks on gloo at tiny shapes")
    parser.add_argument("--worlds", type=int, nargs="*", help="world sizes (default: every one the GPUs allow)")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per world size")
    parser.add_argument("--layers", type=int, help="layers (default 40, Wan2.1-14B's)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.dry_run:
        cfg, backend, worlds = dict(DRY), "gloo", args.worlds or [2]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_distributed: no CUDA device on this machine (--dry-run runs 2 CPU ranks)")
        cfg, backend = dict(WAN14B), "nccl"
        worlds = args.worlds or worlds_for(cfg, torch.cuda.device_count())
    if args.layers:
        cfg["layers"] = args.layers
    results = run(worlds, cfg, args.blocks, backend)
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
