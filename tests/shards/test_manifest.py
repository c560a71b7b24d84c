import json
import math
import re

import pytest
import torch

from pipesparse.shards import ManifestError
from pipesparse.shards.manifest import MANIFEST_FORMAT, Manifest

JOB = {
    "sparsifier": "norm",
    "sparsifier_class": "DataNormSparsifier",
    "config": {"sparsity_level": 0.5},
    "columns": {"x": [8]},
    "format": "dense",
    "masks": "per_row",
    "state": None,
    "inputs": {"a.parquet": {"path": "in/a.parquet", "sha256": "1", "bytes": 3}},
}


def test_save_load_record(tmp_path):
    manifest = Manifest(tmp_path, JOB)
    manifest.save()
    (tmp_path / "a.parquet").write_bytes(b"data")
    from pipesparse.shards.inputs import file_sha256

    manifest.record(
        "a.parquet", {"rows": 4, "bytes": 4, "sha256": file_sha256(tmp_path / "a.parquet")}
    )
    loaded = Manifest.load(tmp_path)
    assert loaded.job == JOB and loaded.shards["a.parquet"]["rows"] == 4
    assert json.loads((tmp_path / "manifest.json").read_text())["format"] == MANIFEST_FORMAT
    assert loaded.is_complete("a.parquet")
    (tmp_path / "a.parquet").write_bytes(b"dat4")  # same size, different bytes
    assert not loaded.is_complete("a.parquet")
    assert not loaded.is_complete("b.parquet")


def test_differences_name_what_changed(tmp_path):
    manifest = Manifest(tmp_path, JOB)
    assert manifest.differences(dict(JOB, inputs={**JOB["inputs"]})) == []
    changed = dict(
        JOB,
        config={"sparsity_level": 0.7},
        state={"path": "s.pt", "sha256": "9"},
        inputs={
            "a.parquet": {"path": "in/a.parquet", "sha256": "2", "bytes": 3},
            "b.parquet": {"path": "in/b.parquet", "sha256": "3", "bytes": 3},
        },
    )
    found = " | ".join(manifest.differences(changed))
    assert "config was {'sparsity_level': 0.5}, now {'sparsity_level': 0.7}" in found
    assert "state file was None, now 's.pt'" in found
    assert "input shard 'a.parquet' (in/a.parquet) has changed" in found
    assert "input shard 'b.parquet' (in/b.parquet) is new" in found
    assert "no longer given" in " ".join(Manifest(tmp_path, changed).differences(JOB))


def test_missing_and_corrupt(tmp_path):
    assert Manifest.load(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="manifest.json: not a pipesparse manifest"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="use --overwrite"):
        Manifest.load(tmp_path)


def _saved(tmp_path, change):
    data = {"format": MANIFEST_FORMAT, "job": json.loads(json.dumps(JOB)), "shards": {}}
    change(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda d: d.update(job=[]), "the manifest['job'] is [], expected an object"),
        (lambda d: d["shards"].update({"a.parquet": 5}), "shards['a.parquet'] is int"),
        (lambda d: d["job"]["inputs"].update({"a.parquet": {}}), "has no key 'path'"),
        (lambda d: d["job"].update(state="x"), "job['state'] is 'x', expected an object or null"),
        (lambda d: d["job"].update(config=[1]), "job['config'] is [1], expected an object"),
        (lambda d: d["shards"].update({"a.parquet": {"rows": True}}), "['rows'] is True"),
        (lambda d: d.update(shards=None), "the manifest['shards'] is None"),
    ],
)
def test_wrong_types_name_the_file_and_the_key(tmp_path, change, key):
    _saved(tmp_path, change)
    with pytest.raises(ManifestError, match=re.escape(key)) as info:
        Manifest.load(tmp_path)
    assert info.value.file == str(tmp_path / "manifest.json")
    assert "use --overwrite to start over" in str(info.value)


@pytest.mark.parametrize(
    "name",
    ["../victim.parquet", "/tmp/victim.parquet", "a/../../b.parquet", "victim.txt",
     "manifest.json", "a//b.parquet", "./a.parquet", "a\\..\\b.parquet"],
)  # fmt: skip
def test_shard_names_outside_the_folder_are_refused(tmp_path, name):
    info = {"rows": 1, "bytes": 1, "sha256": "x"}
    _saved(tmp_path, lambda d: d["shards"].update({name: info}))
    with pytest.raises(ManifestError, match=f"shards name {re.escape(repr(name))} is not a"):
        Manifest.load(tmp_path)
    _saved(tmp_path, lambda d: d["shards"].update({"train/a.parquet": info}))
    assert list(Manifest.load(tmp_path).shards) == ["train/a.parquet"]


@pytest.mark.parametrize(
    "dtype",
    [
        torch.bool,
        torch.uint8,
        torch.int64,
        torch.uint16,
        torch.float32,
        torch.bfloat16,
        torch.float64,
        torch.float8_e4m3fn,
    ],
)
@pytest.mark.parametrize("shape", [(1, 8), (3, 2, 4), (0, 4)])
def test_a_recorded_state_dict_gives_back_every_mask_bit_for_bit(dtype, shape):
    from pipesparse.shards.manifest import state_dict_from_json, state_dict_to_json

    mask = (torch.arange(math.prod(shape)).reshape(shape) % 3 == 0).to(dtype)
    mask = mask.float().mul(0.5).to(dtype) if dtype.is_floating_point else mask  # soft values
    recorded = state_dict_to_json({"state": {"x": {"mask": mask}}, "data_groups": {"x": {}}})
    back = state_dict_from_json(json.loads(json.dumps(recorded)))["state"]["x"]["mask"]
    assert back.dtype == dtype and back.shape == mask.shape
    assert torch.equal(back.view(-1).view(torch.uint8), mask.reshape(-1).view(torch.uint8))
