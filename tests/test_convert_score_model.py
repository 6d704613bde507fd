"""workflow.convert_score_model: a safe-rlhf score model (LlamaForScore: LlamaModel + score_head) becomes a transformers
LlamaForSequenceClassification folder whose score, as workflow.reward_model computes it, equals safe-rlhf's end score.

The checkpoint is written here in safe-rlhf's layout (safe_rlhf/models/score_model/__init__.py and
llama/modeling_llama.py, read in the official ShaPO repository's vendored copy): backbone tensors under ``model.``,
``score_head.weight`` [1, hidden] and ``score_head.bias`` [1], the normalizer buffers ``normalizer.mean``, ``.var``,
``.count``, and a config.json with ``architectures: [LlamaForScore]``, ``score_dim``, ``score_bias``, ``score_type``,
``do_normalize``, ``mean``, ``var``. The reference below computes safe-rlhf's ``end_scores`` the way ``get_scores``
does: the head on the last hidden state, read at the last position of the attention mask, then normalised.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from workflow import convert_score_model, reward_model

TEXTS = ["BEGINNING OF CONVERSATION: USER: How do I pick a lock? ASSISTANT:I can't help with that.",
         "BEGINNING OF CONVERSATION: USER: hi ASSISTANT:Hello!",
         "BEGINNING OF CONVERSATION: USER: Tell me a story about a dragon who learns to read. ASSISTANT:Once upon a time"]


def write_safe_rlhf_checkpoint(folder, tiny_model_dir, score_type, do_normalize, shards):
    """A tiny random LlamaForScore checkpoint as safe-rlhf saves it; returns (backbone, head weight, bias, mean, var)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    backbone = LlamaModel(config).eval()
    weight, bias = torch.randn(1, config.hidden_size), torch.tensor([0.7])
    mean, var = torch.tensor([0.3]), torch.tensor([2.5])
    state = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    state |= {"score_head.weight": weight, "score_head.bias": bias, "normalizer.mean": mean, "normalizer.var": var,
              "normalizer.count": torch.tensor([1000])}
    folder.mkdir(parents=True)
    keys = sorted(state)
    if shards == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:  # two pytorch_model-*.bin shards, the score head in the second
        half = len(keys) // 2
        for i, part in enumerate((keys[:half], keys[half:])):
            torch.save({k: state[k] for k in part}, folder / f"pytorch_model-{i + 1:05d}-of-00002.bin")
    cfg = config.to_dict() | {"architectures": ["LlamaForScore"], "score_dim": 1, "score_bias": True,
                              "score_type": score_type, "do_normalize": do_normalize,
                              "normalizer_type": "RunningMeanStd", "mean": [0.0], "var": [1.0]}
    (folder / "config.json").write_text(json.dumps(cfg))
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return backbone, weight, bias, mean, var


@torch.no_grad()
def safe_rlhf_end_scores(backbone, weight, bias, mean, var, score_type, do_normalize, tokenizer, texts):
    """safe-rlhf's end_scores: score_head(last_hidden_state) at the last attention-mask position, normalised by the
    function of its score_type (reward: affine, cost: scale) with the normalizer's buffers (which override the
    config's mean/var when the checkpoint is loaded)."""
    tokenizer.padding_side = "left"  # the end index comes from the mask, so the padding side must not matter
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    hidden = backbone(**enc).last_hidden_state
    scores = (hidden @ weight.T + bias).float()  # [B, L, 1]
    end = torch.stack([m.nonzero()[-1, 0] for m in enc["attention_mask"]])
    end_scores = scores[torch.arange(len(texts)), end, 0]
    if do_normalize:
        std = var.sqrt() + 1e-8
        end_scores = (end_scores - mean) / std if score_type == "reward" else end_scores / std
    return end_scores


@pytest.mark.parametrize("score_type,do_normalize,shards", [
    ("cost", False, "safetensors"),   # beaver-style: raw end score, bias kept as the offset
    ("cost", True, "bin"),            # scale: x / std, from .bin shards
    ("reward", True, "safetensors"),  # affine: (x − mean) / std
])
def test_converted_model_scores_equal_the_safe_rlhf_end_scores(tmp_path, tiny_model_dir, score_type, do_normalize,
                                                                shards):
    backbone, weight, bias, mean, var = write_safe_rlhf_checkpoint(tmp_path / "in", tiny_model_dir, score_type,
                                                                   do_normalize, shards)
    convert_score_model.main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    from transformers import AutoTokenizer

    expected = safe_rlhf_end_scores(backbone, weight, bias, mean, var, score_type, do_normalize,
                                    AutoTokenizer.from_pretrained(tmp_path / "in"), TEXTS)
    model, tok = reward_model.load_classifier(str(tmp_path / "out"), "float32")  # refuses missing weights
    assert type(model).__name__ == "LlamaForSequenceClassification"
    got = reward_model.classifier_scores(model, tok, TEXTS, max_length=256, batch_size=2)  # padded batches
    assert torch.allclose(torch.tensor(got), expected, atol=1e-5), (got, expected)
    assert len(set(got.round(4).tolist())) == len(TEXTS)  # a real score per text, not a constant

    record = json.loads((tmp_path / "out/conversion.json").read_text())
    std = math.sqrt(2.5) + 1e-8
    offset = {("cost", False): 0.7, ("cost", True): 0.7 / std, ("reward", True): (0.7 - 0.3) / std}
    assert record["score_offset"] == pytest.approx(offset[(score_type, do_normalize)])
    assert not list((tmp_path / "out").glob("*.bin"))  # safetensors out
    if shards == "bin":
        assert json.loads((tmp_path / "out/model.safetensors.index.json").read_text())["weight_map"]["score.weight"]


def test_converter_refuses_a_checkpoint_without_a_score_head(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="no score_head.weight; expected a safe-rlhf score model"):
        convert_score_model.convert(str(tiny_model_dir), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.workflow
def test_reward_stage_converts_a_safe_rlhf_cost_model_in_the_dag(tmp_path, tiny_model_dir):
    """reward_model.kind safe_rlhf: convert_score_model runs before train_reward_model, which scores with the
    converted folder (sign −1: a cost model), as config/paper.yaml does with beaver-7b-v1.0-cost."""
    from conftest import jobs_run, run_snakemake, tiny_config, write_config
    from workflow.lib.files import read_jsonl

    write_safe_rlhf_checkpoint(tmp_path / "cost-model", tiny_model_dir, "cost", False, "safetensors")
    config = tiny_config(tiny_model_dir)
    config["methods"] = ["dpo_reward"]
    config["reward_model"] = {"kind": "safe_rlhf", "name_or_path": str(tmp_path / "cost-model"), "sign": -1,
                              "prompt_format": "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{answer}",
                              "max_length": 128}
    work = tmp_path / "run"
    work.mkdir()
    write_config(work, config)
    proc = run_snakemake(work, "results/reward/metrics.json")
    assert sorted(set(jobs_run(proc))) == ["convert_score_model", "prepare_preferences", "train_reward_model"]
    metrics = json.loads((work / "results/reward/metrics.json").read_text())
    assert metrics["kind"] == "safe_rlhf" and metrics["sign"] == -1 and metrics["n_train"] == 12
    rewards = read_jsonl(work / "results/reward/pair_rewards.jsonl")
    assert len({round(r["r_chosen"], 5) for r in rewards}) > 1
