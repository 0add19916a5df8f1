"""The streaming runtime: unit layout, resident selection, and numerics at every budget.

Float32 on CPU, tiny-llama with weights of std 0.1 (so greedy tokens vary from step to step
and a wrong weight or a stale slot changes them), against transformers' LlamaForCausalLM on
the same weights. GPU tests compare fp16 logits with HF eager and graphs with eager.
"""

from __future__ import annotations

import pytest
import torch

from autotune import models
from autotune.streaming.llama import KVCache, Llama
from autotune.streaming.runtime import (
    WeightStore,
    select_resident,
    spread_order,
    unit_layouts,
    unit_views,
)

SPEC = models.PRESETS["tiny-llama"]
SOURCE = models.RandomWeights(seed=3, std=0.1)


def test_units_cover_every_layer_parameter_once() -> None:
    units = unit_layouts(SPEC, "float32")
    assert [u.kind for u in units[:4]] == ["attn", "mlp", "attn", "mlp"]
    names = [p.name for u in units for p in u.params]
    expected = [n for layer in range(SPEC.num_hidden_layers) for n in SPEC.layer_shapes(layer)]
    assert sorted(names) == sorted(expected)
    for u in units:
        ends = [p.offset + p.nbytes for p in u.params]
        assert all(e <= p.offset for e, p in zip(ends, u.params[1:], strict=False))  # no overlap
        assert ends[-1] <= u.nbytes and all(p.offset % 256 == 0 for p in u.params)


def test_fused_views_are_the_stacked_matrices() -> None:
    attn, mlp = unit_layouts(SPEC, "float32")[:2]
    buf = torch.arange(mlp.nbytes // 4, dtype=torch.float32).view(torch.uint8)
    v = unit_views(attn, buf, torch.float32)
    assert torch.equal(v["qkv"], torch.cat([v["q"], v["k"], v["v"]]))
    m = unit_views(mlp, buf, torch.float32)
    assert torch.equal(m["gate_up"], torch.cat([m["gate"], m["up"]]))


@pytest.mark.parametrize("n", [1, 2, 5, 12, 64, 80])
def test_spread_order_is_a_permutation_with_spread_prefixes(n: int) -> None:
    order = spread_order(n)
    assert sorted(order) == list(range(n))
    if n >= 8:  # the first 4 picks land in the 4 quarters
        assert sorted(i * 4 // n for i in order[:4]) == [0, 1, 2, 3]


def test_select_resident_fits_the_budget_and_spreads() -> None:
    sizes = [134, 270] * 32
    for budget in (0, 133, 134, 500, 4000, 12000, sum(sizes)):
        chosen = select_resident(sizes, budget)
        used = sum(s for s, r in zip(sizes, chosen, strict=True) if r)
        assert used <= budget
        assert all(s > budget - used for s, r in zip(sizes, chosen, strict=True) if not r)  # greedy
    half = select_resident(sizes, sum(sizes) // 2)
    streamed = [i for i, r in enumerate(half) if not r]
    assert max(b - a for a, b in zip(streamed, streamed[1:], strict=False)) <= 4  # no long resident run


def _hf_greedy(prompt: torch.Tensor, steps: int, device: str = "cpu",
               dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    hf = models.build_hf_model(SPEC, dtype, device, SOURCE)
    with torch.no_grad():
        out = hf(input_ids=prompt, use_cache=True)
        first_logits = out.logits[:, -1].float()
        nxt = out.logits[:, -1].argmax(-1)
        tokens = [nxt]
        for _ in range(steps - 1):
            out = hf(input_ids=nxt[:, None], past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1)
            tokens.append(nxt)
    return torch.stack(tokens, dim=1), first_logits


def _run(store: WeightStore, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = Llama(SPEC, store)
    b, s = prompt.shape
    cache = KVCache(SPEC, b, s + steps, store.tdtype, store.device)
    with torch.inference_mode():
        logits = model.prefill(prompt, cache)
        tok = logits.argmax(-1)
        tokens = [tok]
        pos = torch.tensor([s], device=store.device)
        for _ in range(steps - 1):
            tok = model.decode(tok[:, None], pos, cache).argmax(-1)
            tokens.append(tok)
            pos += 1
    return torch.stack(tokens, dim=1), logits.float()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(1, SPEC.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _hf_greedy(prompt, 12)


@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_tokens_equal_transformers_at_every_budget(prompt, reference, slots, fraction) -> None:
    store = WeightStore(SPEC, "float32", torch.device("cpu"), SOURCE, slots=slots)
    applied = store.apply_budget(int(fraction * store.total))
    assert applied <= fraction * store.total
    assert (len(store.streamed) > 0) == (fraction < 1.0)
    tokens, logits = _run(store, prompt, 12)
    ref_tokens, ref_logits = reference
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert len(set(tokens[0].tolist())) > 3  # the test would see a wrong weight


def test_a_stale_slot_changes_the_tokens(prompt, reference) -> None:
    """The equality above can fail: skipping one copy into a slot breaks the output."""
    store = WeightStore(SPEC, "float32", torch.device("cpu"), SOURCE, slots=2)
    store.apply_budget(0)
    real_copy = store._copy
    store._copy = lambda unit, slot: None if unit == 5 else real_copy(unit, slot)
    tokens, _ = _run(store, prompt, 12)
    assert not torch.equal(tokens, reference[0])


def test_budget_changes_between_generations(prompt, reference) -> None:
    store = WeightStore(SPEC, "float32", torch.device("cpu"), SOURCE)
    for fraction in (0.7, 0.0, 1.0, 0.3, 0.0):
        store.apply_budget(int(fraction * store.total))
        assert torch.equal(_run(store, prompt, 12)[0], reference[0])


# -- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_fp16_logits_match_transformers_eager_at_every_budget() -> None:
    prompt = torch.randint(1, SPEC.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    prompt = prompt.cuda()
    _, ref_logits = _hf_greedy(prompt, 1, "cuda", "float16")
    store = WeightStore(SPEC, "float16", torch.device("cuda"), SOURCE)
    for fraction in (0.0, 0.5, 1.0):
        store.apply_budget(int(fraction * store.total))
        _, logits = _run(store, prompt, 4)
        torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
    store.close()
