"""Every ```python snippet of README.md runs, as written, and what its comments claim holds.

Each snippet is executed in a fresh namespace, in a temporary working directory. The README's
snippets are fragments: the names they use without defining (``dataset``, ``transform``, ...)
come from the fixture registered below for that snippet, found by a marker (a piece of the
snippet's own text). A snippet that uses a name no fixture provides fails with a NameError that
says which names to add here; a snippet that needs nothing simply runs.

When a snippet's last statement is an expression (``aware.sparsified``), its value is what the
check receives, as a user at a prompt would see it. The checks hold the snippets' comments to
what they state (``# tensor(0.7500)``, ``# 0.50``, ``Tensor(rows, 64)``).

Servers stay on 127.0.0.1: the gloo snippet's one-rank group uses a TCPStore this file binds
there, and the Ray snippet runs on a local cluster started with every server on loopback (its
``workers=8`` actors on 2 cores take about 10-15 s).
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import io
import json
import re
import shlex
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Snippet:
    index: int  # 1-based, in README order
    line: int  # line of the opening fence
    code: str

    @property
    def id(self) -> str:
        return f"snippet{self.index}-line{self.line}"


def readme_snippets() -> list[Snippet]:
    text = README.read_text(encoding="utf-8")
    return [
        Snippet(index, text.count("\n", 0, match.start()) + 1, match.group(1))
        for index, match in enumerate(FENCE.finditer(text), start=1)
    ]


def run_snippet(snippet: Snippet, namespace: dict[str, Any]) -> tuple[Any, str]:
    """Execute the snippet's text in ``namespace``; (value of a final bare expression or None,
    what it printed)."""
    tree = ast.parse(snippet.code, filename=str(README))
    ast.increment_lineno(tree, snippet.line)  # tracebacks show README.md's own lines
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(tree, str(README), "exec"), namespace)
        value = None
        if last is not None:
            value = eval(compile(ast.Expression(last.value), str(README), "eval"), namespace)
    return value, out.getvalue()


# ---------------------------------------------------------------------------------------------
# Fixtures: each one a context manager that yields the names its snippet uses, and a check of
# what the snippet's comments claim. Registered with the marker that finds its snippet.


@dataclass(frozen=True)
class Setup:
    marker: str  # a piece of the snippet's text, found in exactly one snippet
    prepare: Callable[[Env], contextlib.AbstractContextManager[dict[str, Any]]]
    check: Callable[[Ran], None] | None = None


@dataclass
class Env:
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch


@dataclass
class Ran:
    """A snippet that has run: its text, namespace, final expression's value, what it printed."""

    code: str
    ns: dict[str, Any]
    value: Any
    out: str

    def claim(self, pattern: str) -> str:
        """The first group of ``pattern`` in the snippet's text (a value its comment states)."""
        match = re.search(pattern, self.code)
        assert match, f"the snippet no longer states {pattern!r}: update tests/test_readme.py"
        return match.group(1)


SETUPS: list[Setup] = []


def setup(marker: str, check: Callable[[Ran], None] | None = None):
    def register(prepare):
        SETUPS.append(Setup(marker, contextlib.contextmanager(prepare), check))
        return prepare

    return register


def _rows(count: int, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, width)).astype(np.float32)


def _frozen_transform(width: int = 16):
    """A frozen transform calibrated on a batch of ``width`` features (as snippet 2 leaves it)."""
    from pipesparse import DataNormSparsifier
    from pipesparse.transforms import SparsifyTransform

    transform = SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), update="frozen")
    transform(torch.from_numpy(_rows(64, width, seed=1)))
    return transform


def _zeros(t: torch.Tensor | np.ndarray) -> float:
    """Fraction of zero entries."""
    return float((np.asarray(t.detach() if isinstance(t, torch.Tensor) else t) == 0).mean())


def _write_train_shards(root: Path, shards: int = 2, rows: int = 24) -> None:
    """data/train/part-0000{i}.parquet: an id, an ``emb`` column of 64 float32 per row and an
    ``img`` column of 16."""
    folder = root / "data" / "train"
    folder.mkdir(parents=True)
    for index in range(shards):
        table = pa.table(
            {
                "id": pa.array(np.arange(rows) + index * rows, pa.int64()),
                "emb": pa.array(list(_rows(rows, 64, seed=10 + index)), pa.list_(pa.float32())),
                "img": pa.array(list(_rows(rows, 16, seed=20 + index)), pa.list_(pa.float32())),
            }
        )
        pq.write_table(table, folder / f"part-{index:05d}.parquet")


def _check_core_api(ran: Ran) -> None:
    # print((masked == 0).float().mean())  # tensor(0.7500)
    assert ran.out.splitlines()[0] == ran.claim(r"print\(.*\)\s+#\s*(\S+)"), ran.out
    assert torch.equal(ran.ns["restored"].get_mask("features"), ran.ns["mask"])
    # squash_mask wrote the masks into the user's own tensors
    assert _zeros(ran.ns["features"]) == 0.75
    assert _zeros(ran.ns["emb"].weight) == 0.5


@setup('sparsifier.add_data("features"', _check_core_api)
def core_api(env):
    yield {}


def _check_transform(ran: Ran) -> None:
    result = ran.ns["out"]
    assert result["label"] is ran.ns["y"]
    assert _zeros(result["x"]) == 0.5  # a frozen mask over 16 features: 4 of 8 1x4 blocks


@setup("transform(calibration_batch)", _check_transform)
def frozen_transform(env):
    yield {
        "calibration_batch": torch.from_numpy(_rows(64, 16, seed=1)),
        "x": torch.from_numpy(_rows(8, 16, seed=2)),
        "y": torch.arange(8),
    }


def _check_collate_hook(ran: Ran) -> None:
    loader = ran.ns["loader"]
    try:
        x, label = next(iter(loader))  # four forked workers, each masking with the same mask
        assert x.shape == (64, 16) and label.shape == (64,)
        assert _zeros(x) == 0.5
    finally:
        iterator = loader._iterator  # persistent workers: stop them now, not at interpreter exit
        if iterator is not None:
            iterator._shutdown_workers()


@setup("persistent_workers=True", _check_collate_hook)
def collate_hook(env):
    yield {
        "dataset": TensorDataset(torch.from_numpy(_rows(128, 16)), torch.arange(128)),
        "transform": _frozen_transform(),
    }


def _check_hf_map(ran: Ran) -> None:
    emb = np.asarray(ran.ns["ds"]["emb"], dtype=np.float32)
    assert emb.shape == (40, 16)
    assert _zeros(emb) == 0.5


@setup('hf_map_fn(transform, "emb")', _check_hf_map)
def hf_map(env):
    import datasets

    ds = datasets.Dataset.from_dict({"id": list(range(40)), "emb": _rows(40, 16).tolist()})
    yield {"ds": ds, "transform": _frozen_transform()}


def _check_nodes(ran: Ran) -> None:
    from torchdata.nodes.loader import LoaderIterator

    from pipesparse.transforms import SparsifyNode

    state = ran.ns["state"][LoaderIterator.ROOT_KEY]  # "source position + masks + counter"
    assert set(state) == {SparsifyNode.SOURCE_KEY, SparsifyNode.TRANSFORM_KEY}
    assert "batch" in state[SparsifyNode.TRANSFORM_KEY]["sparsifier"]["state"]
    assert "batches_seen" in state[SparsifyNode.TRANSFORM_KEY]
    batches = list(ran.ns["loader"])
    assert len(batches) == 4
    assert all(_zeros(b) == 0.5 for b in batches)


@setup("SparsifyNode(batches_node, transform)", _check_nodes)
def torchdata_node(env):
    from torchdata.nodes import IterableWrapper

    batches = [torch.from_numpy(_rows(8, 16, seed=s)) for s in range(4)]
    yield {"batches_node": IterableWrapper(batches), "transform": _frozen_transform()}


def _check_sync(ran: Ran) -> None:
    assert _zeros(ran.ns["transform"](torch.from_numpy(_rows(8, 16, seed=3)))) == 0.5


@setup('dist.init_process_group("gloo")', _check_sync)
def gloo_rank(env):
    import torch.distributed as dist

    from pipesparse import DataNormSparsifier
    from pipesparse.transforms import SparsifyTransform

    # A one-rank group, configured the env:// way init_process_group reads. Its rank 0 would
    # start a TCPStore listening on every interface; as under torchrun's agent, the store is
    # ours instead (TORCHELASTIC_USE_AGENT_STORE), on a socket bound to 127.0.0.1.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        1,
        is_master=True,
        wait_for_workers=False,
        master_listen_fd=listener.detach(),  # the store owns the socket from here
        timeout=datetime.timedelta(seconds=60),
    )
    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "TORCHELASTIC_USE_AGENT_STORE": "True",
    }.items():
        env.monkeypatch.setenv(key, value)
    try:
        yield {
            "transform": SparsifyTransform(DataNormSparsifier(sparsity_level=0.5), update="frozen"),
            "local_calibration_batch": torch.from_numpy(_rows(32, 16, seed=4)),
        }
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        del store


def _check_read_sparse(ran: Ran) -> None:
    tensors = ran.ns["tensors"]
    width = int(ran.claim(r'\{"emb": Tensor\(rows, (\d+)\)\}'))
    assert list(tensors) == ["emb"]
    assert tensors["emb"].shape == (24, width)


@setup("read_sparse(", _check_read_sparse)
def sparse_shard(env):
    from pipesparse.shards import fit, preprocess

    _write_train_shards(env.tmp_path)
    fit(["data/train"], "emb", "masks.pt", "norm", {"sparsity_level": 0.75}, quiet=True)
    preprocess(["data/train"], "data/train_sparse", "emb", state="masks.pt", quiet=True)
    yield {}


def _check_preprocess(ran: Ran) -> None:
    summary = ran.ns["summary"]
    assert summary.rows == 48
    assert str(summary) in ran.out
    metadata = json.loads(
        pq.read_schema("data/train_sparse/part-00000.parquet").metadata[b"pipesparse"]
    )
    assert metadata["format"] == "coo"
    from pipesparse.shards import read_sparse

    for index in range(2):
        emb = read_sparse(f"data/train_sparse/part-{index:05d}.parquet")["emb"]
        assert emb.shape == (24, 64)
        assert _zeros(emb) == 0.75  # one mask over the features: 12 of 16 1x4 blocks


@setup('engine="ray"', _check_preprocess)
def ray_shards(env):
    ray = pytest.importorskip("ray")
    _write_train_shards(env.tmp_path)
    env.monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # A local cluster on 127.0.0.1 only (see conftest.py), which the engine then uses as it is.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    try:
        yield {}
    finally:
        ray.shutdown()


def _check_nm(ran: Ran) -> None:
    x, label = next(iter(ran.ns["loader"]))
    assert x.shape == (16, 16) and label.shape == (16,)
    assert ((x.reshape(16, 4, 4) != 0).sum(-1) <= 2).all()  # at most 2 of every 4 kept
    assert _zeros(x) == 0.5


@setup("NMSparsifier(n=2, m=4)", _check_nm)
def nm_dataset(env):
    yield {"dataset": TensorDataset(torch.from_numpy(_rows(64, 16)), torch.arange(64))}


def _check_schedule(ran: Ran) -> None:
    # 8 batches of 8 and 8 scheduler steps: the ramp ended at its final level
    assert ran.ns["scheduler"].get_last_param() == {"batch": pytest.approx(0.75)}
    assert _zeros(ran.ns["batch"]) == pytest.approx(0.75, abs=0.05)  # the last batch, at 0.7485


@setup("CubicSparsityScheduler(sparsifier", _check_schedule)
def schedule_dataset(env):
    yield {"dataset": TensorDataset(torch.from_numpy(_rows(64, 16)))}


class Recommender(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.users = nn.Embedding(100, 16)
        self.items = nn.EmbeddingBag(50, 16, mode="mean")
        self.head = nn.Linear(32, 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.users(users), self.items(items)], dim=-1))


def _check_quantize(ran: Ran) -> None:
    # "# 0.50": every pruned entry (half of the 1x4 blocks) is an exact 0 after quantization,
    # and the few kept entries within half a quantization step of 0 round to it as well
    claimed = ran.claim(r"\.mean\(\)\s+#\s*(\d\.\d+)")
    assert float(ran.value) >= 0.5
    assert f"{float(ran.value):.{len(claimed) - 2}f}" == claimed


@setup("post_training_sparse_quantize(", _check_quantize)
def embedding_model(env):
    torch.manual_seed(0)
    yield {"model": Recommender()}


def _check_lightning(ran: Ran) -> None:
    assert isinstance(ran.value, nn.Module)
    levels = ran.ns["aware"].sparsity_levels
    weights = {name: level for name, level in levels.items() if name.endswith("weight")}
    assert weights and all(level == pytest.approx(0.8, abs=0.05) for level in weights.values())
    module = ran.ns["module"]
    assert (module.model[0].weight != 0).all()  # the trained model itself stays dense
    (post,) = [
        c for c in ran.ns["trainer"].callbacks if type(c).__name__ == "PostTrainingDataSparsity"
    ]
    assert post.sparsity_levels["0_weight"] == 0.5


@setup("trainer.fit(module, loader)", _check_lightning)
def lightning_module(env):
    pl = pytest.importorskip("lightning.pytorch")  # the `lightning` extra

    class TinyRegressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    x = torch.randn(32, 16)
    yield {
        "module": TinyRegressor(),
        "loader": DataLoader(TensorDataset(x, x[:, :4]), batch_size=16),
    }


# ---------------------------------------------------------------------------------------------

SNIPPETS = readme_snippets()


def setup_for(snippet: Snippet) -> Setup | None:
    found = [s for s in SETUPS if s.marker in snippet.code]
    assert len(found) <= 1, f"{snippet.id}: markers {[s.marker for s in found]} all match"
    return found[0] if found else None


def test_readme_has_the_snippets_this_file_knows():
    assert SNIPPETS, "no ```python block found in README.md"
    for known in SETUPS:
        matches = [s.id for s in SNIPPETS if known.marker in s.code]
        assert len(matches) == 1, (
            f"README.md: the marker {known.marker!r} of fixture {known.prepare.__name__} "
            f"matches {matches or 'no snippet'}; update tests/test_readme.py with the README"
        )


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.id for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    found = setup_for(snippet)
    with (
        found.prepare(Env(tmp_path, monkeypatch)) if found else contextlib.nullcontext({}) as names
    ):
        namespace = {"__name__": "__readme__", **names}
        try:
            value, out = run_snippet(snippet, namespace)
        except NameError as err:
            raise AssertionError(
                f"README.md {snippet.id}: {err}. If the README means it as the reader's own "
                "object, give it a value in a fixture of tests/test_readme.py (@setup with a "
                "marker from the snippet); otherwise the snippet lacks an import"
            ) from err
        if found and found.check:
            found.check(Ran(snippet.code, namespace, value, out))


def test_readme_make_commands_are_makefile_targets():
    """`make demo`, `make test`, `make bench`: every make command the README names exists."""
    makefile = (README.parent / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([A-Za-z][\w.-]*):", makefile, re.MULTILINE))
    text = README.read_text(encoding="utf-8")
    bash = "\n".join(re.findall(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE))
    named = set(re.findall(r"`make ([\w-]+)`", text) + re.findall(r"^make ([\w-]+)", bash, re.M))
    assert {"demo", "test"} <= named
    assert named <= targets, (
        f"README.md names make targets {sorted(named - targets)} the Makefile lacks"
    )
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert ci.strip().endswith("make test")  # "CI runs `bash .ci/run`, which is `make test`"


def readme_commands(marker: str) -> list[list[str]]:
    """The `pipesparse ...` command lines of the README's bash block holding ``marker``, each
    split as a shell would (continuation lines joined, comments dropped)."""
    text = README.read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"^```bash\n(.*?)^```", text, re.DOTALL | re.M) if marker in b]
    assert len(blocks) == 1, f"README.md: {len(blocks)} bash blocks hold {marker!r}"
    lines = blocks[0].replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("pipesparse ")]


def test_readme_shard_commands_run(tmp_path, monkeypatch):
    """The offline section's commands, as written, on shards with its `emb` and `img` columns."""
    from pipesparse.cli import main
    from pipesparse.shards import read_sparse

    monkeypatch.chdir(tmp_path)
    _write_train_shards(tmp_path)
    commands = readme_commands("pipesparse fit data/train")
    assert [c[1] for c in commands] == ["fit", "inspect", "preprocess", "preprocess"]
    for command in commands:
        assert main(command[1:]) == 0, command
    assert Path("masks.png").stat().st_size > 0
    for index in range(2):
        name = f"part-{index:05d}.parquet"
        emb = read_sparse(f"data/train_sparse/{name}")["emb"]
        assert emb.shape == (24, 64) and _zeros(emb) == 0.75  # sparsity_level=0.75, one mask
        rows = read_sparse(f"data/train_rows/{name}")
        for column, width in (("emb", 64), ("img", 16)):  # n=2 m=4: 2 of every 4 kept, per row
            kept = (rows[column].reshape(24, width // 4, 4) != 0).sum(-1)
            assert (kept == 2).all(), column
