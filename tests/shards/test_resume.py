import json

import pytest

from pipesparse.shards import ManifestError, ResumeRefusedError, preprocess
from pipesparse.shards.manifest import Manifest
from pipesparse.shards.resume import locked, prepare_folder


def test_a_second_run_on_a_locked_folder_is_refused(tmp_path, shards_dir):
    out = tmp_path / "out"
    with locked(out):
        with pytest.raises(ResumeRefusedError, match="another pipesparse run is writing"):
            preprocess([str(shards_dir)], out, "vec", "norm", quiet=True)
    assert preprocess([str(shards_dir)], out, "vec", "norm", quiet=True).skipped == 0


def test_overwrite_keeps_finished_shards_of_the_same_job(tmp_path, shards_dir):
    out = tmp_path / "out"
    preprocess([str(shards_dir)], out, "vec", "norm", quiet=True)
    again = preprocess([str(shards_dir)], out, "vec", "norm", overwrite=True, quiet=True)
    assert again.skipped == 3


def test_corrupt_manifest_needs_overwrite(tmp_path, shards_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("garbage")
    with pytest.raises(ValueError, match="not a pipesparse manifest"):
        prepare_folder(out, {}, [], overwrite=False)
    assert isinstance(prepare_folder(out, {"x": 1}, [], overwrite=True), Manifest)
    assert (out / "manifest.json").read_text() == "garbage"  # nothing written until the run saves


def _tamper(out, **shards):
    data = json.loads((out / "manifest.json").read_text())
    data["shards"].update(shards)
    (out / "manifest.json").write_text(json.dumps(data))


def test_overwrite_never_deletes_outside_the_output_folder(tmp_path, shards_dir):
    out = tmp_path / "out"
    preprocess([str(shards_dir)], out, "vec", "norm", quiet=True)
    victim = tmp_path / "victim.parquet"
    victim.write_text("important")
    info = {"rows": 1, "bytes": 1, "sha256": "x"}
    _tamper(out, **{str(victim): info, "../victim.parquet": info})
    with pytest.raises(ManifestError, match="is not a relative path of a .parquet file"):
        preprocess([str(shards_dir)], out, "vec", "norm", quiet=True)
    summary = preprocess(
        [str(shards_dir)], out, "vec", "threshold", overwrite=True, quiet=True
    )  # starts over: the manifest cannot be trusted
    assert victim.read_text() == "important" and summary.skipped == 0
    assert (shards_dir / "part-00.parquet").exists()


def test_overwrite_leaves_files_behind_a_symlinked_folder(tmp_path, shards_dir):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.parquet").write_text("important")
    out = tmp_path / "out"
    preprocess([str(shards_dir)], out, "vec", "norm", quiet=True)
    (out / "link").symlink_to(outside)
    _tamper(out, **{"link/a.parquet": {"rows": 1, "bytes": 1, "sha256": "x"}})
    preprocess([str(shards_dir)], out, "vec", "threshold", overwrite=True, quiet=True)
    assert (outside / "a.parquet").read_text() == "important"


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(job=[]),
        lambda d: d["shards"].update({"part-00.parquet": 5}),
        lambda d: d["job"]["inputs"].update({"x.parquet": {}}),
        lambda d: d["job"].update(state="x"),
    ],
)
def test_structurally_corrupt_manifest_is_refused_then_overwritten(tmp_path, shards_dir, change):
    out = tmp_path / "out"
    preprocess([str(shards_dir)], out, "vec", "norm", quiet=True)
    data = json.loads((out / "manifest.json").read_text())
    change(data)
    (out / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="manifest.json: not a pipesparse manifest"):
        preprocess([str(shards_dir)], out, "vec", "norm", quiet=True)
    assert preprocess([str(shards_dir)], out, "vec", "norm", overwrite=True, quiet=True).rows == 60
    assert Manifest.load(out).job["sparsifier"] == "norm"
