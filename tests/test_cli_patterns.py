"""`attnkit patterns`: every built-in pattern drawn as text, and as a PNG grid."""

from __future__ import annotations

import json
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


def test_patterns_draws_the_masks_it_is_given(tmp_path, capsys):
    """--mask (repeatable) replaces the built-in gallery, in the text and in the page."""
    path = tmp_path / "mine.html"
    specs = ["sliding_window:1,1+global:0", "causal"]
    argv = [
        "patterns",
        "--length",
        "6",
        "--mask",
        specs[0],
        "--mask",
        specs[1],
        "--html",
        str(path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("sliding_window:1,1+global:0: density")
    assert "\n".join(["██████", "███···", "████··", "█·███·", "█··███", "█···██"]) in out
    assert "causal: density" in out
    assert "bigbird" not in out
    assert [p["name"] for p in page_data(path)["patterns"]] == specs


def page_data(path):
    """The DATA object a pattern page embeds."""
    page = path.read_text()
    return json.loads(page.split("const DATA = ", 1)[1].split(";\n", 1)[0])


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
        (["patterns", "--mask", "zigzag:3"], "unknown pattern 'zigzag' in --mask"),
        (["patterns", "--mask", "strided:0"], "bad arguments in --mask 'strided:0'"),
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


def test_patterns_html_embeds_every_pattern_and_its_tiles(tmp_path, capsys):
    """Each pattern's packed bits are its dense mask, its tile kinds its BlockMask's."""
    import base64

    import numpy as np

    path = tmp_path / "patterns.html"
    assert main(["patterns", "--length", "40", "--html", str(path), "--block", "8"]) == 0
    data = page_data(path)
    gallery = pattern_gallery(40)
    assert [p["name"] for p in data["patterns"]] == list(gallery)
    for p in data["patterns"]:
        mask = gallery[p["name"]]
        bits = np.unpackbits(np.frombuffer(base64.b64decode(p["bits"]), dtype=np.uint8))
        assert bits[: 40 * 40].reshape(40, 40).tolist() == mask.dense(40, 40)[0, 0].int().tolist()
        assert p["kinds"] == mask.blocks(40, 40, 8, 8).kinds[0, 0].reshape(-1).tolist()
        assert p["spec"] == repr(mask)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ((pattern_gallery(8), 5000), ValueError, "length must be at most 4096"),
        ((pattern_gallery(8), 0), ValueError, "length must be an int >= 1"),
        (({}, 8), ValueError, "at least one pattern"),
        (({"x": "causal"}, 8), TypeError, r"patterns\['x'\] must be an attnkit Mask, got str"),
    ],
)
def test_pattern_view_refuses_bad_arguments(args, error, message):
    from attnkit.viz import pattern_view_html

    with pytest.raises(error, match=message):
        pattern_view_html(*args)


@pytest.mark.slow
def test_pattern_view_in_chromium(browser, tmp_path):
    """The page draws each pair by its tile: attended in a full tile (green), attended or
    masked in a partial one (blue / orange), nothing in an empty one; without the tiles,
    attended pairs only. Hovering names the pair and its tile."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from attnkit import masks
    from attnkit.viz import save_pattern_view

    page = save_pattern_view(pattern_gallery(64), 64, tmp_path / "p.html", block=8)
    browser.get(page.as_uri())
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    assert [c.get_attribute("data-name") for c in cards] == list(pattern_gallery(64))
    counts = masks.causal().blocks(64, 64, 8, 8).counts()
    causal = cards[0].find_element(By.CSS_SELECTOR, ".stats").text
    assert f"{counts['full']} full, {counts['partial']} partial, {counts['empty']} empty" in causal

    def pixel(i, j):  # RGBA of pair (i, j) in the causal grid
        return browser.execute_script(
            "return Array.from(document.querySelector('canvas.pattern').getContext('2d')"
            ".getImageData(arguments[1], arguments[0], 1, 1).data);",
            i,
            j,
        )

    assert pixel(40, 3) == [40, 140, 80, 255]  # tile (5, 0): full
    assert pixel(5, 2) == [30, 80, 160, 255]  # tile (0, 0): partial, attends
    assert pixel(2, 5)[3] == 102  # tile (0, 0): partial, masked
    assert pixel(3, 40) == [0, 0, 0, 0]  # tile (0, 5): empty
    browser.find_element(By.ID, "tiles").click()
    assert pixel(40, 3) == [30, 80, 160, 255]
    assert pixel(2, 5) == [0, 0, 0, 0]

    canvas = browser.find_element(By.CSS_SELECTOR, "canvas.pattern")
    size = canvas.size["width"]  # 256 CSS pixels for 64 tokens: 4 per token
    # offsets from the element's center: the cell of query 50, key 10
    ActionChains(browser).move_to_element_with_offset(
        canvas, int((10.5 / 64 - 0.5) * size), int((50.5 / 64 - 0.5) * size)
    ).perform()
    assert browser.find_element(By.ID, "info").text == (
        "causal: query 50, key 10 attends (tile 6, 1: full)"
    )
