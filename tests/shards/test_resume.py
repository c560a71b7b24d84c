import pytest

from pipesparse.shards import ResumeRefusedError, preprocess
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
