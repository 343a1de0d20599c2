"""Chapter 7's LoRA experts: the materialised ΔW = (α/r)·BA against peft's merged weights,
clear errors for experts that do not match, and DARE on the factors."""
import json

import pytest
import torch

from merging_helpers import lora


def _peft_expert(tmp_path, name, rank=4, targets=("query", "value"), seed=0):
    """A tiny BERT with a random (non-zero) LoRA adapter: its folder, peft's merged weights, the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=24, max_position_embeddings=16))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=8, target_modules=list(targets),
                                                  init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / name))
    merged = peft_model.merge_and_unload().state_dict()
    return tmp_path / name, merged, base


def test_materialised_delta_equals_peft_merged_minus_base(tmp_path):
    folder, merged, base = _peft_expert(tmp_path, "a")
    ad = lora.read_adapter(folder)
    assert (ad.rank, ad.alpha, ad.targets, ad.scale) == (4, 8.0, ("query", "value"), 2.0)
    deltas = lora.lora_deltas({"a": ad})["a"]
    assert len(deltas) == 4 and all(".attention.self." in n for n in deltas)  # q and v of 2 layers
    for n, w in base.items():
        expected = merged[n] - w
        if n in deltas:
            assert expected.abs().max() > 0
            torch.testing.assert_close(deltas[n], expected, rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(merged[n], w), n  # peft changes nothing else
    rebuilt = lora.with_deltas(base, deltas)
    for n in base:
        torch.testing.assert_close(rebuilt[n], merged[n], rtol=1e-5, atol=1e-6)
    assert lora.low_rank_check(deltas.values()) == [4] * 4


def test_experts_that_do_not_match_are_named(tmp_path):
    a = lora.read_adapter(_peft_expert(tmp_path, "a")[0])
    b = lora.read_adapter(_peft_expert(tmp_path, "b", rank=2)[0])
    c = lora.read_adapter(_peft_expert(tmp_path, "c", targets=("query", "key"))[0])
    with pytest.raises(ValueError, match="'a' and 'b' have different ranks: 4 vs 2"):
        lora.lora_deltas({"a": a, "b": b})
    with pytest.raises(ValueError, match=r"'a' and 'c' adapt different maps: \['query', 'value'\] vs \['key', 'query'\]"):
        lora.lora_deltas({"a": a, "c": c})
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora.read_adapter(tmp_path)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    with pytest.raises(ValueError, match="rsLoRA"):
        lora.read_adapter(tmp_path / "a")


def test_dare_on_factors():
    g = torch.Generator().manual_seed(0)
    name = "encoder.layer.0.attention.self.query.weight"
    ad = lora.Adapter(path=None, rank=8, alpha=16.0, targets=("query",),
                      factors={name: (torch.randn(8, 64, generator=g), torch.randn(64, 8, generator=g))})
    assert torch.equal(lora.dare_on_factors(ad, name, 0.0), lora.lora_delta(ad, name))
    # unbiased: the mean over masks tends to ΔW (A's and B's masks are independent)
    mean = torch.stack([lora.dare_on_factors(ad, name, 0.5, seed=s) for s in range(400)]).mean(0)
    err = (mean - lora.lora_delta(ad, name)).norm() / lora.lora_delta(ad, name).norm()
    assert err < 0.15
    assert lora.low_rank_check([lora.dare_on_factors(ad, name, 0.5)]) == [8]  # still rank ≤ r
