"""Upscalers: the Upsampler API (remote, reports by callback) and a local one that
resizes with Pillow (UPSCALER=local)."""

from smi.upscalers.base import (FAILED, FINAL_STATUSES, IN_PROGRESS, IN_QUEUE, SUCCESS, UPSCALER_STATUSES,
                                RemoteUpscaler, Submission, UpscalerUnavailable)
from smi.upscalers.local import LocalUpscaler
from smi.upscalers.upsampler import UpsamplerClient

__all__ = ["FAILED", "FINAL_STATUSES", "IN_PROGRESS", "IN_QUEUE", "SUCCESS", "UPSCALER_STATUSES", "LocalUpscaler",
           "RemoteUpscaler", "Submission", "UpscalerUnavailable", "UpsamplerClient"]
