import pickle

from pipesparse.shards.errors import ShardError, ShardTypeError, find_shard_error


def test_message_and_pickling():
    error = ShardError("f.parquet", "ragged row", "c", 3)
    assert str(error) == "file f.parquet, column 'c', row 3: ragged row"
    assert str(ShardError("f.parquet", "unreadable")) == "file f.parquet: unreadable"
    back = pickle.loads(pickle.dumps(ShardTypeError("f", "bad type", "c")))
    assert isinstance(back, TypeError) and (back.file, back.column, back.row) == ("f", "c", None)


def test_found_inside_wrapping_errors():
    class Wrapper(Exception):
        def __init__(self, cause):
            super().__init__("engine failed")
            self.cause = cause

    inner = ShardTypeError("f", "bad", "c", 1)
    try:
        try:
            raise inner
        except ShardError as err:
            raise RuntimeError("worker died") from err
    except RuntimeError as outer:
        found = find_shard_error(Wrapper(outer))
    assert isinstance(found, ShardTypeError) and str(found) == str(inner)
    assert find_shard_error(RuntimeError("other")) is None
