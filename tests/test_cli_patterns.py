"""`attnkit patterns`: every built-in pattern drawn as text, and as a PNG grid."""

from __future__ import annotations

import struct

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


def test_patterns_png(tmp_path, capsys):
    path = tmp_path / "patterns.png"
    assert main(["patterns", "--length", "32", "--png", str(path)]) == 0
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 1000
    assert height > 500


def test_patterns_rejects_bad_length(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["patterns", "--length", "0"])
    assert exc.value.code == 2
