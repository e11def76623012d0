"""FastVideo's own KV cache vs ``streamkern.integrations.fastvideo.accelerate``, one streamed block at a time.

Run in the FastVideo venv (``make test-fastvideo`` builds it), from the repository root:
``.venv-fastvideo/bin/python bench/bench_fastvideo.py [--cases NAME ...] [--blocks N]``; writes
``bench/results/<cpu>-<date>-fastvideo.json``.

A block is what FastVideo's causal stages run per chunk: ``steps`` denoising calls and the clean t=0 pass, all at
the same ``current_start``. The caches are first brought to the steady state of a long stream (window full, so
every block rolls FastVideo's cache): filled with random keys/values and marked full (FastVideo: its index
tensors; streamkern: its host-side stream position). The first block of each is the warm-up and is measured for
* bytes moved by cache handling (``fastvideo_env.CacheTraffic``: copies, clones, cats and ``ring_write`` touching
  the self-attention caches, bytes read + bytes written; attention reading its window is not counted),
* host syncs per block (``count_host_syncs``): of the whole model and of the causal self-attention alone,
then ``--blocks`` more blocks of each are timed (wall clock; the implementations take turns block by block;
median and 10th/90th percentiles).
Cases: the tiny test models, and the Wan2.1-1.3B per-block shapes of DESIGN.md §6 with two layers (12 heads × 128,
1560 tokens per latent frame, 3-frame blocks; causal Wan with a 12-frame window and 3 sink frames as
MemFlow/LongLive keep it; Matrix-Game 2.0 with 880-token frames, a 6-frame window, no sink), bf16 as FastVideo's
stages run them.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "integrations"))
import fastvideo_env as env  # noqa: E402

WAN_1P3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, freq_dim=256, in_channels=16,
                out_channels=16, num_layers=2)
CASES = {
    "tiny-wan": dict(model="wan", arch={}, local=6, sink=1, height=4, width=6, dtype=torch.float32, steps=4),
    "tiny-matrixgame2": dict(model="matrixgame2", arch={}, local=6, sink=1, height=4, width=6, dtype=torch.float32,
                             steps=4),
    "wan-1.3b": dict(model="wan", arch=dict(WAN_1P3B, text_dim=4096, text_len=512), local=12, sink=3, height=60,
                     width=104, dtype=torch.bfloat16, steps=4),
    "matrixgame2-1.3b": dict(model="matrixgame2", arch=dict(WAN_1P3B, image_dim=1280), local=6, sink=0, height=44,
                             width=80, dtype=torch.bfloat16, steps=4),
}
IMPLS = {"fastvideo": None, "streamkern-sdpa": "sdpa", "streamkern-frame": "frame"}
# Where frame_attention resolves to its "torch" reference (no "cpu" kernel built), it gathers the pages and builds a
# dense [B, H, Lq, Lk] mask (12 x 4680 x 18720 at the Wan shape): then it is timed at tiny shapes only.
REFERENCE_MAX_TOKENS = 10_000


def build(case: dict, layers: int):
    builder = env.wan if case["model"] == "wan" else env.matrixgame2
    return builder(local_attn_size=case["local"], sink_size=case["sink"], frames_per_block=3, seed=0,
                   dtype=case["dtype"], **{**case["arch"], "num_layers": layers})


class Block:
    """One model in its steady state: caches full, ``run()`` streams the next block."""

    def __init__(self, model, case: dict, accelerated: bool):
        self.model, self.case = model, case
        self.frame_len = env.frame_seq_length(case["height"], case["width"])
        cond = env.conditioning(model, 1, seed=1)
        self.kv, self.cross = env.caches(model, 1, self.frame_len, case["dtype"], cond.pop("text_len"))
        self.text, self.cond = cond.pop("encoder_hidden_states"), cond
        gen = torch.Generator().manual_seed(2)
        size = self.kv[0]["k"].shape[1]
        self.start = (case["local"] + 4) * self.frame_len      # a block well past the first window
        for c in self.kv:
            for key in ("k", "v"):
                c[key].copy_(torch.randn(c[key].shape, generator=gen))
            c["global_end_index"].fill_(self.start)
            c["local_end_index"].fill_(size)
        if accelerated:
            from streamkern.integrations import fastvideo as skfv
            for c in self.kv:   # what the stream so far would have left: the newest block ends at self.start
                skfv._STREAMS[c["k"]] = skfv._Stream(self.start - 3 * self.frame_len, self.start)
        self.x = torch.randn(1, model.in_channels, 3, case["height"], case["width"], generator=gen).to(case["dtype"])

    def run(self) -> None:
        from fastvideo.forward_context import set_forward_context

        frame = self.start // self.frame_len
        # FastVideo's stages autocast to bf16 on CUDA; on CPU the same autocast (Matrix-Game 2.0 mixes dtypes)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.case["dtype"] == torch.bfloat16)
        with torch.no_grad(), autocast, set_forward_context(current_timestep=0, attn_metadata=None):
            for i in range(self.case["steps"] + 1):
                t = 0 if i == self.case["steps"] else int(1000 * (1 - i / self.case["steps"]))
                self.model(self.x, self.text, torch.full((1, 3), t, dtype=torch.long), kv_cache=self.kv,
                           crossattn_cache=self.cross, current_start=self.start, start_frame=frame, **self.cond)
        self.start += 3 * self.frame_len


def attention_syncs(model, counts: list) -> list:
    """Wrap every causal self-attention call of ``model`` in its own host-sync count (appended to ``counts``);
    returns what ``unwrap`` needs to put the forwards back."""
    from streamkern.host_sync import count_host_syncs

    saved = []
    for block in model.blocks:
        attn = block.attn1
        saved.append((attn, "forward" in vars(attn), attn.forward))

        def counted(*args, __inner=attn.forward, **kwargs):
            with count_host_syncs() as count:
                out = __inner(*args, **kwargs)
            counts.append(count.total)
            return out
        attn.forward = counted
    return saved


def unwrap(saved: list) -> None:
    for attn, patched, forward in saved:
        if patched:
            attn.forward = forward
        else:
            del attn.forward


def prepare(case_name: str, impl: str, base) -> tuple[dict, Block | None]:
    """The row of ``impl`` on ``case_name``, with its warm-up block measured (bytes, syncs), and its ``Block``."""
    from streamkern.host_sync import count_host_syncs

    case = CASES[case_name]
    attention = IMPLS[impl]
    row = {"case": case_name, "impl": impl, "layers": len(base.blocks), "steps": case["steps"],
           "frame_seqlen": env.frame_seq_length(case["height"], case["width"]), "local_attn_size": case["local"],
           "sink_size": case["sink"], "dtype": str(case["dtype"]).replace("torch.", "")}
    if attention == "frame":
        from streamkern.frame_attention import frame_attention_op
        row["frame_attention_backend"] = frame_attention_op.backends.resolve(None, torch.device("cpu"))
        if row["frame_attention_backend"] == "torch" and 3 * row["frame_seqlen"] > REFERENCE_MAX_TOKENS:
            row["skipped"] = ("frame_attention resolves to its 'torch' reference here, which gathers pages and "
                              "materialises a dense mask: not timed at this shape")
            return row, None
    model = copy.deepcopy(base)
    if attention is not None:
        from streamkern.integrations import fastvideo as skfv
        skfv.accelerate(model, attention=attention)
    block = Block(model, case, attention is not None)
    inner_counts: list[int] = []
    saved = attention_syncs(model, inner_counts)   # for the measured (warm-up) block only
    with count_host_syncs() as count, env.CacheTraffic(block.kv) as traffic:
        block.run()
    unwrap(saved)
    row.update(cache_bytes_per_block=traffic.bytes, cache_ops_per_block=traffic.ops,
               host_syncs_per_block=count.total, host_syncs_by_kind=dict(count.by_kind),
               self_attention_host_syncs_per_block=sum(inner_counts), block_ms=[])
    return row, block


def time_round_robin(prepared: list[tuple[dict, Block | None]], blocks: int) -> None:
    """``blocks`` timed blocks of every implementation, taking turns (one block each per round), so that a load
    that drifts on a shared machine falls on all of them alike; median and 10th/90th percentiles in each row."""
    for _ in range(blocks):
        for row, block in prepared:
            if block is not None:
                t0 = time.perf_counter()
                block.run()
                row["block_ms"].append(round((time.perf_counter() - t0) * 1e3, 3))
    for row, _ in prepared:
        times = sorted(row.get("block_ms", []))
        if times:
            row.update(median_block_ms=statistics.median(times), p10_block_ms=times[len(times) // 10],
                       p90_block_ms=times[-1 - len(times) // 10])


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks per case and implementation")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks of each model")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args(argv)
    env.setup()
    rows = []
    for name in args.cases:
        base = build(CASES[name], args.layers)
        prepared = [prepare(name, impl, base) for impl in args.impls]
        time_round_robin(prepared, args.blocks)
        for row, _ in prepared:
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "block_ms"}), flush=True)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor(),
            "date": datetime.date.today().isoformat()}
    import fastvideo
    info["fastvideo"] = getattr(fastvideo, "__version__", "0.2.1")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{_cpu_tag()}-{info['date']}-fastvideo.json")
    with open(path, "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print(f"wrote {path}")
    return path


def _cpu_tag() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1] for line in f if line.startswith("model name")).lower()
        return "-".join(name.split()[:2])
    except (OSError, StopIteration):
        return platform.machine()


if __name__ == "__main__":
    main()
