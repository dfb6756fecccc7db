"""The decoder's ``keep``: the last layer computes the positions the loss reads alone (its queries,
output projection and MLP on those rows; keys and values on all), and the result equals the
whole forward's output at those positions, with the same gradients, in every decoder variant."""

from __future__ import annotations

import pytest
import torch

from modalign.config import AdapterConfig, LLMConfig, LoRAConfig, PLoRAConfig
from modalign.models.decoder import LLM, Rows

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
            max_position_embeddings=64)  # fmt: skip
ALL = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

VARIANTS = {
    "llama": {},
    "mam+plora": {"mam": True, "plora": PLoRAConfig(rank=4, alpha=8, targets=ALL)},
    "fused-qkv+lora": {"fused_qkv": True, "lora": LoRAConfig(rank=4, alpha=8, targets=ALL)},
    "sliding": {"sliding_window": 3, "layer_types": ["full", "full", "sliding"]},
    # layers typed "sliding" with the window switched off attend as full ones
    "sliding-no-window": {"sliding_window": None, "layer_types": ["sliding", "full", "sliding"]},
    "opt": {
        "norm": "layer",
        "position": "learned",
        "position_offset": 2,
        "mlp": "plain",
        "hidden_act": "relu",
    },
    "adapter": {"adapter": AdapterConfig(num_layers=2, prompt_len=3)},
}


def _llm(variant: str) -> LLM:
    torch.manual_seed(0)
    llm = LLM(LLMConfig(**BASE, **VARIANTS[variant])).eval()
    with torch.no_grad():  # adapters as after training: each adds something
        for n, p in llm.named_parameters():
            if n.endswith(("lora_B.weight", "adapter_gate")):
                p.normal_(0, 0.5)
    return llm


def _inputs(b=3, t=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    keep = torch.zeros(b, t, dtype=torch.bool)
    keep[0, [2, 3, 7]] = True
    keep[1, [5, 6]] = True
    keep[2, 4] = True
    img = torch.zeros(b, t, dtype=torch.long)
    img[:, 1:4] = 1  # image rows, some of them kept
    return ids, mask, keep, img


def _mlp_rows(llm: LLM) -> list[int]:
    seen: list[int] = []
    llm.layers[-1].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    return seen


def _grads(llm: LLM, out: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    llm.zero_grad()
    (out * w).sum().backward()
    return {n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_kept_rows_equal_the_whole_forward(variant, checkpointing):
    llm = _llm(variant)
    llm.gradient_checkpointing = checkpointing
    llm.train(checkpointing)  # checkpointing applies while training (no dropout configured)
    ids, mask, keep, img = _inputs()
    seen = _mlp_rows(llm)
    full = llm(ids, attention_mask=mask, modality_ids=img, return_hidden=True)
    got = llm(ids, attention_mask=mask, modality_ids=img, return_hidden=True, keep=keep)
    assert seen == [9, 3]  # the last layer's MLP ran on 3 rows a sample (the most kept in one), not 9
    assert got.shape == (int(keep.sum()), 32)
    torch.testing.assert_close(got, full[keep], atol=2e-6, rtol=1e-5)
    logits = llm(ids, attention_mask=mask, modality_ids=img, keep=keep)
    torch.testing.assert_close(logits, llm.lm_head(got))
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    want = _grads(llm, full[keep], w)
    have = _grads(llm, llm(ids, attention_mask=mask, modality_ids=img, return_hidden=True, keep=keep), w)
    # parameters whose gradient is zero in the whole forward (the last layer's queries, output
    # projection and MLP at rows nobody reads) may get none at all
    assert have.keys() <= want.keys()
    assert all(not want[n].any() for n in want.keys() - have.keys())
    for n, g in have.items():
        torch.testing.assert_close(g, want[n], atol=1e-5, rtol=1e-4, msg=n)


def test_packed_rows_keep_their_own_samples():
    llm = _llm("mam+plora")
    ids, _, keep, img = _inputs()
    seq_ids = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 2, 2, 2, 3, 3, 0, 0], [1] * 9])
    full = llm(ids, seq_ids=seq_ids, modality_ids=img, return_hidden=True)
    got = llm(ids, seq_ids=seq_ids, modality_ids=img, return_hidden=True, keep=keep)
    torch.testing.assert_close(got, full[keep], atol=2e-6, rtol=1e-5)


def test_rows_of_a_mask():
    keep = torch.tensor(
        [[False, True, False, True], [False, False, False, False], [True, False, False, False]]
    )
    rows = Rows.of(keep)
    assert rows.valid.tolist() == [[True, True], [False, False], [True, False]]
    assert rows.pos[rows.valid].tolist() == [1, 3, 0]  # row-major, as x[keep]
    x = torch.arange(12.0).view(3, 4)
    assert torch.equal(rows.take(x)[rows.valid], x[keep])
    assert Rows.of(torch.zeros(2, 5, dtype=torch.bool)) is None


def test_nothing_kept_and_refused_combinations():
    llm = _llm("llama")
    ids, mask, _, _ = _inputs()
    out = llm(ids, attention_mask=mask, return_hidden=True, keep=torch.zeros_like(mask, dtype=torch.bool))
    assert out.shape == (0, 32)
    with pytest.raises(ValueError, match="keep"):
        llm(ids, attention_mask=mask, keep=mask.bool(), cache=llm.new_cache(3, 16))


def test_layers_typed_sliding_without_a_window_attend_as_full_ones():
    """A config may type layers "sliding" and switch the window off (``sliding_window`` None): they
    attend as full layers do, with the padding mask and causally (the kept rows too)."""
    llm, ref = _llm("sliding-no-window"), _llm("llama")
    ref.load_state_dict(llm.state_dict())
    ids, mask, keep, _ = _inputs()
    torch.testing.assert_close(llm(ids, attention_mask=mask), ref(ids, attention_mask=mask))
    torch.testing.assert_close(llm(ids), ref(ids))
    torch.testing.assert_close(llm(ids, keep=keep, return_hidden=True), ref(ids, return_hidden=True)[keep])
