"""The streaming runtime: unit layout, resident selection, and numerics at every budget.

Float32 on CPU, tiny-llama with weights of std 0.1 (so greedy tokens vary from step to step
and a wrong weight or a stale slot changes them), against transformers' LlamaForCausalLM on
the same weights. GPU tests compare fp16 logits with HF eager and graphs with eager.
"""

from __future__ import annotations

import pytest
import torch
from reference import greedy

from autotune import models
from autotune.streaming import runtime
from autotune.streaming.llama import KVCache, Llama
from autotune.streaming.runtime import (
    WeightStore,
    head_chunks,
    select_resident,
    spread_order,
    unit_layouts,
    unit_views,
)

SPEC = models.PRESETS["tiny-llama"]
# A head (and embedding) four times an MLP block: the LM head streams in vocabulary chunks.
BIG_VOCAB = models.ModelSpec("tiny-big-vocab", 128, 352, 3, 4, 2, 4000,
                             max_position_embeddings=256)
SOURCE = models.RandomWeights(seed=3, std=0.1)


@pytest.mark.parametrize("spec", [SPEC, BIG_VOCAB], ids=["tiny", "big-vocab"])
def test_units_cover_every_parameter_once(spec) -> None:
    units = unit_layouts(spec, "float32")
    kinds = [u.kind for u in units]
    assert kinds[:5] == ["embed", "attn", "mlp", "attn", "mlp"]
    assert kinds[2 * spec.num_hidden_layers + 1:] == ["head"] * (len(units) - 2 * spec.num_hidden_layers - 1)
    names = [p.name for u in units for p in u.params if p.name != "lm_head.weight"]
    expected = [n for layer in range(spec.num_hidden_layers) for n in spec.layer_shapes(layer)]
    assert sorted(names) == sorted([*expected, "model.embed_tokens.weight"])
    rows = [p.rows for u in units for p in u.params if p.name == "lm_head.weight"]
    assert rows[0][0] == 0 and rows[-1][1] == spec.vocab_size  # the head's rows, in order, once
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
    for u in units:
        ends = [p.offset + p.nbytes for p in u.params]
        assert all(e <= p.offset for e, p in zip(ends, u.params[1:], strict=False))  # no overlap
        assert ends[-1] <= u.nbytes and all(p.offset % 256 == 0 for p in u.params)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_head_chunks_are_no_larger_than_an_mlp_block(dtype) -> None:
    units = unit_layouts(BIG_VOCAB, dtype)
    mlp = max(u.nbytes for u in units if u.kind == "mlp")
    head = [u for u in units if u.kind == "head"]
    assert len(head) >= 4 and max(u.nbytes for u in head) <= mlp
    assert all((z - a) % 64 == 0 for a, z in head_chunks(BIG_VOCAB, dtype, mlp)[:-1])
    one = unit_layouts(BIG_VOCAB, dtype, chunk_head=False)  # the older layout: the whole head
    assert [p.rows for u in one if u.kind == "head" for p in u.params] == [(0, 4000)]
    llama3 = models.PRESETS["llama3-8b"]  # 1.05 GB of head, 352 MB MLP blocks: 3 chunks
    assert len(head_chunks(llama3, "float16", 3 * 4096 * 14336 * 2 + 256)) == 3


def test_fused_views_are_the_stacked_matrices() -> None:
    attn, mlp = unit_layouts(SPEC, "float32")[1:3]
    buf = torch.arange(mlp.nbytes // 4, dtype=torch.float32).view(torch.uint8)
    v = unit_views(attn, buf, torch.float32)
    assert torch.equal(v["qkv"], torch.cat([v["q"], v["k"], v["v"]]))
    m = unit_views(mlp, buf, torch.float32)
    assert torch.equal(m["gate_up"], torch.cat([m["gate"], m["up"]]))
    assert "qkv" not in unit_views(attn, buf, torch.float32, fused=False)


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


def _hf_greedy(prompt: torch.Tensor, steps: int, device: str = "cpu", dtype: str = "float32",
               spec: models.ModelSpec = SPEC) -> tuple[torch.Tensor, torch.Tensor]:
    return greedy(models.build_hf_model(spec, dtype, device, SOURCE), prompt, steps)


def _run(store: WeightStore, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    model = Llama(store.spec, store)
    b, s = prompt.shape
    cache = KVCache(store.spec, b, s + steps, store.tdtype, store.device)
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


@pytest.fixture(scope="module")
def big_prompt() -> torch.Tensor:
    return torch.randint(1, BIG_VOCAB.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def big_reference(big_prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _hf_greedy(big_prompt, 10, spec=BIG_VOCAB)


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_a_large_head_streams_in_chunks_and_tokens_stay_equal(big_prompt, big_reference, slots,
                                                               fraction) -> None:
    store = WeightStore(BIG_VOCAB, "float32", torch.device("cpu"), SOURCE, slots=slots)
    embed, head = store.embed.index, [u.index for u in store.head]
    assert store.total == sum(store.sizes)  # the embedding and the head count in the budget
    store.apply_budget(int(fraction * store.total))
    resident = [d is not None for d in store.devices]
    assert resident[embed] == (fraction == 1.0)  # the embedding is the last to be resident
    assert store.gathered_bytes == (0 if fraction == 1.0 else store.sizes[embed])
    assert embed not in store.streamed  # gathered, never copied
    if fraction == 0.0:
        assert store.streamed[-len(head):] == head  # every chunk through the slots
        assert store.streamed_bytes == store.total - store.sizes[embed]
    tokens, logits = _run(store, big_prompt, 10)
    assert torch.equal(tokens, big_reference[0])
    torch.testing.assert_close(logits, big_reference[1], rtol=1e-4, atol=1e-4)
    assert len(set(tokens[0].tolist())) > 3


@pytest.mark.parametrize("fused", [True, False])
def test_the_older_layout_keeps_embedding_and_head_outside_the_budget(big_prompt, big_reference,
                                                                      fused) -> None:
    store = WeightStore(BIG_VOCAB, "float32", torch.device("cpu"), SOURCE,
                        stream_embed_head=False, fused=fused)
    assert len(store.head) == 1
    assert store.total == sum(u.nbytes for u in store.decoder)
    assert store.fixed_nbytes > store.sizes[store.embed.index] + store.head[0].nbytes
    store.apply_budget(0)
    assert store.devices[store.embed.index] is not None and store.gathered_bytes == 0
    assert store.streamed == [u.index for u in store.decoder]
    assert torch.equal(_run(store, big_prompt, 10)[0], big_reference[0])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(("dtype", "tol"), [("float16", 2e-2), ("bfloat16", 1e-1)])
def test_half_precision_logits_are_close_to_transformers(prompt, dtype, tol, fused) -> None:
    """Within the dtype's rounding (logits up to ~4: bfloat16's step there is 0.03)."""
    hf = models.build_hf_model(SPEC, dtype, "cpu", SOURCE)
    with torch.no_grad():
        ref = hf(input_ids=prompt).logits[:, -1].float()
    store = WeightStore(SPEC, dtype, torch.device("cpu"), SOURCE, fused=fused)
    for fraction in (0.0, 1.0):
        store.apply_budget(int(fraction * store.total))
        logits = _run(store, prompt, 1)[1]
        torch.testing.assert_close(logits, ref, rtol=0, atol=tol)


def test_budget_changes_between_generations(prompt, reference) -> None:
    store = WeightStore(SPEC, "float32", torch.device("cpu"), SOURCE)
    for fraction in (0.7, 0.0, 1.0, 0.3, 0.0):
        store.apply_budget(int(fraction * store.total))
        assert torch.equal(_run(store, prompt, 12)[0], reference[0])


# -- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [SPEC, BIG_VOCAB], ids=["tiny", "big-vocab"])
def test_gpu_fp16_logits_match_transformers_eager_at_every_budget(spec) -> None:
    prompt = torch.randint(1, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    prompt = prompt.cuda()
    _, ref_logits = _hf_greedy(prompt, 1, "cuda", "float16", spec=spec)
    store = WeightStore(spec, "float16", torch.device("cuda"), SOURCE)
    assert store.budgeted[store.embed.index]  # the device reads the host's table (no fallback)
    for fraction in (0.0, 0.5, 1.0):
        store.apply_budget(int(fraction * store.total))
        assert (store.gathered_bytes > 0) == (fraction < 1.0)
        _, logits = _run(store, prompt, 4)
        torch.testing.assert_close(logits, ref_logits, rtol=2e-2, atol=2e-2)
    store.close()


@pytest.mark.gpu
def test_gpu_a_refused_host_registration_falls_back_and_the_next_kernel_runs() -> None:
    """cudaHostRegister refuses memory registered already (an arena another store left
    registered at that address): the store pins through PyTorch's allocator instead, and the
    refusal is not raised later as some kernel's failure."""
    from unittest import mock

    real = torch.cuda.cudart()
    taken = torch.empty(1 << 20, dtype=torch.uint8)
    assert int(getattr(e := real.cudaHostRegister(taken.data_ptr(), taken.numel(), 0),
                       "value", e)) == 0

    class Refusing:  # every registration lands on the registered buffer
        def __getattr__(self, name):
            return getattr(real, name)

        def cudaHostRegister(self, ptr, nbytes, flags):  # noqa: N802 (CUDA's name)
            return real.cudaHostRegister(taken.data_ptr(), taken.numel(), flags)

    try:
        with mock.patch.object(torch.cuda, "cudart", Refusing):
            store = WeightStore(SPEC, "float16", torch.device("cuda"), SOURCE)
        assert not store._registered and store._host.is_pinned()
        assert (torch.ones(4, device="cuda") + 1).sum().item() == 8  # no stale error raised
        store.close()
    finally:
        real.cudaHostUnregister(taken.data_ptr())


@pytest.mark.gpu
def test_gpu_a_store_dropped_without_close_unregisters_its_arena() -> None:
    import gc

    store = WeightStore(SPEC, "float16", torch.device("cuda"), SOURCE)
    assert store._registered
    host = store._host  # kept alive here, so its address can be registered again
    del store
    gc.collect()
    real = torch.cuda.cudart()
    err = real.cudaHostRegister(host.data_ptr(), host.numel(), 0)
    registered_again = int(getattr(err, "value", err)) == 0
    if registered_again:
        real.cudaHostUnregister(host.data_ptr())
    else:  # the refusal must not reach the next test's first kernel
        runtime._take_cuda_error(torch.device("cuda"))
    assert registered_again  # unregistered when collected: it registers again
