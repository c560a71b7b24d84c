from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_preprocess_shards_example(tmp_path, run_script):
    out = run_script(EXAMPLES / "preprocess_shards.py", str(tmp_path), timeout=300)
    lines = out.splitlines()
    assert "3 shards -> " in lines[0] and "coo output" in lines[0]
    assert "(3 already complete)" in lines[1]
    assert lines[2] == f"(500, 64) rows, features kept by the fitted mask: {list(range(16, 32))}"
    assert sorted(p.name for p in (tmp_path / "sparse").glob("*.parquet")) == [
        f"train-{i:05d}.parquet" for i in range(3)
    ]
