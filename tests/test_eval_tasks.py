"""Evaluation prompts and scoring: hand-made cases, RULER's own scoring functions and templates as references,
and the structure of every generated prompt (lengths, needles, answers), with the embedded SmolLM2 tokenizer."""

from __future__ import annotations

import math
import re

import pytest
import yaml
from long_context_eval.data.synthetic import constants as ruler_constants  # plain module: templates only
from long_context_eval.eval.synthetic import constants as ruler_metrics  # plain module: metric functions only

from duoattn.data.haystack import essays_path
from duoattn.eval import scoring
from duoattn.eval.niah import NEEDLE, NiahTask
from duoattn.eval.passkey import PasskeyTask, passkey_sample
from duoattn.eval.prompts import encode_prompt, fit_units
from duoattn.eval.ruler import TASKS, RulerTask, common_words, freq_words, qa, variable_tracking
from duoattn.eval.ruler import niah as ruler_niah
from duoattn.eval.ruler.data import qa_dataset
from duoattn.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


# ------------------------------------------------------------------------------------------------ scoring
def test_string_match_by_hand():
    assert scoring.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert scoring.string_match_all("  ABC-def\x07 ", ["abc-DEF"]) == 1.0
    assert scoring.string_match_all("nothing", ["123"]) == 0.0
    assert scoring.string_match_part("It is in france.", ["Paris", "France"]) == 1.0
    assert scoring.string_match_part("It is in Spain.", ["Paris", "France"]) == 0.0
    assert scoring.clean_prediction("  a\tb\x00c \n") == "a\nb\nc"
    with pytest.raises(ValueError, match="at least one reference"):
        scoring.string_match_all("x", [])


CASES = [
    ("The special magic number is 1234567.", ["1234567"]),
    ("1. apple 2. Pear 3. plum", ["apple", "pear", "fig", "plum"]),
    ("VAR ABCDE VAR FGHIJ", ["ABCDE", "FGHIJ", "KLMNO"]),
    ("", ["x"]),
    ("Normandy is in FRANCE", ["France", "France", "Italy"]),
]


@pytest.mark.parametrize("prediction, refs", CASES)
def test_string_match_equals_rulers_own_functions(prediction, refs):
    assert 100 * scoring.string_match_all(prediction, refs) == pytest.approx(
        ruler_metrics.string_match_all_per_sample([prediction], [refs])[0])
    assert 100 * scoring.string_match_part(prediction, refs) == pytest.approx(
        ruler_metrics.string_match_part_per_sample([prediction], [refs])[0])


def test_word_recall_by_hand():
    ref = ["eat a sandwich and sit in Dolores Park on a sunny day"]  # 11 distinct words ("a" twice)
    assert scoring.word_recall(" to eat a sandwich and sit in Dolores Park on a sunny day.\n", ref) == 1.0
    assert scoring.word_recall("Eat a sandwich!", ref) == pytest.approx(3 / 11)
    assert scoring.word_recall("dolores-park, sunny", ref) == pytest.approx(3 / 11)
    assert scoring.word_recall("go to the beach", ref) == 0.0
    assert scoring.score("passkey", "The pass key is 12345. 678", ["12345"]) == 1.0
    assert scoring.score("passkey", " 678 then 12345", ["12345"]) == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        scoring.score("bleu", "x", ["x"])


def test_zeta_and_zipf_counts():
    assert freq_words.zeta(2.0) == pytest.approx(math.pi**2 / 6, rel=0, abs=1e-12)
    assert freq_words.zeta(4.0) == pytest.approx(math.pi**4 / 90, rel=0, abs=1e-12)
    z = math.pi**2 / 6
    assert freq_words.zipf_counts(1000, 4, 2.0) == [int(1000 / z), int(250 / z), int(1000 / 9 / z), int(62.5 / z)]


# ------------------------------------------------------------------------------------------------ prompts
def test_fit_units_finds_the_largest_count_that_fits():
    def build(n):
        return list(range(3 * n + 5)), n

    for budget, lo, hi, want in [(50, 0, 1000, 15), (5, 0, 9, 0), (1000, 2, 7, 7), (51, 1, 10**9, 15)]:
        n, ids, extra = fit_units(build, budget, lo, hi)
        assert (n, len(ids), extra) == (want, 3 * want + 5, want)
    with pytest.raises(ValueError, match="needs 11 tokens with the fewest units"):
        fit_units(build, 10, 2, 100)


def test_encode_prompt_raw_and_chat(tok):
    raw = encode_prompt(tok, "Question: what?", " Answer:", chat_template=False)
    assert raw == tok("Question: what? Answer:").input_ids
    chat = tok.decode(encode_prompt(tok, "Question: what?", " Answer:", chat_template=True))
    assert chat.endswith("<|im_start|>user\nQuestion: what?<|im_end|>\n<|im_start|>assistant\nAnswer:")


def test_templates_are_rulers(tok):
    def theirs(family):
        return ruler_constants.TASKS[family]["template"] + ruler_constants.TASKS[family]["answer_prefix"]

    ours = ruler_niah.TEMPLATE + ruler_niah.ANSWER_PREFIX
    assert ours.replace("{type_v}", "{type_needle_v}") == theirs("niah")
    assert variable_tracking.TEMPLATE + variable_tracking.ANSWER_PREFIX == theirs("variable_tracking")
    assert common_words.TEMPLATE + common_words.ANSWER_PREFIX == theirs("common_words_extraction")
    assert freq_words.TEMPLATE + freq_words.ANSWER_PREFIX == theirs("freq_words_extraction")
    assert qa.TEMPLATE + qa.ANSWER_PREFIX == theirs("qa")
    families = {"niah": ruler_niah, "variable_tracking": variable_tracking, "common_words_extraction": common_words,
                "freq_words_extraction": freq_words, "qa": qa}
    for family, module in families.items():
        assert module.TOKENS_TO_GENERATE == ruler_constants.TASKS[family]["tokens_to_generate"]
    table = yaml.safe_load((essays_path().parents[3] / "synthetic.yaml").read_text())
    assert set(table) == set(TASKS)
    for name, spec in TASKS.items():
        assert families[table[name]["task"]] is spec.family
        args = table[name]["args"]
        if spec.family is ruler_niah:
            assert spec.params == {"haystack": args["type_haystack"], "type_k": args["type_needle_k"],
                                   "type_v": args["type_needle_v"], "num_k": args["num_needle_k"],
                                   "num_v": args["num_needle_v"], "num_q": args["num_needle_q"]}


def test_niah_prompts_fit_and_hide_the_needle_at_the_depth(tok):
    task = NiahTask(lengths=[600, 1200], depths=[0.0, 0.5, 1.0])
    samples = task.samples(tok, chat_template=False)
    assert [s.key for s in samples] == ["L600/D0", "L600/D0.5", "L600/D1", "L1200/D0", "L1200/D0.5", "L1200/D1"]
    for s in samples:
        length = s.meta["length"]
        assert length - 32 - 80 <= len(s.input_ids) <= length - 32  # within one sentence of the budget
        text = tok.decode(s.input_ids)
        assert text.count(NEEDLE) == 1 and text.endswith("\n\nAnswer: The best thing to do in San Francisco is")
        book = text[text.index("<book> ") + 7 : text.index(" </book>")]
        position = book.index(NEEDLE) / len(book)
        assert abs(position - s.meta["depth"]) < 0.12, (s.key, position)
    assert tok.decode(samples[0].input_ids).startswith("This is a very long story book: <book> " + NEEDLE)
    with pytest.raises(ValueError, match=r"answer words \['beach'\] do not occur"):
        NiahTask(answer="the beach")
    with pytest.raises(ValueError, match="depths must be in"):
        NiahTask(depths=[1.5])


def test_passkey_task_is_the_demo_prompt(tok):
    samples = PasskeyTask(lengths=[300], samples_per_length=2, seed=7).samples(tok, chat_template=False)
    assert samples[1].input_ids == passkey_sample(tok, 300, depth=0.75, seed=7 + 300 * 1000 + 1).input_ids
    with pytest.raises(ValueError, match="raw completion prompt"):
        PasskeyTask().samples(tok, chat_template=True)


# ------------------------------------------------------------------------------------------------- RULER
def ruler_sample(tok, task, length, index=0, chat=False):
    return RulerTask(tasks=[task], lengths=[length], samples_per_task=index + 1).samples(tok, chat)[index]


@pytest.mark.parametrize("task", [t for t in TASKS if t != "qa_2"])
def test_ruler_prompts_fit_hold_their_answers_and_are_reproducible(tok, task):
    length = 1024
    s = ruler_sample(tok, task, length, index=1)
    budget = length - TASKS[task].family.TOKENS_TO_GENERATE
    slack = 250 if task.startswith("qa") else 0.15 * budget  # QA adds whole paragraphs (~150 tokens each)
    assert budget - slack <= len(s.input_ids) <= budget
    text = tok.decode(s.input_ids)
    assert s.references and all(ref in text for ref in s.references)
    assert s.metric == ("string_match_part" if task.startswith("qa") else "string_match_all")
    assert s.input_ids == ruler_sample(tok, task, length, index=1).input_ids  # same seed, same prompt
    assert s.input_ids != ruler_sample(tok, task, length, index=0).input_ids


def test_ruler_niah_wording_and_needles(tok):
    single = tok.decode(ruler_sample(tok, "niah_single_1", 1024).input_ids)
    assert single.startswith("A special magic number is hidden within the following text.")
    assert single.endswith("mentioned in the provided text is")
    s = ruler_sample(tok, "niah_multivalue", 2048)
    text = tok.decode(s.input_ids)
    assert text.startswith("Some special magic numbers are hidden") and text.endswith("provided text are")
    key = re.search(r"for (\S+) mentioned in the provided text are$", text).group(1)
    assert sorted(re.findall(rf"magic numbers for {re.escape(key)} is: (\d{{7}})\.", text)) == sorted(s.references)
    query = ruler_sample(tok, "niah_multiquery", 2048)
    asked = re.search(r"numbers for (\S+), (\S+), (\S+), and (\S+) mentioned in the provided text are$",
                      tok.decode(query.input_ids))
    assert asked is not None and len(query.references) == 4
    uuid = ruler_sample(tok, "niah_multikey_3", 1024)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid.references[0])


def test_ruler_vt_cwe_fwe_structure(tok):
    vt = ruler_sample(tok, "vt", 1024)
    text = tok.decode(vt.input_ids)
    names = vt.references
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = re.search(rf"VAR {names[0]} = (\d{{5}})", text).group(1)
    for a, b in zip(names, names[1:]):
        assert text.index(f"VAR {b} = VAR {a} ") > text.index(f"VAR {a} =")
    assert text.endswith(f"5 variables are assgined the value {value}, they are: ")
    assert text.count("Memorize and track") == 2  # the solved example, then the question
    assert text.startswith(" Memorize and track")

    cwe = ruler_sample(tok, "cwe", 1024)  # below 4K: common words 6 times, the others once
    text = tok.decode(cwe.input_ids)
    listing = text.split("Memorize the ones that appear most often.\n")[2].split("\nQuestion")[0]
    counts = {}
    for word in re.findall(r"\d+\. (\S+)", listing):
        counts[word] = counts.get(word, 0) + 1
    assert sorted(w for w, c in counts.items() if c == 6) == sorted(cwe.references)
    assert set(counts.values()) == {1, 6} and len(cwe.references) == 10

    fwe = ruler_sample(tok, "fwe", 1024)
    words = tok.decode(fwe.input_ids).split("coded words. ")[1].split("\nQuestion")[0].split()
    top = sorted(set(words), key=words.count, reverse=True)
    assert top[0] == "..." and top[1:4] == fwe.references
    assert [words.count(w) for w in top[1:4]] == sorted((words.count(w) for w in top[1:4]), reverse=True)


def test_ruler_qa_and_chat_prompts(tok):
    s = ruler_sample(tok, "qa_1", 1500, index=2)
    text = tok.decode(s.input_ids)
    assert s.meta["question"] in text and text.endswith(f"Question: {s.meta['question']} Answer:")
    assert re.findall(r"Document (\d+):\n", text) == [str(i + 1) for i in range(s.meta["documents"])]
    chat = tok.decode(ruler_sample(tok, "qa_1", 1500, index=2, chat=True).input_ids)
    assert "<|im_start|>user\nAnswer the question" in chat and chat.endswith("<|im_start|>assistant\nAnswer:")
    with pytest.raises(ValueError, match="unknown RULER tasks"):
        RulerTask(tasks=["niah_single_9"])
    with pytest.raises(ValueError, match="choose a longer length"):
        ruler_sample(tok, "qa_1", 100)


def test_ruler_prompts_at_4k_in_chat_depend_on_their_seed_only(tok):
    """Every task at 4K (cwe's long setting; qa_2's ten paragraphs fit) as chat prompts: within the budget, the
    answers (qa: the gold paragraphs) in the prompt, and each sample a function of its seed alone."""
    length, seed = 4096, 7
    samples = {s.meta["task"]: s for s in RulerTask(tasks=list(TASKS), lengths=[length], samples_per_task=1,
                                                     seed=seed).samples(tok, chat_template=True)}
    assert set(samples) == set(TASKS)
    for task, s in samples.items():
        budget = length - TASKS[task].family.TOKENS_TO_GENERATE
        slack = 250 if task.startswith("qa") else 0.15 * budget
        assert budget - slack <= len(s.input_ids) <= budget, task
        text = tok.decode(s.input_ids)
        assert text.count("<|im_start|>user\n") == 1 and "<|im_start|>assistant\n" in text, task
        if task.startswith("qa"):
            questions, docs = qa_dataset(TASKS[task].params["dataset"])
            assert s.meta["question"] == questions[0]["query"]
            assert all(docs[d] in text for d in questions[0]["gold"]), task
        else:
            assert all(ref in text for ref in s.references), task

    listing = tok.decode(samples["cwe"].input_ids).split("most often.\n")[2].split("\nQuestion")[0]
    counts = {}
    for word in re.findall(r"\d+\. (\S+)", listing):
        counts[word] = counts.get(word, 0) + 1
    assert set(counts.values()) == {3, 30}  # 4K and above: common words 30 times, the others 3 times
    assert sorted(w for w, c in counts.items() if c == 30) == sorted(samples["cwe"].references)

    for task in ("vt", "cwe", "qa_2"):  # the same alone as among all tasks; another seed, another prompt
        def alone(seed, task=task):
            return RulerTask(tasks=[task], lengths=[length], samples_per_task=1, seed=seed).samples(tok, True)[0]

        assert alone(seed).input_ids == samples[task].input_ids, task
        assert alone(seed + 1).input_ids != samples[task].input_ids, task
