"""Score every training pair with a reward model, for reward-level ShaPO's soft labels.

    python -m workflow.reward_model --model results/models/base --train results/data/preferences/train.jsonl \
        --heldout results/data/preferences/heldout.jsonl \
        --reward-json '{"kind": "bt_head", "layer": -1, "l2": 1.0, "batch_size": 8}' \
        --training-json '{"max_length": 128, "max_prompt_length": 64}' --prompt-format auto \
        --rewards results/reward/pair_rewards.jsonl --metrics results/reward/metrics.json

Three kinds (``kind``):

``bt_head`` (offline default) a Bradley-Terry linear head r(x, y) = w·f(x, y) on frozen features
    of ``--model``: the last-layer hidden states (``layer``) mean-pooled over the answer tokens of
    prompt + answer, tokenised exactly as for training. w maximises Σ log σ(w·(f_chosen − f_rejected))
    − ``l2``/2·‖w‖² over CLEAN training pairs (before noise); fitted as an intercept-free logistic
    regression on the feature differences (both orientations). **Cross-fitted**: the training pairs
    are dealt into ``folds`` seeded folds and each pair is scored by the head fitted on the other
    folds, so no pair's clean label reaches its own soft label (a head fitted on all pairs would
    memorise them: with noise it would undo every flip it was meant to resist). Held-out pairs are
    scored by the mean of the fold heads.
``hub`` a sequence-classification reward or cost model (``name_or_path``: hub id or local folder)
    with one output; ``sign`` = +1 for a reward model, −1 for a cost model (e.g.
    PKU-Alignment/beaver-7b-v1.0-cost scores safer answers lower).
``safe_rlhf`` a safe-rlhf score model (``name_or_path``), scored as ``hub`` from its converted folder
    (``--classifier``, made by ``workflow.convert_score_model``: the convert_score_model rule).

Writes one row per training pair (``pair_id``, ``r_chosen``, ``r_rejected`` in the clean
orientation, and the answers' text keys) and the pair accuracy on the training pairs (out of fold
for bt_head, with the in-sample accuracy of the fold heads beside it) and on the held-out pairs.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from workflow.lib.config import fill_defaults, schema_default
from workflow.lib.files import read_jsonl, write_json, write_jsonl
from workflow.lib.models import format_prompt, load_model, load_tokenizer, placement
from workflow.lib.pairs import collate_pairs, encode_response_pair, text_key
from workflow.lib.progress import progress


@torch.no_grad()
def answer_features(model, tokenizer, records: list[dict], settings: dict, layer: int,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """([N, hidden] chosen, [N, hidden] rejected): hidden states at ``layer`` mean-pooled over each answer's tokens.

    ``settings``: the training section (max_length, max_prompt_length) plus prompt_format."""
    chosen, rejected = [], []
    starts = range(0, len(records), batch_size)
    for start in progress(starts, total=len(starts), desc="reward features", unit="batch"):
        recs = records[start:start + batch_size]
        enc = [encode_response_pair(tokenizer, r, settings["max_length"], settings["max_prompt_length"],
                                    settings["prompt_format"]) for r in recs]
        batch = collate_pairs(enc, tokenizer.pad_token_id)
        device = next(model.parameters()).device
        hidden = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       output_hidden_states=True).hidden_states[layer].float()
        mask = batch["loss_mask"].unsqueeze(-1).to(hidden)
        pooled = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy()
        chosen.append(pooled[:len(recs)])
        rejected.append(pooled[len(recs):])
    return np.concatenate(chosen), np.concatenate(rejected)


def fit_bradley_terry(chosen: np.ndarray, rejected: np.ndarray, l2: float) -> np.ndarray:
    """Weights w [hidden] of the linear Bradley-Terry reward r = w·f, chosen preferred over rejected.

    P(chosen ≻ rejected) = σ(w·(f_c − f_r)) has no intercept (a constant reward cancels), so it is an
    intercept-free logistic regression on the differences; adding each difference negated with
    label 0 makes the two classes explicit without changing the maximiser.
    """
    diff = chosen - rejected
    x = np.concatenate([diff, -diff])
    y = np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    # sklearn minimises C·Σ loss + ½‖w‖²; the sum here counts each pair twice
    clf = LogisticRegression(fit_intercept=False, C=1.0 / (2.0 * l2), max_iter=5000).fit(x, y)
    return clf.coef_[0]


def pair_accuracy(r_chosen: np.ndarray, r_rejected: np.ndarray) -> float:
    """Share of pairs whose chosen answer gets the higher reward."""
    return float(np.mean(np.asarray(r_chosen) > np.asarray(r_rejected))) if len(r_chosen) else float("nan")


def fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    """[n] the fold of each training pair: a seeded permutation dealt round-robin into ``folds`` near-equal folds."""
    if folds < 2:
        raise ValueError(f"config key reward_model.folds: {folds}; cross-fitting needs at least 2 folds")
    if n < folds:
        raise ValueError(f"config key reward_model.folds: {folds} folds need at least {folds} training pairs, have {n}")
    ids = np.empty(n, dtype=int)
    ids[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds
    return ids


def cross_fit(chosen: np.ndarray, rejected: np.ndarray, folds: np.ndarray, l2: float) -> np.ndarray:
    """[k, hidden] one Bradley-Terry head per fold, each fitted on the pairs of the other folds only."""
    return np.stack([fit_bradley_terry(chosen[folds != j], rejected[folds != j], l2) for j in range(folds.max() + 1)])


def out_of_fold(features: np.ndarray, folds: np.ndarray, heads: np.ndarray) -> np.ndarray:
    """[n] each row's reward under the head of its own fold (which never saw that row's pair)."""
    return np.einsum("nh,nh->n", features, heads[folds])


def in_sample_accuracy(chosen: np.ndarray, rejected: np.ndarray, folds: np.ndarray, heads: np.ndarray) -> float:
    """Mean over fold heads of their pair accuracy on the pairs they were fitted on (how much a head memorises)."""
    return float(np.mean([pair_accuracy(chosen[folds != j] @ w, rejected[folds != j] @ w) for j, w in enumerate(heads)]))


def conversation_text(tokenizer, record: dict, answer: str, prompt_format: str) -> str:
    """Prompt and answer as one text in the reward model's own format.

    ``auto``: its chat template, else HH turns; ``chat``/``hh`` force one; any other string is a
    template with ``{prompt}`` (the user turns, blank-line separated) and ``{answer}``, e.g. the
    Beaver models' ``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{answer}``.
    """
    if "{answer}" in prompt_format:
        prompt = "\n\n".join(m["content"] for m in record["messages"] if m["role"] == "user")
        return prompt_format.format(prompt=prompt, answer=answer)
    if prompt_format == "auto":
        prompt_format = "chat" if tokenizer.chat_template else "hh"
    if prompt_format == "chat":
        return tokenizer.apply_chat_template(record["messages"] + [{"role": "assistant", "content": answer}],
                                             tokenize=False)
    return format_prompt(tokenizer, record["messages"], prompt_format) + " " + answer


@torch.no_grad()
def classifier_scores(model, tokenizer, texts: list[str], max_length: int, batch_size: int) -> np.ndarray:
    """[N] the single output of a sequence-classification model for each text, plus the constant ``score_offset``
    of a converted safe-rlhf score model (its folded head bias and normalisation: workflow.convert_score_model)."""
    device = next(model.parameters()).device
    offset = float(getattr(model.config, "score_offset", 0.0))  # a checkpoint attribute, not a workflow config key
    out = []
    starts = range(0, len(texts), batch_size)
    for start in progress(starts, total=len(starts), desc="reward scores", unit="batch"):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length).to(device)
        out.append(model(**enc).logits[:, 0].float().cpu().numpy() + offset)
    return np.concatenate(out) if out else np.zeros(0)


def load_classifier(name_or_path: str, dtype: str):
    """(model, tokenizer) of a one-output sequence-classification reward or cost model (safetensors only)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model, info = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, dtype=getattr(torch, dtype), use_safetensors=True, output_loading_info=True)
    if info["missing_keys"]:
        # e.g. a head saved under another name (safe-rlhf's score_head): transformers would start it at random
        raise ValueError(f"reward_model.name_or_path: {name_or_path!r} lacks weights of {sorted(info['missing_keys'])[:3]};"
                         " expected a transformers sequence-classification checkpoint (convert other heads first)")
    if model.config.num_labels != 1:
        raise ValueError(f"reward_model.name_or_path: {name_or_path!r} has {model.config.num_labels} outputs;"
                         " expected a reward or cost model with exactly one")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tokenizer


class RewardScorer:
    """r(x, y) for chosen and rejected answers of the training and held-out pairs, by the configured kind.

    ``spec``: the reward_model section, ``settings``: the training section plus prompt_format, both with
    defaults filled (``workflow.lib.config.fill_defaults``)."""

    def __init__(self, spec: dict, settings: dict, model_dir: str | None, classifier_dir: str | None = None):
        self.spec, self.settings = spec, settings
        self.kind = spec["kind"]
        if self.kind == "bt_head":
            if not model_dir:
                raise ValueError("reward_model.kind bt_head needs the base model (--model)")
            device, dtype = placement(settings["precision"])
            self.model, self.tokenizer = load_model(model_dir, dtype, device).eval(), load_tokenizer(model_dir)
        elif self.kind == "safe_rlhf":
            if not classifier_dir:
                raise ValueError("reward_model.kind safe_rlhf needs the converted score model (--classifier,"
                                 " from python -m workflow.convert_score_model)")
            self.model, self.tokenizer = load_classifier(classifier_dir, spec["dtype"])
        else:
            if not spec["name_or_path"]:
                raise ValueError("config key reward_model.name_or_path: required with reward_model.kind hub")
            self.model, self.tokenizer = load_classifier(spec["name_or_path"], spec["dtype"])

    def rewards(self, train: list[dict], heldout: list[dict]) -> tuple[tuple, tuple, dict]:
        """((r_chosen, r_rejected) of the training pairs, the same of the held-out pairs, extra metrics)."""
        if self.kind == "bt_head":
            return self._cross_fitted(train, heldout)
        return self._classifier(train), self._classifier(heldout), {}

    def _cross_fitted(self, train, heldout):
        chosen, rejected = self._features(train)
        folds = fold_ids(len(train), self.spec["folds"], self.spec["seed"])
        heads = cross_fit(chosen, rejected, folds, self.spec["l2"])
        h_chosen, h_rejected = self._features(heldout) if heldout else (np.zeros((0, heads.shape[1])),) * 2
        mean_head = heads.mean(0)  # the fold heads' mean reward is the reward of their mean (linear)
        extra = {"folds": int(heads.shape[0]),
                 "train_accuracy_in_sample": in_sample_accuracy(chosen, rejected, folds, heads)}
        return ((out_of_fold(chosen, folds, heads), out_of_fold(rejected, folds, heads)),
                (h_chosen @ mean_head, h_rejected @ mean_head), extra)

    def _classifier(self, records):
        fmt = self.spec["prompt_format"]
        sides = [classifier_scores(self.model, self.tokenizer, [conversation_text(self.tokenizer, r, r[s], fmt)
                                                                for r in records],
                                   self.spec["max_length"], self.spec["batch_size"])
                 for s in ("chosen", "rejected")]
        sign = float(self.spec["sign"])
        return sign * sides[0], sign * sides[1]

    def _features(self, records):
        return answer_features(self.model, self.tokenizer, records, self.settings, self.spec["layer"],
                               self.spec["batch_size"])


def check_clean(records: list[dict], path: str) -> None:
    for r in records:
        if r.get("flipped"):
            raise ValueError(f"{path}: pair {r['pair_id']!r} is flipped; the reward model needs the clean pairs")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="base model folder (kind bt_head: the frozen feature extractor)")
    p.add_argument("--classifier", help="kind safe_rlhf: the converted score model (workflow.convert_score_model)")
    p.add_argument("--train", required=True, help="clean training pairs (scored; bt_head is cross-fitted on them)")
    p.add_argument("--heldout", required=True, help="held-out pairs (pair accuracy)")
    p.add_argument("--reward-json", required=True, help="the config's reward_model section as JSON")
    p.add_argument("--training-json", required=True, help="the config's training section (max_length, max_prompt_length,"
                   " precision) as JSON")
    p.add_argument("--prompt-format", choices=["auto", "chat", "hh"], default=schema_default("model/prompt_format"),
                   help="config model.prompt_format")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--rewards", required=True, help="output: r_chosen, r_rejected per training pair (JSONL)")
    p.add_argument("--metrics", required=True, help="output: pair accuracies (JSON)")
    a = p.parse_args(argv)
    spec = fill_defaults(json.loads(a.reward_json), "reward_model")
    settings = fill_defaults(json.loads(a.training_json), "training") | {"prompt_format": a.prompt_format}
    if a.threads:
        torch.set_num_threads(a.threads)
    train, heldout = read_jsonl(a.train), read_jsonl(a.heldout)
    check_clean(train, a.train)
    scorer = RewardScorer(spec, settings, a.model, a.classifier)
    (r_chosen, r_rejected), (h_chosen, h_rejected), extra = scorer.rewards(train, heldout)
    diff = r_chosen - r_rejected
    # bt_head: train_accuracy is out of fold (each pair scored by a head that never saw it)
    metrics = {"kind": scorer.kind, "train_accuracy": pair_accuracy(r_chosen, r_rejected),
               "heldout_accuracy": pair_accuracy(h_chosen, h_rejected), "n_train": len(train),
               "n_heldout": len(heldout), "reward_diff_mean": float(diff.mean()), "reward_diff_std": float(diff.std()),
               **extra}
    if scorer.kind in ("hub", "safe_rlhf"):
        metrics.update(name_or_path=spec["name_or_path"], sign=spec["sign"])
    write_jsonl(a.rewards, ({"pair_id": r["pair_id"], "r_chosen": float(c), "r_rejected": float(j),
                             "chosen_key": text_key(r["chosen"]), "rejected_key": text_key(r["rejected"])}
                            for r, c, j in zip(train, r_chosen, r_rejected)))
    write_json(a.metrics, metrics)
    print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    main()
