"""FastVideo's own KV cache vs ``streamkern.integrations.fastvideo.accelerate``, one streamed block at a time.

Run where fastvideo is importable, from the repository root: on a CPU in the FastVideo venv (``make
test-fastvideo`` builds it), ``.venv-fastvideo/bin/python bench/bench_fastvideo.py [--cases NAME ...] [--blocks N]``;
on a GPU ``python -m streamkern.bench.bench_fastvideo --device cuda`` (the GPU session installs FastVideo's wheels
from ``.whl/`` first: docs/fastvideo.md). Writes ``bench/results/<machine>-<date>-fastvideo.json``; ``--jsonl PATH``
also appends each row to PATH as one JSON line the moment its case is done.

A block is what FastVideo's causal stages run per chunk: ``steps`` denoising calls and the clean t=0 pass, all at
the same ``current_start``. The caches are first brought to the steady state of a long stream (window full, so
every block rolls FastVideo's cache): filled with random keys/values and marked full (FastVideo: its index
tensors; streamkern: each layer's stream, ``stream(attn, kv_cache[l], frame_seqlen).seek``). The first block of
each is the warm-up and is measured for
* bytes moved by cache handling (``fastvideo_env.CacheTraffic``: copies, clones, cats and ``ring_write`` touching
  the self-attention caches, bytes read + bytes written; attention reading its window is not counted),
* host syncs per block (``count_host_syncs``): of the whole model and of the causal self-attention alone,
then ``--blocks`` more blocks of each are timed (wall clock; the implementations take turns block by block;
median and 10th/90th percentiles).
Cases: the tiny test models, and the Wan2.1-1.3B per-block shapes of docs/contract.md §6 (12 heads × 128,
1560 tokens per latent frame, 3-frame blocks; causal Wan with a 12-frame window and 3 sink frames as
MemFlow/LongLive keep it; Matrix-Game 2.0 with 880-token frames, a 6-frame window, no sink), bf16 under the bf16
autocast FastVideo's stages run them in. On a CPU (the default there: every case) the models have two layers; on
CUDA (default: the two real-shape cases) all 30 layers of Wan2.1-1.3B, six timed blocks after the warm-up one, and
each row also holds the peak GPU memory of its warm-up block (absolute, and above what was allocated before it).
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
import traceback

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


def build(case: dict, layers: int, device: torch.device):
    builder = env.wan if case["model"] == "wan" else env.matrixgame2
    return builder(local_attn_size=case["local"], sink_size=case["sink"], frames_per_block=3, seed=0,
                   dtype=case["dtype"], device=device, **{**case["arch"], "num_layers": layers})


class Block:
    """One model in its steady state: caches full, ``run()`` streams the next block."""

    def __init__(self, model, case: dict, accelerated: bool):
        self.model, self.case = model, case
        self.device = model.proj_out.weight.device
        self.frame_len = env.frame_seq_length(case["height"], case["width"])
        cond = env.conditioning(model, 1, seed=1)
        self.kv, self.cross = env.caches(model, 1, self.frame_len, case["dtype"], cond.pop("text_len"), self.device)
        self.text, self.cond = cond.pop("encoder_hidden_states"), cond
        gen = torch.Generator(device=self.device).manual_seed(2)
        size = self.kv[0]["k"].shape[1]
        self.start = (case["local"] + 4) * self.frame_len      # a block well past the first window
        for c in self.kv:
            for key in ("k", "v"):
                c[key].copy_(torch.randn(c[key].shape, generator=gen, device=self.device))
            c["global_end_index"].fill_(self.start)
            c["local_end_index"].fill_(size)
        if accelerated:
            from streamkern.integrations import fastvideo as skfv
            for block, c in zip(model.blocks, self.kv):   # as the stream so far would have left it
                skfv.stream(block.attn1, c, self.frame_len).seek(self.start - 3 * self.frame_len, self.start)
        self.x = torch.randn(1, model.in_channels, 3, case["height"], case["width"], generator=gen,
                             device=self.device).to(case["dtype"])
        self.timesteps = [torch.full((1, 3), 0 if i == case["steps"] else int(1000 * (1 - i / case["steps"])),
                                     dtype=torch.long, device=self.device) for i in range(case["steps"] + 1)]

    def run(self) -> None:
        from fastvideo.forward_context import set_forward_context

        frame = self.start // self.frame_len
        # FastVideo's stages autocast to bf16 on CUDA; on CPU the same autocast (Matrix-Game 2.0 mixes dtypes)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.case["dtype"] == torch.bfloat16)
        with torch.no_grad(), autocast, set_forward_context(current_timestep=0, attn_metadata=None):
            for t in self.timesteps:
                self.model(self.x, self.text, t, kv_cache=self.kv, crossattn_cache=self.cross,
                           current_start=self.start, start_frame=frame, **self.cond)
        self.start += 3 * self.frame_len


def attention_syncs(model, counts: list) -> list:
    """Wrap every causal self-attention call of ``model`` in its own host-sync count (appended to ``counts``);
    returns what ``unwrap`` needs to put the forwards back."""
    from streamkern.capture import count_host_syncs

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
    """The row of ``impl`` on ``case_name``, with its warm-up block measured (bytes, syncs, on CUDA peak memory),
    and its ``Block``."""
    from streamkern.capture import count_host_syncs

    case = CASES[case_name]
    attention = IMPLS[impl]
    device = base.proj_out.weight.device
    row = {"source": "fastvideo", "case": case_name, "impl": impl, "device": device.type, "layers": len(base.blocks),
           "steps": case["steps"], "frame_seqlen": env.frame_seq_length(case["height"], case["width"]),
           "local_attn_size": case["local"], "sink_size": case["sink"], "dtype": str(case["dtype"]).replace("torch.", "")}
    if attention == "frame":
        from streamkern.ops.frame_attention import frame_attention_op
        row["frame_attention_backend"] = frame_attention_op.backends.resolve(None, device)
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
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with count_host_syncs() as count, env.CacheTraffic(block.kv) as traffic:
        block.run()
    unwrap(saved)
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        row.update(peak_mib=peak / 2 ** 20, peak_over_start_mib=(peak - before) / 2 ** 20)
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
                _sync(block.device)
                t0 = time.perf_counter()
                block.run()
                _sync(block.device)
                row["block_ms"].append(round((time.perf_counter() - t0) * 1e3, 3))
    for row, _ in prepared:
        times = sorted(row.get("block_ms", []))
        if times:
            row.update(median_block_ms=statistics.median(times), p10_block_ms=times[len(times) // 10],
                       p90_block_ms=times[-1 - len(times) // 10])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--cases", nargs="*", default=None, choices=list(CASES),
                        help="default: every case on a CPU, the two real-shape ones on CUDA")
    parser.add_argument("--impls", nargs="*", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--blocks", type=int, default=None,
                        help="timed blocks per case and implementation (default 3 on a CPU, 6 on CUDA)")
    parser.add_argument("--layers", type=int, default=None,
                        help="transformer blocks of each model (default 2 on a CPU, Wan2.1-1.3B's 30 on CUDA)")
    parser.add_argument("--jsonl", default=None, help="append each row to this file as a JSON line")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cases = args.cases or (["wan-1.3b", "matrixgame2-1.3b"] if cuda else list(CASES))
    blocks = args.blocks or (6 if cuda else 3)
    layers = args.layers or (30 if cuda else 2)
    env.setup()
    rows = []
    for name in cases:
        base = prepared = None
        try:
            base = build(CASES[name], layers, device)
            prepared = [prepare(name, impl, base) for impl in args.impls]
            time_round_robin(prepared, blocks)
        except Exception as exc:   # a row with the error, the next case still runs
            traceback.print_exc(limit=4)
            prepared = [({"source": "fastvideo", "case": name, "device": device.type,
                          "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}, None)]
        for row, block in prepared:
            rows.append(row)
            line = json.dumps({k: v for k, v in row.items() if k != "block_ms"})
            print(line, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(line + "\n")
        del base, prepared
        if cuda:
            torch.cuda.empty_cache()
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor(),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "date": datetime.date.today().isoformat()}
    import fastvideo
    info["fastvideo"] = getattr(fastvideo, "__version__", "0.2.1")
    os.makedirs(args.out, exist_ok=True)
    tag = "-".join(info["device"].lower().split()[:2]) if cuda else _cpu_tag()
    path = os.path.join(args.out, f"{tag}-{info['date']}-fastvideo.json")
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
