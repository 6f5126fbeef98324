"""`ladder --task`: lm-evaluation-harness tasks on every rung, no merge written.
Each rung's lm-eval results equal `lm_eval.simple_evaluate(model="hf", ...)` on the
stock mergekit-yaml merge at its t (acc and acc_norm exactly, bits per byte to
1e-6 relative), on local tasks (a multiple-choice one, a rolling one), with a
BOS-adding tokenizer and a model length shorter than some requests, zero-shot and
with --num-fewshot 2 --limit 5; all requests and rungs in one read of the inputs.
Bad input: one line, exit 2, nothing written, no weight read."""

import json
import os
import random
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import Workspace, run_cli

pytest.importorskip("lm_eval", reason="lm-eval is not installed: the eval extra (MERGEKIT_VERSION=0.1.5 setup)")

from nearswap_mergekit.cli import main  # noqa: E402
from nearswap_mergekit.tiny import TinyLlama, build_family  # noqa: E402

#: Shorter than some requests: truncation (multiple choice, two-shot) and several
#: rolling windows (the rolling task's longer documents).
MODEL_LENGTH = 40
TS = ("0.01",)
WORDS = "the sea sky wind story base model weight swap near time four told once upon a".split()
NAMES = ("base", "second", "third")
TASKS = ("tiny_mc", "tiny_ppl", "tiny_ll", "tiny_letters")


def bos_family(root):
    """Tiny float32 Llamas whose BPE tokenizer adds a BOS, with MODEL_LENGTH positions."""
    from tokenizers import Tokenizer, processors

    build_family(root, NAMES, TinyLlama(dtype=torch.float32))
    for name in NAMES:
        folder = root / name
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
        tokenizer.save(str(folder / "tokenizer.json"))
        config = json.loads((folder / "config.json").read_text())
        config["max_position_embeddings"] = MODEL_LENGTH
        (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_tasks(folder):
    """tiny_mc (12 four-choice questions, a train split for few-shot), tiny_ppl (6
    texts, some longer than MODEL_LENGTH tokens), tiny_ll (each answer alone),
    tiny_letters (the questions as MMLU asks them: answer A, B, C or D), tiny_gen
    (generate_until) and tiny_hub (a data set on the Hub only)."""
    folder.mkdir()
    rnd = random.Random(0)
    phrase = lambda low, high: " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(low, high)))  # noqa: E731
    with open(folder / "mc.jsonl", "w") as file:
        for _ in range(12):
            row = {"question": phrase(3, 9), "choices": [phrase(1, 4) for _ in range(4)], "answer": rnd.randrange(4)}
            file.write(json.dumps(row) + "\n")
    with open(folder / "ppl.jsonl", "w") as file:
        for _ in range(6):
            file.write(json.dumps({"text": phrase(5, 90)}) + "\n")
    mc, ppl = folder / "mc.jsonl", folder / "ppl.jsonl"
    tasks = {
        "tiny_mc": {"dataset_path": "json", "dataset_kwargs": {"data_files": {"train": str(mc), "test": str(mc)}},
                    "training_split": "train", "test_split": "test", "output_type": "multiple_choice",
                    "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
                    "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
        "tiny_ppl": {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(ppl)}},
                     "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
                     "doc_to_target": "{{text}}",
                     "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]},
        # Each question's answer scored alone: its perplexity moves with every token of
        # context (truncation included), and its acc is lm-eval's greedy check.
        "tiny_ll": {"dataset_path": "json", "dataset_kwargs": {"data_files": {"train": str(mc), "test": str(mc)}},
                    "training_split": "train", "test_split": "test", "output_type": "loglikelihood",
                    "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": " {{choices[answer]}}",
                    "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]},
        # MMLU's form: the choices listed in the question, the answer a letter, so the
        # four pairs of a question have one forward input and share one forward.
        "tiny_letters": {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(mc)}},
                         "test_split": "test", "output_type": "multiple_choice",
                         "doc_to_text": "{{question}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                                        "D. {{choices[3]}}\nAnswer:",
                         "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{answer}}",
                         "metric_list": [{"metric": "acc"}]},
        # A template that does not parse: lm-eval cannot build the task's requests.
        "tiny_broken": {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(mc)}},
                        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{ question }",
                        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}"},
        # A template that fails on some documents (not the first, which lm-eval tries as it
        # loads the task): the requests cannot be built.
        "tiny_unrenderable": {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(mc)}},
                              "test_split": "test", "output_type": "multiple_choice",
                              "doc_to_text": "{{ question.no_such_method() if answer == 2 else question }}", "doc_to_choice": "{{choices}}",
                              "doc_to_target": "{{answer}}"},
        "tiny_gen": {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(mc)}},
                     "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
                     "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n"]},
                     "metric_list": [{"metric": "exact_match"}]},
        "tiny_hub": {"dataset_path": "nearswap-test/no-such-data-set", "test_split": "test",
                     "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                     "doc_to_target": "{{answer}}"},
    }
    for name, config in tasks.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **config}, sort_keys=False))
    # A group: lm-eval's aggregate over two of the tasks, beside each subtask's results.
    (folder / "tiny_group.yaml").write_text(yaml.safe_dump({
        "group": "tiny_group", "task": ["tiny_mc", "tiny_letters"],
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}]}))


def invoke(args, **kwargs):
    """The command in this process (lm-eval imported once for the module); --quiet's
    TQDM_DISABLE is put back as it was afterwards (CliRunner restores what `env` names)."""
    return CliRunner().invoke(main, [*map(str, args)], env={"TQDM_DISABLE": os.environ.get("TQDM_DISABLE")},
                              **kwargs)


def ladder(*args):
    return invoke(["ladder", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The family, its tasks, a two-rung ladder zero-shot and with --num-fewshot 2
    --limit 5, and each rung merged by mergekit-yaml from the recipe --recipes wrote."""
    ws = Workspace(tmp_path_factory.mktemp("tasks"))
    bos_family(ws.models)
    write_tasks(ws.root / "tasks")
    recipe = ws.write_recipe("chain.yml", {
        "merge_method": "nearswap_chain", "base_model": str(ws.models / "base"),
        "models": [{"model": str(ws.models / name)} for name in NAMES[1:]],
        "parameters": {"t": 1e-3}, "dtype": "float32",
    })
    common = [recipe, *[arg for task in TASKS for arg in ("--task", task)], "--include-path", ws.root / "tasks",
              *[arg for t in TS for arg in ("--t", t)], "--quiet"]
    reports = {}
    for name, extra in (("zero", ["--recipes", ws.root / "rungs"]), ("few", ["--num-fewshot", "2", "--limit", "5"])):
        result = ladder(*common, "--json", ws.root / f"{name}.json", *extra)
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((ws.root / f"{name}.json").read_text())
    merges = {"base": ws.models / "base"}
    for t in TS:
        ws.merge(str(ws.root / "rungs" / f"chain-t{t}.yml"), f"merged-{t}")
        merges[f"t={float(t):g}"] = ws.root / f"merged-{t}"
    inputs = sum((ws.models / name / "model.safetensors").stat().st_size for name in NAMES)
    return ws, reports, merges, inputs


@pytest.fixture(scope="module")
def manager(family):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(family[0].root / "tasks"), include_defaults=False)


def hf_results(folder, manager, **settings):
    """lm-eval's own hf backend on a written checkpoint."""
    import lm_eval

    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32",
                                   tasks=list(TASKS), batch_size=1, device="cpu", task_manager=manager,
                                   **settings)["results"]


@pytest.mark.parametrize("setting", ["zero", "few"])
def test_every_rung_equals_lm_eval_on_the_written_merge(family, manager, setting):
    ws, reports, merges, _inputs = family
    report = reports[setting]
    settings = {"num_fewshot": 2, "limit": 5} if setting == "few" else {}
    assert [row["label"] for row in report["rungs"]] == list(merges)
    for row in report["rungs"]:
        expected = hf_results(merges[row["label"]], manager, **settings)
        got = row["tasks"]
        assert set(got) == set(expected) == set(TASKS)
        for key in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none"):
            assert got["tiny_mc"][key] == expected["tiny_mc"][key], (row["label"], key)
        for key in ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"):
            assert got["tiny_ppl"][key] == pytest.approx(expected["tiny_ppl"][key], rel=1e-6), (row["label"], key)
        assert got["tiny_ll"]["acc,none"] == expected["tiny_ll"]["acc,none"], row["label"]
        assert got["tiny_letters"]["acc,none"] == expected["tiny_letters"]["acc,none"], row["label"]
        assert got["tiny_ll"]["perplexity,none"] == pytest.approx(expected["tiny_ll"]["perplexity,none"], rel=1e-6)
        assert got["tiny_mc"]["sample_len"] == expected["tiny_mc"]["sample_len"] == (5 if settings else 12)
    # The rungs differ from the base, so equality is not that of one model with itself.
    ppl = [row["tasks"]["tiny_ppl"]["bits_per_byte,none"] for row in report["rungs"]]
    assert len(set(ppl)) == len(ppl)


def test_requests_are_truncated_and_rolled_at_the_model_length(family):
    _ws, reports, _merges, _inputs = family
    for report in reports.values():
        requests = report["requests"]
        assert requests["max_length"] == MODEL_LENGTH
        assert requests["loglikelihood_rolling"] == (5 if report is reports["few"] else 6)
        # Some rolling requests take several pairs; two-shot contexts are truncated.
        assert requests["pairs"] > requests["loglikelihood"] + requests["loglikelihood_rolling"]
        # A tiny_letters question's four pairs are one forward.
        questions = 5 if report is reports["few"] else 12
        assert requests["windows"] <= requests["pairs"] - 3 * questions
    # Two-shot questions run past the model length, and are cut on the left to it.
    assert reports["zero"]["requests"]["truncated"] > 0
    # (tiny_mc's and tiny_letters' 5 x 4 pairs, tiny_ll's 5)
    assert reports["few"]["requests"]["truncated"] == reports["few"]["requests"]["loglikelihood"] == 2 * 5 * 4 + 5


def test_all_tasks_and_rungs_in_one_read_of_the_inputs(family):
    _ws, reports, _merges, inputs = family
    for report in reports.values():
        assert report["path"] == "layers" and report["passes"] == 1
        assert report["bytes_read"] <= 1.05 * inputs
        assert "request_scores" not in report
        assert report["task_settings"]["tasks"] == list(TASKS)


def test_text_and_task_combine(family):
    ws, reports, _merges, inputs = family
    (ws.root / "story.txt").write_text(" ".join(WORDS) * 20, encoding="utf-8")
    result = ladder(ws.root / "chain.yml", "--text", ws.root / "story.txt", "--task", "tiny_mc", "--include-path",
                    ws.root / "tasks", "--limit", "5", "--num-fewshot", "2", "--t", TS[0], "--quiet",
                    "--json", ws.root / "both.json", "--plot", ws.root / "both.png")
    assert result.exit_code == 0, result.output
    assert (ws.root / "both.png").stat().st_size > 0
    report = json.loads((ws.root / "both.json").read_text())
    assert report["passes"] == 1 and report["bytes_read"] <= 1.05 * inputs
    assert report["texts"][0]["tokens"] > MODEL_LENGTH
    for row, other in zip(report["rungs"], reports["few"]["rungs"]):
        assert row["tasks"]["tiny_mc"] == other["tasks"]["tiny_mc"]
        assert row["texts"][0]["nll"] > 0
    assert "tiny_mc" in result.output and "acc_norm,none" in result.output


@pytest.fixture
def no_reads(monkeypatch):
    """Any read of a weight fails the test."""
    from nearswap_mergekit.ladder import weights

    def refuse(*_args, **_kwargs):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(weights.InputReader, "__call__", refuse)


@pytest.mark.parametrize("args, message", [
    (["--task", "tiny_mc", "--limit", "0"], "--limit 0: give 1 or more documents per task (or a share between 0 and 1)"),
    (["--task", "tiny_mc", "--limit", "inf"], "--limit inf: give 1 or more documents per task (or a share between 0 "
     "and 1)"),
    (["--task", "tiny_gen"], "--task tiny_gen: a generate_until task; the ladder scores log-likelihood tasks only "
     "(generation would read the inputs once per generated token): write that t's recipe with --recipes, "
     "merge it with mergekit-yaml, then run lm_eval on the merge"),
    (["--limit", "3"], "--limit is for --task: give --task NAME too"),
    ([], "nothing to score: give --text FILE or --task NAME (or both)"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_read(family, no_reads, args, message):
    ws = family[0]
    extra = ["--include-path", str(ws.root / "tasks")] if "--task" in args else []
    result = invoke(["ladder", ws.root / "chain.yml", *args, *extra, "--json", ws.root / "bad.json"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"Error: {message}"]
    assert not (ws.root / "bad.json").exists()


@pytest.mark.parametrize("task", ["tiny_broken", "tiny_unrenderable"])
def test_a_task_lm_eval_cannot_build_is_named_with_its_yaml(family, no_reads, task):
    """Not the offline data-set hint, nor a traceback: the task's own YAML is at
    fault (a template that does not parse; one that fails on the documents)."""
    ws = family[0]
    result = invoke(["ladder", ws.root / "chain.yml", "--task", task, "--include-path", ws.root / "tasks",
                     "--json", ws.root / "bad.json"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: --task {task}: lm-eval could not build "), line
    assert line.endswith("check the task's YAML") and "offline" not in line, line
    assert not (ws.root / "bad.json").exists()


def test_a_failure_of_lm_eval_on_the_answers_is_one_line(family, monkeypatch):
    from nearswap_mergekit.ladder import tasks

    def fails(*_args, **_kwargs):
        raise ZeroDivisionError("no documents")

    monkeypatch.setattr(tasks, "replay", fails)
    ws = family[0]
    result = invoke(["ladder", ws.root / "chain.yml", "--task", "tiny_mc", "--include-path", ws.root / "tasks",
                     "--limit", "2", "--quiet", "--json", ws.root / "bad.json"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        "Error: lm-eval's results for base failed: ZeroDivisionError: no documents"]
    assert not (ws.root / "bad.json").exists()


def test_without_lm_eval_the_extra_is_named(family, no_reads, monkeypatch):
    ws = family[0]
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    result = invoke(["ladder", ws.root / "chain.yml", "--task", "tiny_mc"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: --task needs lm-evaluation-harness (lm-eval), which is not installed here: "
        "pip install 'nearswap-mergekit[eval]'"]


def test_an_lm_eval_outside_the_extras_pin_is_named(family, no_reads, monkeypatch):
    """The ladder takes over a private step of lm-eval's hf backend: another version
    is refused, with the versions the eval extra allows (from this package's metadata)."""
    import importlib.metadata

    ws = family[0]
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.4.99" if name == "lm-eval" else real(name))
    result = invoke(["ladder", ws.root / "chain.yml", "--task", "tiny_mc", "--include-path", ws.root / "tasks"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: --task needs lm-eval <0.4.14,>=0.4.13 (the versions it is tested with); this environment has "
        "lm-eval 0.4.99: pip install 'nearswap-mergekit[eval]'"]


def test_unknown_tasks_and_data_sets_not_here(family):
    """In a subprocess, offline: an unknown task (lm-eval's suggestion; lm-eval's own
    tasks indexed too), a data set neither here nor downloadable."""
    ws = family[0]
    env = {"HF_DATASETS_OFFLINE": "1"}
    unknown = run_cli("nearswap-mergekit", "ladder", "chain.yml", "--task", "tiny_mcq", "--include-path", "tasks",
                      "--json", "bad.json", cwd=ws.root, env=env)
    assert unknown.returncode == 2, unknown.stderr
    (line,) = unknown.stderr.strip().splitlines()
    assert line.startswith("Error: --task tiny_mcq: no task, group or tag of that name in lm-eval's tasks or "
                           "tasks. Did you mean: tiny_mc, ")
    hub = run_cli("nearswap-mergekit", "ladder", "chain.yml", "--task", "tiny_hub", "--include-path", "tasks",
                  "--json", "bad.json", cwd=ws.root, env=env)
    assert hub.returncode == 2, hub.stderr
    (line,) = hub.stderr.strip().splitlines()
    assert line.startswith("Error: --task tiny_hub: its data set could not be loaded here (")
    assert line.endswith("local files (dataset_path: json, data_files) in a task under --include-path work offline")
    assert not (ws.root / "bad.json").exists()


def test_a_group_is_lm_eval_s_aggregate_of_its_tasks(family, manager):
    ws, _reports, merges, _inputs = family
    result = ladder(ws.root / "chain.yml", "--task", "tiny_group", "--include-path", ws.root / "tasks", "--limit", "4",
                    *[arg for t in TS for arg in ("--t", t)], "--quiet", "--json", ws.root / "group.json")
    assert result.exit_code == 0, result.output
    report = json.loads((ws.root / "group.json").read_text())
    for row in report["rungs"]:
        import lm_eval

        expected = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={merges[row['label']]},dtype=float32",
                                           tasks=["tiny_group"], batch_size=1, device="cpu", limit=4,
                                           task_manager=manager)["results"]
        assert set(row["tasks"]) == set(expected) == {"tiny_group", "tiny_mc", "tiny_letters"}
        for task in expected:
            assert row["tasks"][task]["acc,none"] == expected[task]["acc,none"], (row["label"], task)


def test_merged_lm_is_an_lm_eval_model_for_one_t(family, manager):
    """nearswap_mergekit.ladder.lm.merged_lm: simple_evaluate(model=...) on one t,
    merged on access, equals lm-eval's hf backend on the written merge."""
    import lm_eval

    from nearswap_mergekit.ladder.lm import merged_lm

    ws, _reports, merges, _inputs = family
    before = {path for path in ws.root.rglob("*")}
    settings = dict(tasks=["tiny_mc", "tiny_ll"], limit=4, num_fewshot=1, task_manager=manager)
    got = lm_eval.simple_evaluate(model=merged_lm(str(ws.root / "chain.yml"), t=float(TS[0])), **settings)["results"]
    expected = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={merges[f't={float(TS[0]):g}']},"
                                       "dtype=float32", batch_size=1, device="cpu", **settings)["results"]
    for key in ("acc,none", "acc_norm,none"):
        assert got["tiny_mc"][key] == expected["tiny_mc"][key]
    assert got["tiny_ll"]["perplexity,none"] == pytest.approx(expected["tiny_ll"]["perplexity,none"], rel=1e-6)
    assert {path for path in ws.root.rglob("*")} == before


def test_the_demo_quartet_equals_lm_eval_on_its_merge(family, manager, tmp_path):
    """The demo quartet (float16, `tokenizer: source: base`, a tokenizer that adds no
    BOS): its recipe's own t against the stock merge, two-shot on four documents."""
    import shutil

    import lm_eval
    from conftest import CONFIGS

    ws = Workspace(tmp_path)
    build_family(ws.models)
    shutil.copy(CONFIGS / "demo-quartet.yml", ws.root / "quartet.yml")
    tasks = family[0].root / "tasks"
    result = run_cli("nearswap-mergekit", "ladder", "quartet.yml", "--task", "tiny_mc", "--task", "tiny_ppl",
                     "--task", "tiny_ll", "--include-path", tasks, "--limit", "4", "--num-fewshot", "2", "--quiet",
                     "--json", "quartet.json", cwd=ws.root, check=True)
    report = json.loads((ws.root / "quartet.json").read_text())
    assert report["requests"]["max_length"] == 256 and report["passes"] == 1
    inputs = sum((ws.models / name / "model.safetensors").stat().st_size for name in ws.models.iterdir()
                 if (ws.models / name / "model.safetensors").exists())
    assert report["bytes_read"] <= 1.05 * inputs
    ws.merge("quartet.yml", "merged")
    for row, folder in zip(report["rungs"], (ws.models / "miqu", ws.root / "merged")):
        expected = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32",
                                           tasks=list(TASKS), batch_size=1, device="cpu",
                                           limit=4, num_fewshot=2, task_manager=manager)["results"]
        got = row["tasks"]
        for key in ("acc,none", "acc_norm,none"):
            assert got["tiny_mc"][key] == expected["tiny_mc"][key], (row["label"], key)
        assert got["tiny_ll"]["acc,none"] == expected["tiny_ll"]["acc,none"]
        for task, key in (("tiny_ppl", "bits_per_byte,none"), ("tiny_ll", "perplexity,none")):
            assert got[task][key] == pytest.approx(expected[task][key], rel=1e-6), (row["label"], key)
    assert "tiny_ppl" in result.stdout


def test_the_whole_model_path_gives_the_same_answers(family):
    """--whole-model (the path of families not streamed): the same results as the
    layer-by-layer pass, reading the inputs once per batch instead."""
    ws, reports, _merges, _inputs = family
    result = ladder(ws.root / "chain.yml", "--task", "tiny_mc", "--task", "tiny_ll", "--include-path",
                    ws.root / "tasks", "--limit", "5", "--num-fewshot", "2", "--t", TS[0], "--whole-model",
                    "--quiet", "--json", ws.root / "whole.json")
    assert result.exit_code == 0, result.output
    report = json.loads((ws.root / "whole.json").read_text())
    assert report["path"] == "whole model: --whole-model"
    for row, other in zip(report["rungs"], reports["few"]["rungs"]):
        assert row["tasks"]["tiny_mc"] == other["tasks"]["tiny_mc"]
        assert row["tasks"]["tiny_ll"]["acc,none"] == other["tasks"]["tiny_ll"]["acc,none"]
        assert row["tasks"]["tiny_ll"]["perplexity,none"] == pytest.approx(
            other["tasks"]["tiny_ll"]["perplexity,none"], rel=1e-6)


def test_greedy_is_whether_every_continuation_token_is_the_argmax():
    """HFLM's is_greedy, on logits made by hand (tiny random models are never greedy,
    so the equality tests above see only False): one forward answering two pairs."""
    from nearswap_mergekit.ladder.requests import RequestWindow, add_batch

    logits = torch.full((1, 4, 5), -5.0)
    logits[0, 2, 3] = logits[0, 3, 1] = 5.0  # positions 2 and 3 predict tokens 3 and 1
    window = RequestWindow(ids=(0, 0, 0, 0), answers=((0, (3, 1)), (1, (3, 2))))
    scored = {}
    add_batch(scored, [window], logits)
    assert scored[0][1] is True and scored[1][1] is False
    expected = torch.log_softmax(logits[0, 2:], dim=-1)
    assert scored[0][0] == pytest.approx(float(expected[0, 3] + expected[1, 1]))
    assert scored[1][0] == pytest.approx(float(expected[0, 3] + expected[1, 2]))
