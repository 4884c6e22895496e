"""`model.attn_implementation=varlen` (fine_tune/models/attention.py) and the frozen-weight dtypes.

PyTorch's varlen kernel runs on CUDA only; here a reference with its signature (causal SDPA over each
example of the packed rows) stands in for it, so what is ours is checked on any CPU: boundaries from
the collator, the (batch, heads, length) <-> tokens-first reshapes, grouped-query heads, the dtype,
and which batches go to sdpa instead. The kernel itself is measured on a GPU (docs/speed.md).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_mistral_config

from fine_tune.data.collate import PackedCollator, PaddingCollator
from fine_tune.models import attention


def reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, 0), enable_gqa=False):
    """varlen_attn's contract: tokens-first (total, heads, dim), examples delimited by cu_q."""
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k
    assert window_size == (-1, 0) and q.dtype in (torch.bfloat16, torch.float16)
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    pieces = []
    for a, b in zip(cu_q.tolist(), cu_q.tolist()[1:], strict=False):
        q_, k_, v_ = (x[a:b].transpose(0, 1) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale, enable_gqa=enable_gqa)
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces)


def torch_2_10_kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False):
    """The kernel's first signature (PyTorch 2.10): causal flag, no grouped-query heads."""
    assert is_causal and q.shape[1] == k.shape[1]
    return reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale)


@pytest.fixture
def as_on_gpu(monkeypatch):
    """The varlen path taken as on a GPU, through a recording reference kernel."""
    calls = []

    def use(kernel):
        parameters = frozenset(inspect.signature(kernel).parameters)

        def recording(*args, **kwargs):
            calls.append(args[0].shape)
            return kernel(*args, **kwargs)

        monkeypatch.setattr(attention, "kernel", lambda: recording)
        monkeypatch.setattr(attention, "kernel_parameters", lambda: parameters)
        monkeypatch.setattr(attention, "on_gpu", lambda tensor: True)
        return calls

    return use


def tiny_model(dtype=torch.bfloat16):
    from transformers import MistralForCausalLM

    attention.register()
    torch.manual_seed(0)
    return MistralForCausalLM(tiny_mistral_config(vocab_size=100)).to(dtype).eval()


def examples(lengths=(5, 9, 3, 7)):
    torch.manual_seed(1)
    return [{"input_ids": torch.randint(0, 100, (n,)).tolist(), "labels": list(range(n))} for n in lengths]


def logits(model, batch, implementation):
    model.config._attn_implementation = implementation
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits.float()


def test_the_collator_passes_each_examples_boundaries():
    batch = PackedCollator()(examples())
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 14, 17, 24]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == 9
    assert batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"] and batch["max_length_k"] == 9


@pytest.mark.parametrize("kernel", [reference_kernel, torch_2_10_kernel], ids=["torch>=2.11", "torch2.10"])
def test_packed_rows_through_varlen_equal_sdpa(as_on_gpu, kernel):
    """Grouped-query heads (4 query, 2 key/value) by the kernel's flag or repeated for the old one."""
    model, batch = tiny_model(), PackedCollator()(examples())
    expected = logits(model, batch, "sdpa")
    calls = as_on_gpu(kernel)
    got = logits(model, batch, attention.NAME)
    assert calls == [torch.Size([24, 4, 16])] * 2  # both layers, tokens-first
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # bf16: the kernel's order of sums


def test_fp32_inside_autocast_is_cast_for_the_kernel(as_on_gpu):
    """Quantized training hands attention fp32 activations under bf16 autocast; sdpa is autocast
    to bf16, the custom op is not: it is cast by us, to autocast's dtype."""
    model, batch = tiny_model(torch.float32), PackedCollator()(examples())
    calls = as_on_gpu(reference_kernel)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = logits(model, batch, "sdpa")
        got = logits(model, batch, attention.NAME)
    assert len(calls) == 2
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)


def test_what_varlen_does_not_cover_goes_to_sdpa(as_on_gpu):
    model = tiny_model()
    calls = as_on_gpu(reference_kernel)
    padded = PaddingCollator(pad_token_id=0)(examples((5, 9)))
    torch.testing.assert_close(logits(model, padded, attention.NAME), logits(model, padded, "sdpa"))
    fp32 = tiny_model(torch.float32)  # no autocast: the kernel takes fp16/bf16 only
    packed = PackedCollator()(examples())
    torch.testing.assert_close(logits(fp32, packed, attention.NAME), logits(fp32, packed, "sdpa"))
    model.config._attn_implementation = attention.NAME
    prompt = torch.tensor([examples((6,))[0]["input_ids"]])
    model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)  # a KV cache
    assert calls == []


def test_the_sdpa_mask_is_built_only_for_a_batch_that_goes_to_sdpa(as_on_gpu, monkeypatch):
    """Packed rows on varlen never build the (length x length) mask; the same rows where varlen
    does not run (fp32 outside autocast) build it once per forward, not once per layer."""
    built = []
    build = attention.DeferredMask.build
    monkeypatch.setattr(attention.DeferredMask, "build", lambda self: built.append(self) or build(self))
    packed = PackedCollator()(examples())
    calls = as_on_gpu(reference_kernel)
    logits(tiny_model(), packed, attention.NAME)
    assert len(calls) == 2 and built == []
    fp32 = tiny_model(torch.float32)
    got = logits(fp32, packed, attention.NAME)
    assert len(built) == 2 and built[0] is built[1]  # both layers, one mask
    torch.testing.assert_close(got, logits(fp32, packed, "sdpa"))


def test_auto_is_varlen_only_where_its_kernel_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention.resolve("auto") == "sdpa"
    assert attention.resolve("eager") == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention.resolve("auto") == (attention.NAME if attention.kernel() else "sdpa")
    from transformers import AttentionInterface

    assert attention.resolve(attention.NAME) == attention.NAME and attention.NAME in AttentionInterface()


@pytest.mark.parametrize("upcast", [False, True])
def test_frozen_weights_keep_their_dtype_unless_upcast(upcast: bool):
    """quant.upcast_frozen: PEFT's k-bit preparation makes every frozen non-4-bit weight fp32 (and
    with it the residual stream); without it they stay in the model's dtype. Either way nothing of
    the base trains and checkpointing still gets gradients from the input embeddings."""
    from helpers import FAST, compose

    from fine_tune.adapters import prepare_for_adapter
    from fine_tune.utils.build import build

    cfg = compose([*FAST, "quant=nf4", "model.dtype=bfloat16"])
    model = build(cfg.model, quant=cfg.quant, seed=cfg.seed).model.train()
    prepared = prepare_for_adapter(model, gradient_checkpointing=True, upcast_frozen=upcast)
    dtypes = {p.dtype for p in prepared.parameters() if p.__class__.__name__ != "Params4bit"}
    assert dtypes == ({torch.float32} if upcast else {torch.bfloat16})
    assert not any(p.requires_grad for p in prepared.parameters())
    assert prepared.is_gradient_checkpointing
    out = prepared.get_input_embeddings()(torch.tensor([[1, 2]]))
    assert out.requires_grad


def test_gradients_through_varlen_equal_sdpa(as_on_gpu):
    """Training: the loss's gradients reach the projections through our reshapes as through sdpa."""
    batch = PackedCollator()(examples())
    calls = as_on_gpu(reference_kernel)
    grads = {}
    for implementation in ("sdpa", attention.NAME):
        model = tiny_model(torch.float32).train()
        model.config._attn_implementation = implementation
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch).loss.backward()
        grads[implementation] = model.model.layers[0].self_attn.q_proj.weight.grad
    assert len(calls) == 2
    torch.testing.assert_close(grads[attention.NAME], grads["sdpa"], atol=2e-2, rtol=5e-2)
