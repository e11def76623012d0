"""FastVideo on a CPU machine or a GPU one, for the client tests and bench/bench_fastvideo.py (never imported by the
library).

``setup()`` applies the shims an install without FastVideo's full dependency set needs (found by trying; see
docs/fastvideo.md): torchvision's compiled ops do not load on CPU torch, so their ``nms``/``qnms`` schemas are
defined before it is imported; without scipy (not carried to the GPU machine: 35 MB, and only FastVideo's
schedulers, unused here, call it) ``scipy`` is a stand-in whose every function raises; FastVideo's ``CpuPlatform``
names no attention backend, so it is pointed at FastVideo's SDPA backend; the models' forward needs FastVideo's
distributed state (one rank on 127.0.0.1); without CUDA its ``get_local_torch_device`` answers "mps", so it is
pointed at the CPU. ``wan``/``matrixgame2`` build random-weight models (on a ``device``) with every parameter
initialised (several layers allocate theirs with ``torch.empty``); ``run_stage`` drives FastVideo's own denoising
stage; ``stream_blocks`` calls a model block by block as the stages do, in any dtype.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import math
import os
import socket
import sys
from types import SimpleNamespace

import torch

FASTVIDEO = importlib.util.find_spec("fastvideo") is not None
WHY_NOT = ("fastvideo is not installed in this environment: `make test-fastvideo` builds .venv-fastvideo "
           "(requirements-fastvideo.txt) and runs these tests there")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MissingPackage(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stand-in modules for package ``top`` and its submodules, found only where the package is not installed
    (the finder comes last): their attributes are functions that raise ``ModuleNotFoundError`` naming what was
    called, so importing works and any use fails loudly."""

    def __init__(self, top: str):
        self.top = top

    def find_spec(self, name, path=None, target=None):
        if name == self.top or name.startswith(self.top + "."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__path__ = []

        def missing(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)

            def call(*args, **kwargs):
                raise ModuleNotFoundError(f"{module.__name__}.{attr}: {self.top} is not installed here (a stand-in "
                                          f"from tests/integrations/fastvideo_env.py)")
            return call
        module.__getattr__ = missing


def _torchvision_ops_load() -> bool:
    """torchvision's compiled ops load into this torch (a torchvision built for it, e.g. 0.26.0+cu130 next to torch
    2.11.0+cu130); loading them registers their schemas, which a later ``import torchvision`` finds."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    library = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
    try:
        torch.ops.load_library(library)
    except (OSError, RuntimeError):
        return False
    return True


_SP_SIZE: int | None = None   # FastVideo's sequence-parallel size, once set up


def setup(sp_size: int | None = None) -> None:
    """Make fastvideo importable and runnable here, on the CPU or a GPU (once per process). ``sp_size``: FastVideo's
    sequence-parallel size, over the ranks of the torch.distributed group already initialised (default: the group
    set up before, else 1 on a rank of its own)."""
    global _SP_SIZE
    if _SP_SIZE is not None:
        if sp_size not in (None, _SP_SIZE):
            raise ValueError(f"sp_size: FastVideo is set up with sp_size={_SP_SIZE} in this process, got {sp_size}")
        return
    if importlib.util.find_spec("scipy") is None:
        sys.meta_path.append(MissingPackage("scipy"))
    if not _torchvision_ops_load():   # a torchvision built for another torch: its import needs these schemas
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}",
                                     "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:   # defined already
                pass
    from fastvideo.platforms.cpu import CpuPlatform

    CpuPlatform.get_attn_backend_cls = classmethod(
        lambda cls, selected, head_size, dtype: "fastvideo.attention.backends.sdpa.SDPABackend")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    from fastvideo.distributed import maybe_init_distributed_environment_and_model_parallel

    maybe_init_distributed_environment_and_model_parallel(1, sp_size or 1)
    if not torch.cuda.is_available():
        import fastvideo.distributed.parallel_state as state

        original = state.get_local_torch_device   # answers "mps" on any machine without CUDA or NPU
        for module in [m for name, m in sys.modules.items() if name.startswith("fastvideo")]:
            if getattr(module, "get_local_torch_device", None) is original:
                module.get_local_torch_device = lambda: torch.device("cpu")
    _SP_SIZE = sp_size or 1


def init_parameters(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn from N(0, 1/fan_in) (1-D ones around 1 for scales, 0 for the rest), on the
    parameters' device (the same values on every CPU; a GPU draws its own)."""
    gens = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            noise = torch.randn(p.shape, generator=gen, device=p.device)
            if p.dim() >= 2:
                p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def _arch(config, **arch):
    for key, value in arch.items():
        setattr(config.arch_config, key, value)
    config.arch_config.__post_init__()
    return config


TINY = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, freq_dim=16, ffn_dim=32,
            num_layers=2)


def wan(*, local_attn_size: int, sink_size: int, frames_per_block: int = 3, seed: int = 0, dtype=torch.float32,
        device="cpu", **arch) -> torch.nn.Module:
    """A random-weight ``CausalWanTransformer3DModel`` (Self-Forcing-style causal Wan; tiny unless ``arch`` says
    otherwise), built on ``device``."""
    setup()
    from fastvideo.configs.models.dits import WanVideoConfig
    from fastvideo.models.dits.causal_wanvideo import CausalWanTransformer3DModel

    config = _arch(WanVideoConfig(), **{**TINY, "text_dim": 16, "text_len": 8, "local_attn_size": local_attn_size,
                                       "sink_size": sink_size, "num_frames_per_block": frames_per_block,
                                       "sliding_window_num_frames": max(local_attn_size, 1), **arch})
    with torch.device(device):
        model = CausalWanTransformer3DModel(config, {})
    return init_parameters(model.to(device), seed).to(dtype).eval()


def matrixgame2(*, local_attn_size: int, sink_size: int, frames_per_block: int = 3, seed: int = 0,
                dtype=torch.float32, device="cpu", **arch) -> torch.nn.Module:
    """A random-weight ``CausalMatrixGame2WanModel`` (Matrix-Game 2.0, no action module; tiny unless ``arch`` says
    otherwise), built on ``device``."""
    setup()
    from fastvideo.configs.models.dits.matrixgame2 import MatrixGame2WanVideoConfig
    from fastvideo.models.dits.matrixgame2.causal_model import CausalMatrixGame2WanModel

    config = _arch(MatrixGame2WanVideoConfig(), **{**TINY, "image_dim": 16, "text_dim": 0,
                                                  "action_config": {}, "local_attn_size": local_attn_size,
                                                  "sink_size": sink_size, "num_frames_per_block": frames_per_block,
                                                  "sliding_window_num_frames": local_attn_size, **arch})
    with torch.device(device):
        model = CausalMatrixGame2WanModel(config, {})
    return init_parameters(model.to(device), seed).to(dtype).eval()


def frame_seq_length(height: int, width: int) -> int:
    """Tokens per latent frame of a ``height`` × ``width`` latent at the models' (1, 2, 2) patch."""
    return (height // 2) * (width // 2)


def caches(model, batch: int, frame_len: int, dtype, text_len: int, device="cpu"):
    """The per-layer ``kv_cache`` and ``crossattn_cache`` dicts FastVideo's stages create for a request (on the
    model's ``device``, index tensors included, as the stages make them)."""
    heads, head_dim = model.num_attention_heads, model.attention_head_dim
    size = model.local_attn_size * frame_len
    kv = [{"k": torch.zeros(batch, size, heads, head_dim, dtype=dtype, device=device),
           "v": torch.zeros(batch, size, heads, head_dim, dtype=dtype, device=device),
           "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
           "local_end_index": torch.tensor([0], dtype=torch.long, device=device)} for _ in model.blocks]
    cross = [{"k": torch.zeros(batch, text_len, heads, head_dim, dtype=dtype, device=device),
              "v": torch.zeros(batch, text_len, heads, head_dim, dtype=dtype, device=device), "is_init": False}
             for _ in model.blocks]
    return kv, cross


def conditioning(model, batch: int, seed: int) -> dict:
    """Random text (Wan) or image (Matrix-Game 2.0) conditioning in the model's dtype and on its device, as model
    keywords (drawn on the CPU: the same values on every device)."""
    gen = torch.Generator().manual_seed(seed)
    dtype, device = model.proj_out.weight.dtype, model.proj_out.weight.device
    if type(model).__name__ == "CausalMatrixGame2WanModel":
        image = torch.randn(batch, 257, model.config.arch_config.image_dim, generator=gen).to(device, dtype)
        return {"encoder_hidden_states": None, "encoder_hidden_states_image": [image], "text_len": 257}
    text = torch.randn(batch, model.text_len, model.config.arch_config.text_dim, generator=gen).to(device, dtype)
    return {"encoder_hidden_states": text, "text_len": model.text_len}


def stream_blocks(model, *, blocks: list[int], steps: int, height: int, width: int, seed: int,
                  record=None) -> list[torch.Tensor]:
    """Call ``model`` as FastVideo's causal stages do: per block of ``blocks[i]`` latent frames, ``steps``
    denoising calls then the clean t=0 pass, all at ``current_start = start_frame · frame_seq_length``, on caches
    made fresh for the request. Inputs are drawn from ``seed`` (the same for every model); returns every output.
    ``record(call, kv_cache)`` (optional) runs each model call ``call()`` and returns its output, e.g. to count
    host syncs or cache traffic."""
    gen = torch.Generator().manual_seed(seed)
    dtype = model.proj_out.weight.dtype
    frame_len = frame_seq_length(height, width)
    cond = conditioning(model, 1, seed)
    kv, cross = caches(model, 1, frame_len, dtype, cond.pop("text_len"))
    text = cond.pop("encoder_hidden_states")
    outputs, start = [], 0
    from fastvideo.forward_context import set_forward_context

    with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None):
        for frames in blocks:
            x = torch.randn(1, model.in_channels, frames, height, width, generator=gen).to(dtype)
            for t in [int(1000 * (1 - i / steps)) for i in range(steps)] + [0]:
                timestep = torch.full((1, frames), t, dtype=torch.long)
                def call(x=x, timestep=timestep, start=start):
                    return model(x, text, timestep, kv_cache=kv, crossattn_cache=cross,
                                 current_start=start * frame_len, start_frame=start, **cond)
                out = record(call, kv) if record else call()
                outputs.append(out)
                x = (0.5 * x + 0.5 * out).to(dtype)
            start += frames
    return outputs


def run_stage(model, *, num_frames: int, steps: int, height: int, width: int, seed: int,
              transformer_2=None) -> torch.Tensor:
    """FastVideo's own denoising stage (``CausalDMDDenosingStage`` for causal Wan,
    ``MatrixGame2CausalDenoisingStage`` for Matrix-Game 2.0) on random latents; returns the denoised latents.
    The stages run in bf16 (their ``target_dtype``), so ``model`` must be bf16. ``transformer_2`` (Wan) turns on
    the Wan2.2-MoE path: two models, two caches, a first block of one frame."""
    from fastvideo.models.schedulers.scheduling_self_forcing_flow_match import SelfForcingFlowMatchScheduler
    from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
    from fastvideo.pipelines.stages import CausalDMDDenosingStage, MatrixGame2CausalDenoisingStage

    matrix = type(model).__name__ == "CausalMatrixGame2WanModel"
    gen = torch.Generator().manual_seed(seed)
    cond = conditioning(model, 1, seed)
    scheduler = SelfForcingFlowMatchScheduler(num_inference_steps=1000, shift=5.0, extra_one_step=True)
    stage_cls = MatrixGame2CausalDenoisingStage if matrix else CausalDMDDenosingStage
    stage = stage_cls(transformer=model, scheduler=scheduler, transformer_2=transformer_2)
    channels = model.in_channels
    batch = ForwardBatch(data_type="video", generator=torch.Generator().manual_seed(seed + 1),
                         latents=torch.randn(1, channels, num_frames, height, width, generator=gen),
                         prompt_embeds=[torch.zeros(1, 1)] if matrix else [cond["encoder_hidden_states"]],
                         image_embeds=cond.get("encoder_hidden_states_image", []))
    boundary = 0.5 if transformer_2 is not None else None
    args = SimpleNamespace(
        disable_autocast=True, enable_stage_verification=False,
        pipeline_config=SimpleNamespace(
            dmd_denoising_steps=[int(1000 * (1 - i / steps)) for i in range(steps)], warp_denoising_step=True,
            context_noise=0, dit_config=SimpleNamespace(boundary_ratio=boundary, patch_size=(1, 2, 2)),
            text_encoder_configs=[SimpleNamespace(arch_config=SimpleNamespace(text_len=cond["text_len"]))]))
    # the stages autocast to bf16 on CUDA only; on this CPU the same autocast is applied around them
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return stage.forward(batch, args).latents


_MOVES = {"aten::copy_", "aten::clone", "aten::cat", "aten::_to_copy", "aten::index_put_", "aten::slice_scatter",
          "aten::index_select", "aten::gather", "aten::stack"}


class CacheTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes moved by cache handling: every data-moving op (copy, clone, cat, gather, scatter, ``ring_write``) that
    reads or writes the storage of the given self-attention caches, counted as the bytes it reads plus the bytes
    it writes (``ring_write``: its new tokens, read once and written once). Attention reading the window, views
    and everything not touching the caches are not counted."""

    def __init__(self, kv_cache: list[dict]):
        super().__init__()
        self.ptrs = {c[key].untyped_storage().data_ptr() for c in kv_cache for key in ("k", "v")}
        self.bytes = 0
        self.ops: dict[str, int] = {}

    def _touches(self, tensors) -> bool:
        return any(t.untyped_storage().data_ptr() in self.ptrs for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if name == "streamkern::ring_write" or name in _MOVES:
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            inputs = [t for t in flat if isinstance(t, torch.Tensor)]
            outs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            if name == "streamkern::ring_write":
                moved = 2 * sum(t.nbytes for t in inputs[2:4])
            elif self._touches(inputs + outs):
                if name.endswith("_"):   # in place: the first argument is the destination
                    moved = args[0].nbytes + sum(t.nbytes for t in inputs[1:])
                else:
                    moved = sum(t.nbytes for t in inputs) + sum(t.nbytes for t in outs)
            else:
                moved = 0
            if moved:
                self.bytes += moved
                self.ops[name] = self.ops.get(name, 0) + 1
        return out
