"""``attnkit bench``'s code paths on tiny sizes (figures are benchmarks, never asserted here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit import bench, masks
from attnkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_bench_writes_tables_json_and_plot(tmp_path, capsys):
    cases = [
        ("sliding_window(16)", 96, masks.sliding_window(16), torch.float32, False),
        ("causal", 64, masks.causal(), torch.bfloat16, True),
    ]
    json_path, png_path = tmp_path / "cpu.json", tmp_path / "scaling.png"
    code = bench.run(False, str(json_path), str(png_path), True, True, cases=cases, ns=[128, 256])
    assert code == 0
    shown = capsys.readouterr().out
    assert "sliding_window(16)" in shown
    assert "FlexAttention has no CPU backward" in shown
    data = json.loads(json_path.read_text())
    assert [r["case"] for r in data["rows"]] == ["sliding_window(16)", "causal"]
    window, causal = data["rows"]
    assert window["tiled_s"] > 0
    assert window["sdpa_s"] > 0
    assert window["flex_s"] > 0
    assert causal["pass"] == "fwd+bwd"
    assert causal["flex_s"] is None
    assert [r["N"] for r in data["scaling"]] == [128, 256]
    for r in data["scaling"]:
        assert r["tiled_fwd_mb"] >= 0
        assert r["sdpa_fwd_mb"] is not None
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--device", "cuda"], "torch.cuda.is_available() is False"),
        (["--markdown", "x.md"], "--markdown is for --device cuda"),
    ],
)
def test_bench_usage_errors(argv, why, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    assert why in capsys.readouterr().err


def test_call_overhead_bench_checks_its_ways_agree_and_times_them():
    """benchmarks/cpu_call_overhead.py at one length: it asserts every way gives SDPA's output
    before timing, and prints a row with every column."""
    cmd = [sys.executable, str(ROOT / "benchmarks/cpu_call_overhead.py"), "--lengths", "16"]
    out = subprocess.run(
        [*cmd, "--min-time", "0.01"], check=True, capture_output=True, text=True
    ).stdout
    assert re.search(r"│\s+16 │(\s+-?[\d.]+ │){7}", out), out


@pytest.mark.parametrize("model", [[], ["--translation"]], ids=["lm", "translation"])
def test_beam_search_bench_checks_shared_and_copied_beams_agree(model):
    """benchmarks/cpu_beam_search.py, tiny: it asserts both ways' logits agree, then prints a
    row with both times and the caches' sizes."""
    cmd = [sys.executable, str(ROOT / "benchmarks/cpu_beam_search.py"), "--prompts", "40"]
    out = subprocess.run(
        [*cmd, "--steps", "3", "--layers", "1", "--width", "32", "--rounds", "1", *model],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert re.search(r"│\s+40 │\s+[\d.]+ │\s+[\d.]+ │\s+[\d.]+x │\s+[\d.]+ -> [\d.]+ │", out), out


def test_triton_walks_bench_times_both_ways():
    """benchmarks/triton_walks.py at one small length: a row of both ways' times."""
    pytest.importorskip("triton")
    cmd = [sys.executable, str(ROOT / "benchmarks/triton_walks.py"), "--device", "cpu"]
    out = subprocess.run(
        [*cmd, "--lengths", "256", "--min-time", "0.01"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert re.search(r"│\s+256 │\s+[\d.]+ │\s+[\d.]+ │\s+[\d.]+x │", out), out


@pytest.mark.slow
def test_cpu_varlen_bench_runs_and_checks_its_ways_agree():
    """benchmarks/cpu_varlen.py on a small batch: it asserts the packed paths agree before
    timing, and prints one row per way."""
    cmd = [sys.executable, str(ROOT / "benchmarks/cpu_varlen.py"), "--queries", "8"]
    out = subprocess.run(
        [*cmd, "--cached", "0", "5", "--heads", "2", "--dim", "8"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for way in ("varlen", "varlen, tile map", "varlen, predicate", "SDPA padded"):
        assert re.search(rf"│\s+{re.escape(way)} │\s+[\d.]+ │\s+[\d.]+x │", out), out


@pytest.mark.slow
def test_cpu_varlen_decode_table_runs_with_grouped_heads():
    """``cpu_varlen.py --decode`` with GQA: it asserts tiled and SDPA agree on every batch,
    and prints each batch's row with the packed-heads column and ``auto``'s choice."""
    cmd = [sys.executable, str(ROOT / "benchmarks/cpu_varlen.py"), "--decode", "--kv-heads", "2"]
    out = subprocess.run(
        [*cmd, "--min-time", "0.01"], check=True, capture_output=True, text=True
    ).stdout
    rows = re.findall(r"│\s+(\d+) │\s+\d+ │(?:\s+[\d.]+ │){4}\s+tiled\s+│", out)
    assert rows == ["2", "2", "4", "4", "8", "8", "16", "16"], out


@pytest.mark.slow
def test_cpu_padding_bench_runs_and_its_backends_agree():
    """benchmarks/cpu_padding.py on short lengths: its model table asserts the three ways give
    the same embeddings; every table prints its rows, ``auto`` picking tiled for padding."""
    cmd = [sys.executable, str(ROOT / "benchmarks/cpu_padding.py"), "--lengths", "16"]
    out = subprocess.run(
        [*cmd, "--min-time", "0.01"], check=True, capture_output=True, text=True
    ).stdout
    assert len(re.findall(r"│\s+16 │\s+(fwd|fwd\+bwd) │.*│\s+tiled │", out)) == 2, out
    assert (
        len(re.findall(r"│\s+16 │\s+(1|4|16) │\s+(Mask|bool tensor) │.*│\s+tiled │", out)) == 4
    ), out
    assert re.search(r"│\s+16 │(\s+[\d.]+ │){3}(\s+[\d.]+x │){2}\s+— │", out), out


@pytest.mark.slow
def test_gpu_bench_smoke_under_the_triton_interpreter(tmp_path):
    """benchmarks/gpu.py --smoke: every case and pass once, Markdown and JSON written."""
    pytest.importorskip("triton")
    md, js = tmp_path / "gpu.md", tmp_path / "gpu.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks/gpu.py"), "--smoke", "--out", str(md)]
    subprocess.run([*cmd, "--json", str(js)], env=env, check=True, capture_output=True)
    saved = json.loads(js.read_text())
    rows, decode_rows = saved["attention"], saved["decode"]
    assert {(r["case"], r["pass"]) for r in rows} == {
        (c, p)
        for c in (
            "dense",
            "causal",
            "sliding_window(16)",
            "block_sparse(16, 25 %)",
            "8 documents & causal",
        )
        for p in ("fwd", "fwd+bwd")
    }
    assert all(r["triton_s"] > 0 and r["sdpa_s"] > 0 for r in rows)
    # tile lists: only where the kernels would otherwise compute the mask (a band, ranges)
    walked = {r["case"]: r.get("tile_lists_s") for r in rows}
    assert walked["causal"] > 0
    assert walked["sliding_window(16)"] > 0
    assert walked["8 documents & causal"] > 0
    assert walked["dense"] is None
    assert walked["block_sparse(16, 25 %)"] is None
    assert [r["case"] for r in decode_rows] == ["whole cache", "sliding_window(16)", "padded batch"]
    CONTENDERS = ("triton", "unsplit", "unpacked", "growing", "sdpa", "flex")
    # FlexAttention's forward runs on CPU, so every decoding contender has a time
    assert all(r[f"{c}_s"] > 0 for r in decode_rows for c in CONTENDERS)
    table = [line for line in md.read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 2 + len(rows) + len(decode_rows)  # two tables, a header each


def test_gpu_decode_bench_times_the_kernel_packed_split_unsplit_and_unpacked(monkeypatch):
    """The decoding table's "triton" packs query heads by kv head and splits rows, "unsplit"
    runs one program per (batch, kv head), "unpacked" one per query head, each over the keys
    its bytes count, and "growing" over a cache of another length at each call; a contender
    that fails is noted, not fatal."""
    pytest.importorskip("triton")
    from attnkit import bench_gpu_decode
    from conftest import record_launches

    def no_flex(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(bench_gpu_decode, "flex", no_flex)
    launched = record_launches(monkeypatch)
    window = bench_gpu_decode.cases(smoke=True)[1]
    row = bench_gpu_decode.measure(window, "cpu", torch.float32, smoke=True)
    assert [c.meta["PACK_GQA"] for c in launched] == [True, True, False, True]
    assert [c.grid[1] for c in launched] == [window.Hkv, window.Hkv, window.Hq, window.Hkv]
    assert [c.grid[2] > 1 for c in launched] == [True, False, True, True]  # splits
    assert [c.args[1].shape[2] for c in launched] == [64] * 4  # growing starts at L
    lengths = bench_gpu_decode.growing_lengths(4096)
    assert [next(lengths) for _ in range(130)] == [*range(4096, 3968, -1), 4096, 4095]
    assert (row["note"], row["flex_s"]) == ("flex: RuntimeError: no compiler here", None)
    assert row["bytes"] == 2 * window.Hkv * 17 * window.D * 4  # the query and 16 keys left, fp32
    cells = bench_gpu_decode.cells(row)
    assert (cells[:3], cells[8]) == (["sliding_window(16)", "1", "64"], "—")


def test_gpu_decode_bench_padded_batch_reads_each_sequences_kept_keys(monkeypatch):
    """The padded batch's row: the kernels read each sequence's kept keys (key ranges, no tile
    map), its bytes count only those keys, and FlexAttention gets a block mask per sequence."""
    pytest.importorskip("triton")
    from attnkit import bench_gpu, bench_gpu_decode
    from conftest import record_launches

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    batches = []

    def flex(mask, Lq, Lk, device):
        batches.append(mask.batch)
        return bench_gpu.flex(mask, Lq, Lk, device)

    monkeypatch.setattr(bench_gpu_decode, "flex", flex)
    monkeypatch.setattr(masks.Mask, "blocks", lambda *a, **kw: pytest.fail("built a BlockMask"))
    launched = record_launches(monkeypatch)
    padded = bench_gpu_decode.cases(smoke=True)[2]
    row = bench_gpu_decode.measure(padded, "cpu", torch.float32, smoke=True)
    assert launched
    assert all(c.meta["RANGES"] for c in launched)
    assert row["bytes"] == 2 * padded.Hkv * (32 + 64) * padded.D * 4  # fp32 keys and values
    assert batches == [2]
    assert all(row[f"{c}_s"] is not None for c in bench_gpu_decode.CONTENDERS), row["note"]


@pytest.mark.parametrize(
    ("case", "computed"), [("causal", "BAND"), ("8 documents & causal", "RANGES")]
)
def test_gpu_bench_times_masks_computed_in_kernel_and_walked_through_tile_lists(
    monkeypatch, case, computed
):
    """The attention table's causal, window and document rows: "triton" computes the mask in
    the kernels (a band, key ranges), "tile lists" walks its BlockMask as any other's (the
    in-kernel gain is between them)."""
    pytest.importorskip("triton")
    from attnkit import bench_gpu
    from conftest import record_launches

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(bench_gpu, "flex", lambda *args: None)  # fails when called: noted
    launched = record_launches(monkeypatch)
    found = next(c for c in bench_gpu.cases(smoke=True) if c.name == case)
    row = bench_gpu.measure(found, "cpu", torch.float32, smoke=True)
    assert [c.meta[computed] for c in launched] == [True, False]
    cells = dict(zip(bench_gpu.COLUMNS, bench_gpu.cells(row), strict=True))
    assert row["tile_lists_s"] > 0
    assert cells["tile lists TFLOP/s"] != "—"
    assert cells["in-kernel gain"] == f"{row['tile_lists_s'] / row['triton_s']:.2f}x"


@pytest.mark.slow
def test_gpu_bench_flex_fails_past_its_recompile_limit_instead_of_running_unfused():
    """Past dynamo's recompile limit flex_attention would run unfused (every score in memory)
    and be timed as FlexAttention; under the benchmark's limits it raises, and ``measure``
    notes the failure in the row."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from attnkit import bench_gpu

    torch._dynamo.reset()  # earlier tests in this process may have compiled flex_attention
    q = torch.randn(1, 2, 64, 16)
    with bench_gpu.flex_compile_limits(1):
        out = bench_gpu.flex(masks.causal(), 64, 64, "cpu")(q, q, q)
        torch.testing.assert_close(out, attnkit.attention(q, q, q, mask=masks.causal()))
        with pytest.raises(FailOnRecompileLimitHit):
            bench_gpu.flex(masks.sliding_window(8), 64, 64, "cpu")(q, q, q)
    torch._dynamo.reset()


def test_gpu_bench_title_says_whether_triton_tiles_were_autotuned(monkeypatch):
    from attnkit import bench_gpu

    monkeypatch.delenv("ATTNKIT_TRITON_AUTOTUNE", raising=False)
    assert "autotuned" not in bench_gpu.describe("H100", torch.bfloat16)
    monkeypatch.setenv("ATTNKIT_TRITON_AUTOTUNE", "1")
    assert bench_gpu.describe("H100", torch.bfloat16).endswith(", triton tiles autotuned")
