"""The Redis job table: current state of every job, atomic transitions, indexes."""

from smi.jobtable.connection import connect, open_table
from smi.jobtable.table import (DownloadExpired, DueItem, HistoryEntry, JobNotFound, JobTable, Page, ShardRevenue,
                                TransitionResult, hash_token, is_well_formed_token)

__all__ = ["connect", "open_table", "DownloadExpired", "DueItem", "HistoryEntry", "JobNotFound", "JobTable", "Page",
           "ShardRevenue", "TransitionResult", "hash_token", "is_well_formed_token"]
