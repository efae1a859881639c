"""FLOPs per sample of the production-sized networks (the `sd15` flavour of
jobs/configs/namd_nlst.yaml, the Gemma 3 4B-shaped LLM conditioner, the CLDM `unimiss`
encoder) and what they add up to for an NLST-sized cohort: the device-independent input
of docs/scaling.md.

The networks are built on PyTorch's meta device (shapes only: no weights, no memory, no
arithmetic; the small temporal transformer runs on the CPU) and run through
torch.utils.flop_counter.FlopCounterMode, forward and, for training, backward: FLOPs are
counted per aten op from shapes, so the figures do not depend on this machine. The aten
ops each call dispatches are counted too (a proxy for the kernels an eager step launches).
The whole run takes well under a minute of CPU (the 4B LLM's backward dominates).

Derived figures use ASSUMED rates, all flags: GPU-hours = FLOPs / (peak x MFU) (defaults:
H100 SXM bf16 dense 989 TFLOP/s, 35% MFU); a step model per training stage and layout,
max(compute, ops x host time per op) + gradient all-reduce at an assumed bus bandwidth,
plus checkpoint write time; the same call model for cohort forecasting. Nothing here was
measured on a GPU.

    python benchmarks/scaling_flops.py                    # tables
    python benchmarks/scaling_flops.py --json             # the same figures as JSON
    python benchmarks/scaling_flops.py --mfu 0.3 --trajectories 26000 --cases 26000
    python benchmarks/scaling_flops.py --ingest-probe     # also time one NLST-sized CT
        # (512 x 512 x --slices DICOM series written to a temp folder, ~130 MB) through
        # ingestion's per-study function with namd_nlst.yaml's ingest settings

Workload: stage steps, micro-batches and workers come from --config (namd_nlst.yaml:
NAMD App. B's schedules); stage d's NLST-sized variant is --epochs x --trajectories
(one target per trajectory per epoch, README "Stage d details"); forecasting is --cases x
--samples x steps. The cohort sizes are assumptions (see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

GEMMA3_4B = dict(  # Gemma 3 4B's published text config (MedGemma 1.5 4B's backbone): an assumption
    vocab_size=262208,
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=34,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    sliding_window=1024,
    query_pre_attn_scalar=256,
)
ZERO2_BYTES_PER_PARAM = 14  # bf16 weights (2) + fp32 master, Adam m and v (12) in a DeepSpeed checkpoint
BATCH = 2  # rows per counted call (FLOPs are per row; 2 keeps batch-dependent code paths honest)


def _count(fn) -> float:
    """FLOPs of fn() per row of BATCH."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / BATCH


def _ops(fn) -> int:
    """aten ops fn() dispatches, views and empty allocations left out: a rough proxy for
    the kernels one eager call launches, whatever the batch size."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default}

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func not in free:
                Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.n


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_networks(cfg, llm_tokens: int) -> dict[str, dict]:
    """{name: {params, fwd, train}}: FLOPs per sample (train = forward + backward)."""
    import torch
    from transformers import Gemma3TextConfig, Gemma3TextModel

    from cohortcast.config.cldm import unimiss_encoder
    from cohortcast.models.denoiser import ConditionalDenoiser
    from cohortcast.models.perceptual import LPIPS
    from cohortcast.models.temporal import TemporalContextEncoder
    from cohortcast.models.universal_encoder import UniversalEncoder
    from cohortcast.models.vae import NoduleVAE

    m = cfg.model
    # Shapes only: the weight folders the config names are not read (same architecture).
    vae_cfg, den_cfg = replace(m.vae, pretrained_path=None), replace(m.denoiser, pretrained_path=None)
    c, h, w = m.vae.latent_shape
    d = m.denoiser.cross_attention_dim
    K = m.temporal.max_exams
    meta = torch.device("meta")
    out: dict[str, dict] = {}
    with meta:
        lm_cfg = Gemma3TextConfig(**GEMMA3_4B)
        lm_cfg._attn_implementation = "sdpa"
        lm = Gemma3TextModel(lm_cfg).to(torch.bfloat16).requires_grad_(False)
        unet = ConditionalDenoiser(den_cfg, c, h, lm_cfg.hidden_size)
        vae = NoduleVAE(vae_cfg)
        lpips = LPIPS().to(meta)  # its constant buffers are cloned from CPU tensors
        encoder = UniversalEncoder(unimiss_encoder())
    # The temporal transformer checks its mask with a Python branch (no meta tensors): it
    # is small (d 768), so it runs on the CPU for real, once.
    temporal = TemporalContextEncoder(m.temporal, m.vae.latent_numel, d)

    def rand(*shape, grad=False, dtype=None):
        return torch.randn(*shape, device=meta, dtype=dtype, requires_grad=grad)

    # U-Net: noisy + baseline latents (8 channels), 3 context tokens (EHR, temporal, date).
    z, ctx, t = rand(BATCH, c, h, w), rand(BATCH, 3, d), torch.full((BATCH,), 500, device=meta)
    out["unet"] = {
        "params": _params(unet.unet),
        "params_trainable": _params(unet),  # + EHR projection and null tokens
        "what": f"UNet2DConditionModel {tuple(m.denoiser.block_out_channels)} at {c}x{h}x{w} latents (+{c} baseline channels)",
        "fwd": _count(lambda: unet(z, t, z, ctx)),
        "train": _count(lambda: unet(z, t, z, ctx).float().pow(2).mean().backward()),
        "train_ops": _ops(lambda: unet(z, t, z, ctx).float().pow(2).mean().backward()),
        "fwd_ops": _ops(lambda: unet(z, t, z, ctx)),
    }
    size = m.vae.sample_size
    x = rand(BATCH, 1, size, size)
    out["vae"] = {
        "params": _params(vae),
        "what": f"AutoencoderKL {tuple(m.vae.block_out_channels)} + probe at {size} px",
        "encode": _count(lambda: vae.encode(x).mean),
        "decode": _count(lambda: vae.decode(rand(BATCH, c, h, w))),
        "encode_ops": _ops(lambda: vae.encode(x).mean),
        "decode_ops": _ops(lambda: vae.decode(rand(BATCH, c, h, w))),
        "fwd": _count(lambda: vae(x, sample=False)),
        "train": _count(lambda: vae(x, sample=False).reconstruction.pow(2).mean().backward()),
        "train_ops": _ops(lambda: vae(x, sample=False).reconstruction.pow(2).mean().backward()),
    }
    # LPIPS (frozen VGG16): forward on the reconstruction and the target, backward into the reconstruction.
    out["lpips"] = {
        "params": _params(lpips),
        "what": f"LPIPS VGG16, frozen, at {size} px (loss term of the VAE stage)",
        "fwd": _count(lambda: lpips(x, x)),
        "train": _count(lambda: lpips(rand(BATCH, 1, size, size, grad=True), x).sum().backward()),
        "train_ops": _ops(lambda: lpips(rand(BATCH, 1, size, size, grad=True), x).sum().backward()),
    }
    lat, days, mask = (
        torch.randn(BATCH, K, c, h, w),
        torch.rand(BATCH, K) * 1000,
        torch.ones(BATCH, K, dtype=torch.bool),
    )
    hor = torch.rand(BATCH) * 400
    out["temporal"] = {
        "params": _params(temporal),
        "what": f"temporal transformer d {m.temporal.d_model}, {m.temporal.num_layers} layers, {K} prior exams",
        "fwd": _count(lambda: temporal(lat, days, mask, hor)),
        "fwd_ops": _ops(lambda: temporal(lat, days, mask, hor)),
        "train": _count(lambda: sum(o.sum() for o in temporal(lat, days, mask, hor)).backward()),
        "train_ops": _ops(lambda: sum(o.sum() for o in temporal(lat, days, mask, hor)).backward()),
    }
    # Frozen LLM: soft prompts + padded report tokens; training back-propagates into the
    # soft prompts only (input gradients, no weight gradients).
    prompts = m.conditioner.num_soft_prompts

    def llm(grad: bool):
        soft = rand(BATCH, prompts, lm_cfg.hidden_size, grad=grad, dtype=torch.bfloat16)
        text = rand(BATCH, llm_tokens - prompts, lm_cfg.hidden_size, dtype=torch.bfloat16)
        hidden = lm(inputs_embeds=torch.cat([soft, text], 1)).last_hidden_state
        if grad:
            hidden[:, -1].float().sum().backward()

    n_lm = _params(lm)
    out["llm"] = {
        "params": n_lm,
        "params_non_embedding": n_lm - lm.get_input_embeddings().weight.numel(),
        "what": f"Gemma 3 4B-shaped text model (assumed MedGemma 1.5 4B), {llm_tokens} tokens ({prompts} soft prompts + {llm_tokens - prompts} padded text), bf16",
        "fwd": _count(lambda: llm(False)),
        "train": _count(lambda: llm(True)),
        "train_ops": _ops(lambda: llm(True)),
        "fwd_ops": _ops(lambda: llm(False)),
    }
    e = encoder.cfg
    vol = rand(BATCH, 1, *e.volume_3d)
    out["cldm_encoder"] = {
        "params": _params(encoder),
        "what": f"CLDM universal encoder `unimiss` (ViT-B, d {e.dim}), one {list(e.volume_3d)} CT, all tokens (the study latent cache)",
        "fwd": _count(lambda: encoder.tokens(vol)),
        "tokens_3d": math.prod(s // p for s, p in zip(e.volume_3d, e.patch_3d)),
        "tokens_2d": math.prod(s // p for s, p in zip(e.image_2d, e.patch_2d)),
        "dim": e.dim,
    }
    return out


def stage_workload(cfg, nets: dict, args) -> list[dict]:
    """Per training stage: samples, FLOPs per sample, total FLOPs."""
    t, s = cfg.training, cfg.training.scaling
    per_sample = {
        "vae": nets["vae"]["train"] + nets["lpips"]["train"],
        "ldm_uncond": nets["unet"]["train"],  # null context: no LLM, no temporal
        "ldm_cond": nets["unet"]["train"] + nets["temporal"]["train"] + nets["llm"]["train"],
    }
    rows = []
    for name in ("vae", "ldm_uncond", "ldm_cond"):
        st = getattr(t, name)
        global_batch = st.micro_batch_size * st.grad_accumulation * s.num_workers
        samples = st.max_steps * global_batch
        rows.append(
            {
                "stage": name,
                "source": f"{Path(args.config).name}: {st.max_steps} steps x global batch {global_batch}",
                "steps": st.max_steps,
                "global_batch": global_batch,
                "samples": samples,
                "flops_per_sample": per_sample[name],
            }
        )
    samples = args.epochs * args.trajectories
    rows.append(
        {
            "stage": "ldm_cond (NLST-sized)",
            "source": f"{args.epochs} epochs x {args.trajectories} trajectories (assumed cohort)",
            "steps": math.ceil(samples / 8),
            "global_batch": 8,
            "samples": samples,
            "flops_per_sample": per_sample["ldm_cond"],
        }
    )
    for row in rows:
        row["flops"] = row["samples"] * row["flops_per_sample"]
    return rows


# (stage, nodes, GPUs per node, global batch): the paper's batches on 1 GPU and on one
# 8-GPU node (namd_nlst.yaml's layout), then stage d at a larger global batch (a recipe
# change whose effect on quality is not measured) across nodes.
STEP_SCENARIOS = [
    ("vae", 1, 1, 64),
    ("vae", 1, 8, 64),
    ("ldm_uncond", 1, 1, 16),
    ("ldm_uncond", 1, 8, 16),
    ("ldm_cond (NLST-sized)", 1, 1, 8),
    ("ldm_cond (NLST-sized)", 1, 8, 8),
    ("ldm_cond (NLST-sized)", 1, 8, 256),
    ("ldm_cond (NLST-sized)", 4, 8, 256),
    ("ldm_cond (NLST-sized)", 16, 8, 256),
]


def step_model(cfg, nets: dict, stages: list[dict], args) -> list[dict]:
    """Time per optimizer step = max(GPU compute at the assumed MFU, host time of the
    eager ops at --host-us-per-op) + the gradient all-reduce (ZeRO-2's reduce-scatter +
    all-gather moves what one all-reduce does; bf16 gradients; not overlapped, since the
    backward is too short to hide it). Every input but the FLOPs and op counts is assumed."""
    rate = args.peak_tflops * 1e12 * args.mfu
    ops = {
        "vae": nets["vae"]["train_ops"] + nets["lpips"]["train_ops"],
        "ldm_uncond": nets["unet"]["train_ops"],
        "ldm_cond (NLST-sized)": nets["unet"]["train_ops"] + nets["temporal"]["train_ops"] + nets["llm"]["train_ops"],
    }
    trainable = {
        "vae": nets["vae"]["params"],
        "ldm_uncond": nets["unet"]["params_trainable"],
        "ldm_cond (NLST-sized)": nets["unet"]["params_trainable"] + nets["temporal"]["params"],
    }
    every = {"vae": cfg.training.vae.checkpoint_every, "ldm_uncond": cfg.training.ldm_uncond.checkpoint_every}
    every["ldm_cond (NLST-sized)"] = cfg.training.ldm_cond.checkpoint_every
    by_stage = {r["stage"]: r for r in stages}
    rows = []
    for stage, nodes, per_node, batch in STEP_SCENARIOS:
        gpus = nodes * per_node
        flops = by_stage[stage]["flops_per_sample"]
        compute = batch / gpus * flops / rate
        host = ops[stage] * args.host_us_per_op * 1e-6
        grad_bytes = 2 * trainable[stage]
        fabrics = {"nvlink": args.nvlink_busbw} if nodes == 1 else {"ib": args.ib_busbw, "ethernet": args.eth_busbw}
        for fabric, busbw in fabrics.items():
            reduce = 0.0 if gpus == 1 else 2 * (gpus - 1) / gpus * grad_bytes / (busbw * 1e9)
            step = max(compute, host) + reduce
            steps = math.ceil(by_stage[stage]["samples"] / batch)
            ckpt = ZERO2_BYTES_PER_PARAM * trainable[stage] / (args.checkpoint_gbps * 1e9)
            rows.append(
                {
                    "stage": stage,
                    "nodes": nodes,
                    "gpus": gpus,
                    "global_batch": batch,
                    "fabric": fabric if gpus > 1 else "-",
                    "steps": steps,
                    "compute_ms": 1e3 * compute,
                    "host_ms": 1e3 * host,
                    "allreduce_ms": 1e3 * reduce,
                    "step_ms": 1e3 * step,
                    "bound": "all-reduce"
                    if reduce > max(compute, host)
                    else ("compute" if compute >= host else "host"),
                    "wall_hours": steps * step / 3600,
                    "gpu_hours": steps * step * gpus / 3600,
                    "checkpoint_s": ckpt,
                    "checkpoint_overhead": ckpt / (every[stage] * step),
                }
            )
    return rows


def forecast_workload(cfg, nets: dict, args) -> list[dict]:
    """Per case: LLM, VAE encode and temporal once per case, samples x steps U-Net rows,
    one VAE decode per sample. Every network call runs on exactly `micro_batch` rows
    (scheduler.micro_batch: the last chunk padded), so a call's time is max(compute of
    micro_batch rows, host time of its ops): FLOPs floor and step model side by side, for
    the config's (cases_per_batch, micro_batch) and for a GPU-sized micro-batch."""
    rate = args.peak_tflops * 1e12 * args.mfu
    host = args.host_us_per_op * 1e-6
    n, v, lm, tp = nets["unet"], nets["vae"], nets["llm"], nets["temporal"]
    S = args.samples
    layouts = [
        (args.cases_per_batch, cfg.model.scheduler.micro_batch),
        (args.gpu_cases_per_batch, args.gpu_micro_batch),
    ]
    rows = []
    for cpb, mb in layouts:
        per_case_calls = math.ceil(cpb / mb) / cpb  # once-per-case networks: calls per case
        per_sample_calls = math.ceil(cpb * S / mb) / cpb  # per-sample networks: calls per case (x steps for the U-Net)

        def call(flops_per_row, ops, mb=mb):
            return max(mb * flops_per_row / rate, ops * host)

        once_flops = per_case_calls * mb * (lm["fwd"] + v["encode"] + tp["fwd"])
        once_s = per_case_calls * (call(lm["fwd"], lm["fwd_ops"]) + call(v["encode"], v["encode_ops"]))
        once_s += per_case_calls * call(tp["fwd"], tp["fwd_ops"])
        for sampler, steps in (("ddim", 50), ("dpmsolver++", 10)):
            unet_flops = per_sample_calls * mb * steps * n["fwd"]
            decode_flops = per_sample_calls * mb * v["decode"]
            per_case = once_flops + unet_flops + decode_flops
            seconds = once_s + per_sample_calls * (
                steps * call(n["fwd"], n["fwd_ops"]) + call(v["decode"], v["decode_ops"])
            )
            rows.append(
                {
                    "sampler": sampler,
                    "steps": steps,
                    "samples": S,
                    "cases": args.cases,
                    "cases_per_batch": cpb,
                    "micro_batch": mb,
                    "flops_per_case": per_case,
                    "unet_share": unet_flops / per_case,
                    "flops": per_case * args.cases,
                    "gpu_s_per_case_step_model": seconds,
                    "gpu_hours_step_model": seconds * args.cases / 3600,
                }
            )
    return rows


def cache_bytes(cfg, nets: dict) -> dict:
    """Tensor bytes per row from the table schemas (float32 unless noted)."""
    c, h, w = cfg.model.vae.latent_shape
    crop, patch, vol = cfg.ingest.crop_size, cfg.ingest.patch_size, cfg.ingest.volume_shape
    latent = 4 * c * h * w
    e = nets["cldm_encoder"]
    return {
        "nodules_row": 4 * crop**2 + 4 * patch**3 + 8 * 16,  # crop, patch, crop_affine
        "latent_cache_row": 4 * crop**2
        + 8 * 16
        + latent
        + 8 * latent,  # crop, affine, latent, latent_d8 (patch dropped)
        "latent_cache_row_latents_only": 9 * latent,
        "studies_row_ct": 4 * math.prod(vol) + 2 * math.prod(vol) + 4 * cfg.ingest.radiograph_size**2 + 3 * 8 * 16,
        "cldm_study_latents_ct": 4 * (1 + e["tokens_3d"]) * e["dim"],
        "cldm_study_latents_dx": 4 * (1 + e["tokens_2d"]) * e["dim"],
    }


def ingest_probe(cfg, slices: int, nodules: int) -> dict:
    """Write one 512 x 512 x slices CT series (0.7 x 0.7 x 1.25 mm) and time the reader
    and process_study on it (files in the page cache: decode + crop + resample, not disk)."""
    import datetime as dt
    import tempfile

    import numpy as np

    from cohortcast.data.readers import read_study
    from cohortcast.data.study_processing import process_study
    from cohortcast.io.dicom import DicomIdentity, write_ct_series
    from cohortcast.io.volume import Volume

    rng = np.random.default_rng(0)
    spacing = (0.7, 0.7, 1.25)
    hu = np.full((slices, 512, 512), -1000.0, np.float32)
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) / 200) ** 2 + ((xx - 256) / 240) ** 2 < 1
    hu[:, body] = rng.normal(-700, 150, (slices, int(body.sum()))).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-179.2, -179.2, -slices * spacing[2] / 2)
    ident = DicomIdentity("probe", "probe", None, "O", "", "", dt.date(2001, 1, 1), "probe")
    with tempfile.TemporaryDirectory(prefix="cohortcast-probe-") as tmp:
        folder = Path(tmp) / "ct"
        write_ct_series(Volume(hu, affine), folder, ident)
        del hu
        series_bytes = sum(f.stat().st_size for f in folder.iterdir())
        findings = [
            {"nodule_id": str(k), "center_x_mm": 30.0 * k - 40, "center_y_mm": 20.0, "center_z_mm": 0.0}
            for k in range(nodules)
        ]
        task = {
            "patient": "p",
            "study": "s",
            "split": "train",
            "study_date": "2001-01-01",
            "days_since_baseline": 0,
            "exam_index": 0,
            "num_exams": 1,
            "modality": "CT",
            "report_text": "",
            "rel_path": "ct",
            "path": str(folder),
            "dims": 3,
            "findings_json": json.dumps(findings),
        }
        timings = {"read": [], "read_cpu": [], "process_study": [], "process_study_cpu": []}
        for _ in range(2):
            wall, cpu = time.perf_counter(), time.process_time()
            read_study(folder, modality="CT")
            timings["read"].append(time.perf_counter() - wall)
            timings["read_cpu"].append(time.process_time() - cpu)
            wall, cpu = time.perf_counter(), time.process_time()
            result = process_study(task, cfg.ingest)
            timings["process_study"].append(time.perf_counter() - wall)
            timings["process_study_cpu"].append(time.process_time() - cpu)
        if result["status"] != "ok":
            raise RuntimeError(f"probe study was quarantined: {result['message']}")
    out_bytes = sum(v.nbytes for k, v in result.items() if isinstance(v, np.ndarray))
    return {
        "slices": slices,
        "nodules": nodules,
        "series_bytes": series_bytes,
        **{f"{k}_s": round(min(v), 3) for k, v in timings.items()},  # best of 2; *_cpu: CPU seconds, all threads
        "result_tensor_bytes": out_bytes,
        "volume_shape": list(cfg.ingest.volume_shape),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, one process",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", default="jobs/configs/namd_nlst.yaml", help="config whose model and stages are counted"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="assumed dense bf16 peak per GPU (H100 SXM: 989)"
    )
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOP utilisation (0-1)")
    parser.add_argument("--host-us-per-op", type=float, default=8.0, help="assumed host time per eager op (us)")
    parser.add_argument(
        "--nvlink-busbw", type=float, default=400.0, help="assumed NCCL all-reduce bus bandwidth in a node (GB/s)"
    )
    parser.add_argument(
        "--ib-busbw", type=float, default=300.0, help="assumed across nodes, 8 x 400 Gb/s IB per node (GB/s)"
    )
    parser.add_argument(
        "--eth-busbw", type=float, default=11.0, help="assumed across nodes, 100 Gb/s Ethernet per node (GB/s)"
    )
    parser.add_argument(
        "--checkpoint-gbps", type=float, default=2.0, help="assumed write bandwidth to shared storage (GB/s)"
    )
    parser.add_argument("--trajectories", type=int, default=26000, help="assumed (patient, nodule) trajectories")
    parser.add_argument("--epochs", type=int, default=60, help="conditional-stage epochs (NAMD App. B: 60)")
    parser.add_argument("--cases", type=int, default=26000, help="assumed forecast cases (one per trajectory)")
    parser.add_argument("--samples", type=int, default=20, help="samples per case (NAMD: 20)")
    parser.add_argument(
        "--cases-per-batch",
        type=int,
        default=None,
        help="cases per forecast call (default: the config's forecast.cases_per_batch)",
    )
    parser.add_argument(
        "--llm-tokens", type=int, default=None, help="LLM sequence (default: soft prompts + max_length)"
    )
    parser.add_argument("--gpu-cases-per-batch", type=int, default=400, help="cases per call in the GPU-sized layout")
    parser.add_argument(
        "--gpu-micro-batch", type=int, default=400, help="scheduler.micro_batch in the GPU-sized layout"
    )
    parser.add_argument("--ingest-probe", action="store_true", help="also time one NLST-sized CT through ingestion")
    parser.add_argument("--slices", type=int, default=250, help="slices of the probe CT (512 x 512 each)")
    parser.add_argument("--nodules", type=int, default=1, help="findings in the probe CT")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args()

    import torch

    from cohortcast.config import load_config

    torch.set_num_threads(1)
    started = time.perf_counter()
    cfg = load_config(args.config)
    if args.cases_per_batch is None:
        args.cases_per_batch = cfg.forecast.cases_per_batch
    tokens = args.llm_tokens or cfg.model.conditioner.num_soft_prompts + cfg.model.conditioner.max_length
    nets = count_networks(cfg, tokens)
    rate = args.peak_tflops * 1e12 * args.mfu
    stages = stage_workload(cfg, nets, args)
    forecasts = forecast_workload(cfg, nets, args)
    for row in stages + forecasts:
        row["gpu_hours_at_assumed_mfu"] = row["flops"] / rate / 3600
    steps = step_model(cfg, nets, stages, args)
    report = {
        "config": args.config,
        "assumed": {
            "peak_tflops": args.peak_tflops,
            "mfu": args.mfu,
            "host_us_per_op": args.host_us_per_op,
            "busbw_gbps": {"nvlink": args.nvlink_busbw, "ib": args.ib_busbw, "ethernet": args.eth_busbw},
            "checkpoint_gbps": args.checkpoint_gbps,
            "zero2_checkpoint_bytes_per_param": ZERO2_BYTES_PER_PARAM,
            "trajectories": args.trajectories,
            "cases": args.cases,
        },
        "networks": nets,
        "training": stages,
        "step_model": steps,
        "forecast": forecasts,
        "bytes": cache_bytes(cfg, nets),
        "checkpoint_bytes": {
            k: nets[k]["params"] * ZERO2_BYTES_PER_PARAM for k in ("unet", "vae", "temporal", "cldm_encoder")
        },
        "counted_in_s": None,
        "torch": torch.__version__,
    }
    report["counted_in_s"] = round(time.perf_counter() - started, 1)
    if args.ingest_probe:
        report["ingest_probe"] = ingest_probe(cfg, args.slices, args.nodules)
    if args.json:
        print(json.dumps(report, indent=2))
        return

    g = 1e9
    print(
        f"FLOPs per sample ({args.config}, counted on the meta device with FlopCounterMode, torch {torch.__version__})"
    )
    print(f"{'network':<13} {'params':>14} {'fwd GFLOP':>11} {'train GFLOP':>12}  what")
    for name, n in nets.items():
        train = f"{n['train'] / g:12.1f}" if "train" in n else f"{'-':>12}"
        print(f"{name:<13} {n['params']:>14,} {n['fwd'] / g:11.2f} {train}  {n['what']}")
    v = nets["vae"]
    print(f"  vae encode {v['encode'] / g:.2f} GFLOP, decode {v['decode'] / g:.2f} GFLOP per image")
    u, lm = nets["unet"], nets["llm"]
    print(
        f"  aten ops per eager call (~kernels, any batch): unet fwd {u['fwd_ops']}, unet fwd+bwd {u['train_ops']}, "
        f"vae fwd+bwd {v['train_ops']}, lpips {nets['lpips']['train_ops']}, temporal {nets['temporal']['train_ops']}, "
        f"llm fwd {lm['fwd_ops']}, llm fwd+bwd {lm['train_ops']}"
    )
    print(f"\nTraining (GPU-hours = FLOPs / ({args.peak_tflops:g} TFLOP/s x {args.mfu:g} MFU), both assumed)")
    print(f"{'stage':<22} {'samples':>11} {'TFLOP/sample':>13} {'EFLOP':>8} {'GPU-h':>8}  source")
    for r in stages:
        print(
            f"{r['stage']:<22} {r['samples']:>11,} {r['flops_per_sample'] / 1e12:13.4f} {r['flops'] / 1e18:8.3f} "
            f"{r['gpu_hours_at_assumed_mfu']:8.2f}  {r['source']}"
        )
    print(
        f"\nStep model (assumed: {args.host_us_per_op:g} us/op host, busbw NVLink {args.nvlink_busbw:g} / IB {args.ib_busbw:g} / "
        f"Ethernet {args.eth_busbw:g} GB/s, checkpoints at {args.checkpoint_gbps:g} GB/s)"
    )
    print(
        f"{'stage':<22} {'nodes':>5} {'GPUs':>4} {'batch':>5} {'fabric':>8} {'steps':>8} {'compute':>8} {'host':>6} "
        f"{'reduce':>7} {'step ms':>8} {'bound':>10} {'wall h':>7} {'GPU-h':>7} {'ckpt':>5}"
    )
    for r in steps:
        print(
            f"{r['stage']:<22} {r['nodes']:>5} {r['gpus']:>4} {r['global_batch']:>5} {r['fabric']:>8} {r['steps']:>8,} "
            f"{r['compute_ms']:8.1f} {r['host_ms']:6.1f} {r['allreduce_ms']:7.1f} {r['step_ms']:8.1f} {r['bound']:>10} "
            f"{r['wall_hours']:7.2f} {r['gpu_hours']:7.2f} {r['checkpoint_overhead']:5.0%}"
        )
    print(f"\nForecasting {args.cases:,} cases x {args.samples} samples (FLOPs floor at the assumed MFU | step model)")
    print(
        f"{'sampler':<12} {'steps':>5} {'cases/call':>10} {'micro':>5} {'TFLOP/case':>11} {'U-Net':>6} {'EFLOP':>7} "
        f"{'GPU-h':>6} | {'s/case':>7} {'GPU-h':>6}"
    )
    for r in forecasts:
        print(
            f"{r['sampler']:<12} {r['steps']:>5} {r['cases_per_batch']:>10} {r['micro_batch']:>5} "
            f"{r['flops_per_case'] / 1e12:11.2f} {r['unet_share']:6.0%} {r['flops'] / 1e18:7.3f} "
            f"{r['gpu_hours_at_assumed_mfu']:6.2f} | {r['gpu_s_per_case_step_model']:7.3f} {r['gpu_hours_step_model']:6.2f}"
        )
    print("\nBytes per row (tensor columns, before Parquet compression)")
    for k, b in report["bytes"].items():
        print(f"  {k:<32} {b:>12,} B")
    print("ZeRO-2 checkpoint per stage (14 B/param, assumed layout)")
    for k, b in report["checkpoint_bytes"].items():
        print(f"  {k:<32} {b / 1e9:12.2f} GB")
    if args.ingest_probe:
        p = report["ingest_probe"]
        print(
            f"\nIngest probe ({p['machine']}): {p['slices']}-slice 512x512 series, {p['series_bytes'] / 1e6:.0f} MB; "
            f"read {p['read_s']:.2f} s ({p['read_cpu_s']:.2f} CPU-s), process_study {p['process_study_s']:.2f} s "
            f"({p['process_study_cpu_s']:.2f} CPU-s, read included) "
            f"(crops + patches + {p['volume_shape']} volume), {p['result_tensor_bytes'] / 1e6:.1f} MB of tensors out"
        )
    print(f"\ncounted in {report['counted_in_s']} s")


if __name__ == "__main__":
    main()
