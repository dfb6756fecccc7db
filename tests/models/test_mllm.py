"""Core model behaviour without a reference: presets, config round trips and validation,
connectors' contract, the per-image splice, native save/load."""

import json

import pytest
import torch

from modalign import MLLM, MLLMConfig, PlaceholderMismatch
from modalign.checkpoints import build
from modalign.config import ConfigError, ConnectorConfig
from modalign.models.connectors import build_connector
from modalign.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_on_meta_and_round_trip(name):
    cfg = MLLMConfig.from_name(name)
    assert MLLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with torch.device("meta"):
        model = MLLM(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_config_errors_name_the_key():
    d = MLLMConfig.from_name("tiny-llava").to_dict()
    d["llm"]["rope_scalng"] = None
    with pytest.raises(ConfigError, match=r"config\.llm: unknown key\(s\) rope_scalng"):
        MLLMConfig.from_dict(d)
    d = MLLMConfig.from_name("tiny-llava").to_dict()
    d["vision"]["num_layers"] = "four"
    with pytest.raises(ConfigError, match=r"config\.vision\.num_layers: expected an integer"):
        MLLMConfig.from_dict(d)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        MLLMConfig.from_name("nope")


@pytest.mark.parametrize(
    "ctype,extra,l_out",
    [
        ("linear", {}, 17),
        ("mlp2x_gelu", {}, 17),
        ("mlp3x_gelu", {}, 17),
        (
            "abstractor",
            dict(num_queries=5, num_layers=2, num_heads=4, hidden_size=32, intermediate_size=48),
            6,
        ),
        (
            "abstractor",
            dict(
                num_queries=5, num_layers=1, num_heads=4, hidden_size=32, intermediate_size=48, pos_embed=True
            ),
            6,
        ),  # fmt: skip
        (
            "resampler",
            dict(num_queries=7, num_layers=2, num_heads=4, hidden_size=24, intermediate_size=48),
            7,
        ),
    ],
)
def test_connector_contract(ctype, extra, l_out):
    cfg = ConnectorConfig(type=ctype, **extra)
    conn = build_connector(cfg, d_vis=32, d_llm=40, num_features=17)
    x = torch.randn(3, 17, 32)
    y = conn(x)
    assert y.shape == (3, l_out, 40) and conn.num_output_tokens(17) == l_out
    # each image is encoded independently of the others in the batch
    torch.testing.assert_close(conn(x[1:2]), y[1:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ctype", ["abstractor", "resampler", "qformer"])
def test_fresh_query_connectors_give_each_query_its_own_output(ctype):
    """Freshly initialised learned queries differ, so each output token can learn its own part of
    the image (identical queries get identical gradients and stay identical: one token nine times)."""
    extra = {"qformer": dict(num_queries=6, num_layers=2, num_heads=4, hidden_size=32, intermediate_size=48,
                             cross_attention_every=1)}.get(ctype, dict(num_queries=6, num_layers=1, num_heads=4,
                                                                      hidden_size=32, intermediate_size=48))  # fmt: skip
    torch.manual_seed(0)
    conn = build_connector(ConnectorConfig(type=ctype, **extra), d_vis=32, d_llm=40, num_features=17)
    y = conn(torch.randn(2, 17, 32))[:, :6]
    gaps = (y[:, :, None] - y[:, None]).abs().amax(-1)  # [N, 6, 6]: between every two query outputs
    assert (gaps + torch.eye(6)).min() > 1e-4


def test_abstractor_locality_starts_each_query_over_its_own_patches():
    """With a strong locality prior each query reads its own place on the grid: changing one patch
    changes only the output tokens of the queries over it. The prior is a learned parameter."""
    torch.manual_seed(0)
    cfg = ConnectorConfig(type="abstractor", num_queries=4, num_layers=2, num_heads=4, hidden_size=32,
                          intermediate_size=48, eos_token=False, locality=200.0)  # fmt: skip
    conn = build_connector(cfg, d_vis=32, d_llm=40, num_features=17)  # CLS + a 4x4 grid
    assert conn.locality_bias.requires_grad and conn.locality_bias.shape == (4, 17)
    assert (conn.locality_bias[:, 0] == 0).all()  # no bias towards the CLS feature
    x = torch.randn(1, 17, 32)
    y = conn(x)
    # patch (row 3, col 0) lies in the bottom-left 2x2 block: query 2 of the 2x2 query grid
    x2 = x.clone()
    x2[0, 1 + 3 * 4 + 0] = torch.randn(32)
    changed = (conn(x2) - y).abs().amax(-1)[0]
    assert changed[2] > 1e-2 and changed[[0, 1, 3]].max() < 1e-6, changed
    # each query's prior peaks on the four patches of its own block, equally
    grid = conn.locality_bias[1, 1:].view(4, 4)
    block = grid[0:2, 2:4]
    assert torch.allclose(block, block.max().expand(2, 2)) and grid.max() == block.max()
    # the prior trains: the loss reaches it
    conn(x).square().sum().backward()
    assert conn.locality_bias.grad.abs().sum() > 0
    from modalign.train.freeze import no_decay

    assert no_decay("connector.locality_bias", conn.locality_bias)  # no weight decay pulls it to 0
    with pytest.raises(ValueError, match="square number of queries and a square patch grid, got 5 queries"):
        build_connector(ConnectorConfig(type="abstractor", num_queries=5, locality=1.0, hidden_size=32,
                                        num_heads=4), 32, 40, 17)  # fmt: skip


def test_mlp_depth_and_unknown_connector():
    conn = build_connector(ConnectorConfig(type="mlp3x_gelu"), 8, 16, 4)
    assert [n for n, _ in conn.named_children()] == ["linear_1", "linear_2", "linear_3"]
    with pytest.raises(ValueError, match="unknown connector type 'perceiver'; known: .*abstractor"):
        build_connector(ConnectorConfig(type="perceiver"), 8, 16, 4)


def _tiny_per_image():
    torch.manual_seed(0)
    cfg = MLLMConfig.from_name("tiny-llava")
    cfg.llm.num_layers = 2
    cfg.vision.num_layers = 2
    return MLLM(cfg).eval()


def test_per_image_splice_equals_expanded_per_token():
    model = _tiny_per_image()
    ph = model.config.image_token_id
    n = model.num_image_tokens()
    ids = torch.tensor([[1, ph, 9, 10, 11], [1, 12, ph, 13, ph]])
    px = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(ids, pixel_values=px)
        assert out.logits.shape == (2, 3 + 2 * n, 512)
        # row 0 is shorter: right padded, masked
        assert out.attention_mask[0].sum() == 4 + n and out.attention_mask[1].sum() == 3 + 2 * n
        # the same model fed the expanded ids per token gives the same logits
        model.config.placeholder = "per_token"
        exp = torch.tensor(
            [[1] + [ph] * n + [9, 10, 11] + [0] * (n - 1), [1, 12] + [ph] * n + [13] + [ph] * n]
        )
        mask = torch.tensor([[1] * (4 + n) + [0] * (n - 1), [1] * (3 + 2 * n)])
        ref = model(exp, pixel_values=px, attention_mask=mask)
    m = out.attention_mask.bool()
    torch.testing.assert_close(out.logits[m], ref.logits[m], atol=1e-5, rtol=1e-5)
    assert torch.equal(out.modality_ids, ref.modality_ids * mask)


def test_per_image_placeholder_count_mismatch():
    model = _tiny_per_image()
    ph = model.config.image_token_id
    with pytest.raises(PlaceholderMismatch, match=r"2 image placeholder\(s\) \(id 3\) but 1 image\(s\)"):
        model(torch.tensor([[1, ph, 5, ph]]), pixel_values=torch.randn(1, 3, 64, 64))


def test_loss_only_objective_equals_full_logits_loss():
    """The lm objective (the trainer's path) runs the LM head on supervised positions only: the
    same loss, supervised-token count and gradients as ``MLLM.forward``'s loss over full logits."""
    from modalign.train.objectives.lm import LMObjective

    model = _tiny_per_image().train()
    ph = model.config.image_token_id
    ids = torch.tensor([[1, ph, 9, 10, 11, 12], [1, 12, ph, 13, 14, 0]])
    labels = torch.tensor([[-100, -100, -100, 10, 11, 12], [-100, -100, -100, -100, 14, -100]])
    mask = torch.tensor([[1] * 6, [1] * 5 + [0]])
    px = torch.randn(2, 3, 64, 64)
    full = model(ids, pixel_values=px, attention_mask=mask, labels=labels)
    full.loss.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    objective = LMObjective(model)
    assert [n for n, _ in objective.named_parameters()] == [n for n, _ in model.named_parameters()]
    batch = {
        "input_ids": ids,
        "pixel_values": px,
        "attention_mask": mask,
        "labels": labels,
        "ids": ["a", "b"],
    }
    loss, n = objective(batch)
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert n == full.num_tokens == 4
    torch.testing.assert_close(loss, full.loss, atol=1e-6, rtol=1e-6)
    assert got.keys() == want.keys() and "llm.lm_head.weight" in want
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5, msg=k)


def test_native_save_load_is_exact_and_atomic(tmp_path):
    model = _tiny_per_image()
    model.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["config.json", "model.safetensors"]
    again = MLLM.from_pretrained(tmp_path / "m")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    # a save that fails midway leaves the previous checkpoint intact
    from modalign.checkpoints.io import atomic_dir

    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "m") as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed")
    kept = MLLM.from_pretrained(tmp_path / "m").state_dict()
    assert kept.keys() == model.state_dict().keys()
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_build_skips_init_and_loads_dtype(tmp_path):
    model = _tiny_per_image().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    again = MLLM.from_pretrained(tmp_path / "bf16")
    assert again.llm.embed_tokens.weight.dtype == torch.bfloat16
    assert again.llm.rotary.inv_freq.dtype == torch.float32  # rope stays fp32
    m = build(MLLMConfig.from_name("tiny-llava"))
    assert m.llm.rotary.inv_freq.device.type == "cpu"
    # the buffers a build fills in are the ones a normal construction computes
    assert torch.equal(m.llm.rotary.inv_freq, MLLM(MLLMConfig.from_name("tiny-llava")).llm.rotary.inv_freq)
