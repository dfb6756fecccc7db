"""BLIP-2 stage 1: the Q-Former's text branch and heads against transformers'
``Blip2ForImageTextRetrieval`` (itm and itc logits), and the multimodal causal mask of itg."""

import pytest
import torch

from modalign.checkpoints.parts import build_from_parts, merge_part_configs
from modalign.config import MLLMConfig
from tests.helpers import randomize, transformers
from tests.models.test_parity_blip2 import make_blip2

QC = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, encoder_hidden_size=32,
          cross_attention_frequency=2, vocab_size=100, max_position_embeddings=32, use_qformer_text_input=True)  # fmt: skip
VC = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
)


def retrieval_pair(tmp_path):
    """A tiny random ``Blip2ForImageTextRetrieval`` and a modalign model whose vision tower and
    Q-Former are read from its folder (a recipe's ``init: {vision, connector}``)."""
    cfg = transformers.Blip2Config(
        vision_config=VC, qformer_config=QC, num_query_tokens=5, image_text_hidden_size=24
    )
    cfg.architectures = ["Blip2ForImageTextRetrieval"]
    torch.manual_seed(0)
    ref = randomize(transformers.Blip2ForImageTextRetrieval(cfg)).eval()
    ref.save_pretrained(tmp_path / "itm")
    _, base = make_blip2(tmp_path)  # any BLIP-2 layout with a decoder: the recipe's base config
    init = {"vision": str(tmp_path / "itm"), "connector": str(tmp_path / "itm")}
    mcfg = MLLMConfig.from_dict(merge_part_configs(base.config.to_dict(), init))
    ours = build_from_parts(mcfg, init, seed=0).eval()
    return ref, ours


def texts(n=3, t=7, vocab=100):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    ids[:, 0] = 1  # a [CLS]-like first token
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return ids, mask


def test_itm_and_itc_logits_match_transformers_retrieval(tmp_path):
    ref, ours = retrieval_pair(tmp_path)
    conn = ours.connector
    assert conn.cfg.text_heads == ["itc", "itm"] and conn.cfg.embed_dim == 24
    ids, mask = texts()
    px = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = ours.vision(px)
        itm_ref = ref(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        itc_ref = ref(pixel_values=px, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        itm = conn.itm_logits(feats, ids, mask)
        itc = conn.itc_similarity(feats, ids, mask)
    torch.testing.assert_close(itm, itm_ref.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(itc, itc_ref.logits_per_image, atol=1e-5, rtol=1e-5)
    assert itc.shape == (3, 3) and (itc - itc.t()).abs().max() > 1e-3  # image x text, not symmetric
    # the text's padding is not read: changing a padded id changes nothing
    other = ids.clone()
    other[2, 5] = 9
    with torch.no_grad():
        torch.testing.assert_close(conn.itm_logits(feats, other, mask), itm, atol=0, rtol=0)
    assert conn.temp.item() == pytest.approx(0.07)


def test_query_output_unchanged_by_the_text_branch(tmp_path):
    """The stage-1 heads leave the connector's output as the queries alone give it."""
    ref, ours = retrieval_pair(tmp_path)
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        feats = ours.vision(px)
        q = ref.qformer(query_embeds=ref.query_tokens.expand(2, -1, -1), encoder_hidden_states=feats)
        torch.testing.assert_close(
            ours.connector.query_states(feats), q.last_hidden_state, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            ours.encode_images(px),
            ours.connector.language_projection(q.last_hidden_state),
            atol=1e-5,
            rtol=1e-5,
        )


def test_itg_mask_is_multimodal_causal(tmp_path):
    """itg: a text position sees the queries and the text up to itself; the queries see only
    the queries (their states equal the query-only pass)."""
    from modalign.models.qformer import QFormerConnector

    cfg = MLLMConfig.from_name("tiny-blip2").connector
    conn = randomize(QFormerConnector(cfg, 32, 64, 16)).eval()
    image = torch.randn(2, 16, 32)
    ids = torch.randint(5, cfg.text_vocab_size, (2, 6))
    with torch.no_grad():
        full = conn.joint_states(image, ids, causal=True)
        nq = cfg.num_queries
        torch.testing.assert_close(full[:, :nq], conn.query_states(image), atol=1e-5, rtol=1e-5)
        for t in range(ids.shape[1]):
            later = ids.clone()
            later[:, t + 1 :] = 7
            part = conn.joint_states(image, later, causal=True)
            torch.testing.assert_close(part[:, : nq + t + 1], full[:, : nq + t + 1], atol=1e-5, rtol=1e-5)
        bidir = conn.joint_states(image, ids)
        assert (bidir[:, :nq] - full[:, :nq]).abs().max() > 1e-3  # itm's queries read the text
        logits = conn.itg_logits(image, ids)
    assert logits.shape == (2, 6, cfg.text_vocab_size)
    # the LM head's decoder is the word embeddings
    h = full[:, nq:]
    t = conn.itg_head.transform
    want = (
        t.LayerNorm(torch.nn.functional.gelu(t.dense(h))) @ conn.qformer.embeddings.word_embeddings.weight.t()
    )
    torch.testing.assert_close(logits, want + conn.itg_head.bias, atol=1e-5, rtol=1e-5)


def test_a_bert_folder_starts_the_qformer(tmp_path):
    """BLIP-2 starts its Q-Former from BERT: read from a transformers BERT folder, the text branch
    gives BERT's hidden states, the itg head BERT's masked-LM logits, the queries' FFN is BERT's
    FFN; the word embeddings grow by BLIP-2's [DEC]; cross-attention and queries start fresh."""
    from modalign import MLLM as Model

    bc = transformers.BertConfig(vocab_size=1023, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=256, max_position_embeddings=64, layer_norm_eps=1e-12)  # fmt: skip
    torch.manual_seed(0)
    ref = randomize(transformers.BertForMaskedLM(bc)).eval()
    with torch.no_grad():
        ref.bert.embeddings.token_type_embeddings.weight.zero_()  # BLIP-2's Q-Former has none
    ref.save_pretrained(tmp_path / "bert")
    base = MLLMConfig.from_name("tiny-blip2")
    init = {"connector": str(tmp_path / "bert")}
    cfg = MLLMConfig.from_dict(merge_part_configs(base.to_dict(), init))
    model = build_from_parts(cfg, init, seed=0).eval()
    c = model.connector
    ids = torch.randint(5, 1023, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = c.text_states(ids)
        torch.testing.assert_close(h, ref.bert(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5)
        logits = c.itg_head(h, c.qformer.embeddings.word_embeddings.weight)
        torch.testing.assert_close(logits[..., :1023], ref(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    layer = c.qformer.encoder.layer[0]
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    assert c.qformer.embeddings.word_embeddings.weight.shape[0] == 1024  # + [DEC]
    torch.manual_seed(0)  # the recipe's seed draws the parts BERT lacks, as MLLM(cfg) would
    fresh = Model(base)
    assert torch.equal(c.query_tokens, fresh.connector.query_tokens)
    assert torch.equal(layer.crossattention.attention.query.weight,
                       fresh.connector.qformer.encoder.layer[0].crossattention.attention.query.weight)  # fmt: skip
