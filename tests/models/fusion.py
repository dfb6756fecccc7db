"""Checks shared by the fusion designs that keep the image token in the sequence (Flamingo-style
cross-attention, LLaMA-Adapter's visual prompts): greedy decoding without a cache as the
reference, continuous batching against it, packed rows, and a save/load round trip."""

from __future__ import annotations

import torch

from modalign import MLLM, MLLMConfig
from modalign.infer.engine import Engine, Prompt, SamplingParams
from modalign.infer.scheduler import Scheduler
from modalign.models.decoder import LLM
from tests.infer.test_scheduler import Sink, run


def pixels(n, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def two_rows(img: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): row 0 text, image A, text, image B, text; row 1 (left-padded) text, image C, text."""
    ids = torch.tensor([[1, 7, 8, img, 9, 10, img, 11, 12],
                        [0, 0, 1, 13, 14, img, 15, 16, 17]])  # fmt: skip
    return ids, torch.tensor([[1] * 9, [0, 0] + [1] * 7])


def decoder_without(m: MLLM, field: str, marker: str) -> LLM:
    """``m``'s decoder with ``llm.<field>`` switched off and the parameters named ``marker`` dropped."""
    cfg = MLLMConfig.from_dict(m.config.to_dict()).llm
    setattr(cfg, field, None)
    base = LLM(cfg).eval()
    base.load_state_dict(
        {k[4:]: v for k, v in m.state_dict().items() if k.startswith("llm.") and marker not in k}
    )
    return base


def greedy_without_cache(m: MLLM, ids: list[int], images: list[torch.Tensor], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        with torch.no_grad():
            px = torch.stack(images) if images else None
            logits = m(torch.tensor([seq]), px).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(ids) :]


def mixed_prompts(img: int, px: torch.Tensor) -> list[Prompt]:
    """Two images, one image, text only (in a batch with images), one image; ``px`` [4, 3, H, W]."""
    return [Prompt([1, 7, img, 9, 10, 11, img, 12], [px[0], px[1]]),
            Prompt([1, img, 13], [px[2]]),
            Prompt([1, 14, 15, 16, 17]),
            Prompt([1, 20, img, 21, 22], [px[3]])]  # fmt: skip


def continuous_batching_matches_greedy(m: MLLM, prompts: list[Prompt]) -> None:
    """Requests joining and leaving a running batch of 3 each get the no-cache greedy tokens."""
    want = [
        greedy_without_cache(m, p.input_ids, p.pixel_values, n)
        for p, n in zip(prompts, [5, 3, 6, 4], strict=True)
    ]
    sinks = [Sink() for _ in prompts]
    reqs = [
        s.request(p, SamplingParams(max_new_tokens=len(w)))
        for s, p, w in zip(sinks, prompts, want, strict=True)
    ]
    run(Scheduler(Engine(m), max_batch=3, headroom=4), {0: reqs[2:3], 1: reqs[:2], 3: reqs[3:]})
    assert [s.tokens for s in sinks] == want


def save_load_round_trip(
    m: MLLM, path, fusion: str, ids: torch.Tensor, px: torch.Tensor, mask: torch.Tensor
) -> None:
    m.save_pretrained(path)
    back = MLLM.from_pretrained(path)
    assert back.config == m.config and back.config.fusion == fusion
    with torch.no_grad():
        assert torch.equal(back.eval()(ids, px, mask).logits, m(ids, px, mask).logits)


def packed_row_matches_samples_alone(m: MLLM, img: int, px: torch.Tensor) -> None:
    """Two samples packed in one row give each its own logits; the second's text before its image
    must not see the first's image. ``px`` [2, 3, H, W]."""
    a, b = [1, img, 7, 8, 9], [1, 10, img, 11]
    with torch.no_grad():
        alone = [m(torch.tensor([a]), px[:1]).logits[0], m(torch.tensor([b]), px[1:]).logits[0]]
        packed = m(torch.tensor([a + b + [0]]), px, seq_ids=torch.tensor([[1] * 5 + [2] * 4 + [0]])).logits[0]
    torch.testing.assert_close(packed[:5], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[5:9], alone[1], atol=1e-5, rtol=1e-5)
