"""The devices the step is modelled on, and every assumption of the time estimate, as data.

An op's time is the larger of its memory time and its compute time, and at least
``min_kernel_us`` per launch (a kernel's fixed cost: launch, ramp-up, tail)::

    t = max(bytes / (bandwidth · memory_efficiency), flops / (peak · efficiency[kind]), launches · min_kernel_us)

Peaks are the vendors' dense figures (no sparsity). The efficiencies are assumptions, not
measurements: ``fastbyol gpu-check`` records measured stage times next to these, and the first
GPU run calibrates them. Collectives (``world_size > 1``) are a ring all-reduce over NVLink:
``latency + 2·(N−1)/N · bytes / bus_bandwidth`` per call.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict

from .counter import OpCost


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth_tb_s: float  # HBM peak, TB/s
    bf16_tflops: float  # dense tensor-core peak (bf16 / fp16)
    fp32_tflops: float  # CUDA-core fp32 peak (matmuls without TF32: PyTorch's default)
    tf32_tflops: float  # dense TF32 tensor-core peak (cuDNN convolutions in fp32 use it by default)
    nvlink_bus_gb_s: float  # achievable NCCL all-reduce bus bandwidth in one node
    pcie_gb_s: float  # host→device copies


DEVICES: Dict[str, Device] = {
    "H100": Device("H100 SXM", bandwidth_tb_s=3.35, bf16_tflops=989.0, fp32_tflops=67.0, tf32_tflops=494.0,
                   nvlink_bus_gb_s=360.0, pcie_gb_s=50.0),
    "H200": Device("H200 SXM", bandwidth_tb_s=4.8, bf16_tflops=989.0, fp32_tflops=67.0, tf32_tflops=494.0,
                   nvlink_bus_gb_s=360.0, pcie_gb_s=50.0),
}


@dataclass(frozen=True)
class Assumptions:
    memory_efficiency: float = 0.80  # share of peak HBM bandwidth a streaming kernel reaches
    efficiency: Dict[str, float] = field(default_factory=lambda: {"conv": 0.55, "matmul": 0.70})  # of peak FLOPs
    min_kernel_us: float = 2.0  # the shortest a launched kernel takes
    collective_latency_us: float = 15.0  # one small NCCL all-reduce in one node
    transfer_latency_us: float = 5.0  # one small host→device copy


ASSUMPTIONS = Assumptions()


def peak_tflops(device: Device, dtype: str, kind: str) -> float:
    if "bfloat16" in dtype or "float16" in dtype or "bf16" in dtype or "fp16" in dtype:
        return device.bf16_tflops
    return device.tf32_tflops if kind == "conv" else device.fp32_tflops


def op_seconds(cost: OpCost, device: Device, world_size: int = 1, a: Assumptions = ASSUMPTIONS) -> float:
    """Modelled time of one op or launch on ``device`` (see the module doc)."""
    if cost.kind == "collective":
        ring = 2 * (world_size - 1) / world_size if world_size > 1 else 0.0
        return cost.launches * a.collective_latency_us * 1e-6 + ring * cost.bytes_read / (device.nvlink_bus_gb_s * 1e9)
    if cost.kind == "transfer":
        return a.transfer_latency_us * 1e-6 + cost.bytes_read / (device.pcie_gb_s * 1e9)
    memory = cost.bytes / (device.bandwidth_tb_s * 1e12 * a.memory_efficiency)
    compute = 0.0
    if cost.flops and cost.kind in a.efficiency:
        compute = cost.flops / (peak_tflops(device, cost.dtype, cost.kind) * 1e12 * a.efficiency[cost.kind])
    return max(memory, compute, cost.launches * a.min_kernel_us * 1e-6)


def describe(a: Assumptions = ASSUMPTIONS) -> Dict:
    """Everything the estimate assumes, for the JSON and the table's footnote."""
    return {"devices": {k: asdict(v) for k, v in DEVICES.items()}, "assumptions": asdict(a),
            "formula": "max(bytes/(bandwidth*memory_efficiency), flops/(peak*efficiency[kind]), "
                       "launches*min_kernel_us); collectives: launches*latency + 2(N-1)/N*bytes/nvlink_bus; "
                       "the step is the sum of its ops (no overlap)"}
