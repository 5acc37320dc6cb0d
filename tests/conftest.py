"""Shared test helpers: an independent float64 attention formula and DESIGN §7 tolerances."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import math
import os
import shutil
import tempfile

# Triton's interpreter on machines without a GPU (a GPU run sets TRITON_INTERPRET=0). Set before
# any test module imports triton: triton decides at import whether its own jit functions run
# interpreted, and transformers imports it at collection.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, settings

from attnkit import masks

# Temporary files of this run, the compile, export and AOTInductor tests' generated code and
# inductor's precompiled headers (~140 MB each) among them, go to a folder of the run, removed
# at its end (each xdist worker its own): inductor's default, /tmp/torchinductor_<user>, is
# kept across runs and had grown to 5 GB on a long-lived machine whose disk then filled.
# Before any compile: inductor fixes its headers' folder when it first imports codecache.
_RUN_TMP = tempfile.mkdtemp(prefix="attnkit-tests-")
tempfile.tempdir = os.environ["TMPDIR"] = _RUN_TMP  # this process and its subprocesses
atexit.register(shutil.rmtree, _RUN_TMP, ignore_errors=True)

# Each pytest-xdist worker takes its share of the cores: two workers of two OpenMP threads each
# on two cores left threads waiting at barriers on partners the scheduler had put aside (the
# date-task training test: 14 s alone, 213 s beside another worker's kernels). Tests of
# threading set their thread counts themselves.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))

#: Where the Triton tests run: CPU tensors under the interpreter, or a GPU (TRITON_INTERPRET=0).
TRITON_DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
needs_triton_device = pytest.mark.skipif(
    TRITON_DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="needs a GPU or TRITON_INTERPRET=1",
)


# Property tests run the same examples every run, so CI runs what was run here (no deadline:
# first calls build kernels; filters that retry often are fine). `--hypothesis-seed N` explores
# other examples: a derandomized run would ignore the seed.
settings.register_profile(
    "derandomized",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
settings.register_profile("explore", settings.get_profile("derandomized"), derandomize=False)
settings.load_profile("derandomized")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--hypothesis-seed", None) is not None:
        settings.load_profile("explore")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def naive_attention(q, k, v, allowed=None, scale=None, bias=None):
    """softmax(q·kᵀ·scale + bias, masked)·v in float64, written out; fully masked rows -> 0.

    q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv); allowed bool broadcastable.
    Returns out (B, Hq, Lq, Dv) float64, lse (B, Hq, Lq) float64.
    """
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return torch.einsum("bhij,bhjd->bhid", p, v), lse


def packed_document_ids(lengths, B=1):
    """Document ids (B, L) of packed documents of these lengths, sequence b's ends 7·b later."""
    ids = torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths))
    return torch.stack(
        [torch.cat([ids[:1].expand(7 * b), ids[: ids.numel() - 7 * b]]) for b in range(B)]
    )


def random_key_ranges(Lq, Lk, spans):
    """(2, Lq) first and last keys at random (seed 5), last - first drawn from ``spans`` (lo,
    hi): where it is negative the row keeps none (first > last)."""
    g = torch.Generator().manual_seed(5)
    first = torch.randint(0, Lk, (2, Lq), generator=g)
    return first, first + torch.randint(*spans, (2, Lq), generator=g)


def rand_qkv(B, Hq, Hkv, Lq, Lk, D, Dv=None, dtype=torch.float32, requires_grad=False):
    Dv = D if Dv is None else Dv
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    k = torch.randn(B, Hkv, Lk, D, dtype=dtype)
    v = torch.randn(B, Hkv, Lk, Dv, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def assert_close_scaled(fast, ref64, ref_low, mult=2.0, floor=1e-5, what="output"):
    """DESIGN §7: a fast path in dtype X passes when its error vs the float64 reference is at
    most ``mult`` x the error of the reference run in dtype X, plus a small floor."""
    ref_err = (ref_low.double() - ref64).abs().max().item()
    err = (fast.double() - ref64).abs().max().item()
    assert err <= mult * ref_err + floor, (
        f"{what}: error {err:.3g} > {mult} x ref error {ref_err:.3g} + {floor}"
    )


def per_head_predicate(b, h, q, kv):
    """A custom mask that differs per batch and head (tiles must not be shared across them)."""
    return (q + 2 * kv + 3 * h + b) % 5 != 0


def every_mask(Lq, Lk):
    """Every built-in mask kind, combinations, a custom predicate and a bool tensor."""
    layout = torch.rand(2, -(-Lq // 32) + 1, -(-Lk // 32) + 1) < 0.4
    ids = torch.arange(Lk) * 4 // Lk
    g = torch.Generator().manual_seed(Lq * 7919 + Lk)
    first = torch.randint(0, Lk, (Lq,), generator=g)  # some rows keep none (first > last)
    last = first + torch.randint(-4, Lk // 3 + 1, (Lq,), generator=g)
    return {
        "full": masks.full(),
        "causal": masks.causal(),
        "causal_tl": masks.causal(align="top_left"),
        "sliding_window": masks.sliding_window(50),
        "sliding_sym": masks.sliding_window(20, 20),
        "dilated": masks.dilated(8, 3),
        "strided": masks.strided(16),
        "fixed": masks.fixed(32, 4),
        "global|window": masks.sliding_window(16, 16) | masks.global_tokens([0, 7]),
        "bigbird": masks.bigbird(32, 3, 1, 1, seed=2),
        "block_sparse": masks.block_sparse(layout, 32),
        "key_padding": masks.key_padding([Lk, Lk // 3]),
        "padding_mask": masks.from_padding_mask(torch.rand(2, Lk) > 0.3),
        "document&causal": masks.document(ids) & masks.causal(),
        "prefix_lm": masks.prefix_lm(40),
        "key_ranges": masks.key_ranges(first, last),
        "custom": masks.custom(lambda b, h, q, kv: (q + 2 * kv) % 5 != 0),
        "custom_per_head": masks.custom(per_head_predicate),
        "bool_tensor": torch.rand(2, 1, Lq, Lk) > 0.5,
        "~window": ~masks.sliding_window(30),
    }


MASK_NAMES = list(every_mask(150, 150))


# transformers' class-name prefixes where they are not the family's name capitalised
HF_PREFIXES = {  # family -> (config class prefix, attention/rotary class prefix)
    "gpt_neox": ("GPTNeoX", "GPTNeoX"),
    "stablelm": ("StableLm", "StableLm"),
    "diffllama": ("DiffLlama", "DiffLlama"),
    "gemma3": ("Gemma3Text", "Gemma3"),
    "gemma4": ("Gemma4Text", "Gemma4Text"),
    "smollm3": ("SmolLM3", "SmolLM3"),
    "granite_swa": ("GraniteSWA", "GraniteSWA"),
}


def hf_prefixes(family):
    """(config prefix, module prefix) of a transformers model family, e.g. "gpt_oss"."""
    default = "".join(part.capitalize() for part in family.split("_"))
    return HF_PREFIXES.get(family, (default, default))


def hf_attention(family, layer_idx=0, **config):
    """A transformers attention module (eager, random weights) and its config.

    ``family`` names the model module, e.g. "gpt_oss" (class GptOssAttention) or "qwen3".
    """
    transformers = pytest.importorskip("transformers")
    import importlib

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    config_prefix, prefix = hf_prefixes(family)
    cfg = getattr(transformers, f"{config_prefix}Config")(attention_dropout=0.0, **config)
    cfg._attn_implementation = "eager"
    hf = getattr(module, f"{prefix}Attention")(cfg, layer_idx=layer_idx).eval()
    with torch.no_grad():
        for i, p in enumerate(hf.parameters()):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
    return hf


def load_hf_attention(ours, hf):
    """Copy q/k/v/o projections (and q/k norms, sinks where both have them) from ``hf``."""
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(ours, name).load_state_dict(getattr(hf, name).state_dict())
        ours.out_proj.load_state_dict(hf.o_proj.state_dict())
        theirs = hf.state_dict()
        for name in ("q_norm.weight", "k_norm.weight", "sinks"):
            if name in theirs:
                ours.get_parameter(name).copy_(theirs[name])  # raises if ours lacks it


def record_launches(monkeypatch):
    """The kernel calls the triton backend makes from here on (still launched), in order."""
    from attnkit.backends import triton as tr

    launched = []
    launch = tr.calls.KernelCall.launch
    monkeypatch.setattr(tr.calls.KernelCall, "launch", lambda c: (launched.append(c), launch(c)))
    return launched


# ---- a headless browser for the HTML pages ---------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def chromium():
    """Headless Chromium through chromedriver, kept for a test module."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "chromium and chromedriver are not installed (make test installs them "
            "with apt-get where it can): the browser tests of the HTML pages are skipped"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch drivers
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,800",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the pages' console
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium):
    """The browser for one test, which fails if a page it loaded logged an error (a script
    that threw halfway can leave a page that still passes the test's own checks)."""
    chromium.get_log("browser")  # what earlier tests left
    yield chromium
    errors = [e["message"] for e in chromium.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"the page logged errors: {errors}"


@contextlib.contextmanager
def gloo_rank(rank, world, init_file, results_dir):
    """A spawned worker's body as rank ``rank`` of a loopback gloo group: ok{rank} is written
    into ``results_dir`` if it passes (``spawn_ok`` checks); a hung collective fails after
    60 s instead of hanging."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        yield
        with open(os.path.join(results_dir, f"ok{rank}"), "w") as f:
            f.write("ok")
    finally:
        dist.destroy_process_group()


def spawn_ok(worker, world, tmp_path, *args):
    """Run ``worker`` on ``world`` ranks; each writes ok{rank} into tmp_path when it passed."""
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path), *args), nprocs=world)
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("ok")) == [
        f"ok{r}" for r in range(world)
    ]
