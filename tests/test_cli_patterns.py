"""`attnkit patterns`: every built-in pattern drawn as text, and as a PNG grid."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from attnkit.cli import main, pattern_gallery


def test_patterns_text(capsys):
    assert main(["patterns", "--length", "16"]) == 0
    out = capsys.readouterr().out
    for name in pattern_gallery(16):
        assert f"{name}: density" in out
    # causal at 16 tokens: the first row sees one key, the last all 16
    assert "█" + "·" * 15 in out
    assert "█" * 16 in out


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`attnkit patterns | head -3`: the pipe closes while the command still writes."""
    code = "from attnkit.cli import main; raise SystemExit(main(['patterns', '--length', '128']))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    assert proc.stdout.readline().startswith(b"causal: density")
    proc.stdout.close()  # far more than the pipe's buffer is still to come
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert err == ""


def test_patterns_png(tmp_path, capsys):
    path = tmp_path / "patterns.png"
    assert main(["patterns", "--length", "32", "--png", str(path)]) == 0
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 1000
    assert height > 500


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["patterns", "--length", "0"], "must be >= 1"),
        (["patterns", "--length", "100000"], "at most 4096"),  # 80 GB of dense masks
        (["patterns", "--png", "/no/such/folder/p.png"], "folder /no/such/folder does not exist"),
        (["explain", "--html", "/no/such/folder/v.html"], "argument --html: folder /no/such"),
        (["bench", "--json", "/no/such/folder/b.json"], "argument --json: folder /no/such"),
        (["explain", "--html", "/"], "argument --html: / is a folder; give a file name in it"),
        (["patterns", "--length", "x"], "must be an int >= 1, got 'x'"),
    ],
)
def test_usage_errors_exit_2_before_any_work(argv, message, capsys):
    """Bad lengths and output files in missing folders (or naming a folder) are refused while
    parsing, not with a traceback after the work (or an allocation of the whole machine's
    memory)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
