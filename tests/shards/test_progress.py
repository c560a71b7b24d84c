import io
import sys

from pipesparse.shards.progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_only_on_a_terminal_and_not_quiet(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress_bar(10, "preprocess", quiet=False, shards=2) as bar:
        bar.update(10)
        bar.set_postfix_str("shards 2/2")
    assert "preprocess" in terminal.getvalue() and "shards 2/2" in terminal.getvalue()
    assert "rows/s" in terminal.getvalue() or "s/rows" in terminal.getvalue()
    for quiet, stream in ((True, _Terminal()), (False, io.StringIO())):
        monkeypatch.setattr(sys, "stderr", stream)
        with progress_bar(10, "fit", quiet=quiet, shards=1) as bar:
            bar.update(10)
        assert stream.getvalue() == ""
