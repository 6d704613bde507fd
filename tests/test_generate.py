"""Generation: left-padded batches equal one prompt at a time, seeded sampling, token counts, vLLM backend."""
import importlib.util
import json

import pytest

from workflow.generate import generate_answers, main
from workflow.lib.textgen import Sampling, answer_length
from workflow.lib.models import load_model, load_tokenizer

PROMPTS = ["Write a poem about spring", "Hi", "Explain in detail how a bicycle gear system works", "List fruits"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir, padding_side="left")


def test_answer_length_stops_at_the_first_stop_token():
    assert answer_length([5, 6, 2, 0, 0], {2}, 0) == 3
    assert answer_length([5, 6, 7], {2}, 0) == 3
    assert answer_length([5, 0, 0], {2}, 0) == 1  # trailing padding of a sequence that did not stop


def test_batched_left_padded_greedy_equals_one_at_a_time(tiny):
    model, tok = tiny
    batched = generate_answers(model, tok, PROMPTS, max_new_tokens=8, batch_size=4)
    single = generate_answers(model, tok, PROMPTS, max_new_tokens=8, batch_size=1)
    assert batched == single and any(batched)


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    hot = Sampling(do_sample=True, temperature=1.5, top_p=0.95, seed=3)
    first = generate_answers(model, tok, PROMPTS[:2], 8, 2, sampling=hot)
    assert first == generate_answers(model, tok, PROMPTS[:2], 8, 2, sampling=hot)
    assert first != generate_answers(model, tok, PROMPTS[:2], 8, 2, sampling=Sampling(True, 1.5, 0.95, 4))


def test_cli_writes_answers_with_sampling_options(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "category": ""}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "answers.jsonl"
    main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--max-new-tokens", "4", "--batch-size", "2",
          "--do-sample", "--temperature", "0.7", "--top-p", "0.9", "--seed", "1", "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3"] and all(isinstance(r["answer"], str) for r in rows)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm_is_a_clear_config_error(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "prompt": "Hi", "category": ""}) + "\n")
    with pytest.raises(SystemExit, match="config key evaluation.backend: 'vllm' needs the vllm package"):
        main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--backend", "vllm",
              "--output", str(tmp_path / "a.jsonl")])

# vLLM vs transformers answers (greedy, stop strings, long prompts): tests/test_generation_options.py
