"""The reference-parity examples run as scripts and print what they promise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_nm_sparsity(run_script):
    out = run_script(EXAMPLES / "nm_sparsity.py")
    assert out.count("kept per group of 4 = [2], zeros 0.50") == 4
    assert "semi_structured on cpu: Tensor, warnings: 1" in out or "on cuda" in out


def test_sparsity_schedule(run_script):
    out = run_script(EXAMPLES / "sparsity_schedule.py")
    pairs = [
        tuple(map(float, m)) for m in re.findall(r"scheduled ([\d.]+), measured ([\d.]+)", out)
    ]
    assert len(pairs) == 10
    measured = [m for _, m in pairs]
    assert measured == sorted(measured) and measured[0] == 0.0 and measured[-1] == 0.75
    assert all(abs(s - m) <= 1 / 16 for s, m in pairs)  # one block of 4 in a 32-wide row of 8
    assert "scheduler state: {'last_epoch': 10, '_step_count': 11}" in out


def test_embedding_sparse_quantize(run_script):
    out = run_script(EXAMPLES / "embedding_sparse_quantize.py")
    zeros = re.findall(r"pipesparse ([\d.]+) / torch.ao ([\d.]+)", out)
    assert len(zeros) == 2
    for ours, reference in zeros:
        assert float(ours) >= 0.5 > float(reference)
    assert out.count("modules now: QuantizedEmbedding, QuantizedEmbeddingBag, Linear") == 2
    errors = [float(e) for e in re.findall(r"max output error ([\d.]+)", out)]
    assert len(errors) == 2 and max(errors) < 0.05


def test_lightning_callbacks(run_script):
    pytest.importorskip("lightning")
    out = run_script(EXAMPLES / "lightning_callbacks.py")
    assert "trained model zeros: 0.00 (never modified)" in out
    assert "post-training copy: {'0_weight': 0.5, '2_weight': 0.5}" in out
    assert "training-aware copy: {'0_weight': 0.8, '2_weight': 0.75}" in out
