"""Generation options (issues 11, 15): stop strings in both backends, HH turns stop at "\\n\\nHuman:",
sampled answers per prompt, prompts longer than the context, and how the judge, the statistics and
the report count them. Real tiny models throughout: the random tiny Llama, and a "parrot" copy of it
trained in the fixture to answer every HH prompt with one fixed text, so that stop strings are hit
at known places."""
from __future__ import annotations

import json
import math
import re
import shlex
import shutil

import pandas as pd
import pytest
import torch

from conftest import run_snakemake, tiny_config, write_config
from workflow.lib.config import ConfigError, validate_config
from workflow.lib.jobs import generation_args
from workflow.generate import HH_STOP, format_user_prompts, generate_answers, main, stop_strings
from workflow.judge import summarise
from workflow.lib.models import format_prompt, load_model, load_tokenizer
from workflow.report import generation_note
from workflow.lib.results import load_judgements, per_prompt
from workflow.lib.tables import comparisons, rate_table
from workflow.lib.textgen import cut_at_stop, finish_answer, fit_prompt, generate_raw, prompt_budget

PARROT_ANSWER = " Sure, here it is.\nStep one.\n\nHuman: thanks\n\nAssistant: bye"
PROMPTS = ["Write a poem about spring", "Hi", "Explain in detail how a bicycle gear system works", "List fruits"]


# ------------------------------------------------------------------------------------------- pure parts
def test_cut_at_stop_cuts_at_the_earliest_stop_and_removes_it():
    assert cut_at_stop("one. two\nthree\n\nHuman: x", ["\n\nHuman:", "\n"]) == ("one. two", "\n")
    assert cut_at_stop("a\n\nHuman: b", ["\n\nHuman:", "\n"]) == ("a", "\n\nHuman:")  # a tie names the longer
    assert cut_at_stop("no stop here", ["\n"]) == ("no stop here", None)
    assert cut_at_stop("anything", []) == ("anything", None)
    assert cut_at_stop("\nat once", ["\n"]) == ("", "\n")  # the official stop "\n" as the first character
    assert finish_answer(" Sure.  \nmore", ["\n"]) == "Sure."
    assert finish_answer("  no stops  ", []) == "no stops"  # without stops: the old answer (stripped)


def test_stop_strings_add_the_human_turn_for_hh_prompts_only(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir, padding_side="left")  # it has a chat template: auto = chat
    assert stop_strings([], tok, "hh") == [HH_STOP] and stop_strings(["\n"], tok, "hh") == ["\n", HH_STOP]
    assert stop_strings([], tok, "auto") == [] and stop_strings(["x"], tok, "chat") == ["x"]
    assert stop_strings([HH_STOP], tok, "hh") == [HH_STOP]


def test_prompt_budget_needs_room_for_the_answer():
    assert prompt_budget(512, 8) == 504 and prompt_budget(None, 8) is None
    with pytest.raises(ValueError, match="config key evaluation.max_new_tokens: 512 new tokens leave no room"):
        prompt_budget(512, 512)


def test_config_samples_need_sampling_and_stops_reach_the_command(tiny_model_dir):
    config = tiny_config(tiny_model_dir)
    config["evaluation"].update(samples=3)
    with pytest.raises(ConfigError, match="config key evaluation.samples: 3 samples per prompt need "
                                          "evaluation.do_sample: true"):
        validate_config(config)
    config["evaluation"].update(do_sample=True, stop=["\n", "'quoted' $x"])
    args = shlex.split(generation_args(validate_config(config)))
    assert args[args.index("--samples") + 1] == "3"
    assert json.loads(args[args.index("--stop-json") + 1]) == ["\n", "'quoted' $x"]
    with pytest.raises(ConfigError, match="config key evaluation.stop"):
        validate_config(tiny_config(tiny_model_dir) | {"evaluation": {"stop": [""]}})


# ------------------------------------------------------------------------------------ the parrot model
@pytest.fixture(scope="module")
def parrot_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama trained to answer any HH prompt with PARROT_ANSWER (then EOS)."""
    folder = tmp_path_factory.mktemp("models") / "parrot"
    shutil.copytree(tiny_model_dir, folder)
    model, tok = load_model(folder), load_tokenizer(folder)
    answer = tok(PARROT_ANSWER, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompts = [tok(format_prompt(tok, [{"role": "user", "content": p}], "hh"), add_special_tokens=False)["input_ids"]
               for p in PROMPTS]
    width = max(map(len, prompts)) + len(answer)
    pad = [[tok.pad_token_id] * (width - len(p) - len(answer)) for p in prompts]
    ids = torch.tensor([p + answer + q for p, q in zip(prompts, pad)])
    labels = torch.tensor([[-100] * len(p) + answer + [-100] * len(q) for p, q in zip(prompts, pad)])  # answer only
    mask = torch.tensor([[1] * (len(p) + len(answer)) + [0] * len(q) for p, q in zip(prompts, pad)])
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(200):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def parrot(parrot_dir):
    return load_model(parrot_dir).eval(), load_tokenizer(parrot_dir, padding_side="left")


def hh_texts(tok, prompts):
    return [format_prompt(tok, [{"role": "user", "content": p}], "hh") for p in prompts]


def decode_steps(model, fn):
    """Forward passes of ``model`` while ``fn`` runs (one per generated token of the batch), and fn's result."""
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        result = fn()
    finally:
        handle.remove()
    return len(calls), result


def test_parrot_fixture_answers_with_its_text(parrot):
    model, tok = parrot
    raws, _ = generate_raw(model, tok, hh_texts(tok, PROMPTS), 40, 4)
    assert raws == [PARROT_ANSWER] * len(PROMPTS)


def test_stop_strings_cut_the_answer_and_end_generation_early(parrot):
    model, tok = parrot
    texts = hh_texts(tok, PROMPTS)
    full_steps, (full, _) = decode_steps(model, lambda: generate_raw(model, tok, texts, 40, 4))
    steps, (raws, counts) = decode_steps(model, lambda: generate_raw(model, tok, texts, 40, 4, stop=["\n"]))
    # the whole batch stopped once every sequence had produced "\n", long before the 40 tokens or EOS
    assert steps < full_steps and steps <= len(tok(" Sure, here it is.\n")["input_ids"]) + 1
    assert all(r.startswith(" Sure, here it is.\n") and "Step" not in r for r in raws)
    assert [finish_answer(r, ["\n"]) for r in raws] == ["Sure, here it is."] * len(PROMPTS)
    assert [finish_answer(r, ["\n"]) for r in full] == ["Sure, here it is."] * len(PROMPTS)  # cut = same answer
    # a stop string that never occurs changes nothing
    assert generate_raw(model, tok, texts, 40, 4, stop=["@@"])[0] == full


def test_hh_prompts_stop_at_the_next_human_turn(parrot, parrot_dir, tmp_path):
    model, tok = parrot
    assert generate_answers(model, tok, PROMPTS, 40, 4, prompt_format="hh") == ["Sure, here it is.\nStep one."] * 4
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "category": "c"}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    out = tmp_path / "answers.jsonl"
    main(["--model", str(parrot_dir), "--prompts", str(prompts), "--max-new-tokens", "40", "--batch-size", "2",
          "--prompt-format", "hh", "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3"] and all(r["sample"] == 0 for r in rows)
    for r in rows:
        assert r["answer"] == "Sure, here it is.\nStep one." and r["stop"] == HH_STOP
        assert r["answer_raw"].startswith(PARROT_ANSWER[:30]) and HH_STOP in r["answer_raw"]  # the raw is kept
        assert r["prompt_truncated"] is False and r["prompt_tokens_dropped"] == 0
    # the configured stops come first: the official "\n" cuts earlier
    main(["--model", str(parrot_dir), "--prompts", str(prompts), "--max-new-tokens", "40", "--prompt-format", "hh",
          "--stop-json", '["\\n"]', "--output", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(r["answer"], r["stop"]) for r in rows} == {("Sure, here it is.", "\n")}


# ---------------------------------------------------------------------------------- samples per prompt
@pytest.mark.workflow
def test_samples_share_the_prompt_id_and_are_seeded_seed_plus_k(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "category": ""}) + "\n"
                               for i, p in enumerate(PROMPTS[:2])))

    def run(name, *args):
        main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--max-new-tokens", "6", "--batch-size", "2",
              "--do-sample", "--temperature", "1.5", "--output", str(tmp_path / name), *args])
        return [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]

    three = run("three.jsonl", "--samples", "3", "--seed", "5")
    assert [(r["id"], r["sample"]) for r in three] == [(f"p{i}", k) for i in range(2) for k in range(3)]
    for k in range(3):  # sample k is the single-sample run seeded seed + k
        single = run(f"seed{5 + k}.jsonl", "--seed", str(5 + k))
        assert [r["answer"] for r in three if r["sample"] == k] == [r["answer"] for r in single]
    assert len({r["answer"] for r in three if r["id"] == "p0"}) > 1  # the samples differ
    with pytest.raises(SystemExit, match="--samples 2 \\(config key evaluation.samples\\): must be 1, or more with"):
        main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--samples", "2",
              "--output", str(tmp_path / "x.jsonl")])


def judged_file(tmp_path, name, method, rows, seed=0):
    """A judgement file pair (labels .jsonl + summary .json) as workflow.judge writes them."""
    (tmp_path / f"{name}.json").write_text(json.dumps({"method": method, "noise": 0.4, "seed": seed,
                                                       "benchmark": "b", "kind": "harmful", "judge": "j"}))
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / f"{name}.jsonl")


def answers(labels_by_prompt, truncated=()):
    """Judged rows: prompt i's samples get the labels labels_by_prompt[i] (1 unsafe, 0 safe, None unparseable)."""
    return [{"id": f"p{i}", "sample": k, "refused": False, "prompt_truncated": i in truncated,
             "label": {1: "unsafe", 0: "safe", None: "unparseable"}[lab]}
            for i, labels in enumerate(labels_by_prompt) for k, lab in enumerate(labels)]


@pytest.mark.workflow
def test_statistics_average_the_samples_of_a_prompt_and_skip_mcnemar(tmp_path):
    # 3 samples per prompt; p0 2/3 unsafe; p1 one unparseable sample (not unsafe, as in the official rate over
    # all answers) and 1/2 of its parseable ones; p2 none parseable; p3 none unsafe
    ref = judged_file(tmp_path, "dpo", "dpo", answers([[1, 1, 0], [None, 1, 0], [None, None, None], [0, 0, 0]],
                                                        truncated={3}))
    other = judged_file(tmp_path, "shapo", "shapo", answers([[0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 0, 0]]))
    data = load_judgements([ref, other])
    assert len(data) == 24 and list(data["sample"][:3]) == [0, 1, 2]
    prompts = per_prompt(data)
    dpo = prompts[prompts.method == "dpo"].set_index("id")
    assert len(prompts) == 8 and list(dpo["samples"]) == [3, 3, 3, 3]
    assert dpo.loc["p0", "outcome"] == pytest.approx(2 / 3) and dpo.loc["p1", "outcome"] == pytest.approx(1 / 3)
    assert dpo.loc["p2", "outcome"] == 0 and per_prompt(prompts).equals(prompts)  # idempotent
    # unsafe / parseable answers: the mean over a prompt's parseable samples, NaN when it has none
    assert dpo.loc["p1", "unsafe_parseable"] == 0.5 and math.isnan(dpo.loc["p2", "unsafe_parseable"])
    rates = rate_table(data, n_boot=200, level=0.95, seed=0).set_index("method")
    # the rate is the mean over prompts of the per-prompt means (2/3, 1/3, 0, 0), not over answers (3/12)
    assert rates.loc["dpo", "rate"] == pytest.approx((2 / 3 + 1 / 3 + 0 + 0) / 4)
    assert rates.loc["dpo", "prompts"] == 4 and rates.loc["dpo", "samples"] == 3
    assert rates.loc["dpo", "prompt_truncated"] == 1 and rates.loc["shapo", "prompt_truncated"] == 0
    pooled, by_seed = comparisons(data, "dpo", n_boot=200, level=0.95, seed=0)
    assert by_seed.empty and math.isnan(pooled.iloc[0]["mcnemar_p_min"]) and pooled.iloc[0]["prompts"] == 4
    assert not math.isnan(pooled.iloc[0]["p_bootstrap"])
    # one sample per prompt: the same numbers as before samples existed, McNemar run
    one = load_judgements([judged_file(tmp_path, "dpo1", "dpo", answers([[1], [0], [1]])),
                           judged_file(tmp_path, "sh1", "shapo", answers([[0], [0], [1]]))])
    pooled, by_seed = comparisons(one, "dpo", n_boot=200, level=0.95, seed=0)
    assert len(by_seed) == 1 and by_seed.iloc[0]["b"] == 1 and pooled.iloc[0]["discordant"] == 1
    assert rate_table(one, 200, 0.95, 0).set_index("method").loc["dpo", "rate"] == pytest.approx(2 / 3)


def test_report_says_how_answers_were_generated():
    rates = pd.DataFrame({"benchmark": ["a", "a", "b"], "prompt_truncated": [2, 2, 0], "prompts": [50, 50, 40]})
    note = generation_note(rates, {"samples": 3})
    assert "answered 3 times" in note and "McNemar's test" in note and "(a: 2 of 50)" in note and "b:" not in note
    assert generation_note(rates.assign(prompt_truncated=0), {"samples": 1}) == \
        "No prompt was longer than the model's context."


# ------------------------------------------------------------------------------------------ long prompts
def test_a_prompt_longer_than_the_context_is_cut_from_the_left(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir, padding_side="left")
    long_prompt = "".join(f"word{i} " for i in range(6000))[:32000] + "THE QUESTION?"
    assert len(long_prompt) > 32000
    budget = prompt_budget(512, 8)  # the tiny Llama has 512 positions
    dropped = {}
    for fmt in ("chat", "hh"):
        (short, cut), (d_short, d_cut) = format_user_prompts(tok, ["Hi", long_prompt], fmt, budget)
        dropped[fmt] = d_cut
        assert d_short == 0 and short == format_prompt(tok, [{"role": "user", "content": "Hi"}], fmt)
        n = len(tok(cut, add_special_tokens=False)["input_ids"])
        assert d_cut > 5000 and budget - 10 <= n <= budget
        head, tail = format_prompt(tok, [{"role": "user", "content": "\x00"}], fmt).split("\x00")
        assert cut.startswith(head) and cut.endswith("THE QUESTION?" + tail)  # format intact, end kept
    with pytest.raises(ValueError, match="the prompt format alone takes"):
        fit_prompt(tok, long_prompt, lambda c: "x " * 600 + c, 504)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "short", "prompt": "Hi", "category": ""}) + "\n"
                       + json.dumps({"id": "long", "prompt": long_prompt, "category": ""}) + "\n")
    out = tmp_path / "answers.jsonl"
    main(["--model", str(tiny_model_dir), "--prompts", str(prompts), "--max-new-tokens", "8", "--batch-size", "2",
          "--output", str(out)])
    short_row, long_row = [json.loads(line) for line in out.read_text().splitlines()]
    assert long_row["prompt"] == long_prompt and long_row["answer"]  # the row keeps the prompt as asked
    assert long_row["prompt_truncated"] and long_row["prompt_tokens_dropped"] == dropped["chat"]  # auto = chat
    assert not short_row["prompt_truncated"] and short_row["prompt_tokens_dropped"] == 0
    summary = summarise([{**short_row, "label": "safe", "refused": False},
                         {**long_row, "label": "unsafe", "refused": False}], {}, "j")
    assert summary["prompt_truncated"] == 1 and summary["categories"][""]["prompt_truncated"] == 1


# -------------------------------------------------------------------------------------- vLLM = transformers
def test_vllm_answers_equal_the_transformers_answers(parrot_dir, tmp_path):
    pytest.importorskip("vllm", reason="vllm is not installed (optional backend, GPU machines)")
    prompts = tmp_path / "prompts.jsonl"
    rows = PROMPTS + ["Something else entirely", "word " * 3000]  # the last one is cut to fit
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "category": ""}) + "\n"
                               for i, p in enumerate(rows)))
    for stop in ('[]', '["\\n"]', '["here"]'):
        runs = {}
        for backend in ("transformers", "vllm"):
            main(["--model", str(parrot_dir), "--prompts", str(prompts), "--backend", backend, "--precision", "fp32",
                  "--max-new-tokens", "40", "--prompt-format", "hh", "--stop-json", stop,
                  "--output", str(tmp_path / f"{backend}.jsonl")])
            runs[backend] = [json.loads(line) for line in (tmp_path / f"{backend}.jsonl").read_text().splitlines()]
        for key in ("answer", "stop", "prompt_truncated", "prompt_tokens_dropped"):
            assert [r[key] for r in runs["vllm"]] == [r[key] for r in runs["transformers"]], (stop, key)


# ------------------------------------------------------------------------------------------ the workflow
@pytest.mark.workflow
def test_workflow_generations_carry_stops_samples_and_reach_the_judge(parrot_dir, tmp_path):
    config = tiny_config(parrot_dir)
    config["model"]["prompt_format"] = "hh"
    config["evaluation"].update(stop=["\n"], samples=2, do_sample=True, max_new_tokens=24)
    write_config(tmp_path, config)
    run_snakemake(tmp_path, "results/judgements/refusal_markers/base/harmbench.json")
    rows = [json.loads(line) for line in
            (tmp_path / "results/generations/base/harmbench.jsonl").read_text().splitlines()]
    sample = [json.loads(line) for line in
              (tmp_path / "results/data/benchmarks/harmbench/sample.jsonl").read_text().splitlines()]
    assert [(r["id"], r["sample"]) for r in rows] == [(s["id"], k) for s in sample for k in (0, 1)]
    for r in rows:
        assert r["answer"] == finish_answer(r["answer_raw"], ["\n", HH_STOP]) and "\n" not in r["answer"]
        assert r["stop"] in ("\n", HH_STOP, None)
    assert sum(r["stop"] == "\n" for r in rows) >= len(rows) // 2  # the parrot says "\n" after its first line
    summary = json.loads((tmp_path / "results/judgements/refusal_markers/base/harmbench.json").read_text())
    assert summary["n"] == len(rows) and summary["prompt_truncated"] == 0


@pytest.mark.workflow
def test_paper_config_generates_as_the_official_code(paper_dry_run):
    """config/paper.yaml: HH turns, sampled at T = 1.0 and top_p 1.0, 256 new tokens, cut at "\\n"
    (official judeg_eval/model_infer.py:33, 39, 82, 103), 3 seeded samples per prompt (ours)."""
    from test_paper_config import shell_commands

    proc = paper_dry_run[1]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    commands = shell_commands(proc.stdout + proc.stderr, "generate")
    pairs = {(re.search(r"--model (\S+)", c)[1], re.search(r"benchmarks/(\w+)/", c)[1]) for c in commands}
    models, benchmarks = {m for m, _ in pairs}, {b for _, b in pairs}
    # every model answers every paper benchmark, once
    assert benchmarks == {"pku_saferlhf_test", "harmbench", "saladbench", "donotanswer"}
    assert len(commands) == len(pairs) == len(models) * len(benchmarks) and "results/models/base" in models
    for cmd in commands:
        args = shlex.split(cmd.split(">")[0])
        assert args[args.index("--prompt-format") + 1] == "hh" and args[args.index("--max-new-tokens") + 1] == "256"
        assert "--do-sample" in args and args[args.index("--temperature") + 1] == "1.0"
        assert args[args.index("--top-p") + 1] == "1.0" and args[args.index("--samples") + 1] == "3"
        assert json.loads(args[args.index("--stop-json") + 1]) == ["\n"]
