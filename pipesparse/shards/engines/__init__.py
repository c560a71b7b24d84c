"""Engines: each turns input shards into an ordered stream of sparsified Arrow tables.

An engine is a context manager (it owns its workers or cluster for the run) with one method,
``run(shards) -> Iterator[(shard index, pa.Table)]``, in shard and row order; the caller writes
the tables, commits each shard and updates the manifest, so every engine writes the same files
the same way.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ENGINES", "make_engine"]

ENGINES = ("local", "hf", "ray")


def make_engine(name: str, job: Any, batch_rows: int, workers: int, scratch: str) -> Any:
    """The engine ``name``; its library is imported only when it is asked for."""
    if name == "local":
        from pipesparse.shards.engines.local import LocalEngine

        return LocalEngine(job, batch_rows)
    if name == "hf":
        from pipesparse.shards.engines.hf import HFEngine

        return HFEngine(job, batch_rows, workers, scratch)
    if name == "ray":
        from pipesparse.shards.engines.ray import RayEngine

        return RayEngine(job, batch_rows, workers)
    raise ValueError(f"unknown engine {name!r}; accepted: {', '.join(ENGINES)}")
